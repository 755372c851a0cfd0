"""Per-node speeds learned from completion reports, with the operator's settings as priors. PURE.

The load model (`policy`) turns work into time with five numbers per node (`Speeds`): prefill
milliseconds per uncached prompt token and the fixed part of a time to first token,
milliseconds per decode step (one output token), the mean output length, and the mean
uncached prompt tokens per request. The settings give
priors; every completion report refines the node's own values (`learn`), which live in the
replicated node record, so every replica learns the same values from the same reports and a
new leader starts warm.

Each value is a running mean that starts from the prior as one pseudo-sample and becomes an
exponentially weighted mean over the last ~`WINDOW` samples, so a node whose real speed
differs from the setting converges to its own within a few dozen completions and follows
slow drift. A sample outside [prior / `SPREAD`, prior x `SPREAD`] is clamped into it: one
absurd report moves a value at most by a bounded step.

Samples, from what a report carries (every field optional) and what the leader stamped:
- output tokens and new (uncached) prompt tokens: as reported (new tokens fall back to the
  blocks the router itself expected the node to compute);
- decode ms per token = (latency - time to first token) / (output tokens - 1), the latency
  being the engine's own, or else the leader's route-to-completion time;
- prefill: a time to first token is a fixed part (the step that admits the request, the
  engine's per-request overheads, the rest of the step under way when it arrived) plus
  prefill time per uncached token. Both are fitted by an exponentially weighted least-squares
  line of (time to first token - the wait the load model expected when it routed the
  request) over uncached tokens, over the last ~`FIT_WINDOW` requests: the slope is the
  prefill time per token, the intercept `first_token_ms`. Only requests that found a free
  running slot and at most one step's worth of prefill ahead (`clear`) are fitted: under load
  a time to first token is mostly queueing, which no fit can tell apart from slow prefill.
  The fit is used from `WARM` samples on, once the prompts' sizes vary enough to give a slope;
  past that, a sample counts at most twice what the line predicts for it.
  A node's prefill fit is noisy (batch-mates and the step under way when a request arrives
  are in every time to first token), and a router that trusts noise chases it.

Every value the load model prices a node with is therefore the node's own shrunk towards the
fleet's (`pool`: the nodes' values weighted by their samples), empirical-Bayes style: with a
full window of evidence the node's own counts half. A node that is really faster or slower
stands apart from the fleet by half its difference, which is enough to route around it; a
node that differs only by noise barely does; a new node starts at the fleet's values, not at
the settings.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

WINDOW = 32
SPREAD = 16.0
FIT_WINDOW = 128
WARM = 16


@dataclass(frozen=True, slots=True)
class Speeds:
    """How fast a node works: what the load model converts tokens into milliseconds with."""

    prefill_ms_per_token: float
    decode_ms_per_token: float
    output_tokens: float
    new_tokens: float = 0.0  # mean uncached prompt tokens per request (prefill of queued ones)
    first_token_ms: float = 0.0  # a time to first token's fixed part (0: one decode step)

    @property
    def fixed_ms(self) -> float:
        return self.first_token_ms or self.decode_ms_per_token


# Llama-3-8B on one H100 with vLLM (docs/simulation.md): ~28k prefill tokens/s, ~10 ms per
# decode step under load; 256 output tokens is a generic chat answer.
DEFAULT_SPEEDS = Speeds(prefill_ms_per_token=1000 / 28_000, decode_ms_per_token=10.0,
                        output_tokens=256.0, new_tokens=0.0)


@dataclass(frozen=True, slots=True)
class Learned:
    """A node's learned values and how many samples each has seen (0: the prior holds)."""

    prefill_n: int = 0
    prefill_ms_per_token: float = 0.0  # the fit's slope (0: no usable fit yet)
    decode_n: int = 0
    decode_ms_per_token: float = 0.0
    output_n: int = 0
    output_tokens: float = 0.0
    new_tokens: float = 0.0
    first_token_ms: float = 0.0        # the fit's intercept
    # the prefill fit's weighted moments: mean tokens, mean ms, variance, covariance
    fit: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)

    def wire(self) -> list[Any]:
        return [self.prefill_n, self.prefill_ms_per_token, self.decode_n,
                self.decode_ms_per_token, self.output_n, self.output_tokens, self.new_tokens,
                self.first_token_ms, list(self.fit)]

    @classmethod
    def from_wire(cls, w: list[Any] | tuple[Any, ...]) -> Learned:
        mx, my, vx, cxy = w[8]
        return cls(int(w[0]), float(w[1]), int(w[2]), float(w[3]), int(w[4]), float(w[5]),
                   float(w[6]), float(w[7]), (float(mx), float(my), float(vx), float(cxy)))


NOTHING_LEARNED = Learned()


@dataclass(frozen=True, slots=True)
class Report:
    """What a completion report says about one request (None: not given)."""

    prompt_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int | None = None
    ttft_ms: int | None = None
    latency_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Pool:
    """The fleet's learned speeds: the nodes' values weighted by their (windowed) samples.

    Three groups, each with its own weight: the prefill fit (per token, fixed part), the
    decode step, and the output and uncached prompt means. A group no node has learned is
    None.
    """

    prefill: tuple[float, float] | None
    decode: tuple[float] | None
    output: tuple[float, float] | None


def _groups(learned: Learned) -> tuple[tuple[float, tuple[float, ...]], ...]:
    """(weight, values) of each group of a node's learned values, in `Pool`'s order."""
    return ((float(min(learned.prefill_n, FIT_WINDOW)) if learned.prefill_ms_per_token > 0
             else 0.0, (learned.prefill_ms_per_token, learned.first_token_ms)),
            (float(min(learned.decode_n, WINDOW)), (learned.decode_ms_per_token,)),
            (float(min(learned.output_n, WINDOW)), (learned.output_tokens, learned.new_tokens)))


def pool(fleet: Iterable[Learned]) -> Pool:
    """The fleet's learned speeds (deterministic: plain sums in the order given)."""
    weights = [0.0, 0.0, 0.0]
    sums = [[0.0, 0.0], [0.0], [0.0, 0.0]]
    for learned in fleet:
        for i, (weight, values) in enumerate(_groups(learned)):
            weights[i] += weight
            sums[i] = [total + weight * value for total, value in zip(sums[i], values,
                                                                       strict=True)]
    prefill, decode, output = (tuple(total / weight for total in group) if weight else None
                               for weight, group in zip(weights, sums, strict=True))
    return Pool(prefill, decode, output)  # type: ignore[arg-type]


def speeds(learned: Learned, prior: Speeds, fleet: Pool | None = None) -> Speeds:
    """A node's speeds: its learned values shrunk towards the fleet's, else the prior's.

    With a full window of evidence the node's own value counts half (`FIT_WINDOW` samples
    for the prefill fit, `WINDOW` for the means). Where neither the node nor the fleet has
    learned a group, the prior holds; where only the fleet has, a node starts at the fleet's.
    Without `fleet`, the node's own values stand alone.
    """
    if fleet is None:
        fleet = pool((learned,))
    priors = ((prior.prefill_ms_per_token, prior.first_token_ms),
              (prior.decode_ms_per_token,), (prior.output_tokens, prior.new_tokens))
    shared = (fleet.prefill, fleet.decode, fleet.output)
    out: list[float] = []
    for (weight, own), window, common, default in zip(
            _groups(learned), (FIT_WINDOW, WINDOW, WINDOW), shared, priors, strict=True):
        if common is None:
            out.extend(default)
            continue
        share = weight / (weight + window)
        out.extend(share * mine + (1 - share) * theirs
                   for mine, theirs in zip(own, common, strict=True))
    per_token, first, decode, output, new = out
    return Speeds(per_token, decode, output, new, first)


def _mean(n: int, value: float, prior: float, sample: float) -> float:
    """Fold `sample` into a mean of `n` samples (the prior counts as one before the first)."""
    if prior > 0:
        sample = min(max(sample, prior / SPREAD), prior * SPREAD)
    old = value if n else prior
    return old + (sample - old) / min(n + 2, WINDOW)


def learn(learned: Learned, report: Report, prior: Speeds, *, elapsed_ms: int,
          expected_wait_ms: float, expected_new_tokens: int, clear: bool = True) -> Learned:
    """Fold one completion report into a node's learned speeds (deterministic, total).

    `elapsed_ms` is the leader's route-to-completion time, `expected_wait_ms` the wait the
    load model predicted when the request was routed, `expected_new_tokens` the prompt tokens
    the router expected the node to compute, `clear` whether it found a free running slot and
    at most one step of prefill ahead (only then does its time to first token teach prefill
    speed). Fields a report lacks teach nothing.
    """
    new = expected_new_tokens
    if report.prompt_tokens is not None and report.cached_tokens is not None:
        new = max(report.prompt_tokens - report.cached_tokens, 0)
    out = report.output_tokens
    pre_n, pre, dec_n, dec = (learned.prefill_n, learned.prefill_ms_per_token,
                              learned.decode_n, learned.decode_ms_per_token)
    out_n, out_mean, new_mean = learned.output_n, learned.output_tokens, learned.new_tokens
    if out is not None:
        out_mean = _mean(out_n, out_mean, prior.output_tokens, float(out))
        new_mean = _mean(out_n, new_mean, 0.0, float(new)) if out_n else float(new)
        out_n += 1
    ttft = report.ttft_ms
    if ttft is not None and out is not None and out >= 2:
        latency = report.latency_ms if report.latency_ms is not None else elapsed_ms
        if latency > ttft:
            dec = _mean(dec_n, dec, prior.decode_ms_per_token, (latency - ttft) / (out - 1))
            dec_n += 1
    fit, first = learned.fit, learned.first_token_ms
    if clear and ttft is not None:
        y = max(ttft - expected_wait_ms, 0.0)
        if pre > 0:  # a fitted line: a sample counts at most twice its prediction
            y = min(y, 2 * (first + pre * new))
        fit = _fold(fit, pre_n, float(new), y)
        pre_n += 1
        mx, my, vx, cxy = fit
        if pre_n >= WARM and vx > (0.05 * mx) ** 2 and vx > 0:
            per_token = prior.prefill_ms_per_token
            slope = cxy / vx
            if my - slope * mx < 0:  # a line through no fixed part: the mean rate instead
                slope = my / mx
            pre = min(max(slope, per_token / SPREAD), per_token * SPREAD)
            first = max(my - pre * mx, 0.0)
    return Learned(min(pre_n, 1 << 40), pre, min(dec_n, 1 << 40), dec, min(out_n, 1 << 40),
                   out_mean, new_mean, first, fit)


def _fold(fit: tuple[float, float, float, float], n: int, x: float,
          y: float) -> tuple[float, float, float, float]:
    """Fold (x, y) into exponentially weighted means, variance of x and covariance."""
    mx, my, vx, cxy = fit
    alpha = 1 / min(n + 1, FIT_WINDOW)
    dx, dy = x - mx, y - my
    return (mx + alpha * dx, my + alpha * dy, (1 - alpha) * (vx + alpha * dx * dx),
            (1 - alpha) * (cxy + alpha * dx * dy))

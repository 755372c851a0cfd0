"""Workloads for the fleet simulator: the Mooncake trace and generated ones (deterministic).

Every workload is a list of `Request`s sorted by arrival, with prompts as chained block ids:
two requests share block id i only if their prompts agree up to the end of block i, so a
shared leading run of ids is reusable KV cache (the Mooncake trace's own convention).

- `mooncake`: `../shared/traces/mooncake_synthetic_trace.jsonl` (512-token blocks); `speedup`
  compresses its arrival times (the trace spans ~17 minutes).
- `shared_prompts`: many users behind a few long system prompts (popularity skewed), each
  with a short unique question.
- `multi_turn`: conversations whose prompt is the whole history so far; each turn's answer
  becomes part of the next turn's prompt (output blocks are named, so engines cache them).
- `no_sharing`: every prompt unique; the control where cache-aware routing cannot help.

Offered load: `capacity_rps` is what a fleet completes per second on a workload when nothing
is reused (a saturated batch, see its docstring), and `at_rate` rescales a workload's arrival
times to a chosen rate, so a load of 0.8 means 80% of that capacity whatever the workload and
engine; `arrival_rate` is the mean rate both use.
"""

from __future__ import annotations

import hashlib
import json
import random
import statistics
from collections.abc import Iterable, Sequence

from .engine import EngineConfig, Request, fresh


class _Ids:
    """Chained block ids: id(parent, content) is stable and unique per (parent, content)."""

    def __init__(self, namespace: str) -> None:
        self._ns = namespace.encode()

    def block(self, parent: int, content: object) -> int:
        digest = hashlib.blake2b(self._ns + repr((parent, content)).encode(), digest_size=8)
        return int.from_bytes(digest.digest(), "big") >> 1  # < 2**63

    def chain(self, parent: int, contents: Iterable[object]) -> list[int]:
        out = []
        for content in contents:
            parent = self.block(parent, content)
            out.append(parent)
        return out


def mooncake(path: str, limit: int | None = None, speedup: float = 1.0) -> list[Request]:
    """The Mooncake trace: timestamp (ms), input/output lengths, 512-token block ids."""
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if limit is not None and i >= limit:
                break
            row = json.loads(line)
            out.append(Request(f"mc{i}", [int(h) for h in row["hash_ids"]],
                               int(row["input_length"]), max(int(row["output_length"]), 1),
                               float(row["timestamp"]) / speedup))
    out.sort(key=lambda r: r.arrival_ms)
    return out


def shared_prompts(requests: int, rate_per_s: float, seed: int = 1, systems: int = 8,
                   system_tokens: int = 4096, question_tokens: tuple[int, int] = (64, 1024),
                   output_tokens: tuple[int, int] = (64, 512), block_size: int = 16) -> list[Request]:
    """Users behind a few long system prompts (Zipf-like popularity)."""
    rng = random.Random(seed)
    ids = _Ids(f"shared-{seed}")
    heads = [ids.chain(0, ((s, b) for b in range(system_tokens // block_size)))
             for s in range(systems)]
    weights = [1 / (k + 1) for k in range(systems)]
    out, t = [], 0.0
    for i in range(requests):
        t += rng.expovariate(rate_per_s) * 1000
        head = rng.choices(heads, weights)[0]
        q_tokens = rng.randint(*question_tokens)
        tail = ids.chain(head[-1], ((i, b) for b in range(-(-q_tokens // block_size))))
        out.append(Request(f"sp{i}", head + tail, system_tokens + q_tokens,
                           rng.randint(*output_tokens), t))
    return out


def multi_turn(conversations: int, turns: int, rate_per_s: float, seed: int = 2,
               system_tokens: int = 1024, user_tokens: tuple[int, int] = (32, 256),
               output_tokens: tuple[int, int] = (64, 512), think_s: float = 20.0,
               block_size: int = 16) -> list[Request]:
    """Chats whose history grows: each turn's prompt = every earlier prompt and answer."""
    rng = random.Random(seed)
    ids = _Ids(f"chat-{seed}")
    system = ids.chain(0, (("sys", b) for b in range(system_tokens // block_size)))
    out, start = [], 0.0
    for c in range(conversations):
        start += rng.expovariate(rate_per_s / turns) * 1000
        history, t = list(system), start
        for turn in range(turns):
            u_blocks = -(-rng.randint(*user_tokens) // block_size)
            prompt = history + ids.chain(history[-1], ((c, turn, "u", b) for b in range(u_blocks)))
            out_tokens = rng.randint(*output_tokens)
            answer = ids.chain(prompt[-1], ((c, turn, "a", b)
                                            for b in range(out_tokens // block_size)))
            out.append(Request(f"mt{c}-{turn}", prompt, len(prompt) * block_size, out_tokens, t,
                               session=f"chat-{c}", output_blocks=answer))
            history = prompt + answer
            t += (rng.expovariate(1 / think_s) + 5) * 1000
    out.sort(key=lambda r: r.arrival_ms)
    return out


def no_sharing(requests: int, rate_per_s: float, seed: int = 3,
               prompt_tokens: tuple[int, int] = (1024, 8192),
               output_tokens: tuple[int, int] = (64, 512), block_size: int = 16) -> list[Request]:
    """Every prompt unique (the control)."""
    rng = random.Random(seed)
    ids = _Ids(f"unique-{seed}")
    out, t = [], 0.0
    for i in range(requests):
        t += rng.expovariate(rate_per_s) * 1000
        tokens = rng.randint(*prompt_tokens)
        out.append(Request(f"ns{i}", ids.chain(i + 1, range(-(-tokens // block_size))), tokens,
                           rng.randint(*output_tokens), t))
    return out


def arrival_rate(requests: Sequence[Request]) -> float:
    """Mean arrival rate (requests/s): the inverse of the mean gap between arrivals.

    Raises ValueError for fewer than two requests or a zero time span.
    """
    times = [r.arrival_ms for r in requests]
    span_ms = max(times, default=0.0) - min(times, default=0.0)
    if len(times) < 2 or span_ms <= 0:
        raise ValueError("a rate needs at least two requests at different times")
    return (len(times) - 1) * 1000 / span_ms


def capacity_rps(requests: Sequence[Request], config: EngineConfig, nodes: int) -> float:
    """Requests/s `nodes` engines of `config` complete on this workload, with no prefix reuse.

    A saturated engine runs a full batch of `running` = min(max_num_seqs, the requests whose
    mean prompt and output fit in the KV pool) sequences. Per request it spends:

    - its share of the decode steps: mean output tokens x step_ms(0, running) / running
      (each step advances every running request by one token);
    - its prefill: mean prompt tokens x prefill_ms_per_token, plus the fixed prefill cost of a
      step shared by the requests admitted together: at saturation a step finishes (and so
      admits) running / mean output tokens requests, at least one.

    Capacity = nodes x 1000 / that time. Reuse only makes the fleet faster, so a load of 1.0
    is at most saturation for every policy and exactly saturation without reuse.
    """
    if not requests or nodes < 1:
        raise ValueError("capacity needs requests and at least one node")
    prompt = statistics.fmean(r.prompt_tokens for r in requests)
    output = statistics.fmean(max(r.output_tokens, 1) for r in requests)
    size = config.block_size
    blocks = -(-prompt // size) + -(-output // size)
    running = max(1, min(config.max_num_seqs, int(config.capacity_blocks // blocks)))
    latency = config.latency
    decode_ms = output * latency.step_ms(0, running) / running
    admitted_per_step = max(1.0, running / output)
    prefill_ms = prompt * latency.prefill_ms_per_token + latency.prefill_base_ms / admitted_per_step
    return nodes * 1000 / (decode_ms + prefill_ms)


def at_rate(requests: Sequence[Request], rate_per_s: float) -> list[Request]:
    """Unrun copies of `requests` with every arrival time scaled so `arrival_rate` = `rate_per_s`.

    One factor multiplies every time, so order and structure are kept in proportion: a
    multi-turn conversation's think times shrink or grow with the gaps between conversations,
    and a trace's bursts stay bursts.
    """
    if rate_per_s <= 0:
        raise ValueError("the rate must be positive")
    return fresh(requests, arrival_rate(requests) / rate_per_s)

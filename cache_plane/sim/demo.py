"""`cache-plane demo`: a local 3-member cluster routes a simulated fleet's requests.

Part one: a cluster on loopback, 4 simulated GPU nodes, a few hundred requests sharing system
prompts routed through the cluster over HTTP (each one committed), the leader killed with
SIGKILL half-way, and a table against round robin on the same simulated fleet.

Part two: the data plane. A fresh cluster, two sim-node processes and an OpenAI-compatible
gateway (`GatewayStack`); the official `openai` client streams chat requests through the
gateway and, for comparison, straight to the node the gateway chose (engines in zero-latency
mode, so the difference is the gateway's own cost); the gateway's prediction accuracy comes
from its metrics. Everything started is stopped and reaped before it returns.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from veristore_py.localcluster import LocalCluster

from ..client import CachePlaneClient
from .engine import EngineConfig, Request, fresh
from .fleet import Fleet, run
from .policies import CachePlanePolicy, RoundRobin
from .workloads import shared_prompts


class DemoPolicy(CachePlanePolicy):
    """cache_plane routing that also times each route, heartbeats the fleet, and kills the
    leader once, mid-run, to show routing carry on through the new leader."""

    def __init__(self, client: CachePlaneClient, model: str, cluster: LocalCluster,
                 kill_at: int) -> None:
        super().__init__(client, model)
        self.cluster, self.kill_at, self.count = cluster, kill_at, 0
        self.latencies: list[float] = []
        self.failover_ms: float | None = None

    async def choose(self, request: Request, fleet: Fleet) -> str | None:
        self.count += 1
        if self.count % 25 == 0:  # the fleet keeps its leases alive, as real engines would
            for node_id, engine in fleet.engines.items():
                await self.client.heartbeat(node_id, active_requests=len(engine.running),
                                            queue_depth=len(engine.waiting))
        killed = None
        if self.count == self.kill_at:
            self.cluster.kill(self.cluster.wait_for_leader())
            killed = time.perf_counter()
        started = time.perf_counter()
        node = await super().choose(request, fleet)
        self.latencies.append(time.perf_counter() - started)
        if killed is not None:
            self.failover_ms = (time.perf_counter() - killed) * 1000
        return node


async def demo_workload(cluster: LocalCluster, requests: int, seed: int) -> list[tuple[str, str]]:
    model, block, nodes = "demo-llm", 16, 4
    workload = shared_prompts(requests, rate_per_s=12.0, seed=seed, systems=24,
                              system_tokens=4096)
    config = EngineConfig(capacity_blocks=30_000, block_size=block, max_num_seqs=64)
    baseline = (await run(Fleet.build(nodes, config), fresh(workload), RoundRobin())).summary()
    async with CachePlaneClient(cluster.urls, timeout=15) as client:
        await client.register_model(model, block_size=block)
        fleet = Fleet.build(nodes, config)
        for i, node in enumerate(fleet.ids):
            await client.register_node(node, f"10.0.0.{i + 1}:8000", [model],
                                       config.capacity_blocks,
                                       max_active=config.max_num_seqs * 8,
                                       max_running=config.max_num_seqs)
        policy = DemoPolicy(client, model, cluster, kill_at=requests // 2)
        ours = (await run(fleet, fresh(workload), policy)).summary()
        stats = await client.stats()
    lat = sorted(policy.latencies)
    return [
        ("workload", f"{requests} requests, {nodes} simulated GPU nodes, 24 shared 4k-token "
                     f"system prompts + unique questions"),
        ("route types", ", ".join(f"{k} {v}" for k, v in sorted(policy.decisions.items()))),
        ("prompt tokens reused", f"{ours['hit_rate']:.0%} with cache_plane vs "
                                 f"{baseline['hit_rate']:.0%} round robin"),
        ("simulated TTFT p50 / p90", f"{ours['ttft_p50_ms']:.0f} / {ours['ttft_p90_ms']:.0f} ms "
                                     f"vs {baseline['ttft_p50_ms']:.0f} / "
                                     f"{baseline['ttft_p90_ms']:.0f} ms round robin"),
        ("cluster block hit rate", f"{stats['block_hit_rate']:.0%}"),
        ("route latency p50 / p99", f"{lat[len(lat) // 2] * 1000:.1f} ms / "
                                    f"{lat[int(len(lat) * 0.99)] * 1000:.1f} ms (HTTP, committed)"),
        ("leader killed mid-run", f"next route answered after {policy.failover_ms:.0f} ms; "
                                  f"rejections {policy.route_errors or 'none'}"),
    ]


def gateway_rows(base: str, requests: int = 30) -> list[tuple[str, str]]:
    """Stream chat through a gateway and straight to the chosen node; the figures' rows."""
    import openai

    from .stack import MODEL, GatewayStack

    def ttft(client: openai.OpenAI, messages: list[dict[str, str]]) -> tuple[float, str]:
        started = time.perf_counter()
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, max_tokens=4, stream=True)  # type: ignore[arg-type]
        node = raw.headers.get("x-cache-plane-node", "")
        first = None
        for _ in raw.parse():
            if first is None:
                first = time.perf_counter() - started
        return (first or 0.0) * 1000, node

    with GatewayStack(base, engines=2, gateways=1, kv_events_zmq=True) as stack:
        gateway = openai.OpenAI(base_url=stack.gateway_url(), api_key=stack.api_key)
        direct = {f"gpu{i}": openai.OpenAI(base_url=stack.engine_url(i) + "/v1", api_key="-")
                  for i in range(stack.engines)}
        through, straight = [], []
        for i in range(requests):
            messages = [{"role": "system", "content": f"Demo system prompt {i % 3}. " * 60},
                        {"role": "user", "content": f"question {i}"}]
            ms, node = ttft(gateway, messages)
            through.append(ms)
            straight.append(ttft(direct[node], messages)[0])
        with urllib.request.urlopen(stack.gateway_url()[:-3] + "/metrics", timeout=5) as r:
            metrics = r.read().decode()
        events = kv_event_row(stack)
    outcomes = {}
    for line in metrics.splitlines():
        if line.startswith("cache_plane_gateway_prediction_total{"):
            outcomes[line.split('"')[1]] = float(line.rsplit(" ", 1)[1])
    total = sum(outcomes.values()) or 1.0
    added = sorted(a - b for a, b in zip(through, straight, strict=True))
    return [
        ("gateway", f"{requests} streamed chat requests via the openai client, 2 sim-nodes "
                    f"(zero-latency engines), strict routes"),
        ("gateway TTFT p50", f"{sorted(through)[len(through) // 2]:.1f} ms through it vs "
                             f"{sorted(straight)[len(straight) // 2]:.1f} ms straight to the "
                             f"node; added p50 {added[len(added) // 2]:.1f} ms"),
        ("prediction accuracy", f"{outcomes.get('exact', 0) / total:.0%} of requests: the "
                                f"cluster's matched_tokens equalled the engine's "
                                f"cached_tokens (within a block)"),
        events,
    ]


FAQ = [("How do I reset my password?", "What's the way to reset my password?"),
       ("What is the capital of France?", "Which city is the capital of France?"),
       ("How long should I boil an egg for a soft yolk?",
        "For a soft yolk, how long do I boil an egg?"),
       ("How many days are in a leap year?", None),
       ("Explain what a Raft leader does.", None)]
NEAR_MISSES = ["How many days are in 3 leap years?", "What is the capital of Germany?"]


def cache_rows(base: str) -> list[tuple[str, str]]:
    """Exact and semantic hits of the response cache, against an engine with the default
    latency model (so the time saved is what a real GPU would have spent); the rows."""
    import openai

    from .stack import MODEL, GatewayStack

    system = {"role": "system", "content": "You are the support assistant of ExampleCorp."}

    def ask(client: openai.OpenAI, question: str, stream: bool = False) -> tuple[str, float]:
        started = time.perf_counter()
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[system, {"role": "user", "content": question}],  # type: ignore[list-item]
            temperature=0, max_tokens=48, stream=stream)
        if stream:
            for _ in raw.parse():
                pass
        else:
            raw.parse()
        return raw.headers.get("x-cache", "?"), (time.perf_counter() - started) * 1000

    with GatewayStack(base, engines=1, gateways=1, engine_args=()) as stack:
        client = openai.OpenAI(base_url=stack.gateway_url(), api_key=stack.api_key)
        seen: dict[str, list[float]] = {}

        def note(outcome: tuple[str, float]) -> None:
            seen.setdefault(outcome[0], []).append(outcome[1])
        for question, _ in FAQ:
            note(ask(client, question))
        time.sleep(0.5)  # the questions' embeddings are computed after the answers
        for question, paraphrase in FAQ:
            note(ask(client, question))
            note(ask(client, question, stream=True))
            if paraphrase:
                note(ask(client, paraphrase))
        for question in NEAR_MISSES:
            note(ask(client, question))
        req = urllib.request.Request(stack.gateway_url() + "/cache/stats",
                                     headers={"Authorization": f"Bearer {stack.api_key}"})
        deadline = time.monotonic() + 5
        while True:  # until the misses' answers are stored (that happens after the answer)
            with urllib.request.urlopen(req, timeout=5) as r:
                stats = json.load(r)
            if stats["stores"].get("stored", 0) >= len(seen.get("miss", [])) \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.1)

    def p50(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 2] if xs else 0.0
    hits = seen.get("hit", []) + seen.get("semantic-hit", [])
    rejected = ", ".join(f"{n:.0f} by {'the threshold' if why == 'threshold' else why + ' guard'}"
                         for why, n in sorted(stats["semantic_rejected"].items()))
    tokens = stats["saved_tokens"]
    return [
        ("response cache", f"{sum(map(len, seen.values()))} chat requests (temperature 0, one "
                           f"engine with the default latency model): "
                           f"{len(seen.get('hit', []))} exact hits (half of them streamed), "
                           f"{len(seen.get('semantic-hit', []))} semantic hits (paraphrases), "
                           f"{len(seen.get('miss', []))} misses (incl. {len(NEAR_MISSES)} "
                           f"near-misses); semantic candidates passed over: "
                           f"{rejected or 'none'}"),
        ("cache savings", f"hit p50 {p50(hits):.1f} ms vs miss p50 {p50(seen.get('miss', [])):.0f}"
                          f" ms; saved {stats['saved_seconds']:.2f} s of backend time, "
                          f"{tokens.get('prompt', 0):.0f} prompt + "
                          f"{tokens.get('completion', 0):.0f} completion tokens; "
                          f"{stats['cluster']['entries']} entries replicated in the cluster"),
    ]


def kv_event_row(stack: Any, timeout: float = 10.0) -> tuple[str, str]:
    """The engines' ZMQ KV events as the cluster's leader ingested them: a row."""
    assert stack.cluster is not None

    def get(url: str, auth: bool = True) -> Any:
        req = urllib.request.Request(url, headers=stack.cluster.auth_headers if auth else {})
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.load(r)

    deadline = time.monotonic() + timeout
    while True:
        leader = stack.cluster.nodes[stack.cluster.wait_for_leader()].url
        nodes = [get(f"{leader}/v1/nodes/gpu{i}") for i in range(stack.engines)]
        published = [get(stack.engine_url(i) + "/sim/kv-events", False)["next_seq"]
                     for i in range(stack.engines)]
        indexed = [{b for blocks in get(f"{leader}/v1/nodes/gpu{i}/blocks")["models"].values()
                    for b, tier in blocks if tier != "pending"} for i in range(stack.engines)]
        held = [set(get(stack.engine_url(i) + "/sim/blocks", False)["blocks"])
                for i in range(stack.engines)]
        caught_up = all(n["kv_streams"] and n["kv_streams"][0]["last_seq"] == p - 1
                        for n, p in zip(nodes, published, strict=True))
        if caught_up and indexed == held or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    batches = sum(n["kv_streams"][0]["batches"] for n in nodes if n["kv_streams"])
    stored = sum(n["kv_streams"][0]["blocks_stored"] for n in nodes if n["kv_streams"])
    same = sum(a == b for a, b in zip(indexed, held, strict=True))
    return ("KV events (ZMQ)", f"{sum(published)} batches published by the engines over ZMQ, "
                               f"{batches} applied by the leader ({stored} blocks stored); "
                               f"index equals the engine's cache on {same}/{stack.engines} "
                               f"nodes")


def run_demo(base_dir: str | None, requests: int, seed: int,
             echo: Callable[[str], None] = print) -> list[tuple[str, str]]:
    """Start a cluster, run the demo workload through it, stop it; the result table's rows
    (keys padded to one width). `echo` hears progress lines. Without `base_dir` the data go
    to a temporary directory, removed at the end."""
    base = base_dir or tempfile.mkdtemp(prefix="cache-plane-demo-")
    try:
        cluster = LocalCluster(base, size=3, module="cache_plane")
        echo(f"starting a 3-member cache-plane cluster under {base} ...")
        try:
            cluster.start()
            t0 = time.perf_counter()
            leader = cluster.wait_for_leader()
            echo(f"leader elected: member {leader} after {time.perf_counter() - t0:.2f} s; "
                 f"4 simulated GPU nodes joining")
            rows = asyncio.run(demo_workload(cluster, requests, seed))
        finally:
            cluster.close()
        echo("cluster stopped; now the data plane: a fresh cluster, 2 sim-nodes, a gateway ...")
        rows += gateway_rows(os.path.join(base, "gateway"))
        echo("and the response cache: exact and semantic hits in front of a slower engine ...")
        rows += cache_rows(os.path.join(base, "cache"))
    finally:
        if base_dir is None:
            shutil.rmtree(base, ignore_errors=True)
    width = max(len(k) for k, _ in rows)
    return [(f"{key:<{width}}", value) for key, value in rows]

"""Gateway benchmark: streaming chat through `cache-plane gateway` vs straight to the engine.

One `GatewayStack` (3 cluster members, `--engines` sim-nodes serving ``tiny-chat`` with
near-zero latency, two gateways: gateway 0 acknowledges routes once committed, gateway 1 once
decided) plus, in its own process, a minimal aiohttp reverse proxy that streams bytes through
to sim-node 0 without parsing them. The same load then goes to each target in turn:

- (a) engine:    sim-node 0's own ``/v1/chat/completions`` (the baseline);
- (b) proxy:     the minimal reverse proxy in front of sim-node 0 (what any hop costs);
- (c) committed: the gateway, routes acknowledged once committed through Raft (the default);
- (d) decided:   the gateway, routes acknowledged once the leader decided (``--route-ack
                 decided``).

With one engine (the default) every target ends on the same sim-node process, so the gateway
gets no more engine capacity than the baseline; the route decision is still made and committed
for every request.

Load: streaming chat (``stream: true``, ``max_tokens`` 8), ~2k-token prompts: one of 8 shared
system prompts of ~1.8k tokens (``tiny-chat``'s tokenizer) and a unique user question. The
load generator (aiohttp) runs in a process of its own (multiprocessing ``spawn``), but shares
the machine's cores with everything else. Open loop at a fixed rate (Poisson or uniform
arrivals; every request is sent at its time, whatever the ones before it are doing), and
``max``: closed loop with `--concurrency` requests always in flight. TTFT is the time from
sending a request to the first SSE event that carries content (the first token, not the
opening role event). 'added' is a target's TTFT percentile minus the baseline's at the same
rate (rates interleave: each round loads every target in turn).

Beside the table, where the added time goes: the gateway's own histograms (``GET /metrics``)
over each point, ``overhead_seconds`` (its handler's start to the backend call: read, check,
tokenize, hash, route), ``route_seconds`` (the cluster call within it) and ``ttft_seconds``
(to the first event relayed), set against the client's times; and the CPU each part of the
stack used (from /proc), with what the rest of the machine (other tenants) used.

Performance is measured, not asserted: the goals print PASS or MISS and the exit code is 0.
Usage: python benchmarks/gateway.py [--quick] [--seconds S] [--rounds N] [--rates 50,100,max]
                                    [--concurrency C] [--arrivals poisson|uniform] [--engines N]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import random
import re
import shutil
import sys
import tempfile
import time
import urllib.request
import zlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.api import cpu_seconds, machine_busy_seconds  # noqa: E402
from benchmarks.replication import machine as machine_info  # noqa: E402
from cache_plane.sim.stack import MODEL, GatewayStack  # noqa: E402
from veristore_py.localcluster import free_ports, wait_listening  # noqa: E402

TARGETS = ("engine", "proxy", "committed", "decided")
LABELS = {"engine": "(a) sim-node direct", "proxy": "(b) minimal proxy",
          "committed": "(c) gateway, committed", "decided": "(d) gateway, decided"}
SYSTEM_PROMPTS = 8
SYSTEM_TOKENS = 1800
MAX_TOKENS = 8
WORDS = ("cache", "plane", "route", "request", "node", "engine", "prefix", "block", "hash",
         "token", "leader", "follower", "commit", "journal", "replica", "stream", "latency",
         "throughput", "tenant", "gateway", "model", "policy", "score", "queue", "batch",
         "decode", "prefill", "memory", "evict", "reuse", "shared", "system", "prompt", "the",
         "a", "of", "to", "and", "in", "on", "with", "for", "every", "each", "when", "while")
# Goals (the issue): at 100 req/s, added TTFT p50 <= 3 ms and p99 <= 15 ms; at max, the
# gateway's throughput >= 0.5x the minimal proxy's.
GOAL_RATE, GOAL_P50_MS, GOAL_P99_MS, GOAL_THROUGHPUT = 100.0, 3.0, 15.0, 0.5


# -- prompts ----------------------------------------------------------------------------------

def system_prompts(rng: random.Random) -> list[str]:
    """`SYSTEM_PROMPTS` texts of ~`SYSTEM_TOKENS` tokens each (measured with the tokenizer)."""
    from cache_plane.tokenization import load_tokenizer

    tokenizer = load_tokenizer(MODEL)
    out = []
    for k in range(SYSTEM_PROMPTS):
        words = [f"You are assistant number {k} of the benchmark fleet."]
        text = words[0]
        while len(tokenizer.encode(text, add_special_tokens=False)) < SYSTEM_TOKENS:
            words.extend(rng.choice(WORDS) for _ in range(50))
            text = " ".join(words)
        out.append(text)
    return out


QUESTION = ("Question {tag}: given the shared instructions above, explain in a few words how "
            "the gateway should pick a node for request {tag} when two engines hold the same "
            "prefix, one of them is busy decoding long answers for other tenants, and the "
            "cluster leader has just changed; name the signal you would trust first, the one "
            "you would ignore, and why the answer changes when the prompt is short.")


def body(systems: list[str], tag: str, i: int) -> dict[str, Any]:
    return {"model": MODEL, "stream": True, "max_tokens": MAX_TOKENS,
            "messages": [{"role": "system", "content": systems[i % len(systems)]},
                         {"role": "user", "content": QUESTION.format(tag=f"{tag}-{i}")}]}


# -- the minimal reverse proxy (its own process) ----------------------------------------------

def _proxy_server(port: int, upstream: str) -> None:
    """Forward every POST to `upstream` (same path), streaming the answer's bytes back."""
    from aiohttp import web

    session_key = web.AppKey("session", aiohttp.ClientSession)

    async def forward(request: web.Request) -> web.StreamResponse:
        data = await request.read()
        async with request.app[session_key].post(
                upstream + request.path, data=data,
                headers={"Content-Type": request.content_type}) as answer:
            out = web.StreamResponse(status=answer.status, headers={
                "Content-Type": answer.headers.get("Content-Type", "application/json")})
            await out.prepare(request)
            async for chunk in answer.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    async def backend(app: web.Application) -> AsyncIterator[None]:
        app[session_key] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                                 auto_decompress=False)
        yield
        await app[session_key].close()

    app = web.Application(client_max_size=16 << 20)
    app.router.add_post("/{tail:.*}", forward)
    app.cleanup_ctx.append(backend)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# -- the load generator (its own process) -----------------------------------------------------

def _load_generator(conn: Any) -> None:
    """Run each job received on `conn` (see `run_load`) and send back its result."""
    while True:
        job = conn.recv()
        if job is None:
            return
        conn.send(asyncio.run(run_load(**job)))


async def one_request(session: aiohttp.ClientSession, url: str, payload: bytes,
                      headers: dict[str, str], out: dict[str, Any]) -> None:
    """Send one streaming chat request; record its TTFT in `out` (and when its first event
    arrived), or why it failed."""
    import orjson

    started = time.perf_counter()
    ttft = first = None
    try:
        async with session.post(url, data=payload, headers=headers) as resp:
            if resp.status != 200:
                await resp.read()
                out["statuses"][resp.status] = out["statuses"].get(resp.status, 0) + 1
                return
            seen = b""
            pending = b""
            async for chunk in resp.content.iter_any():
                seen += chunk
                if ttft is not None:
                    continue
                if first is None:
                    first = time.perf_counter() - started
                pending += chunk
                *events, pending = pending.split(b"\n\n")
                for event in events:
                    data = event.removeprefix(b"data: ")
                    if data == b"[DONE]" or not data.startswith(b"{"):
                        continue
                    choices = orjson.loads(data).get("choices") or [{}]
                    delta = choices[0].get("delta") or {}
                    if delta.get("content"):
                        ttft = time.perf_counter() - started
                        break
    except (aiohttp.ClientError, TimeoutError) as exc:
        kind = type(exc).__name__
        out["statuses"][kind] = out["statuses"].get(kind, 0) + 1
        return
    if ttft is None or not seen.endswith(b"data: [DONE]\n\n") or b'"error"' in seen:
        out["statuses"]["bad stream"] = out["statuses"].get("bad stream", 0) + 1
        return
    out["ttfts"].append(ttft)
    out["firsts"].append(first)


async def run_load(url: str, headers: dict[str, str], systems: list[str], tag: str,
                   seconds: float, rate: float | None, concurrency: int, arrivals: str,
                   seed: int) -> dict[str, Any]:
    """Open loop at `rate` req/s for `seconds` (every request sent at its arrival time), or,
    with `rate` None, closed loop with `concurrency` requests in flight. Returns TTFTs (s),
    failures by status, the wall time and, open loop, how late requests left (s)."""
    import orjson

    out: dict[str, Any] = {"ttfts": [], "firsts": [], "statuses": {}, "lags": []}
    rng = random.Random(seed)
    counter = iter(range(10**9))
    connector = aiohttp.TCPConnector(limit=0 if rate else concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        if rate is None:
            stop = started + seconds

            async def worker() -> None:
                while time.perf_counter() < stop:
                    i = next(counter)
                    await one_request(session, url, orjson.dumps(body(systems, tag, i)),
                                      headers, out)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            tasks = []
            at = 0.0
            while at < seconds:
                delay = started + at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                out["lags"].append(max(0.0, -delay))
                i = next(counter)
                tasks.append(asyncio.create_task(one_request(
                    session, url, orjson.dumps(body(systems, tag, i)), headers, out)))
                at += rng.expovariate(rate) if arrivals == "poisson" else 1.0 / rate
            await asyncio.gather(*tasks)
        out["wall"] = time.perf_counter() - started
    return out


# -- the gateway's own histograms -------------------------------------------------------------

OVERHEAD, ROUTE, GATEWAY_TTFT = HISTOGRAMS = (
    "cache_plane_gateway_overhead_seconds", "cache_plane_gateway_route_seconds",
    "cache_plane_gateway_ttft_seconds")
_SAMPLE = re.compile(r'^(\w+?)(_bucket|_sum|_count)\{([^}]*)\} (\S+)$')


def scrape(port: int) -> dict[str, dict[str, float]]:
    """`HISTOGRAMS` of the gateway on `port`: name -> {"sum", "count", le -> cumulative}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, dict[str, float]] = {name: {} for name in HISTOGRAMS}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if not match or match[1] not in out:
            continue
        name, kind, labels, value = match[1], match[2], match[3], float(match[4])
        le = re.search(r'le="([^"]+)"', labels)
        key = le[1] if kind == "_bucket" and le else kind[1:]
        out[name][key] = out[name].get(key, 0.0) + value  # summed over the other labels
    return out


def histogram_delta(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]],
                    name: str) -> dict[str, float]:
    return {k: v - before[name].get(k, 0.0) for k, v in after[name].items()}


def histogram_mean(histogram: dict[str, float]) -> float:
    count = histogram.get("count", 0.0)
    return histogram.get("sum", 0.0) / count if count else float("nan")


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def quantile(histogram: dict[str, float], q: float) -> float:
    """Prometheus' histogram_quantile: linear within the bucket holding the q-th sample."""
    buckets = sorted((float(le), n) for le, n in histogram.items() if le not in ("sum", "count"))
    total = histogram.get("count", 0.0)
    if not total:
        return float("nan")
    rank = q * total
    lower, below = 0.0, 0.0
    for le, cumulative in buckets:
        if cumulative >= rank:
            if le == float("inf"):
                return lower
            return lower + (le - lower) * (rank - below) / max(cumulative - below, 1e-9)
        lower, below = le, cumulative
    return lower


# -- the run ----------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))] if values else float("nan")


def run(args: argparse.Namespace, rates: list[float | None],
        systems: list[str]) -> dict[tuple[str, float | None], dict[str, Any]]:
    """Start everything, load every (target, rate) point, stop everything; the points."""
    spawn = mp.get_context("spawn")
    workdir = tempfile.mkdtemp(prefix="bench-gateway-")
    (proxy_port,) = free_ports(1)
    points: dict[tuple[str, float | None], dict[str, Any]] = {}
    proxy = generator = None
    parent, child = spawn.Pipe()
    try:
        with GatewayStack(os.path.join(workdir, "stack"), engines=args.engines,
                          gateways=1) as stack:
            stack.add_gateway("--route-ack", "decided")  # gateway 1 (the later flag wins)
            proxy = spawn.Process(target=_proxy_server, daemon=True,
                                  args=(proxy_port, stack.engine_url(0)))
            proxy.start()
            generator = spawn.Process(target=_load_generator, args=(child,), daemon=True)
            generator.start()
            wait_listening(proxy_port, timeout=30.0)
            assert stack.cluster is not None and proxy.pid and generator.pid
            gateway = {"committed": 0, "decided": 1}
            auth = {"Authorization": f"Bearer {stack.api_key}"}
            urls = {"engine": stack.engine_url(0) + "/v1/chat/completions",
                    "proxy": f"http://127.0.0.1:{proxy_port}/v1/chat/completions",
                    "committed": stack.gateway_url(0) + "/chat/completions",
                    "decided": stack.gateway_url(1) + "/chat/completions"}
            pids = {"engine": [stack.processes[f"gpu{i}"].pid for i in range(args.engines)],
                    "proxy": [proxy.pid],
                    "committed": [stack.processes["gateway0"].pid],
                    "decided": [stack.processes["gateway1"].pid],
                    "cluster": [n.process.pid for n in stack.cluster.nodes if n.process],
                    "loadgen": [generator.pid]}

            def load(target: str, rate: float | None, round_: str, seconds: float,
                     concurrency: int) -> dict[str, Any]:
                """One point's round in the load generator (questions unique per request;
                the same arrival times for every target of a round)."""
                point = f"{rate_name(rate)}-{round_}"
                parent.send({"url": urls[target], "systems": systems,
                             "tag": f"{target}-{point}",
                             "headers": auth if target in gateway else {},
                             "seconds": seconds, "rate": rate, "concurrency": concurrency,
                             "arrivals": args.arrivals, "seed": zlib.crc32(point.encode())})
                return parent.recv()

            for target in TARGETS:  # warm up: connections, models, prefix caches
                load(target, None, "warm", args.warmup, 2)
            for name in ("committed", "decided"):
                routes = scrape(stack.gateway_ports[gateway[name]])[ROUTE]
                print(f"gateway {name}: {routes.get('count', 0):.0f} warm-up routes")
            every = [p for group in pids.values() for p in group]
            settle(every)  # the warm-up's reports, KV events and housekeeping drain
            stack_cpu = sum(map(cpu_seconds, every))
            busy = machine_busy_seconds()
            time.sleep(2.0)
            print(f"idle, everything up: the machine is "
                  f"{(machine_busy_seconds() - busy) / 2.0:.2f} cores busy, the stack "
                  f"{(sum(map(cpu_seconds, every)) - stack_cpu) / 2.0:.2f}")
            seconds = args.seconds / args.rounds
            for rate in rates:
                for r in range(args.rounds):
                    for target in TARGETS:
                        port = stack.gateway_ports[gateway[target]] \
                            if target in gateway else None
                        before_metrics = scrape(port) if port else None
                        watched = {k: [cpu_seconds(p) for p in v] for k, v in pids.items()}
                        busy = machine_busy_seconds()
                        result = load(target, rate, str(r), seconds, args.concurrency)
                        cpu = {k: sum(cpu_seconds(p) - c for p, c in zip(pids[k], v,
                                                                          strict=True))
                               for k, v in watched.items()}
                        cpu["machine"] = machine_busy_seconds() - busy
                        cpu["other"] = cpu["machine"] - sum(cpu[k] for k in pids)
                        if port and before_metrics:
                            after = scrape(port)
                            result["metrics"] = {n: histogram_delta(before_metrics, after, n)
                                                 for n in HISTOGRAMS}
                        result["cpu"] = cpu
                        merge(points.setdefault((target, rate), {}), result)
                        time.sleep(0.2)  # let background completion reports drain
    finally:
        for process in (generator, proxy):
            if process is not None and process.is_alive():
                if process is generator:
                    parent.send(None)
                    process.join(5)
                process.kill()
                process.join()
        shutil.rmtree(workdir, ignore_errors=True)
    return points


def settle(pids: list[int], timeout: float = 30.0) -> None:
    """Wait until `pids` together use under 0.1 cores (0.5 s windows), at most `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = sum(map(cpu_seconds, pids))
        time.sleep(0.5)
        if sum(map(cpu_seconds, pids)) - before < 0.05:
            return


def merge(into: dict[str, Any], result: dict[str, Any]) -> None:
    """Pool one round's `result` into a point."""
    into.setdefault("ttfts", []).extend(result["ttfts"])
    into.setdefault("firsts", []).extend(result["firsts"])
    into.setdefault("lags", []).extend(result["lags"])
    into["wall"] = into.get("wall", 0.0) + result["wall"]
    statuses = into.setdefault("statuses", {})
    for status, n in result["statuses"].items():
        statuses[status] = statuses.get(status, 0) + n
    cpu = into.setdefault("cpu", {})
    for k, v in result["cpu"].items():
        cpu[k] = cpu.get(k, 0.0) + v
    if "metrics" in result:
        metrics = into.setdefault("metrics", {})
        for name, histogram in result["metrics"].items():
            pooled = metrics.setdefault(name, {})
            for k, v in histogram.items():
                pooled[k] = pooled.get(k, 0.0) + v


def rate_name(rate: float | None) -> str:
    return "max" if rate is None else f"{rate:g}"


def report(points: dict[tuple[str, float | None], dict[str, Any]],
           rates: list[float | None], args: argparse.Namespace) -> None:
    ms = 1000.0
    print(f"\n{'target':<24}{'rate':>6}{'req/s':>8}{'TTFT mean':>10}{'p50':>7}{'p99':>8}"
          f"{'added p50':>11}{'p99':>8}{'errors':>8}")
    for rate in rates:
        base = points[("engine", rate)]["ttfts"]
        for target in TARGETS:
            p = points[(target, rate)]
            ttfts = p["ttfts"]
            p50, p99 = percentile(ttfts, 0.5) * ms, percentile(ttfts, 0.99) * ms
            if target == "engine" or rate is None:
                added = f"{'-':>11}{'-':>8}"
            else:
                added = (f"{p50 - percentile(base, 0.5) * ms:>+11.2f}"
                         f"{p99 - percentile(base, 0.99) * ms:>+8.2f}")
            errors = sum(p["statuses"].values())
            print(f"{LABELS[target]:<24}{rate_name(rate):>6}{len(ttfts) / p['wall']:>8.1f}"
                  f"{mean(ttfts) * ms:>10.2f}{p50:>7.2f}{p99:>8.2f}{added}{errors:>8}"
                  f"{'  ' + str(p['statuses']) if errors else ''}")
    print("(TTFT in ms: send to the first SSE event carrying content; 'added' = the target's "
          "percentile minus (a)'s at the same rate; max: closed loop, "
          f"{args.concurrency} in flight)")

    print(f"\nWhere the gateway's added TTFT goes (ms; means, which add up; p50/p99 "
          f"interpolated in the gateway's histogram buckets):\n{'target':<24}{'rate':>6}"
          f"{'TTFT':>7}{'added':>7}{'outside':>8}{'overhead':>9}{'p50':>6}{'p99':>7}"
          f"{'route':>7}{'p50':>6}{'p99':>7}{'rest':>6}{'backend':>8}{'token':>7}")
    for rate in rates:
        a = points[("engine", rate)]
        base = mean(a["ttfts"]) * ms
        first, token = mean(a["firsts"]) * ms, (mean(a["ttfts"]) - mean(a["firsts"])) * ms
        print(f"{LABELS['engine']:<24}{rate_name(rate):>6}{base:>7.1f}{'':>7}{'':>8}{'':>9}"
              f"{'':>6}{'':>7}{'':>7}{'':>6}{'':>7}{'':>6}{first:>8.1f}{token:>7.1f}")
        for target in ("committed", "decided"):
            p = points[(target, rate)]
            metrics = p.get("metrics")
            if not metrics:
                continue
            over, route, ttft = metrics[OVERHEAD], metrics[ROUTE], metrics[GATEWAY_TTFT]
            over_mean, route_mean, ttft_mean = (histogram_mean(h) * ms
                                                for h in (over, route, ttft))
            client, first = mean(p["ttfts"]) * ms, mean(p["firsts"]) * ms
            added = f"{client - base:>+7.1f}" if rate is not None else f"{'-':>7}"
            print(f"{LABELS[target]:<24}{rate_name(rate):>6}{client:>7.1f}{added}"
                  f"{first - ttft_mean:>8.1f}{over_mean:>9.1f}"
                  f"{quantile(over, 0.5) * ms:>6.1f}{quantile(over, 0.99) * ms:>7.1f}"
                  f"{route_mean:>7.1f}{quantile(route, 0.5) * ms:>6.1f}"
                  f"{quantile(route, 0.99) * ms:>7.1f}{over_mean - route_mean:>6.1f}"
                  f"{ttft_mean - over_mean:>8.1f}{client - first:>7.1f}")
    print("(TTFT = outside + overhead + backend + token. The gateway's own view "
          "(/metrics): overhead = its handler's start to the backend call, of which route = "
          "the cluster call and rest = reading, checking, tokenizing and hashing the body; "
          "backend = the call to the first event relayed (the engine's role event; for (a): "
          "sending to the first event). outside = the client's time to the first event "
          "minus the gateway's (before the handler runs, and the last hop); token = first "
          "event to first content event (the engine's step))")

    print(f"\nCPU (cores busy over the point; the machine has {os.cpu_count()}):\n"
          f"{'target':<24}{'rate':>6}{'engine':>8}{'hop':>8}{'hop ms/req':>11}{'cluster':>9}"
          f"{'loadgen':>9}{'other':>7}{'machine':>9}{'ms/req':>8}{'send lag p99':>14}")
    for rate in rates:
        for target in TARGETS:
            p = points[(target, rate)]
            cpu, wall = p["cpu"], p["wall"]
            hop = cpu[target] / wall if target != "engine" else float("nan")
            per_request = (cpu[target] / len(p["ttfts"]) * ms
                           if target != "engine" and p["ttfts"] else float("nan"))
            lag = f"{percentile(p['lags'], 0.99) * ms:>12.2f}ms" if p["lags"] else f"{'-':>14}"
            print(f"{LABELS[target]:<24}{rate_name(rate):>6}{cpu['engine'] / wall:>8.2f}"
                  f"{hop:>8.2f}{per_request:>11.2f}{cpu['cluster'] / wall:>9.2f}"
                  f"{cpu['loadgen'] / wall:>9.2f}{cpu['other'] / wall:>7.2f}"
                  f"{cpu['machine'] / wall:>9.2f}"
                  f"{cpu['machine'] / max(len(p['ttfts']), 1) * ms:>8.2f}{lag}")
    print("(hop: the proxy's or the gateway's process; cluster: the 3 members; other: the "
          "rest of the machine (other tenants); ms/req: the whole machine's CPU per request; "
          "send lag: how late the load generator sent requests, open loop)")

    print("\nGoals:")
    if GOAL_RATE in rates:
        base = points[("engine", GOAL_RATE)]["ttfts"]
        for target in ("committed", "decided"):
            ttfts = points[(target, GOAL_RATE)]["ttfts"]
            for q, goal in ((0.5, GOAL_P50_MS), (0.99, GOAL_P99_MS)):
                added_ms = (percentile(ttfts, q) - percentile(base, q)) * ms
                print(f"  {LABELS[target]}: added TTFT p{q * 100:g} at {GOAL_RATE:g} req/s "
                      f"{added_ms:+.2f} ms (goal <= {goal:g}): "
                      f"{'PASS' if added_ms <= goal else 'MISS'}")
    else:
        print(f"  (no {GOAL_RATE:g} req/s point: the latency goals were not measured)")
    if None in rates:
        proxy = points[("proxy", None)]
        proxy_rps = len(proxy["ttfts"]) / proxy["wall"]
        for target in ("committed", "decided"):
            p = points[(target, None)]
            ratio = len(p["ttfts"]) / p["wall"] / proxy_rps if proxy_rps else float("nan")
            print(f"  {LABELS[target]}: throughput at max {ratio:.3f}x the minimal proxy's "
                  f"(goal >= {GOAL_THROUGHPUT:g}x): "
                  f"{'PASS' if ratio >= GOAL_THROUGHPUT else 'MISS'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="per point, all rounds")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds per rate; each round loads every target in turn")
    parser.add_argument("--rates", default="50,100,max",
                        help="comma-separated req/s, 'max' for the closed loop")
    parser.add_argument("--concurrency", type=int, default=16, help="in flight at 'max'")
    parser.add_argument("--arrivals", choices=("poisson", "uniform"), default="poisson")
    parser.add_argument("--engines", type=int, default=1,
                        help="sim-nodes behind the gateways (the baselines use the first)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds per target")
    parser.add_argument("--quick", action="store_true",
                        help="CI: rates 100 and max, 3 s per point in 3 rounds")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.rounds, args.rates, args.warmup = 3.0, 3, "100,max", 0.5
    try:
        rates = [None if r.strip() == "max" else float(r) for r in args.rates.split(",")]
    except ValueError:
        parser.error("--rates: numbers or 'max', comma-separated")
    if args.rounds < 1 or args.seconds <= 0 or args.concurrency < 1 or args.engines < 1 \
            or any(r is not None and r <= 0 for r in rates):
        parser.error("--rounds, --concurrency, --engines must be >= 1; --seconds, rates > 0")
    started = time.monotonic()
    systems = system_prompts(random.Random(7))
    from cache_plane.tokenization import chat_request_token_ids, load_tokenizer

    tokenizer = load_tokenizer(MODEL)
    samples = [body(systems, "sample", i) for i in range(32)]
    lengths = [len(chat_request_token_ids(tokenizer, b)) for b in samples]
    tick = time.perf_counter()
    for b in samples:
        chat_request_token_ids(tokenizer, b)
    tokenize_ms = (time.perf_counter() - tick) / len(samples) * 1000
    print(f"machine: {machine_info()}")
    print(f"load: {args.seconds:g} s per point in {args.rounds} interleaved round(s); rates "
          f"{args.rates} ({args.arrivals} arrivals; max = closed loop, {args.concurrency} in "
          f"flight); streaming chat, max_tokens {MAX_TOKENS}; prompts {min(lengths)}-"
          f"{max(lengths)} tokens ({SYSTEM_PROMPTS} shared system prompts + a unique question); "
          f"{args.engines} sim-node(s), 3 members, 2 gateways on loopback; the load generator "
          f"is a process of its own on the same cores")
    print(f"tokenizing one prompt (chat template + encode) here: {tokenize_ms:.2f} ms\n")
    points = run(args, rates, systems)
    report(points, rates, args)
    print(f"\n(total {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

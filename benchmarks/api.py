"""API benchmark: /v1/route on a 3-member cluster vs a trivial aiohttp handler, same load.

Starts three `cache-plane serve` processes on loopback and, in another process, a trivial
aiohttp app whose POST handler parses the JSON body and answers a small JSON object. One
asyncio load generator (this process, `--concurrency` connections, `--seconds` per target) then
sends the same kind of request to each target:

- trivial:    POST /echo with the route body;
- dry-run:    POST /v1/route with dry_run (decision only, nothing committed);
- committed:  POST /v1/route (decision committed through Raft on every member);
- ..., TLS:   the same two against a second cluster serving HTTPS (a throwaway CA, TLS 1.2+,
              kept-alive connections): what TLS costs a route;
- raw Raft:   same-run baselines for the replication engine alone: three processes running
              plain PySyncObj (its journal file, never fsynced; the same password; its
              low-latency mode, appendEntriesUseBatch off) behind the trivial handler, which
              commits before answering (a no-op `@replicated` call, no state machine):
              - each:    one commit per request, carrying its body;
              - batched: bodies that arrive while a commit is in flight leave together in the
                         next one (one in flight, as the cache plane's group commit);
              - digests: batched, but each request adds only a 16-byte digest of its body:
                         the cheapest thing any design that commits every route could
                         replicate, so the ceiling of committed routes on this machine.

Every target runs from the start; the load visits them in turn, `--rounds` times, so a change
in the shared machine's speed (other tenants) hits all targets alike. 'vs trivial' is the
median over rounds of each round's ratio.

Beside each figure, the CPU the target's processes used (cores, from /proc) and how busy the
whole machine was: on a small machine the members, the load generator and the target share
the cores, which bounds what any target can reach.

Bodies: 8k-token prompts given as 512 block hashes (16-token blocks), built from 32 shared
prefixes of 448 blocks plus 64 unique blocks, against 16 registered nodes.
Usage: python benchmarks/api.py [--quick] [--rounds N] [--seconds S] [--concurrency C]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import multiprocessing as mp
import os
import random
import shutil
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import aiohttp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.replication import machine as machine_info  # noqa: E402
from cache_plane.client import CachePlaneClient  # noqa: E402
from veristore_py.localcluster import (  # noqa: E402
    LocalCluster,
    free_ports,
    throwaway_pki,
    wait_listening,
)


def _trivial_server(port: int) -> None:
    from aiohttp import web

    async def echo(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"ok": True, "model": body.get("model")})

    app = web.Application(client_max_size=16 << 20)
    app.router.add_post("/echo", echo)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


RAW_MODES = ("each", "batched", "digests")


def _raw_raft_member(index: int, raft_ports: list[int], http_port: int, journal_dir: str,
                     password: str, mode: str) -> None:
    """One member of a raw-PySyncObj baseline in `mode` (see the module docstring)."""
    import hashlib
    import json
    import logging

    from aiohttp import web
    from pysyncobj import SyncObj, SyncObjConf, replicated

    # Plain PySyncObj logs "truncating already-applied log entries" (critical) on followers
    # now and then (docs/veristore.md, Known limits); keep it out of the table's output.
    logging.getLogger("pysyncobj").setLevel(logging.CRITICAL + 1)
    addresses = [f"127.0.0.1:{p}" for p in raft_ports]

    class RawLog(SyncObj):
        def __init__(self) -> None:
            # appendEntriesUseBatch=False is PySyncObj's low-latency mode: with its default
            # batching (entries sent every 100 ms) this closed loop commits ~4x fewer.
            conf = SyncObjConf(journalFile=os.path.join(journal_dir, f"journal{index}"),
                               password=password, appendEntriesUseBatch=False)
            super().__init__(addresses[index],
                             [a for i, a in enumerate(addresses) if i != index], conf)

        @replicated
        def commit(self, body: bytes) -> bool:
            return True

    node = RawLog()
    queued: list[tuple[bytes, asyncio.Future[int]]] = []
    in_flight = False

    def propose(loop: asyncio.AbstractEventLoop, payload: Any,
                waiters: list[asyncio.Future[int]]) -> None:
        def settle(error: int) -> None:
            nonlocal in_flight
            for done in waiters:
                if not done.done():
                    done.set_result(error)
            if mode != "each":
                in_flight = False
                flush(loop)

        node.commit(payload, callback=lambda _result, error: loop.call_soon_threadsafe(
            settle, error))

    def flush(loop: asyncio.AbstractEventLoop) -> None:
        nonlocal in_flight
        if in_flight or not queued:
            return
        batch = queued[:]
        queued.clear()
        in_flight = True
        propose(loop, [item for item, _ in batch], [done for _, done in batch])

    async def commit(request: web.Request) -> web.Response:
        raw = await request.read()
        body = json.loads(raw)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[int] = loop.create_future()
        if mode == "each":
            propose(loop, raw, [done])
        else:
            queued.append((raw if mode == "batched" else
                           hashlib.blake2b(raw, digest_size=16).digest(), done))
            flush(loop)
        if await done != 0:
            return web.json_response({"error": "not_committed"}, status=503)
        return web.json_response({"ok": True, "model": body.get("model")})

    async def leader(request: web.Request) -> web.Response:
        return web.json_response({"leader": bool(node._isLeader())})  # plain PySyncObj

    app = web.Application(client_max_size=16 << 20)
    app.router.add_post("/commit", commit)
    app.router.add_get("/leader", leader)
    web.run_app(app, host="127.0.0.1", port=http_port, print=None, access_log=None)


def _raw_raft_leader(http_ports: list[int], timeout: float = 60.0) -> int:
    import json
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for port in http_ports:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/leader", timeout=1) as r:
                    if json.load(r)["leader"]:
                        return port
            except OSError:
                pass
        time.sleep(0.2)
    raise TimeoutError("the raw PySyncObj baseline elected no leader")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle (nor waiting for I/O) since boot."""
    with open("/proc/stat") as f:
        ticks = list(map(int, f.readline().split()[1:]))
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def measured(url: str, payloads: list[dict[str, Any]], seconds: float, concurrency: int,
             headers: dict[str, str], pids: list[int],
             ssl_context: ssl.SSLContext | None = None) -> dict[str, Any]:
    """`load`, plus the CPU seconds used by `pids`, by this process and by the whole machine
    (`*_cpu`) over `wall` seconds (`merged` turns them into cores)."""
    before = [cpu_seconds(p) for p in pids], cpu_seconds(os.getpid()), machine_busy_seconds()
    started = time.monotonic()
    result = asyncio.run(load(url, payloads, seconds, concurrency, headers, ssl_context))
    wall = time.monotonic() - started
    result["wall"] = wall
    result["target_cpu"] = sum(cpu_seconds(p) - c for p, c in zip(pids, before[0], strict=True))
    result["loadgen_cpu"] = cpu_seconds(os.getpid()) - before[1]
    result["machine_cpu"] = machine_busy_seconds() - before[2]
    return result


def merged(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One target's `measured` rounds as one result (latencies pooled, CPU summed)."""
    out: dict[str, Any] = {"ok": sum(r["ok"] for r in rounds),
                           "errors": sum(r["errors"] for r in rounds), "statuses": {}}
    for r in rounds:
        for status, count in r["statuses"].items():
            out["statuses"][status] = out["statuses"].get(status, 0) + count
    out.update(summary([x for r in rounds for x in r["latencies"]],
                       sum(r["elapsed"] for r in rounds)))
    wall = sum(r["wall"] for r in rounds)
    for what in ("target", "loadgen", "machine"):
        out[f"{what}_cores"] = sum(r[f"{what}_cpu"] for r in rounds) / wall
    return out


def bodies(count: int, rng: random.Random, dry_run: bool) -> list[dict[str, Any]]:
    prefixes = [[rng.getrandbits(63) for _ in range(448)] for _ in range(32)]
    out = []
    for i in range(count):
        blocks = rng.choice(prefixes) + [rng.getrandbits(63) for _ in range(64)]
        body: dict[str, Any] = {"model": "bench", "block_hashes": blocks}
        if dry_run:
            body["dry_run"] = True
        else:
            body["request_id"] = f"c{i}-{rng.getrandbits(32)}"
        out.append(body)
    return out


async def load(url: str, payloads: list[dict[str, Any]], seconds: float, concurrency: int,
               headers: dict[str, str],
               ssl_context: ssl.SSLContext | None = None) -> dict[str, Any]:
    """Closed-loop load: `concurrency` workers send payloads back to back for `seconds`
    (over kept-alive connections: a TLS handshake per connection, not per request)."""
    latencies: list[float] = []
    errors = 0
    statuses: dict[int, int] = {}
    stop = time.perf_counter() + seconds
    cursor = iter(range(10**9))
    connector = aiohttp.TCPConnector(limit=concurrency, ssl=ssl_context or True)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < stop:
                i = next(cursor)
                body = payloads[i % len(payloads)]
                if "request_id" in body:  # every committed route is a new request
                    body = {**body, "request_id": f"{body['request_id']}-{i}"}
                started = time.perf_counter()
                async with session.post(url, json=body) as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors += 1
                        statuses[resp.status] = statuses.get(resp.status, 0) + 1
                        continue
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"ok": len(latencies), "errors": errors, "statuses": statuses,
            "elapsed": elapsed, **summary(latencies, elapsed)}


def summary(latencies: list[float], elapsed: float) -> dict[str, Any]:
    """req/s and p50/p99 (ms) of `latencies` (seconds) gathered over `elapsed` seconds."""
    latencies = sorted(latencies)
    n = len(latencies)
    return {"latencies": latencies, "rps": n / elapsed if elapsed else 0.0,
            "p50_ms": 1000 * latencies[n // 2] if n else float("nan"),
            "p99_ms": 1000 * latencies[min(n - 1, int(n * 0.99))] if n else float("nan")}


async def prepare(cluster: LocalCluster, token: str) -> str:
    async with CachePlaneClient(cluster.urls, token=token, ca_file=cluster.ca_file) as client:
        await client.register_model("bench", block_size=16)
        for i in range(16):
            await client.register_node(f"gpu{i:02d}", f"10.0.0.{i}:8000", ["bench"],
                                       capacity_blocks=2_000_000, max_active=1_000_000)
        leader = cluster.wait_for_leader()
        return cluster.nodes[leader].url


def _leader_url(cluster: LocalCluster) -> str:
    return cluster.nodes[cluster.wait_for_leader(timeout=60)].url


def _term(cluster: LocalCluster) -> int:
    return max((cluster.status(i) or {}).get("term", 0) for i in range(cluster.size))


def _start_raw(mode: str, directory: str) -> tuple[list[Any], str]:
    """Start a raw-PySyncObj baseline in `mode`; its processes and its leader's commit URL."""
    spawn = mp.get_context("spawn")
    raft_ports, http_ports = free_ports(3), free_ports(3)
    raw = [spawn.Process(target=_raw_raft_member, daemon=True,
                         args=(i, raft_ports, http_ports[i], directory, "bench-password", mode))
           for i in range(3)]
    for process in raw:
        process.start()
    return raw, f"http://127.0.0.1:{_raw_raft_leader(http_ports)}/commit"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="per target, all rounds")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds; each round loads every target in turn")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="one round, 2 s per target (CI)")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.rounds = 2.0, 1
    if args.rounds < 1 or args.seconds <= 0:
        parser.error("--rounds must be >= 1 and --seconds > 0")
    rng = random.Random(3)
    token = "bench-token-for-the-api-benchmark"
    headers = {"Authorization": f"Bearer {token}"}
    print(f"machine: {machine_info()}")
    print(f"load: {args.concurrency} connections x {args.seconds:g} s per target, in "
          f"{args.rounds} interleaved round(s); 8k-token prompts as 512 block hashes; "
          f"16 nodes; 3 members on loopback\n")
    (port,) = free_ports(1)
    spawn = mp.get_context("spawn")
    workdir = tempfile.mkdtemp(prefix="bench-api-")
    processes: list[Any] = []
    # The benchmark's nodes do not heartbeat; a long lease keeps them up for the whole run.
    cluster = LocalCluster(os.path.join(workdir, "cluster"), module="cache_plane",
                           api_token=token, settings={"log_level": "warning"},
                           env={"CACHE_PLANE_NODE_LEASE_MS": str(3_600_000),
                                **{k: v for k, v in os.environ.items()
                                   if k.startswith("CACHE_PLANE_")}})
    # The same cluster serving HTTPS (a throwaway CA; no client certificates): TLS's cost.
    tls_files = throwaway_pki(os.path.join(workdir, "tls"))
    tls_cluster = LocalCluster(os.path.join(workdir, "tls-cluster"), module="cache_plane",
                               api_token=token, ca_file=tls_files["ca"],
                               settings={"log_level": "warning", "tls_cert_file": tls_files["cert"],
                                         "tls_key_file": tls_files["key"]},
                               env=cluster.env)
    rounds: dict[str, list[dict[str, Any]]] = {}
    idle_cores = float("nan")
    terms: dict[str, list[int]] = {}
    try:
        trivial = spawn.Process(target=_trivial_server, args=(port,), daemon=True)
        trivial.start()
        processes.append(trivial)
        assert trivial.pid is not None
        for each in (cluster, tls_cluster):
            each.start()
            each.wait_for_leader()
            asyncio.run(prepare(each, token))
        wait_listening(port, timeout=30.0)
        members = [p.pid for p in (cluster.nodes[i].process for i in range(cluster.size))
                   if p is not None]
        tls_members = [p.pid for p in (n.process for n in tls_cluster.nodes) if p is not None]
        # (name, URL, dry run, pids, cluster or None); every target runs from the start, idle
        # but for the round that loads it, so all of them see the same machine.
        targets: list[tuple[str, Callable[[], str], bool, list[int], LocalCluster | None]] = [
            ("trivial aiohttp handler", lambda: f"http://127.0.0.1:{port}/echo", False,
             [trivial.pid], None),
            ("route, dry run", lambda: _leader_url(cluster) + "/v1/route", True, members,
             cluster),
            ("route, committed", lambda: _leader_url(cluster) + "/v1/route", False, members,
             cluster),
            ("route, dry run, TLS", lambda: _leader_url(tls_cluster) + "/v1/route", True,
             tls_members, tls_cluster),
            ("route, committed, TLS", lambda: _leader_url(tls_cluster) + "/v1/route", False,
             tls_members, tls_cluster),
        ]
        for mode in RAW_MODES:
            directory = os.path.join(workdir, f"raw-{mode}")
            os.makedirs(directory)
            raw, raw_url = _start_raw(mode, directory)
            processes.extend(raw)
            targets.append((f"raw PySyncObj, {mode}", functools.partial(str, raw_url), False,
                            [p.pid for p in raw], None))
        idle_before = machine_busy_seconds()
        time.sleep(2.0)
        idle_cores = (machine_busy_seconds() - idle_before) / 2.0
        for _ in range(args.rounds):
            for name, url, dry_run, pids, target_cluster in targets:
                before = _term(target_cluster) if target_cluster else 0
                rounds.setdefault(name, []).append(measured(
                    url(), bodies(500, rng, dry_run), args.seconds / args.rounds,
                    args.concurrency, headers if target_cluster else {}, pids,
                    target_cluster.ssl_context if target_cluster else None))
                terms.setdefault(name, [before])
                if target_cluster:
                    terms[name][1:] = [_term(target_cluster)]
    finally:
        cluster.close()
        tls_cluster.close()
        for process in processes:
            process.kill()
            process.join()
        shutil.rmtree(workdir, ignore_errors=True)
    trivial_rounds = rounds["trivial aiohttp handler"]
    print(f"{'target':<24}{'req/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'errors':>7}{'vs trivial':>11}"
          f"{'target CPU':>11}{'loadgen':>8}{'machine':>8}  Raft term before/after")
    for name, runs in rounds.items():
        r = merged(runs)
        # the median of per-round ratios: each round compares targets under the same load
        ratio = statistics.median(run["rps"] / base["rps"]
                                  for run, base in zip(runs, trivial_rounds, strict=True))
        term = "/".join(map(str, terms[name])) if len(terms[name]) > 1 else ""
        print(f"{name:<24}{r['rps']:>8.0f}{r['p50_ms']:>8.2f}{r['p99_ms']:>8.2f}{r['errors']:>7}"
              f"{ratio:>10.0%}{r['target_cores']:>11.2f}{r['loadgen_cores']:>8.2f}"
              f"{r['machine_cores']:>8.2f}  {term} {r['statuses'] or ''}")
    if args.rounds > 1:
        print("per round, vs trivial: " + "; ".join(
            f"{name}: " + " ".join(f"{run['rps'] / base['rps']:.0%}"
                                   for run, base in zip(runs, trivial_rounds, strict=True))
            for name, runs in rounds.items() if runs is not trivial_rounds))
    print(f"(CPU in cores; the machine has {os.cpu_count()}. 'target CPU' counts the trivial "
          f"server, the three members, or the three raw PySyncObj processes. 'vs trivial' is "
          f"the median over rounds of the ratio within a round. With every target up and no "
          f"load the machine was {idle_cores:.2f} cores busy.)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

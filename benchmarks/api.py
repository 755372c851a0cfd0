"""API benchmark: /v1/route on a 3-member cluster vs a trivial aiohttp handler, same load.

Starts three `cache-plane serve` processes on loopback and, in another process, a trivial
aiohttp app whose POST handler parses the JSON body and answers a small JSON object. One
asyncio load generator (this process, `--concurrency` connections, `--seconds` each) then
sends the same kind of request to each target:

- trivial:    POST /echo with the route body;
- dry-run:    POST /v1/route with dry_run (decision only, nothing committed);
- committed:  POST /v1/route (decision committed through Raft on every member);
- raw Raft:   a second baseline: three processes running plain PySyncObj (its journal file,
              never fsynced; the same password; its low-latency mode, appendEntriesUseBatch
              off) behind the trivial handler, which commits each body (a no-op `@replicated`
              call) before answering. It is what replicating the same bytes costs with no
              state machine and no durability, measured after the cluster above is stopped.

Beside each figure, the CPU the target's processes used (cores, from /proc) and how busy the
whole machine was: on a small machine the members, the load generator and the target share
the cores, which bounds what any target can reach.

Bodies: 8k-token prompts given as 512 block hashes (16-token blocks), built from 32 shared
prefixes of 448 blocks plus 64 unique blocks, against 16 registered nodes.
Usage: python benchmarks/api.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import aiohttp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.replication import machine as machine_info  # noqa: E402
from cache_plane.client import CachePlaneClient  # noqa: E402
from veristore_py.localcluster import LocalCluster, free_ports  # noqa: E402


def _trivial_server(port: int) -> None:
    from aiohttp import web

    async def echo(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"ok": True, "model": body.get("model")})

    app = web.Application(client_max_size=16 << 20)
    app.router.add_post("/echo", echo)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def _raw_raft_member(index: int, raft_ports: list[int], http_port: int, journal_dir: str,
                     password: str) -> None:
    """One member of the raw-PySyncObj baseline (see the module docstring)."""
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

    async def commit(request: web.Request) -> web.Response:
        raw = await request.read()
        body = json.loads(raw)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[int] = loop.create_future()

        def settle(error: int) -> None:
            if not done.done():
                done.set_result(error)

        def callback(_result: Any, error: int) -> None:
            loop.call_soon_threadsafe(settle, error)

        node.commit(raw, callback=callback)
        if await done != 0:
            return web.json_response({"error": "not_committed"}, status=503)
        return web.json_response({"ok": True, "model": body.get("model")})

    async def leader(request: web.Request) -> web.Response:
        return web.json_response({"leader": bool(node._isLeader())})

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
             headers: dict[str, str], pids: list[int]) -> dict[str, Any]:
    """`load`, plus the cores used by `pids`, by this process and by the whole machine."""
    before = [cpu_seconds(p) for p in pids], cpu_seconds(os.getpid()), machine_busy_seconds()
    started = time.monotonic()
    result = asyncio.run(load(url, payloads, seconds, concurrency, headers))
    wall = time.monotonic() - started
    result["target_cores"] = sum(cpu_seconds(p) - c for p, c in zip(pids, before[0],
                                                                      strict=True)) / wall
    result["loadgen_cores"] = (cpu_seconds(os.getpid()) - before[1]) / wall
    result["machine_cores"] = (machine_busy_seconds() - before[2]) / wall
    return result


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
               headers: dict[str, str]) -> dict[str, Any]:
    """Closed-loop load: `concurrency` workers send payloads back to back for `seconds`."""
    latencies: list[float] = []
    errors = 0
    statuses: dict[int, int] = {}
    stop = time.perf_counter() + seconds
    cursor = iter(range(10**9))
    connector = aiohttp.TCPConnector(limit=concurrency)
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
    latencies.sort()
    n = len(latencies)
    return {"ok": n, "errors": errors, "statuses": statuses, "rps": n / elapsed,
            "p50_ms": 1000 * latencies[n // 2] if n else float("nan"),
            "p99_ms": 1000 * latencies[min(n - 1, int(n * 0.99))] if n else float("nan")}


async def prepare(cluster: LocalCluster, token: str) -> str:
    async with CachePlaneClient(cluster.urls, token=token) as client:
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


def _wait_for_port(port: int, timeout: float = 30.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"trivial server did not listen on {port}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="2 s per target (CI)")
    args = parser.parse_args()
    if args.quick:
        args.seconds = 2.0
    rng = random.Random(3)
    token = "bench-token"
    headers = {"Authorization": f"Bearer {token}"}
    print(f"machine: {machine_info()}")
    print(f"load: {args.concurrency} connections x {args.seconds:.0f} s per target; "
          f"8k-token prompts as 512 block hashes; 16 nodes; 3 members on loopback\n")
    (port,) = free_ports(1)
    spawn = mp.get_context("spawn")
    trivial = spawn.Process(target=_trivial_server, args=(port,), daemon=True)
    trivial.start()
    # The benchmark's nodes do not heartbeat; a long lease keeps them up for the whole run.
    cluster = LocalCluster(tempfile.mkdtemp(prefix="bench-api-"), module="cache_plane",
                           api_token=token, settings={"log_level": "warning"},
                           env={"CACHE_PLANE_NODE_LEASE_MS": str(3_600_000),
                                **{k: v for k, v in os.environ.items()
                                   if k.startswith("CACHE_PLANE_")}})
    results = {}
    try:
        cluster.start()
        cluster.wait_for_leader()
        asyncio.run(prepare(cluster, token))
        _wait_for_port(port)
        members = [p.pid for p in (cluster.nodes[i].process for i in range(cluster.size))
                   if p is not None]
        assert trivial.pid is not None
        targets: list[tuple[str, Callable[[], str], bool, list[int]]] = [
            ("trivial aiohttp handler", lambda: f"http://127.0.0.1:{port}/echo", False,
             [trivial.pid]),
            ("route, dry run", lambda: _leader_url(cluster) + "/v1/route", True, members),
            ("route, committed", lambda: _leader_url(cluster) + "/v1/route", False, members),
        ]
        for name, url, dry_run, pids in targets:
            term_before = _term(cluster)
            results[name] = measured(url(), bodies(500, rng, dry_run), args.seconds,
                                     args.concurrency, headers, pids)
            results[name]["terms"] = f"{term_before}/{_term(cluster)}"
    finally:
        cluster.close()
    raw_dir = tempfile.mkdtemp(prefix="bench-raw-raft-")
    raft_ports, http_ports = free_ports(3), free_ports(3)
    raw = [spawn.Process(target=_raw_raft_member, daemon=True,
                         args=(i, raft_ports, http_ports[i], raw_dir, "bench-password"))
           for i in range(3)]
    try:
        for process in raw:
            process.start()
        leader_port = _raw_raft_leader(http_ports)
        results["raw PySyncObj commit"] = measured(
            f"http://127.0.0.1:{leader_port}/commit", bodies(500, rng, False), args.seconds,
            args.concurrency, {}, [p.pid for p in raw if p.pid is not None])
        results["raw PySyncObj commit"]["terms"] = ""
    finally:
        for process in [*raw, trivial]:
            process.kill()
            process.join()
        shutil.rmtree(raw_dir, ignore_errors=True)
    base = results["trivial aiohttp handler"]["rps"]
    print(f"{'target':<24}{'req/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'errors':>7}{'vs trivial':>11}"
          f"{'target CPU':>11}{'loadgen':>8}{'machine':>8}  Raft term before/after")
    for name, r in results.items():
        print(f"{name:<24}{r['rps']:>8.0f}{r['p50_ms']:>8.2f}{r['p99_ms']:>8.2f}{r['errors']:>7}"
              f"{r['rps'] / base:>10.0%}{r['target_cores']:>11.2f}{r['loadgen_cores']:>8.2f}"
              f"{r['machine_cores']:>8.2f}  {r['terms']} {r['statuses'] or ''}")
    print(f"(CPU in cores; the machine has {os.cpu_count()}. 'target CPU' counts the trivial "
          f"server, the three members, or the three raw PySyncObj processes.)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

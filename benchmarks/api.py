"""API benchmark: /v1/route on a 3-member cluster vs a trivial aiohttp handler, same load.

Starts three `cache-plane serve` processes on loopback and, in another process, a trivial
aiohttp app whose POST handler parses the JSON body and answers a small JSON object. One
asyncio load generator (this process, `--concurrency` connections, `--seconds` each) then
sends the same kind of request to each target:

- trivial:    POST /echo with the route body;
- dry-run:    POST /v1/route with dry_run (decision only, nothing committed);
- committed:  POST /v1/route (decision committed through Raft on every member).

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
import sys
import tempfile
import time
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
    trivial = mp.get_context("spawn").Process(target=_trivial_server, args=(port,), daemon=True)
    trivial.start()
    # The benchmark's nodes do not heartbeat; a long lease keeps them up for the whole run.
    cluster = LocalCluster(tempfile.mkdtemp(prefix="bench-api-"), module="cache_plane",
                           api_token=token, settings={"log_level": "warning"},
                           env={"CACHE_PLANE_NODE_LEASE_MS": str(3_600_000),
                                **{k: v for k, v in os.environ.items()
                                   if k.startswith("CACHE_PLANE_")}})
    try:
        cluster.start()
        cluster.wait_for_leader()
        asyncio.run(prepare(cluster, token))
        _wait_for_port(port)
        targets = [
            ("trivial aiohttp handler", lambda: f"http://127.0.0.1:{port}/echo", False),
            ("route, dry run", lambda: _leader_url(cluster), True),
            ("route, committed", lambda: _leader_url(cluster), False),
        ]
        results = {}
        for name, url, dry_run in targets:
            term_before = _term(cluster)
            target = url()
            path = "" if target.endswith("/echo") else "/v1/route"
            results[name] = asyncio.run(load(target + path, bodies(500, rng, dry_run),
                                             args.seconds, args.concurrency, headers))
            results[name]["terms"] = (term_before, _term(cluster))
    finally:
        cluster.close()
        trivial.kill()
        trivial.join()
    base = results["trivial aiohttp handler"]["rps"]
    print(f"{'target':<26}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'vs trivial':>12}"
          f"  Raft term before/after")
    for name, r in results.items():
        print(f"{name:<26}{r['rps']:>9.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['errors']:>8}"
              f"{r['rps'] / base:>11.0%}  {r['terms'][0]}/{r['terms'][1]} {r['statuses'] or ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

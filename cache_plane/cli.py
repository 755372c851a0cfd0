"""`cache-plane` command line.

Today it offers `demo`: start a local three-node veristore cluster on loopback (free ports,
fresh data dirs, a random Raft password), write and read through the leader, kill the leader
with SIGKILL, show that a new leader serves the same data, and shut everything down. The
routing demo replaces the body of `demo` once the cache_plane domain lands.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time

from veristore_py.client import VeristoreClient
from veristore_py.localcluster import LocalCluster


async def _demo_traffic(cluster: LocalCluster, writes: int) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    async with VeristoreClient(cluster.urls) as client:
        started = time.perf_counter()
        for i in range(writes):
            await client.put(f"demo/{i:04d}", f"value-{i}")
        elapsed = time.perf_counter() - started
        rows.append(("sequential writes", f"{writes} in {elapsed * 1000:.0f} ms "
                                          f"({elapsed / writes * 1000:.2f} ms each)"))
        got = await client.get("demo/0000")
        rows.append(("read demo/0000", str(got and got["value"])))
        leader = cluster.wait_for_leader()
        cluster.kill(leader)
        killed_at = time.perf_counter()
        await client.put("demo/after-failover", "ok")
        rows.append(("killed leader (SIGKILL)", f"node {leader}"))
        rows.append(("first write after kill", f"{time.perf_counter() - killed_at:.2f} s"))
        scan = await client.scan("demo/", limit=1000)
        rows.append(("keys readable after failover", str(len(scan["items"]))))
    return rows


def demo(args: argparse.Namespace) -> int:
    base = args.dir or tempfile.mkdtemp(prefix="cache-plane-demo-")
    cluster = LocalCluster(base, size=3)
    print(f"starting a 3-node cluster under {base} ...")
    try:
        cluster.start()
        t0 = time.perf_counter()
        leader = cluster.wait_for_leader()
        print(f"leader elected: node {leader} after {time.perf_counter() - t0:.2f} s")
        rows = asyncio.run(_demo_traffic(cluster, args.writes))
    finally:
        cluster.close()
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    print("cluster stopped; all node processes reaped")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cache-plane", description="llm-serving-cache control plane")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run a local 3-node cluster, write, fail over, shut down")
    p.add_argument("--dir", help="keep cluster data here instead of a temp dir")
    p.add_argument("--writes", type=int, default=200, help="sequential writes to make (default 200)")
    p.set_defaults(func=demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

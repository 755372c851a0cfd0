"""Capacity figures for operators: memory and disk per indexed block, journal and snapshot size.

Runs one cache_plane member in-process (real Raft, LMDB journal and state, group commit),
registers 4 nodes with room for everything, and routes `--routes` prompts of 8k tokens through
the service (512 new 16-token blocks each, completed, so the blocks stay indexed). Reports:

- process RSS growth per indexed block (Python's memory copy of the index plus the LMDB pages
  the process has touched; see routing_core.py for the index's Python heap alone);
- state store (LMDB data file, allocated bytes) per indexed block, with the block log as the
  routes left it and after the leader's block-log compaction replaced it with per-node
  checkpoints;
- Raft journal bytes per route, before and after log compaction (a snapshot);
- snapshot.bin bytes per indexed block: also the size of a backup (`cache-plane backup`).

Usage: python benchmarks/capacity.py [--quick] [--routes N]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.replication import machine as machine_info  # noqa: E402
from cache_plane import commands  # noqa: E402
from cache_plane.machine import CachePlaneMachine  # noqa: E402
from cache_plane.service import CachePlaneService  # noqa: E402
from cache_plane.settings import ServiceSettings  # noqa: E402
from veristore_py.config import NodeSettings  # noqa: E402
from veristore_py.localcluster import free_ports  # noqa: E402
from veristore_py.node import VeristoreNode  # noqa: E402

BLOCK_TOKENS = 16
PROMPT_BLOCKS = 512
CONCURRENCY = 32


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def allocated(path: str) -> int:
    """Bytes the file system allocated for a file (LMDB files may be sparse)."""
    return os.stat(path).st_blocks * 512 if os.path.exists(path) else 0


async def fill(service: CachePlaneService, routes: int) -> None:
    await service.register_model({"model_id": "m", "block_size": BLOCK_TOKENS})
    for n in range(4):
        await service.register_node({"node_id": f"gpu{n}", "address": f"10.0.0.{n}:8000",
                                     "models": ["m"], "capacity_blocks": routes * PROMPT_BLOCKS,
                                     "max_active": 1024})
    tokens = PROMPT_BLOCKS * BLOCK_TOKENS

    async def one(r: int) -> None:
        prompt = list(range(r * tokens, (r + 1) * tokens))
        routed = await service.route({"model": "m", "token_ids": prompt})
        await service.complete({"request_id": routed["request_id"],
                                "node_id": routed["node_id"]})

    for first in range(0, routes, CONCURRENCY):  # concurrent, so group commit batches them
        await asyncio.gather(*(one(r) for r in range(first, min(first + CONCURRENCY, routes))))


async def compact_block_log(service: CachePlaneService) -> None:
    while service.machine.log.record_count > 0:  # each command checkpoints the largest log
        await service.submit(commands.compact_log())


def wait_for_snapshot(node: VeristoreNode, built: int, timeout: float = 120.0) -> None:
    node.request_compaction()
    deadline = time.monotonic() + timeout
    while node.snapshots.built == built or len(node._journal) > 10:
        if time.monotonic() > deadline:
            raise TimeoutError("no snapshot")
        time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routes", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="200 routes (CI)")
    args = parser.parse_args()
    routes = 200 if args.quick else args.routes
    data = tempfile.mkdtemp(prefix="capacity-")
    raft, http = free_ports(2)
    settings = NodeSettings(raft_address=f"127.0.0.1:{raft}", http_address=f"127.0.0.1:{http}",
                            data_dir=data, compaction_min_entries=1_000_000,
                            compaction_min_time_s=1e9, password="capacity-benchmark").validate()
    node = VeristoreNode(settings, CachePlaneMachine())
    try:
        while not (node.is_leader() and node.leader_caught_up()):
            time.sleep(0.02)
        service = CachePlaneService(node, ServiceSettings(node_lease_ms=600_000))
        gc.collect()
        rss0 = rss_bytes()
        started = time.perf_counter()
        asyncio.run(fill(service, routes))
        elapsed = time.perf_counter() - started
        gc.collect()
        blocks = service.machine.index.size()
        rss = rss_bytes() - rss0
        state_file = os.path.join(data, "state", "data.mdb")
        journal_file = os.path.join(data, "journal", "data.mdb")
        state_logged, journal_full = allocated(state_file), allocated(journal_file)
        entries = len(node._journal)
        asyncio.run(compact_block_log(service))
        state_compacted = allocated(state_file)
        wait_for_snapshot(node, node.snapshots.built)
        snapshot = allocated(os.path.join(data, "snapshot.bin"))
        journal_after = allocated(journal_file)
    finally:
        node.stop()
        shutil.rmtree(data, ignore_errors=True)
    print(f"{machine_info()}")
    print(f"{routes} routes of {PROMPT_BLOCKS} blocks in {elapsed:.1f} s; {blocks} indexed "
          f"blocks, {entries} journal entries")
    rows = [
        ("process RSS growth", rss),
        ("state store (LMDB), block log as written", state_logged),
        ("state store after block-log compaction", state_compacted),
        ("snapshot.bin / backup", snapshot),
    ]
    for label, size in rows:
        print(f"  {label:<42} {size / 2**20:8.1f} MiB  {size / blocks:6.1f} B/block")
    print(f"  {'journal before log compaction':<42} {journal_full / 2**20:8.1f} MiB  "
          f"{journal_full / routes / 1024:6.1f} KiB/route")
    print(f"  {'journal after log compaction (file keeps its size)':<42} "
          f"{journal_after / 2**20:8.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Routing-core benchmark: decision cost and index memory at fleet scale (pure core, no I/O).

Builds a `CachePlaneMachine` whose index holds `--blocks` (node, block) entries across
`--nodes` nodes (chains of 512 blocks; a tenth of the chains are cached on two nodes), then
measures, for prompts of 1k, 8k and 32k tokens (16-token blocks):

- decide:  `CachePlaneMachine.decide`, what the leader runs before proposing a route (and for
           a dry run): longest-prefix match, scoring, eviction plan;
- apply:   the replicated `cp.route` carrying that decision, as every replica runs it (check
           the decision, index/LRU/pin updates, block-log mutations), timed alone; each route
           is then completed with `cp.complete` (untimed);
- baseline: the seed router's approach, a linear scan of the index for the longest prefix
           (timed on fewer prompts: it is slow by design).

Memory per indexed block is the Python heap growth (tracemalloc) while populating, divided by
the entries. Usage: python benchmarks/routing_core.py [--quick] [--blocks N] [--nodes N]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
import tracemalloc
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.replication import machine as machine_info  # noqa: E402
from cache_plane import commands  # noqa: E402
from cache_plane.hashing import DEFAULT_SEED  # noqa: E402
from cache_plane.index import victim_pairs  # noqa: E402
from cache_plane.machine import CachePlaneMachine  # noqa: E402
from cache_plane.model import RouteDecision  # noqa: E402
from cache_plane.policy import DEFAULT_POLICY  # noqa: E402
from veristore_py.state import ApplyContext  # noqa: E402

CHAIN = 512
BLOCK_TOKENS = 16
PRIOR = commands.priors(28_000, 10.0, 256)  # the settings' defaults, as the leader stamps them


class NullReader:
    """The machine reads only its memory copy; KV ops are not exercised here."""

    def get(self, key: bytes) -> bytes | None:
        return None

    def scan(self, prefix: bytes, start: bytes, limit: int) -> list[tuple[bytes, bytes]]:
        return []


def populate(m: CachePlaneMachine, nodes: int, blocks: int, rng: random.Random) -> list[list[int]]:
    """Fill the index through replicated kv_events commands; return the cached chains."""
    reader, ctx = NullReader(), ApplyContext(1, 0, 0)
    m.apply(commands.register_model("m", BLOCK_TOKENS, DEFAULT_SEED), reader, ctx)
    per_node = blocks // nodes
    for n in range(nodes):
        node = commands.register_node(f"n{n:02d}", f"10.0.0.{n}:8000", ["m"], 2 * per_node, 64,
                                      {}, 1 << 40)
        m.apply({**node, "now_ms": 0}, reader, ctx)
    chains: list[list[int]] = []
    entries, seq = 0, 0
    while entries < blocks:
        chain = [rng.getrandbits(64) for _ in range(CHAIN)]
        chains.append(chain)
        holders = [rng.randrange(nodes)]
        if rng.random() < 0.1:
            holders.append((holders[0] + 1) % nodes)
        for n in holders:
            seq += 1
            m.apply(commands.kv_events(f"n{n:02d}", seq,
                                       [{"type": "stored", "block_hashes": chain}]), reader, ctx)
            entries += CHAIN
    return chains


def prompt(chains: list[list[int]], tokens: int, rng: random.Random) -> list[int]:
    """A prompt that reuses a random cached prefix (sometimes all of it) and then diverges."""
    n = tokens // BLOCK_TOKENS
    chain = rng.choice(chains)
    shared = min(rng.randrange(n + 1), CHAIN)
    return chain[:shared] + [rng.getrandbits(64) for _ in range(n - shared)]


def linear_scan_best(m: CachePlaneMachine, blocks: list[int]) -> tuple[int, int]:
    """The seed's approach: walk every indexed entry to find the longest cached prefix."""
    best = (0, -1)
    for slot in range(len(m.nodes)):
        held = {b for _, b in m.index.lru_order(slot)}  # a full pass over the node's entries
        length = 0
        while length < len(blocks) and blocks[length] in held:
            length += 1
        best = max(best, (length, slot))
    return best


def timed(fn: Any, inputs: list[Any]) -> list[float]:
    """Seconds taken by `fn(x)` for each x in `inputs`."""
    out = []
    for x in inputs:
        t = time.perf_counter()
        fn(x)
        out.append(time.perf_counter() - t)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=1_000_000, help="indexed (node, block) entries")
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=300, help="decisions per prompt size")
    parser.add_argument("--quick", action="store_true", help="100k entries, fewer repeats (CI)")
    args = parser.parse_args()
    if args.quick:
        args.blocks, args.repeat = 100_000, 50
    rng = random.Random(7)
    print(f"machine: {machine_info()}")
    m = CachePlaneMachine()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    chains = populate(m, args.nodes, args.blocks, rng)
    built = time.perf_counter() - t0
    heap = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    entries = m.index.size()
    print(f"index: {entries:,} (node, block) entries on {args.nodes} nodes, built in {built:.1f} s "
          f"through cp.kv_events; heap {heap / 2**20:.0f} MiB = {heap / entries:.0f} bytes/entry\n")
    reader = NullReader()
    print(f"{'prompt':>8} {'blocks':>7} {'decide µs p50':>14} {'p99':>8} {'decide/s':>9}"
          f" {'apply µs p50':>13} {'baseline scan µs':>17}")
    index = 10
    for tokens in (1024, 8192, 32768):
        prompts = [prompt(chains, tokens, rng) for _ in range(args.repeat)]
        decide = timed(lambda p: m.decide({"model": "m", "blocks": p, "now_ms": 1}), prompts)
        applies = []
        for p in prompts:
            index += 1
            ctx = ApplyContext(index, 0, 1)
            command = commands.route("m", p, f"q{index}", 1, 30_000, 600_000, PRIOR,
                                     DEFAULT_POLICY.load_weight, DEFAULT_POLICY.session_max_load)
            decision = m.decide(command)  # the leader decides before proposing
            if isinstance(decision, RouteDecision) and decision.node_id is not None:
                commands.with_decision(command, decision.node_id, decision.route_type,
                                       decision.matched_blocks, victim_pairs(decision.evict))
            t = time.perf_counter()
            out = m.apply(command, reader, ctx)  # what every replica runs
            applies.append(time.perf_counter() - t)
            if out.result.get("routed"):
                m.apply(commands.complete(f"q{index}", out.result["node_id"], "ok", [], {},
                                          PRIOR), reader, ctx)
        scan = timed(lambda p: linear_scan_best(m, p), prompts[:5])
        decide.sort()
        print(f"{tokens:>8} {tokens // BLOCK_TOKENS:>7} {decide[len(decide) // 2] * 1e6:>14.0f}"
              f" {decide[int(len(decide) * 0.99)] * 1e6:>8.0f} {1 / statistics.fmean(decide):>9.0f}"
              f" {sorted(applies)[len(applies) // 2] * 1e6:>13.0f}"
              f" {statistics.median(scan) * 1e6:>17.0f}")
    stats = m.stats
    print(f"\nroutes applied: {stats.routes}; evictions {stats.evictions}; "
          f"rejections {stats.rejections}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

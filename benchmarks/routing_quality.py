"""Routing quality: cache_plane vs the routing policies of the systems we compete with.

Every policy routes the same workload onto the same simulated fleet (`cache_plane.sim`: KV
block pools with LRU eviction, continuous batching, a latency model of Llama-3.1-8B on H100;
see docs/simulation.md). cache_plane runs as a real 3-member cluster on loopback, asked over
HTTP for every request and told about every completion and eviction, as a router and node
agents would. The baselines are described in `cache_plane/sim/policies.py`.

Workloads: the Mooncake trace (`../shared/traces/mooncake_synthetic_trace.jsonl`, 512-token
blocks), many users behind a few long system prompts, multi-turn chats whose history grows,
and a no-sharing control. Per policy: token cache-hit rate, TTFT p50/p90/p99, end-to-end
latency, throughput, load imbalance (max/mean of each node's time-averaged requests) and
rejections. Prints tables, writes JSON and (with matplotlib) PNG plots.

Usage: python benchmarks/routing_quality.py [--quick] [--out DIR] [--workload NAME ...]

`--sweep` instead compares every policy across regimes (running slots x latency model x
offered load x workload) with cache_plane's machine applied in process on the virtual clock:
see `benchmarks/routing_sweep.py` and docs/simulation.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import routing_sweep  # noqa: E402
from benchmarks.replication import machine as machine_info  # noqa: E402
from cache_plane.client import CachePlaneClient  # noqa: E402
from cache_plane.sim import workloads  # noqa: E402
from cache_plane.sim.engine import (  # noqa: E402
    DEFAULT_KV_TOKENS,
    DEFAULT_LATENCY,
    EngineConfig,
    Request,
    fresh,
)
from cache_plane.sim.fleet import Fleet, run  # noqa: E402
from cache_plane.sim.policies import BASELINES, CachePlanePolicy  # noqa: E402
from veristore_py.localcluster import LocalCluster  # noqa: E402

TRACE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                     "shared", "traces", "mooncake_synthetic_trace.jsonl")
NODES = 8
MAX_NUM_SEQS = 128
# cache_plane's leader reads its real clock (it estimates prefill backlogs with it), so its
# run keeps virtual time `pace` times ahead of real time, and everything the cluster hears in
# milliseconds is on its clock: the prior speeds are scaled by the pace, and the completion
# reports' times divided by it. The pace leaves every request WALL_PER_REQUEST_S of
# real time for its three HTTP calls (route, complete, KV events), so the simulation never
# falls behind its pace.
WALL_PER_REQUEST_S = 0.03
ANCHOR_STYLE = ("sglang-style", "llm-d-style")


def workload_set(quick: bool) -> dict[str, tuple[int, Callable[[], list[Request]], bool]]:
    """name -> (block size, builder, is a sharing workload)."""
    n = 300 if quick else 1
    return {
        "mooncake": (512, lambda: workloads.mooncake(TRACE, limit=600 if quick else None), True),
        "shared-prompts": (16, lambda: workloads.shared_prompts(
            n if quick else 3000, 20.0, systems=160, system_tokens=8192), True),
        "multi-turn": (16, lambda: workloads.multi_turn(
            40 if quick else 250, 8, 12.0), True),
        "no-sharing": (16, lambda: workloads.no_sharing(n if quick else 1500, 8.0), False),
    }


def pace_for(requests: list[Request]) -> float:
    span_s = (requests[-1].arrival_ms - requests[0].arrival_ms) / 1000 if requests else 0.0
    return max(1.0, span_s / (len(requests) * WALL_PER_REQUEST_S))


def start_cluster(token: str, pace: float) -> LocalCluster:
    cluster = LocalCluster(tempfile.mkdtemp(prefix="bench-quality-"), module="cache_plane",
                           api_token=token, settings={"log_level": "warning"},
                           env={"CACHE_PLANE_NODE_LEASE_MS": str(3_600_000),
                                "CACHE_PLANE_REQUEST_TTL_MS": str(600_000),
                                # the fleet's prefill speed, as an operator would configure it
                                "CACHE_PLANE_PREFILL_TOKENS_PER_S": str(round(
                                    pace * 1000 / DEFAULT_LATENCY.prefill_ms_per_token)),
                                "CACHE_PLANE_DECODE_MS_PER_TOKEN": str(
                                    DEFAULT_LATENCY.step_ms(0, MAX_NUM_SEQS // 2) / pace)})
    cluster.start()
    cluster.wait_for_leader(timeout=60)
    return cluster


async def run_cache_plane(cluster: LocalCluster, token: str, name: str, block: int,
                          requests: list[Request], config: EngineConfig,
                          nodes: int = NODES, pace: float | None = None) -> dict[str, Any]:
    model = f"bench-{name}"
    async with CachePlaneClient(cluster.urls, token=token, timeout=30) as client:
        await client.register_model(model, block_size=block)
        fleet = Fleet.build(nodes, config)
        for i, node in enumerate(fleet.ids):
            await client.register_node(node, f"10.0.0.{i + 1}:8000", [model],
                                       capacity_blocks=config.capacity_blocks,
                                       max_active=config.max_num_seqs * 8,
                                       max_running=config.max_num_seqs)
        policy = CachePlanePolicy(client, model, pace=pace or 1.0)
        started = time.perf_counter()
        result = await run(fleet, requests, policy, pace=pace,
                           heartbeat_ms=routing_sweep.HEARTBEAT_MS)
        wall = time.perf_counter() - started
        await client.request("POST", f"/v1/models/{model}/invalidate")  # free node capacity
    summary = result.summary()
    summary["route_types"] = policy.decisions
    summary["route_errors"] = policy.route_errors
    summary["wall_s"] = wall
    return summary


def goals(rows: dict[str, dict[str, Any]], sharing: bool) -> list[tuple[str, bool, str]]:
    cp, rr, oracle = rows["cache_plane"], rows["round-robin"], rows["oracle"]
    if not sharing:  # the control: nothing to reuse, so only "costs nothing" is a goal
        return [("control: TTFT p90 within 10% of round robin's",
                 cp["ttft_p90_ms"] <= 1.1 * rr["ttft_p90_ms"],
                 f"{cp['ttft_p90_ms']:.0f} ms vs {rr['ttft_p90_ms']:.0f} ms")]
    best_anchor = min((rows[a] for a in ANCHOR_STYLE), key=lambda r: r["ttft_p90_ms"])
    out = [
        ("hit rate >= 95% of oracle's", cp["hit_rate"] >= 0.95 * oracle["hit_rate"],
         f"{cp['hit_rate']:.1%} vs oracle {oracle['hit_rate']:.1%}"),
        ("TTFT p90 <= 1/5 of round robin's", cp["ttft_p90_ms"] <= rr["ttft_p90_ms"] / 5,
         f"{cp['ttft_p90_ms']:.0f} ms vs {rr['ttft_p90_ms']:.0f} ms"),
        ("TTFT p90 better than the best anchor-style policy",
         cp["ttft_p90_ms"] < best_anchor["ttft_p90_ms"],
         f"{cp['ttft_p90_ms']:.0f} ms vs {best_anchor['policy']} {best_anchor['ttft_p90_ms']:.0f} ms"),
    ]
    if sharing:
        out.append(("no node overloaded (imbalance < 1.5)", cp["imbalance"] < 1.5,
                    f"{cp['imbalance']:.2f}"))
    return out


def print_table(name: str, rows: dict[str, dict[str, Any]]) -> None:
    print(f"\n== {name}")
    print(f"{'policy':<14}{'hit':>7}{'TTFT p50':>10}{'p90':>9}{'p99':>9}{'e2e p50':>9}"
          f"{'e2e p90':>9}{'req/s':>8}{'tok/s':>8}{'imbal':>7}{'rej':>6}")
    for r in rows.values():
        print(f"{r['policy']:<14}{r['hit_rate']:>7.1%}{r['ttft_p50_ms']:>10.0f}"
              f"{r['ttft_p90_ms']:>9.0f}{r['ttft_p99_ms']:>9.0f}{r['e2e_p50_ms']:>9.0f}"
              f"{r['e2e_p90_ms']:>9.0f}{r['throughput_rps']:>8.2f}"
              f"{r['output_tokens_per_s']:>8.0f}{r['imbalance']:>7.2f}{r['rejected']:>6}")


def plot(results: dict[str, dict[str, dict[str, Any]]], out_dir: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plots; pip install -e '.[bench]')")
        return []
    paths = []
    for metric, label in (("ttft_p90_ms", "TTFT p90 (ms, log scale)"),
                          ("hit_rate", "token cache-hit rate")):
        fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.6))
        for ax, (name, rows) in zip(axes if len(results) > 1 else [axes], results.items(),
                                    strict=True):
            names = list(rows)
            values = [rows[p][metric] for p in names]
            colors = ["tab:red" if p == "cache_plane" else "tab:gray" for p in names]
            ax.bar(range(len(names)), values, color=colors)
            ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
            ax.set_title(name, fontsize=10)
            if metric == "ttft_p90_ms":
                ax.set_yscale("log")
                ax.set_ylim(bottom=10)
        axes_list = axes if len(results) > 1 else [axes]
        axes_list[0].set_ylabel(label)
        fig.tight_layout()
        path = os.path.join(out_dir, f"routing_quality_{metric}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a few hundred requests per workload (CI)")
    parser.add_argument("--out", default=None, help="directory for JSON and PNG results")
    parser.add_argument("--workload", action="append", help="run only these workloads")
    routing_sweep.add_arguments(parser)
    args = parser.parse_args()
    if args.sweep:
        return routing_sweep.main(args, parser)
    sets = workload_set(args.quick)
    chosen = args.workload or list(sets)
    unknown = [w for w in chosen if w not in sets]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; choose from {list(sets)}")
    print(f"machine: {machine_info()}")
    print(f"fleet: {NODES} simulated engines (Llama-3.1-8B on H100 latency model, "
          f"{DEFAULT_KV_TOKENS:,}-token KV cache, {MAX_NUM_SEQS} concurrent sequences); "
          f"cache_plane: 3-member cluster on loopback")
    token = "routing-quality-benchmark-token"
    results: dict[str, dict[str, dict[str, Any]]] = {}
    verdicts: dict[str, list[tuple[str, bool, str]]] = {}
    for name in chosen:
        block, build, sharing = sets[name]
        requests = build()
        config = EngineConfig(capacity_blocks=DEFAULT_KV_TOKENS // block, block_size=block,
                              max_num_seqs=MAX_NUM_SEQS)
        rows: dict[str, dict[str, Any]] = {}
        for policy_class in BASELINES:
            result = asyncio.run(run(Fleet.build(NODES, config), fresh(requests),
                                     policy_class()))
            rows[policy_class.name] = result.summary()
        pace = pace_for(requests)
        cluster = start_cluster(token, pace)  # a fresh cluster, its rate scaled by the pace
        try:
            rows["cache_plane"] = asyncio.run(run_cache_plane(
                cluster, token, name, block, fresh(requests), config, pace=pace))
        finally:
            cluster.close()
            shutil.rmtree(cluster.base_dir, ignore_errors=True)
        results[name] = rows
        verdicts[name] = goals(rows, sharing)
        print_table(f"{name}: {len(requests)} requests, {block}-token blocks", rows)
        cp = rows["cache_plane"]
        print(f"   cache_plane route types {cp['route_types']}, rejections "
              f"{cp['route_errors'] or 'none'}, {cp['wall_s']:.0f} s wall for "
              f"{cp['requests']} routes over HTTP (virtual time at {pace:.1f}x real)")
        for goal, ok, detail in verdicts[name]:
            print(f"   [{'met' if ok else 'NOT met'}] {goal}: {detail}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "routing_quality.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"machine": machine_info(), "quick": args.quick, "results": results,
                       "goals": {k: [{"goal": g, "met": ok, "detail": d} for g, ok, d in v]
                                 for k, v in verdicts.items()}}, f, indent=1)
        print(f"\nwrote {path}")
        if not args.quick:
            for p in plot(results, args.out):
                print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

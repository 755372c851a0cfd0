"""Routing quality across regimes: every policy on the same arrivals, cell by cell.

The matrix (`routing_quality.py --sweep`): running slots per engine {8, 32, 128} x latency
model {prefill-bound, decode-bound} x offered load {0.5, 0.8, 1.0, 1.2} of the fleet's
capacity without reuse (`workloads.capacity_rps`) x workload {mooncake, multi-turn,
shared-prompts, no-sharing}: 96 cells on 8 simulated engines. In each cell the workload is
rescaled to its offered rate (`workloads.at_rate`) once, and every policy replays those same
arrivals: the baselines of `cache_plane/sim/policies.py` and cache_plane, in process
(`cache_plane/sim/inprocess.py`: the real machine on the virtual clock, node heartbeats every
2 s). cache_plane gets generic priors (the fleet's prefill rate, a mid-batch decode step,
256 output tokens) and is expected to learn the rest.

Verdicts per cell: (a) cache_plane's TTFT p90 <= 1.05 x the best other policy's (the oracle is
not an "other policy": it bounds hit rate and is blind to load; it is reported), (b) its load
imbalance <= 1.5, (c) on a sharing workload, its hit rate >= 95% of the oracle's.
`--quick` runs a small sub-matrix and checks ordering facts only (exit 1 if one fails).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks.replication import machine as machine_info
from cache_plane.sim import workloads
from cache_plane.sim.engine import (
    DECODE_BOUND_LATENCY,
    DEFAULT_KV_TOKENS,
    PREFILL_BOUND_LATENCY,
    EngineConfig,
    LatencyModel,
    Request,
    fresh,
)
from cache_plane.sim.fleet import Fleet, run
from cache_plane.sim.inprocess import InProcessCachePlane
from cache_plane.sim.policies import BASELINES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACE = os.path.join(ROOT, "..", "shared", "traces", "mooncake_synthetic_trace.jsonl")
DEFAULT_OUT = os.path.join(ROOT, "docs", "routing_quality")

NODES = 8
SLOTS = (8, 32, 128)
LATENCIES: dict[str, LatencyModel] = {"prefill-bound": PREFILL_BOUND_LATENCY,
                                      "decode-bound": DECODE_BOUND_LATENCY}
LOADS = (0.5, 0.8, 1.0, 1.2)
WORKLOADS = ("mooncake", "multi-turn", "shared-prompts", "no-sharing")
SHARING = {"mooncake": True, "multi-turn": True, "shared-prompts": True, "no-sharing": False}
QUICK = {"slots": (8, 128), "latency": tuple(LATENCIES), "load": (1.0,),
         "workload": ("mooncake", "no-sharing")}
REQUESTS, QUICK_REQUESTS = 1000, 300
MOONCAKE_KV_BLOCKS = 3000   # 512-token blocks per node: the fleet
HEARTBEAT_MS = 2000.0
PRIOR_OUTPUT_TOKENS = 256
TTFT_SLACK, MAX_IMBALANCE, HIT_FRACTION = 1.05, 1.5, 0.95
ORACLE = "oracle"
CACHE_PLANE = "cache_plane"


@dataclass(frozen=True, slots=True)
class Cell:
    workload: str
    latency: str
    slots: int
    load: float

    def label(self) -> str:
        return f"{self.workload:<14}{self.latency:<14}S={self.slots:<4}load {self.load:.1f}"


# -- workloads and priors -------------------------------------------------------------------

def _builders(n: int) -> dict[str, tuple[int, Callable[[], list[Request]]]]:
    """name -> (block size, builder); rates are rescaled per cell.

    The generated workloads have about `n` requests. The Mooncake trace is replayed whole
    (3,993 requests): its reuse builds up over the trace (the oracle's hit rate is ~17% on its
    first 1,000 requests, ~60% on all), and with 512-token blocks and short outputs it costs
    about as little to simulate as 1,000 requests of the others.
    """
    turns = 8
    return {
        "mooncake": (512, lambda: workloads.mooncake(TRACE)),
        # ~20 conversations live at once: starts spread over ~5x a conversation's length, so
        # the ramp-up and ramp-down are a small part of the run.
        "multi-turn": (16, lambda: workloads.multi_turn(max(n // turns, 1), turns, 1.0)),
        "shared-prompts": (16, lambda: workloads.shared_prompts(n, 10.0, systems=160,
                                                                 system_tokens=8192)),
        "no-sharing": (16, lambda: workloads.no_sharing(n, 8.0)),
    }


@functools.lru_cache(maxsize=8)
def workload(name: str, n: int) -> tuple[int, tuple[Request, ...]]:
    """(block size, requests) of a sweep workload (built once per process)."""
    block, build = _builders(n)[name]
    return block, tuple(build())


def engine_config(cell: Cell, block: int) -> EngineConfig:
    capacity = MOONCAKE_KV_BLOCKS if cell.workload == "mooncake" else DEFAULT_KV_TOKENS // block
    return EngineConfig(capacity_blocks=capacity, block_size=block, max_num_seqs=cell.slots,
                        latency=LATENCIES[cell.latency])


def priors(latency: LatencyModel, slots: int) -> dict[str, Any]:
    """Deliberately generic operator priors: the router is supposed to learn the rest."""
    return {"prefill_tokens_per_s": 1000 / latency.prefill_ms_per_token,
            "decode_ms_per_token": latency.decode_base_ms + latency.decode_ms_per_seq * slots / 2,
            "mean_output_tokens": PRIOR_OUTPUT_TOKENS}


# -- one cell -------------------------------------------------------------------------------

def run_cell(cell: Cell, n: int, overrides: dict[str, Any] | None = None,
             heartbeat_ms: float = HEARTBEAT_MS, heartbeat_loss: float = 0.0) -> dict[str, Any]:
    """Run every policy on the cell's arrivals; return its rows and cache_plane's details.

    cache_plane's nodes heartbeat every `heartbeat_ms`, and a `heartbeat_loss` share of
    the heartbeats is lost on the way (deterministically, per node).
    """
    started = time.perf_counter()
    block, base = workload(cell.workload, n)
    config = engine_config(cell, block)
    capacity = workloads.capacity_rps(base, config, NODES)
    requests = workloads.at_rate(base, cell.load * capacity)
    rows: dict[str, dict[str, Any]] = {}
    for policy_class in BASELINES:
        result = asyncio.run(run(Fleet.build(NODES, config), fresh(requests), policy_class()))
        rows[policy_class.name] = result.summary()
    fleet = Fleet.build(NODES, config)
    policy = InProcessCachePlane(fleet, **priors(config.latency, cell.slots),
                                 policy_overrides=overrides, heartbeat_loss=heartbeat_loss)
    result = asyncio.run(run(fleet, fresh(requests), policy, heartbeat_ms=heartbeat_ms))
    rows[CACHE_PLANE] = result.summary()
    return {**asdict(cell), "requests": len(requests), "block_size": block,
            "capacity_rps": capacity, "offered_rps": cell.load * capacity, "rows": rows,
            "cache_plane": {"route_types": policy.decisions, "rejections": policy.route_errors,
                            "active_after_run": len(policy.machine.requests)},
            "wall_s": time.perf_counter() - started}


def _run_job(job: tuple[Cell, int, dict[str, Any] | None, float, float]) -> dict[str, Any]:
    return run_cell(*job)


def verdict(cell: dict[str, Any]) -> dict[str, Any]:
    """The three goals of a cell (see module docstring); None where a goal does not apply."""
    rows = cell["rows"]
    cp, oracle = rows[CACHE_PLANE], rows[ORACLE]
    others = [r for name, r in rows.items() if name not in (CACHE_PLANE, ORACLE)]
    best = min(others, key=lambda r: r["ttft_p90_ms"])
    ratio = cp["ttft_p90_ms"] / best["ttft_p90_ms"] if best["ttft_p90_ms"] > 0 else math.inf
    sharing = SHARING[cell["workload"]]
    hit_ratio = cp["hit_rate"] / oracle["hit_rate"] if sharing and oracle["hit_rate"] else None
    goals = {"ttft": ratio <= TTFT_SLACK, "imbalance": cp["imbalance"] <= MAX_IMBALANCE,
             "hit": None if hit_ratio is None else hit_ratio >= HIT_FRACTION}
    return {"ttft_ratio": ratio, "best_other": best["policy"],
            "best_other_ttft_p90_ms": best["ttft_p90_ms"], "imbalance": cp["imbalance"],
            "hit_ratio": hit_ratio, "oracle_hit_rate": oracle["hit_rate"], "goals": goals,
            "all_met": all(v is not False for v in goals.values())}


def _mark(ok: bool | None) -> str:
    return "-" if ok is None else ("ok" if ok else "NO")


def cell_line(cell: dict[str, Any]) -> str:
    rows, v = cell["rows"], cell["verdict"]
    p90 = " ".join(f"{_ABBREV.get(name, name)} {r['ttft_p90_ms']:.0f}" for name, r in rows.items())
    hit = f"{rows[CACHE_PLANE]['hit_rate']:.1%}/{v['oracle_hit_rate']:.1%}"
    return (f"{Cell(cell['workload'], cell['latency'], cell['slots'], cell['load']).label()}"
            f" | {cell['offered_rps']:6.1f} req/s | TTFT p90 ms: {p90}"
            f" | ratio {v['ttft_ratio']:.2f} imbal {v['imbalance']:.2f} hit cp/oracle {hit}"
            f" | a {_mark(v['goals']['ttft'])} b {_mark(v['goals']['imbalance'])}"
            f" c {_mark(v['goals']['hit'])} | {cell['wall_s']:.1f} s")


_ABBREV = {"round-robin": "rr", "least-loaded": "ll", "session-hash": "sh",
           "sglang-style": "sgl", "llm-d-style": "llmd", ORACLE: "orc", CACHE_PLANE: "cp"}


def print_summary(cells: Sequence[dict[str, Any]]) -> None:
    print(f"\n{'workload':<15}{'latency':<14}{'slots':>5}{'load':>6}{'cp p90':>9}"
          f"{'best other':>22}{'ratio':>7}{'imbal':>7}{'hit/orc':>8}  a  b  c  all")
    for cell in cells:
        v, cp = cell["verdict"], cell["rows"][CACHE_PLANE]
        best = f"{v['best_other']} {v['best_other_ttft_p90_ms']:.0f}"
        hit = "-" if v["hit_ratio"] is None else f"{v['hit_ratio']:.2f}"
        g = v["goals"]
        print(f"{cell['workload']:<15}{cell['latency']:<14}{cell['slots']:>5}{cell['load']:>6.1f}"
              f"{cp['ttft_p90_ms']:>9.0f}{best:>22}{v['ttft_ratio']:>7.2f}{v['imbalance']:>7.2f}"
              f"{hit:>8}{_mark(g['ttft']):>3}{_mark(g['imbalance']):>3}{_mark(g['hit']):>3}"
              f"{'yes' if v['all_met'] else 'no':>5}")
    met = sum(c["verdict"]["all_met"] for c in cells)
    ratios = [c["verdict"]["ttft_ratio"] for c in cells]
    print(f"\ncells meeting all goals: {met} / {len(cells)}; cache_plane TTFT p90 / best "
          f"other's: median {statistics.median(ratios):.2f}, worst {max(ratios):.2f}")


def ordering_failures(cells: Sequence[dict[str, Any]]) -> list[str]:
    """Ordering facts the quick sweep checks (no latencies, no thresholds on time)."""
    out = []
    for cell in cells:
        rows, name = cell["rows"], Cell(cell["workload"], cell["latency"], cell["slots"],
                                        cell["load"]).label()
        for policy, row in rows.items():
            if row["completed"] != cell["requests"] or row["rejected"]:
                out.append(f"{name}: {policy} completed {row['completed']} of "
                           f"{cell['requests']} ({row['rejected']} rejected)")
        if cell["cache_plane"]["active_after_run"]:
            out.append(f"{name}: cache_plane's machine still holds "
                       f"{cell['cache_plane']['active_after_run']} active requests")
        rr, oracle, cp = rows["round-robin"], rows[ORACLE], rows[CACHE_PLANE]
        if SHARING[cell["workload"]]:
            if oracle["hit_rate"] < rr["hit_rate"]:
                out.append(f"{name}: oracle's hit rate {oracle['hit_rate']:.3f} < round "
                           f"robin's {rr['hit_rate']:.3f}")
            if cp["hit_rate"] <= rr["hit_rate"]:
                out.append(f"{name}: cache_plane's hit rate {cp['hit_rate']:.3f} <= round "
                           f"robin's {rr['hit_rate']:.3f}")
        elif any(r["hit_rate"] for r in rows.values()):
            out.append(f"{name}: a policy reused KV on the no-sharing workload")
    return out


def heatmap(cells: Sequence[dict[str, Any]], path: str) -> bool:
    """Plot cache_plane's TTFT p90 / best other's per cell; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no heat map; pip install -e '.[bench]')")
        return False
    rows = list(dict.fromkeys((c["workload"], c["latency"]) for c in cells))
    cols = list(dict.fromkeys((c["slots"], c["load"])
                              for c in sorted(cells, key=lambda c: (c["slots"], c["load"]))))
    grid = [[math.nan] * len(cols) for _ in rows]
    for c in cells:
        grid[rows.index((c["workload"], c["latency"]))][cols.index((c["slots"], c["load"]))] = \
            c["verdict"]["ttft_ratio"]
    # Colour by log2(ratio), so 0.5x and 2x are equally far from 1.0 (white); clipped at 4x.
    shade = [[max(-2.0, min(2.0, math.log2(v))) if v > 0 else math.nan for v in row]
             for row in grid]
    fig, ax = plt.subplots(figsize=(1.0 * len(cols) + 3, 0.6 * len(rows) + 1.8))
    image = ax.imshow(shade, cmap="RdBu_r", vmin=-2, vmax=2, aspect="auto")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if abs(shade[i][j]) > 1.2 else "black")
    for j in range(1, len(cols)):  # separate the slot groups and the workloads
        if cols[j][0] != cols[j - 1][0]:
            ax.axvline(j - 0.5, color="black", linewidth=1.5)
    for i in range(1, len(rows)):
        if rows[i][0] != rows[i - 1][0]:
            ax.axhline(i - 0.5, color="black", linewidth=1.5)
    ax.set_xticks(range(len(cols)), [f"S={s}\nload {ld:g}" for s, ld in cols], fontsize=8)
    ax.set_yticks(range(len(rows)), [f"{w}\n{lat}" for w, lat in rows], fontsize=8)
    bar = fig.colorbar(image, ax=ax, ticks=[-2, -1, 0, 1, 2])
    bar.ax.set_yticklabels(["0.25x", "0.5x", "1x", "2x", "4x"])
    ax.set_title("cache_plane TTFT p90 / best other policy's (oracle excluded; < 1 is better)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- command line ---------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sweep (with --sweep; --quick and --workload apply too)")
    group.add_argument("--sweep", action="store_true",
                       help="run the regime matrix with cache_plane in process")
    group.add_argument("--slots", type=int, action="append", help=f"of {list(SLOTS)}")
    group.add_argument("--latency", action="append", choices=list(LATENCIES))
    group.add_argument("--load", type=float, action="append", help=f"of {list(LOADS)}")
    group.add_argument("--requests", type=int, default=None,
                       help=f"requests per cell of a generated workload ({REQUESTS}; "
                            f"{QUICK_REQUESTS} with --quick); mooncake is the whole trace")
    group.add_argument("--workers", type=int, default=2, help="processes over cells")
    group.add_argument("--heartbeat-ms", type=float, default=HEARTBEAT_MS,
                       help="virtual ms between a node's heartbeats to cache_plane")
    group.add_argument("--heartbeat-loss", type=float, default=0.0, metavar="FRACTION",
                       help="share of heartbeats lost on the way (deterministic per node)")
    group.add_argument("--policy-overrides", default=None, metavar="JSON",
                       help="merged into every cache_plane route command, e.g. "
                            "'{\"load_weight\": 1.0}'")


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    base = QUICK if args.quick else {"slots": SLOTS, "latency": tuple(LATENCIES),
                                     "load": LOADS, "workload": WORKLOADS}
    matrix = {key: tuple(getattr(args, key) or base[key]) for key in base}
    unknown = [w for w in matrix["workload"] if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; choose from {list(WORKLOADS)}")
    overrides = None
    if args.policy_overrides:
        overrides = json.loads(args.policy_overrides)
        if not isinstance(overrides, dict):
            parser.error("--policy-overrides must be a JSON object")
    n = args.requests or (QUICK_REQUESTS if args.quick else REQUESTS)
    if args.heartbeat_ms <= 0 or not 0 <= args.heartbeat_loss < 1:
        parser.error("--heartbeat-ms must be > 0 and --heartbeat-loss in [0, 1)")
    beats = (args.heartbeat_ms, args.heartbeat_loss)
    default_beats = beats == (HEARTBEAT_MS, 0.0)
    cells = [Cell(w, lat, s, ld) for w in matrix["workload"] for lat in matrix["latency"]
             for s in matrix["slots"] for ld in matrix["load"]]
    print(f"machine: {machine_info()}")
    print(f"sweep: {len(cells)} cells x {len(BASELINES) + 1} policies, ~{n} requests per cell, "
          f"{NODES} engines; cache_plane in process (heartbeats every {beats[0]:.0f} ms"
          f"{f', {beats[1]:.0%} lost' if beats[1] else ''}"
          f"{f', overrides {overrides}' if overrides else ''}); {args.workers} worker(s)")
    started = time.perf_counter()
    jobs = [(cell, n, overrides, *beats) for cell in cells]
    results: list[dict[str, Any]] = []

    def record(result: dict[str, Any]) -> None:
        result["verdict"] = verdict(result)
        results.append(result)
        print(cell_line(result), flush=True)

    if args.workers > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            for result in pool.imap(_run_job, jobs):
                record(result)
    else:
        for job in jobs:
            record(_run_job(job))
    wall = time.perf_counter() - started
    print_summary(results)
    print(f"wall time: {wall:.0f} s")
    # Only the whole default sweep replaces the published results unless --out says where.
    published = (not args.quick and matrix == base and not overrides and n == REQUESTS
                 and default_beats)
    out_dir = args.out or (DEFAULT_OUT if published else None)
    if out_dir is None:
        print("(results not written: pass --out DIR)")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "sweep_quick.json" if args.quick else "sweep.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"machine": machine_info(), "quick": args.quick, "matrix": matrix,
                       "requests_per_cell": n, "nodes": NODES, "heartbeat_ms": beats[0],
                       "heartbeat_loss": beats[1],
                       "policy_overrides": overrides, "wall_s": wall,
                       "cells_meeting_all_goals": sum(c["verdict"]["all_met"] for c in results),
                       "cells": results}, f, indent=1)
        print(f"wrote {path}")
        png = os.path.join(out_dir, "sweep_heatmap.png")
        if not args.quick and heatmap(results, png):
            print(f"wrote {png}")
    if args.quick:
        failures = ordering_failures(results)
        for failure in failures:
            print(f"ORDERING VIOLATED: {failure}")
        print("ordering facts: " + ("all hold" if not failures else f"{len(failures)} violated"))
        return 1 if failures else 0
    return 0

"""The simulated engine: prefix reuse, tail-first LRU, batching cap, latency model; the fleet."""

from __future__ import annotations

import asyncio

from cache_plane.sim.engine import Engine, EngineConfig, LatencyModel, Request, fresh
from cache_plane.sim.fleet import Fleet, run
from cache_plane.sim.policies import BASELINES, LeastLoaded, Oracle, RoundRobin
from cache_plane.sim.workloads import multi_turn, no_sharing, shared_prompts

FLAT = LatencyModel(prefill_ms_per_token=1.0, prefill_base_ms=0.0, decode_base_ms=10.0,
                    decode_ms_per_seq=0.0)


def drain(engine: Engine, now: float = 0.0) -> float:
    while (result := engine.step(now)) is not None:
        now = result.ends_ms
    return now


def test_cached_prefix_skips_prefill_and_first_token_time_follows():
    e = Engine("n", EngineConfig(capacity_blocks=100, block_size=4, latency=FLAT))
    a = Request("a", [1, 2, 3], 12, 2, 0.0)
    e.submit(a)
    end = drain(e)
    assert a.reused_blocks == 0 and a.ttft_ms == 12 + 10  # 12 prompt tokens + one decode
    b = Request("b", [1, 2, 9], 12, 1, end)
    e.submit(b)
    drain(e, end)
    assert b.reused_blocks == 2 and b.reused_tokens == 8 and b.ttft_ms == 4 + 10


def test_full_pool_evicts_unreferenced_chain_tail_first():
    e = Engine("n", EngineConfig(capacity_blocks=4, block_size=1, latency=FLAT))
    e.submit(Request("a", [1, 2, 3], 3, 1, 0.0))
    now = drain(e)
    e.submit(Request("b", [7, 8], 2, 1, now))
    drain(e, now)
    # b needed 2 prompt + 1 output block with 1 free: the chain [1, 2, 3] lost its tail first.
    assert e.holds(1) and not e.holds(3)


def test_batch_cap_makes_requests_wait():
    e = Engine("n", EngineConfig(capacity_blocks=100, block_size=1, max_num_seqs=1, latency=FLAT))
    first, second = Request("a", [1], 1, 3, 0.0), Request("b", [2], 1, 1, 0.0)
    e.submit(first)
    e.submit(second)
    drain(e)
    assert second.admitted_ms >= first.finished_ms and second.ttft_ms > first.ttft_ms


def test_prompt_larger_than_the_pool_is_refused_not_stuck():
    e = Engine("n", EngineConfig(capacity_blocks=2, block_size=1, latency=FLAT))
    r = Request("a", [1, 2, 3, 4], 4, 1, 0.0)
    e.submit(r)
    drain(e)
    assert r.rejected and e.idle()


def test_multi_turn_output_blocks_are_reused_by_the_next_turn():
    e = Engine("n", EngineConfig(capacity_blocks=100, block_size=1, latency=FLAT))
    t1 = Request("t1", [1, 2], 2, 2, 0.0, output_blocks=[3, 4])
    e.submit(t1)
    now = drain(e)
    t2 = Request("t2", [1, 2, 3, 4, 5], 5, 1, now)
    e.submit(t2)
    drain(e, now)
    assert t2.reused_blocks == 4


def test_every_baseline_completes_every_workload_and_oracle_bounds_hit_rate():
    config = EngineConfig(capacity_blocks=3000, block_size=16, max_num_seqs=32)
    for requests in (shared_prompts(120, 10.0, systems=12, system_tokens=2048),
                     multi_turn(10, 4, 4.0), no_sharing(60, 5.0)):
        results = {}
        for policy in BASELINES:
            out = asyncio.run(run(Fleet.build(4, config), fresh(requests), policy())).summary()
            assert out["completed"] == len(requests) and out["rejected"] == 0
            results[policy.name] = out
        assert results["oracle"]["hit_rate"] >= results["round-robin"]["hit_rate"]


def test_runs_are_deterministic():
    requests = shared_prompts(80, 10.0, systems=6, system_tokens=1024)
    config = EngineConfig(capacity_blocks=500, block_size=16)
    a = asyncio.run(run(Fleet.build(3, config), fresh(requests), LeastLoaded())).summary()
    b = asyncio.run(run(Fleet.build(3, config), fresh(requests), LeastLoaded())).summary()
    assert a == b
    assert asyncio.run(run(Fleet.build(3, config), fresh(requests), Oracle())).summary() != \
        asyncio.run(run(Fleet.build(3, config), fresh(requests), RoundRobin())).summary()

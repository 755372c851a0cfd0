"""The fleet loop's heartbeat timer, offered-load control, and cache_plane in process."""

from __future__ import annotations

import asyncio
import math

import pytest

from cache_plane.errors import CachePlaneError
from cache_plane.sim.engine import (
    DECODE_BOUND_LATENCY,
    Engine,
    EngineConfig,
    LatencyModel,
    Request,
    fresh,
)
from cache_plane.sim.fleet import Fleet, run
from cache_plane.sim.inprocess import InProcessCachePlane
from cache_plane.sim.policies import LeastLoaded, RoundRobin
from cache_plane.sim.workloads import (
    arrival_rate,
    at_rate,
    capacity_rps,
    multi_turn,
    no_sharing,
    shared_prompts,
)

CONFIG = EngineConfig(capacity_blocks=3000, block_size=16, max_num_seqs=8)


class Beating(RoundRobin):
    """Round robin that records every heartbeat it hears."""

    def __init__(self) -> None:
        super().__init__()
        self.beats: list[tuple[str, float]] = []

    async def heartbeat(self, node: str, engine: Engine, now_ms: float) -> None:
        self.beats.append((node, now_ms))


def in_process(fleet: Fleet, **overrides: float) -> InProcessCachePlane:
    return InProcessCachePlane(fleet, prefill_tokens_per_s=28_000, decode_ms_per_token=7.0,
                               mean_output_tokens=256, policy_overrides=overrides)


def test_heartbeats_fire_on_a_phased_timer_and_stop_when_the_run_is_over():
    """Node i beats at i*period/n + k*period until the fleet is idle; the run ends unchanged."""
    requests = no_sharing(40, 5.0)
    policy = Beating()
    result = asyncio.run(run(Fleet.build(4, CONFIG), fresh(requests), policy, heartbeat_ms=500))
    plain = asyncio.run(run(Fleet.build(4, CONFIG), fresh(requests), RoundRobin()))
    beating, baseline = result.summary(), plain.summary()
    # (the load integral is split at each beat: equal up to rounding)
    assert math.isclose(beating.pop("imbalance"), baseline.pop("imbalance"))
    assert beating == {**baseline, "policy": result.policy}
    ids = Fleet.build(4, CONFIG).ids
    for i, node in enumerate(ids):
        times = [t for n, t in policy.beats if n == node]
        assert times and all(math.isclose(t, i * 125 + k * 500) for k, t in enumerate(times))
    assert max(t for _, t in policy.beats) < result.makespan_ms + 500


def test_a_policy_without_heartbeat_ignores_the_timer():
    """Baselines have no heartbeat method; a heartbeat period changes nothing for them."""
    requests = no_sharing(20, 5.0)
    a = asyncio.run(run(Fleet.build(2, CONFIG), fresh(requests), LeastLoaded(), heartbeat_ms=10))
    b = asyncio.run(run(Fleet.build(2, CONFIG), fresh(requests), LeastLoaded()))
    assert a.summary() == b.summary() and a.avg_load == b.avg_load


def test_at_rate_gives_the_requested_mean_rate_and_keeps_the_order():
    """Rescaled arrivals have exactly the asked mean rate; order and sessions are kept."""
    requests = multi_turn(6, 4, 2.0)
    scaled = at_rate(requests, 7.5)
    assert math.isclose(arrival_rate(scaled), 7.5)
    assert [r.request_id for r in scaled] == [r.request_id for r in requests]
    assert [r.session for r in scaled] == [r.session for r in requests]
    assert all(r.finished_ms < 0 for r in scaled)  # unrun copies


def test_capacity_follows_its_definition():
    """Capacity = nodes x 1000 / (decode share of a full batch + prefill + shared step cost)."""
    flat = LatencyModel(prefill_ms_per_token=0.5, prefill_base_ms=8.0, decode_base_ms=10.0,
                        decode_ms_per_seq=1.0)
    requests = [Request(f"r{i}", [i], 100, 4, float(i)) for i in range(10)]
    config = EngineConfig(capacity_blocks=1000, block_size=16, max_num_seqs=8, latency=flat)
    # 8 running: decode 4 x (10 + 8) / 8 = 9 ms; prefill 50 ms + 8 ms / (8 / 4 admitted a step)
    assert math.isclose(capacity_rps(requests, config, 3), 3 * 1000 / (9 + 50 + 4))
    # A pool of 24 blocks holds 3 requests of 7 + 1 blocks: the batch is KV-limited to 3.
    small = EngineConfig(capacity_blocks=24, block_size=16, max_num_seqs=8, latency=flat)
    assert math.isclose(capacity_rps(requests, small, 1), 1000 / (4 * 13 / 3 + 50 + 8))


def test_decode_bound_model_spends_more_on_decode_than_prefill_per_request():
    """In the decode-bound model a full batch's decode outweighs a 1k-token prefill."""
    per_request_decode = 256 * DECODE_BOUND_LATENCY.step_ms(0, 128) / 128
    assert per_request_decode > DECODE_BOUND_LATENCY.step_ms(1024, 0)


def test_in_process_cache_plane_routes_everything_and_completes_every_request():
    """Every request is routed and reported; the machine ends with no active requests."""
    for requests in (shared_prompts(60, 10.0, systems=4, system_tokens=512),
                     multi_turn(6, 4, 4.0)):
        fleet = Fleet.build(3, CONFIG)
        policy = in_process(fleet)
        out = asyncio.run(run(fleet, fresh(requests), policy, heartbeat_ms=1000)).summary()
        assert out["completed"] == len(requests) and out["rejected"] == 0
        assert sum(policy.decisions.values()) == len(requests) and not policy.route_errors
        assert policy.machine.requests == {}
        assert all(rec.reported_used >= 0 for rec in policy.machine.nodes.values())  # beats


def test_policy_overrides_reach_every_route_command():
    """An override the machine refuses makes the route fail loudly, not silently reject."""
    fleet = Fleet.build(2, CONFIG)
    policy = in_process(fleet, load_weight=-1.0)
    with pytest.raises(CachePlaneError) as info:
        asyncio.run(run(fleet, fresh(no_sharing(2, 5.0)), policy))
    assert info.value.code == "invalid_command"

"""Simulated nodes against a real cluster: KV reports reach the index; routing quality order."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp.test_utils import TestClient, TestServer

from benchmarks.routing_quality import run_cache_plane
from cache_plane.client import CachePlaneClient
from cache_plane.sim.engine import EngineConfig, fresh
from cache_plane.sim.fleet import Fleet, run
from cache_plane.sim.policies import RoundRobin
from cache_plane.sim.server import SimNodeSettings, create_app, tokenize
from cache_plane.sim.workloads import shared_prompts

pytestmark = pytest.mark.integration


async def node_reports(cluster):
    settings = SimNodeSettings(node_id="sim-a", time_scale=1000.0, capacity_blocks=1000,
                               cluster_urls=tuple(cluster.urls), api_token="integration-test-token")
    async with TestClient(TestServer(create_app(settings))) as node, \
            CachePlaneClient(cluster.urls, token="integration-test-token", timeout=20) as router:
        prompt = " ".join(f"word{i}" for i in range(40))  # 40 tokens: two full 16-token blocks
        for _ in range(100):  # the node registers itself in the background
            if any(n["node_id"] == "sim-a" for n in await router.nodes()):
                break
            await asyncio.sleep(0.05)
        resp = await node.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4})
        assert resp.status == 200
        for _ in range(100):  # ... and publishes the stored blocks as KV events
            decision = await router.route("sim-llm", token_ids=tokenize(prompt), dry_run=True)
            if decision["matched_blocks"] == 2:
                break
            await asyncio.sleep(0.05)
        assert decision["node_id"] == "sim-a" and decision["matched_blocks"] == 2


def test_sim_node_registers_and_its_kv_events_reach_the_index(cluster_factory):
    cluster = cluster_factory(module="cache_plane", api_token="integration-test-token").start()
    asyncio.run(node_reports(cluster))


def test_cache_plane_beats_round_robin_on_a_sharing_workload(cluster_factory):
    """The ordering fact the quick benchmark must always show (no timing thresholds)."""
    cluster = cluster_factory(module="cache_plane", api_token="integration-test-token",
                              env={"CACHE_PLANE_NODE_LEASE_MS": "600000"}).start()
    cluster.wait_for_leader()
    requests = shared_prompts(200, 10.0, systems=24, system_tokens=4096)
    config = EngineConfig(capacity_blocks=6000, block_size=16, max_num_seqs=64)
    rr = asyncio.run(run(Fleet.build(4, config), fresh(requests), RoundRobin())).summary()
    ours = asyncio.run(run_cache_plane(cluster, "integration-test-token", "t", 16, fresh(requests), config, 4))
    assert ours["completed"] == rr["completed"] == len(requests)
    assert ours["hit_rate"] > rr["hit_rate"]

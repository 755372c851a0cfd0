"""Three real `cache-plane serve` processes: routing survives leader loss with the index intact."""

from __future__ import annotations

import asyncio

import pytest

from cache_plane.client import CachePlaneClient

pytestmark = pytest.mark.integration


async def scenario(cluster):
    leader = cluster.wait_for_leader()
    follower_a, follower_b = [i for i in range(3) if i != leader]
    # Register through one follower (client follows the 307 to the leader) ...
    async with CachePlaneClient([cluster.nodes[follower_a].url], token="integration-test-token") as admin:
        await admin.register_model("m", block_size=4)
        for i in range(3):
            await admin.register_node(f"gpu{i}", f"10.0.0.{i}:8000", ["m"], 100, max_active=8)
    # ... route through the other one.
    async with CachePlaneClient([cluster.nodes[follower_b].url] + cluster.urls, token="integration-test-token",
                                timeout=20) as router:
        prompt = list(range(64))
        first = await router.route("m", token_ids=prompt)
        await router.complete(first["request_id"], first["node_id"])
        cluster.kill(leader)
        again = await router.route("m", token_ids=prompt)
        assert again["node_id"] == first["node_id"]
        assert again["route_type"] == "exact" and again["matched_blocks"] == 16
        assert again["term"] > first["term"]
        stats = await router.stats()
        assert stats["routes_total"] == 2


def test_route_via_follower_and_survive_leader_kill(cluster_factory):
    """Register via one member, route via another, kill the leader: same client, same index."""
    cluster = cluster_factory(module="cache_plane", api_token="integration-test-token").start()
    asyncio.run(scenario(cluster))

"""A member's own ingester over real ZMQ: duplicate stores and removes, reference-counted.

One real member (Raft, LMDB, HTTP app with its ingester) subscribes to a publisher the test
drives frame by frame, so the index's answer to each duplicate is checked exactly.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from cache_plane.api import create_app
from cache_plane.machine import CachePlaneMachine
from cache_plane.sim.kv_publisher import (
    KVEventPublisher,
    KVEventsSettings,
    block_removed,
    block_stored,
)
from tests.members import single_member
from veristore_py.config import NodeSettings
from veristore_py.localcluster import free_ports

TOKEN = "admin-token-for-the-ingest-test"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    raft, http = free_ports(2)
    directory = tmp_path_factory.mktemp("ingest")
    settings = NodeSettings(raft_address=f"127.0.0.1:{raft}", http_address=f"127.0.0.1:{http}",
                            data_dir=str(directory / "data"), password="test-password",
                            api_token=TOKEN).validate()
    with single_member(settings, CachePlaneMachine()) as n:
        yield n


async def test_duplicate_stores_and_removes_over_the_wire_are_counted(node, aiohttp_client):
    pub_port, replay_port = free_ports(2)
    settings = KVEventsSettings(endpoint=f"tcp://127.0.0.1:{pub_port}",
                                replay_endpoint=f"tcp://127.0.0.1:{replay_port}", layout="map")
    client = await aiohttp_client(create_app(node, node.settings), headers=AUTH)
    await client.post("/v1/models", json={"model_id": "m", "block_size": 4})
    with KVEventPublisher(settings) as pub:
        r = await client.post("/v1/nodes", json={
            "node_id": "gpu0", "address": "127.0.0.1:1", "models": ["m"],
            "capacity_blocks": 1000, "kv_events": {"endpoint": settings.endpoint,
                                                   "replay_endpoint": settings.replay_endpoint,
                                                   "topic": settings.topic}})
        assert r.status == 200

        async def blocks() -> dict[int, str]:
            view = await (await client.get("/v1/nodes/gpu0/blocks")).json()
            return {b: tier for pairs in view["models"].values() for b, tier in pairs}

        async def settle(seq: int) -> None:
            deadline = time.monotonic() + 15
            while True:
                streams = (await (await client.get("/v1/nodes/gpu0")).json())["kv_streams"]
                if streams and streams[0]["last_seq"] == seq:
                    return
                assert time.monotonic() < deadline, streams
                await asyncio.sleep(0.05)

        tokens = list(range(8))
        pub.publish([block_stored("map", [11, 12], None, tokens, 4)])
        pub.publish([block_stored("map", [11], None, tokens[:4], 4)])  # vLLM stores it again
        pub.publish([block_stored("map", [12], None, tokens[4:], 4, medium="CPU")])
        await settle(2)
        assert await blocks() == {11: "gpu", 12: "gpu"}
        pub.publish([block_removed("map", [11, 12])])  # one GPU copy of each goes
        await settle(3)
        assert await blocks() == {11: "gpu", 12: "cpu"}  # 11 kept; 12 lives on in the CPU
        pub.publish([block_removed("map", [11]), block_removed("map", [12], medium="CPU")])
        await settle(4)
        assert await blocks() == {}
        stream = (await (await client.get("/v1/nodes/gpu0")).json())["kv_streams"][0]
        assert (stream["blocks_stored"], stream["blocks_removed"], stream["duplicates"]) == \
            (4, 2, 0)

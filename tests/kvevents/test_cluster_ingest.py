"""Sim-nodes publishing real ZMQ KV events to a real 3-member cluster (no HTTP reports).

The leader subscribes to every engine's stream; at quiescence each node's indexed block set
equals the engine's actual cache, also after the leader is killed mid-stream and after
frames are lost on the wire (replayed) and an engine's publisher restarts (rebuilt).
"""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

import pytest

from cache_plane.sim.stack import GatewayStack
from tests.gateway.test_gateway_stack import client, messages

pytestmark = pytest.mark.timeout(240)


def _get(stack: GatewayStack, url: str, *, cluster: bool = True) -> Any:
    assert stack.cluster is not None
    headers = stack.cluster.auth_headers if cluster else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
        return json.load(r)


def _post(url: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.load(r)


def indexed(stack: GatewayStack, node: str) -> set[int]:
    assert stack.cluster is not None
    leader = stack.cluster.nodes[stack.cluster.wait_for_leader()]
    view = _get(stack, f"{leader.url}/v1/nodes/{node}/blocks")
    return {block for blocks in view["models"].values() for block, tier in blocks
            if tier != "pending"}


def held(stack: GatewayStack, i: int) -> set[int]:
    return set(_get(stack, stack.engine_url(i) + "/sim/blocks", cluster=False)["blocks"])


def caught_up(stack: GatewayStack, i: int) -> bool:
    """The cluster applied every batch engine `i` published (its watermark is the last seq)."""
    assert stack.cluster is not None
    leader = stack.cluster.nodes[stack.cluster.wait_for_leader()]
    streams = _get(stack, f"{leader.url}/v1/nodes/gpu{i}")["kv_streams"]
    published = _get(stack, stack.engine_url(i) + "/sim/kv-events", cluster=False)
    return bool(streams) and streams[0]["last_seq"] == published["next_seq"] - 1


def converged(stack: GatewayStack, timeout: float = 30.0) -> None:
    """Every stream caught up, and each node's indexed blocks are the engine's."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            diffs = {f"gpu{i}": (indexed(stack, f"gpu{i}"), held(stack, i), caught_up(stack, i))
                     for i in range(stack.engines)}
        except OSError:  # a member just killed or restarting
            diffs = {"?": (set(), {0}, False)}
        if all(a == b and up for a, b, up in diffs.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError({n: (sorted(a - b)[:5], sorted(b - a)[:5], len(a), len(b), up)
                                  for n, (a, b, up) in diffs.items()})
        time.sleep(0.3)


def chat(stack: GatewayStack, n: int, tag: str) -> None:
    c = client(stack)
    for i in range(n):
        question = " ".join(f"{tag}-{i}-{w}" for w in range(40))  # new blocks each time
        c.chat.completions.create(model="tiny-chat", messages=messages(question), max_tokens=2)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with GatewayStack(str(tmp_path_factory.mktemp("zmq")), engines=2, gateways=1,
                      kv_events_zmq=True, kv_events_args=("--kv-events-layout", "map",
                                                          "--kv-events-hash", "bytes")) as s:
        yield s


def test_the_index_follows_the_engines_zmq_streams(stack):
    chat(stack, 6, "warm")  # may be published before the leader subscribed: replay brings it
    converged(stack)
    chat(stack, 6, "live")
    converged(stack)
    assert stack.cluster is not None
    leader = stack.cluster.nodes[stack.cluster.wait_for_leader()]
    nodes = [_get(stack, f"{leader.url}/v1/nodes/gpu{i}") for i in range(stack.engines)]
    assert all(n["kv_events"]["endpoint"].startswith("tcp://127.0.0.1:") for n in nodes)
    streams = [n["kv_streams"][0] for n in nodes]
    assert all(s["rank"] == 0 and not s["stale"] for s in streams)
    assert sum(s["batches"] for s in streams) >= 2
    assert sum(n["kv_ingest"][0]["frames"] for n in nodes) >= 1  # live, not only replayed
    req = urllib.request.Request(leader.url + "/metrics", headers=stack.cluster.auth_headers)
    with urllib.request.urlopen(req, timeout=5) as r:
        metrics = r.read().decode()
    assert 'cache_plane_kv_stream_batches_total{node="gpu0",rank="0"}' in metrics
    assert 'cache_plane_kv_ingest_frames_total{node="gpu0",rank="0"}' in metrics
    assert 'cache_plane_kv_ingest_lag_ms{node="gpu0",quantile="p99",rank="0"}' in metrics


def test_lost_frames_are_replayed_and_a_publisher_restart_rebuilds(stack):
    _post(stack.engine_url(0) + "/sim/kv-events", {"drop_live": 3})
    chat(stack, 6, "lossy")
    converged(stack)
    _post(stack.engine_url(1) + "/sim/kv-events", {"restart": True})
    chat(stack, 6, "restarted")
    converged(stack)


def test_a_leader_kill_mid_stream_loses_and_doubles_nothing(stack):
    assert stack.cluster is not None
    leader = stack.cluster.wait_for_leader()
    chat(stack, 2, "before")
    stack.cluster.kill(leader)
    chat(stack, 6, "during")
    stack.cluster.start_node(leader)
    converged(stack, timeout=45)

"""The veristore HTTP API on a real single-node cluster (real Raft, real LMDB, real HTTP)."""

from __future__ import annotations

import time

import pytest

from veristore_py.api import create_app
from veristore_py.config import NodeSettings
from veristore_py.localcluster import free_ports
from veristore_py.node import VeristoreNode

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def node(tmp_path):
    raft, http = free_ports(2)
    settings = NodeSettings(raft_address=f"127.0.0.1:{raft}", http_address=f"127.0.0.1:{http}",
                            data_dir=str(tmp_path / "data")).validate()
    n = VeristoreNode(settings)
    deadline = time.monotonic() + 10
    while not (n.is_leader() and n.leader_caught_up()):
        assert time.monotonic() < deadline, "single node did not elect itself"
        time.sleep(0.02)
    yield n
    n.stop()


@pytest.fixture
async def client(node, aiohttp_client):
    return await aiohttp_client(create_app(node, node.settings, TOKEN))


async def test_put_get_cas_delete_scan(client):
    """The KV round trip over HTTP."""
    r = await client.put("/v1/kv/a%2Fb", json={"value": "1"}, headers=AUTH)
    assert r.status == 200 and (await r.json())["revision"] > 0
    r = await client.get("/v1/kv/a%2Fb")
    assert (await r.json())["value"] == "1"
    r = await client.post("/v1/kv/a%2Fb/cas", json={"expected": "1", "value": "2"}, headers=AUTH)
    assert (await r.json())["succeeded"] is True
    r = await client.post("/v1/kv/a%2Fb/cas", json={"expected": "1", "value": "3"}, headers=AUTH)
    body = await r.json()
    assert body["succeeded"] is False and body["current"] == "2"
    r = await client.get("/v1/kv", params={"prefix": "a/"})
    assert [i["key"] for i in (await r.json())["items"]] == ["a/b"]
    for consistency in ("lease", "stale"):
        r = await client.get("/v1/kv/a%2Fb", params={"consistency": consistency})
        assert (await r.json())["value"] == "2"
    r = await client.delete("/v1/kv/a%2Fb", headers=AUTH)
    assert (await r.json())["deleted"] is True
    r = await client.get("/v1/kv/a%2Fb")
    assert r.status == 404 and (await r.json())["error"] == "key_not_found"


async def test_idempotent_retry_returns_first_outcome(client):
    """Retrying a CAS with the same idempotency key does not apply it twice."""
    body = {"expected": None, "value": "x", "idempotency_key": "req-1"}
    first = await (await client.post("/v1/kv/k/cas", json=body, headers=AUTH)).json()
    again = await (await client.post("/v1/kv/k/cas", json=body, headers=AUTH)).json()
    assert first["succeeded"] and again["succeeded"] and again["replayed"]


@pytest.mark.parametrize("method, path, kwargs, status, code", [
    ("put", "/v1/kv/a", {"data": b"{not json"}, 400, "invalid_request"),
    ("put", "/v1/kv/a", {"json": [1, 2]}, 400, "invalid_request"),
    ("put", "/v1/kv/a", {"json": {"value": 5}}, 400, "invalid_request"),
    ("put", "/v1/kv/a", {"json": {}}, 400, "invalid_request"),
    ("post", "/v1/kv/a/cas", {"json": {"value": "x"}}, 400, "invalid_request"),
    ("put", "/v1/kv/a", {"json": {"value": "x", "idempotency_key": 7}}, 400, "invalid_request"),
    ("put", "/v1/kv/" + "k" * 401, {"json": {"value": "x"}}, 400, "invalid_request"),
    ("get", "/v1/kv", {"params": {"limit": "0"}}, 400, "invalid_request"),
    ("get", "/v1/kv/a", {"params": {"consistency": "eventual"}}, 400, "invalid_request"),
    ("put", "/v1/kv/a", {"data": b"x" * (3 << 20)}, 413, "body_too_large"),
    ("get", "/v1/nope", {}, 404, "not_found"),
    ("patch", "/v1/kv/a", {}, 405, "method_not_allowed"),
])
async def test_bad_requests_get_clear_4xx(client, method, path, kwargs, status, code):
    """Malformed input gets a JSON 4xx naming the problem, never a 500."""
    r = await getattr(client, method)(path, headers=AUTH, **kwargs)
    body = await r.json()
    assert r.status == status and body["error"] == code and body["definite"] is True
    assert body["detail"]


async def test_mutations_require_bearer_token(client):
    """Writes without the configured token are refused; reads are open."""
    r = await client.put("/v1/kv/a", json={"value": "1"})
    assert r.status == 401
    r = await client.put("/v1/kv/a", json={"value": "1"}, headers={"Authorization": "Bearer wrong"})
    assert r.status == 401
    assert (await client.get("/health/live")).status == 200


async def test_status_and_readiness(client, node):
    """Status reports this node as leader; readiness is green."""
    status = await (await client.get("/v1/status")).json()
    assert status["state"] == "leader" and status["leader"] == node.settings.raft_address
    assert (await client.get("/health/ready")).status == 200
    digest = await (await client.get("/v1/digest")).json()
    assert len(digest["digest"]) == 64

"""The veristore HTTP API on a real single-node cluster (real Raft, real LMDB, real HTTP)."""

from __future__ import annotations

import aiohttp
import pytest

from tests.members import single_member
from veristore_py.api import create_app
from veristore_py.config import NodeSettings
from veristore_py.localcluster import free_ports

TOKEN = "admin-token-for-the-api-tests"
READ_TOKEN = "read-token-for-the-api-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
READ = {"Authorization": f"Bearer {READ_TOKEN}"}  # the test client's default


def tokens_file(directory):
    path = directory / "tokens"
    path.write_text(f"read {READ_TOKEN}\n")
    return str(path)


@pytest.fixture
def node(tmp_path):
    raft, http = free_ports(2)
    settings = NodeSettings(raft_address=f"127.0.0.1:{raft}", http_address=f"127.0.0.1:{http}",
                            data_dir=str(tmp_path / "data"), password="test-password",
                            api_token=TOKEN, tokens_file=tokens_file(tmp_path)).validate()
    with single_member(settings) as n:
        yield n


@pytest.fixture
async def client(node, aiohttp_client):
    return await aiohttp_client(create_app(node, node.settings), headers=READ)


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


async def test_endpoints_require_a_token_of_their_role(client):
    """Writes need admin (a read token is 403, none or a wrong one 401); reads need read;
    health needs nothing."""
    r = await client.put("/v1/kv/a", json={"value": "1"})  # the client's default: read
    assert r.status == 403 and (await r.json())["error"] == "forbidden"
    r = await client.put("/v1/kv/a", json={"value": "1"}, headers={"Authorization": "Bearer wrong"})
    assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    async with aiohttp.ClientSession() as bare:  # no Authorization header at all
        assert (await bare.get(client.make_url("/v1/kv/a"))).status == 401
        assert (await bare.get(client.make_url("/health/live"))).status == 200
    assert (await client.get("/v1/kv/a")).status == 404  # read: allowed (key absent)


async def test_status_and_readiness(client, node):
    """Status reports this node as leader; readiness is green."""
    status = await (await client.get("/v1/status")).json()
    assert status["state"] == "leader" and status["leader"] == node.settings.raft_address
    assert (await client.get("/health/ready")).status == 200
    digest = await (await client.get("/v1/digest")).json()
    assert len(digest["digest"]) == 64


async def test_a_body_that_never_arrives_is_a_408(client, monkeypatch):
    """A client that sends headers and then too little of its body gets 408, not a handler
    held forever (the timeout is shortened for the test; docs/security.md)."""
    import asyncio

    from veristore_py import api

    monkeypatch.setattr(api, "BODY_READ_TIMEOUT_S", 0.3)
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(b"PUT /v1/kv/slow HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: 100\r\n\r\n"
                 b'{"value":')
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 30)
    writer.close()
    assert status_line.split()[1] == b"408"
    assert (await client.get("/v1/kv/slow")).status == 404  # nothing was written


async def test_an_undecodable_authorization_header_is_a_401(client):
    """Bytes that are not UTF-8 in the token are an unknown token, not a 500 (whose log line
    would carry the presented token)."""
    import asyncio

    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(b"GET /v1/kv/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe"
                 + b"a" * 20 + b"\r\nConnection: close\r\n\r\n")
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 30)
    writer.close()
    assert status_line.split()[1] == b"401"

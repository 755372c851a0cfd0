"""The cache_plane HTTP API on a real single-member cluster (real Raft, LMDB, HTTP)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cache_plane.api import create_app
from cache_plane.hashing import block_hashes
from cache_plane.machine import CachePlaneMachine
from tests.members import single_member
from veristore_py.config import NodeSettings
from veristore_py.localcluster import free_ports

TOKEN = "admin-token-for-the-api-tests"
READ_TOKEN = "read-token-for-the-api-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
READ = {"Authorization": f"Bearer {READ_TOKEN}"}  # the test client's default


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    raft, http = free_ports(2)
    directory = tmp_path_factory.mktemp("cp")
    tokens = directory / "tokens"
    tokens.write_text(f"read {READ_TOKEN}\n")
    settings = NodeSettings(raft_address=f"127.0.0.1:{raft}", http_address=f"127.0.0.1:{http}",
                            data_dir=str(directory / "data"), password="test-password",
                            api_token=TOKEN, tokens_file=str(tokens)).validate()
    with single_member(settings, CachePlaneMachine()) as n:
        yield n


@pytest.fixture
async def client(node, aiohttp_client):
    c = await aiohttp_client(create_app(node, node.settings), headers=READ)
    await c.post("/v1/models", json={"model_id": "llama", "block_size": 4}, headers=AUTH)
    for i, cap in enumerate((50, 50)):
        await c.post("/v1/nodes", json={"node_id": f"gpu{i}", "address": f"10.0.0.{i}:8000",
                                        "models": ["llama"], "capacity_blocks": cap,
                                        "max_active": 8}, headers=AUTH)
    return c


async def post(client, path, body):
    r = await client.post(path, json=body, headers=AUTH)
    return r.status, await r.json()


async def test_route_miss_then_prefix_hit_with_breakdown(client):
    """Token ids are hashed server-side; a shared prefix routes back to its holder."""
    tokens = list(range(40))
    status, first = await post(client, "/v1/route", {"model": "llama", "token_ids": tokens,
                                                     "request_id": "api-r1"})
    assert status == 200 and first["route_type"] in ("miss", "prefix", "exact")
    assert {"node_id", "address", "matched_blocks", "matched_tokens", "total_blocks",
            "evicted_blocks", "candidates", "term", "index"} <= set(first)
    await post(client, "/v1/complete", {"request_id": "api-r1", "node_id": first["node_id"]})
    status, hit = await post(client, "/v1/route", {
        "model": "llama", "block_hashes": block_hashes(tokens[:32], 4) + [7, 8]})
    assert status == 200 and hit["node_id"] == first["node_id"]
    assert hit["matched_blocks"] == 8 and hit["matched_tokens"] == 32
    assert len(hit["candidates"]) == 2


async def test_completion_reports_in_a_batch_each_get_their_result(client):
    """One /v1/complete/batch: each report's result in order; a bad one does not sink the rest."""
    routed = []
    for i in range(3):
        status, r = await post(client, "/v1/route", {"model": "llama", "request_id": f"b{i}",
                                                    "token_ids": list(range(100 + i, 120 + i))})
        assert status == 200
        routed.append(r["node_id"])
    other = "gpu1" if routed[1] == "gpu0" else "gpu0"
    status, body = await post(client, "/v1/complete/batch", {"reports": [
        {"request_id": "b0", "node_id": routed[0], "output_tokens": 3},
        {"request_id": "b1", "node_id": other},  # not where it was routed
        {"request_id": "b2", "node_id": routed[2], "status": "cancelled"},
        {"request_id": "b0", "node_id": routed[0]},  # reported twice
    ]})
    assert status == 200
    first, wrong, cancelled, again = body["results"]
    assert first["confirmed"] is True and cancelled["confirmed"] is False
    assert wrong["error"]["code"] == "node_mismatch" and wrong["error"]["detail"]
    assert again.get("duplicate") is True


async def test_retried_route_returns_the_same_decision(client):
    """Repeating a request id answers with the original decision (safe retries)."""
    body = {"model": "llama", "prompt": "x" * 400, "request_id": "same-id"}
    _, a = await post(client, "/v1/route", body)
    _, b = await post(client, "/v1/route", body)
    assert b["node_id"] == a["node_id"] and b["duplicate"] is True


async def test_dry_run_changes_nothing(client):
    """dry_run answers with a decision but commits nothing."""
    before = await (await client.get("/v1/stats")).json()
    status, r = await post(client, "/v1/route", {"model": "llama", "token_ids": list(range(8)),
                                                 "dry_run": True})
    after = await (await client.get("/v1/stats")).json()
    assert status == 200 and r["dry_run"] and before["routes_total"] == after["routes_total"]


async def test_nodes_models_heartbeat_drain_delete(client):
    """Node lifecycle over HTTP."""
    assert (await post(client, "/v1/nodes/gpu1/heartbeat", {"active_requests": 2,
                                                            "queue_depth": 1}))[0] == 200
    node = await (await client.get("/v1/nodes/gpu1")).json()
    assert node["active_requests"] == 2 and node["queue_depth"] == 1
    assert node["reported_used_blocks"] is None  # the engine never said
    assert (await post(client, "/v1/nodes/gpu1/heartbeat", {"used_blocks": 7}))[0] == 200
    node = await (await client.get("/v1/nodes/gpu1")).json()
    assert node["reported_used_blocks"] == 7 and node["used_blocks"] >= 0
    assert (await post(client, "/v1/nodes/gpu1/drain", {}))[1]["state"] == "draining"
    r = await client.delete("/v1/nodes/gpu1", headers=AUTH)
    assert r.status == 200
    assert (await client.get("/v1/nodes/gpu1")).status == 404
    models = await (await client.get("/v1/models")).json()
    assert models["models"][0]["model_id"] == "llama"
    assert (await post(client, "/v1/models/llama/invalidate", {}))[1]["epoch"] >= 1


async def test_kv_events_idempotent_per_seq(client):
    """The same (node, seq) batch applies once."""
    body = {"node_id": "gpu0", "seq": 100, "events": [
        {"type": "stored", "block_hashes": [11, 12], "tier": "cpu"}]}
    assert (await post(client, "/v1/kv-events", body))[1]["stored"] == 2
    assert (await post(client, "/v1/kv-events", body))[1]["duplicate"] is True


@pytest.mark.parametrize("path, body, status, code", [
    ("/v1/route", {"model": "nope", "token_ids": [1]}, 404, "unknown_model"),
    ("/v1/route", {"model": "llama"}, 400, "invalid_request"),
    ("/v1/route", {"model": "llama", "token_ids": [1], "prompt": "x"}, 400, "invalid_request"),
    ("/v1/route", {"model": "llama", "token_ids": [-1]}, 400, "invalid_request"),
    ("/v1/route", {"model": "llama", "block_hashes": [2**64]}, 400, "invalid_request"),
    ("/v1/route", {"model": "llama", "token_ids": "abc"}, 400, "invalid_request"),
    ("/v1/route", {"model": "llama", "block_hashes": list(range(60))}, 413, "prompt_too_large"),
    ("/v1/nodes", {"node_id": "x"}, 400, "invalid_request"),
    ("/v1/nodes", {"node_id": "x", "address": "a", "models": ["ghost"], "capacity_blocks": 1},
     404, "unknown_model"),
    ("/v1/nodes/ghost/heartbeat", {}, 404, "unknown_node"),
    ("/v1/complete", {"request_id": "r"}, 400, "invalid_request"),
    ("/v1/complete/batch", {"reports": []}, 400, "invalid_request"),
    ("/v1/complete/batch", {"reports": [{"request_id": "r", "node_id": "n", "status": "x"}]},
     400, "invalid_request"),
    ("/v1/kv-events", {"node_id": "gpu0", "seq": 1, "events": [{"type": "boom"}]}, 400,
     "invalid_request"),
    ("/v1/models", {"model_id": "m", "block_size": 0}, 400, "invalid_request"),
])
async def test_each_error_class_is_a_clear_4xx(client, path, body, status, code):
    """Bad input gets the right status and an error naming the problem."""
    got, payload = await post(client, path, body)
    assert (got, payload["error"]) == (status, code) and payload["detail"]


async def test_auth_metrics_openapi_docs_health(client):
    """Token required on mutations; metrics, spec, docs and health are served."""
    assert (await client.post("/v1/models", json={"model_id": "z"})).status == 403  # read
    assert (await client.post("/v1/models", json={"model_id": "z"},
                              headers={"Authorization": "Bearer nope"})).status == 401
    metrics = await (await client.get("/metrics")).text()
    assert "cache_plane_http_request_duration_seconds_bucket" in metrics
    assert "cache_plane_raft_term" in metrics
    assert 'cache_plane_raft_entry_commands_bucket{le="+Inf"}' in metrics
    assert "cache_plane_evicted_blocks_total" in metrics
    assert "cache_plane_block_log_records" in metrics
    spec = await (await client.get("/openapi.json")).json()
    assert spec["openapi"].startswith("3.1") and "/v1/route" in spec["paths"]
    assert "llm-serving-cache API" in await (await client.get("/docs")).text()
    assert (await client.get("/health/ready")).status == 200
    cluster = await (await client.get("/v1/cluster")).json()
    assert cluster["state"] == "leader"


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
FIELDS = st.sampled_from(["model", "token_ids", "block_hashes", "prompt", "session_id",
                          "request_id", "dry_run", "node_id", "seq", "events", "models",
                          "address", "capacity_blocks", "status", "model_id", "block_size"])


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/route", "/v1/nodes", "/v1/complete", "/v1/complete/batch",
                             "/v1/kv-events",
                             "/v1/models", "/v1/nodes/gpu0/heartbeat", "/v1/kv/k",
                             "/v1/kv/k/cas"]),
       body=st.one_of(JSONISH, st.dictionaries(FIELDS, JSONISH, max_size=6)),
       raw=st.booleans())
async def test_fuzzed_bodies_never_get_a_5xx(client, path, body, raw):
    """Random JSON (and non-JSON) bodies get a 2xx or 4xx, never a 500."""
    import json as _json

    data = _json.dumps(body).encode()[::-1] if raw else _json.dumps(body).encode()
    method = client.put if path == "/v1/kv/k" else client.post
    r = await method(path, data=data, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status < 500, await r.text()


def test_openapi_document_is_valid_openapi_31():
    """The served spec passes an OpenAPI 3.1 validator (so generated clients can trust it)."""
    from openapi_spec_validator import validate

    from cache_plane.api.openapi import document

    validate(document())


async def test_a_member_that_may_not_decide_redirects_before_judging_the_request(
        client, node, monkeypatch):
    """Regression (chaos run): a follower rebuilding its state knew no models and answered
    routes with a definite 404 unknown_model instead of redirecting to the leader."""
    from veristore_py.errors import NotLeaderError

    def not_leader() -> None:
        raise NotLeaderError("127.0.0.1:1")

    monkeypatch.setattr(node, "require_current_leader", not_leader)
    r = await client.post("/v1/route", json={"model": "never-registered", "block_hashes": [1]},
                          headers=AUTH, allow_redirects=False)
    assert r.status in (307, 503), await r.text()


async def test_completion_reports_calibrate_the_node_shown_in_nodes_and_breakdown(client):
    """Usage and timings in /v1/complete teach the node's speeds; GET /v1/nodes and the next
    route's candidates show them."""
    before = {n["node_id"]: n["speeds"]["samples"]["completions"]
              for n in (await (await client.get("/v1/nodes")).json())["nodes"]}
    served = []
    for i in range(3):
        status, r = await post(client, "/v1/route", {"model": "llama", "request_id": f"cal{i}",
                                                     "token_ids": list(range(1000 + i * 64,
                                                                             1064 + i * 64))})
        assert status == 200
        served.append(r["node_id"])
        status, _ = await post(client, "/v1/complete", {
            "request_id": f"cal{i}", "node_id": r["node_id"], "prompt_tokens": 64,
            "cached_tokens": 0, "output_tokens": 101, "ttft_ms": 30,
            "latency_ms": 30 + 100 * 40})
        assert status == 200
    node = served[0]
    after = await (await client.get(f"/v1/nodes/{node}")).json()
    speeds = after["speeds"]
    assert speeds["samples"]["completions"] == before[node] + served.count(node)
    assert speeds["decode_ms_per_token"] > 10.0  # pulled from the 10 ms prior towards 40 ms
    assert {"max_running", "running_slots", "expected_wait_ms"} <= set(after)
    status, dry = await post(client, "/v1/route", {"model": "llama", "token_ids": [1, 2, 3, 4],
                                                   "dry_run": True})
    by_node = {c["node_id"]: c for c in dry["candidates"]}
    assert by_node[node]["decode_ms_per_token"] == pytest.approx(
        speeds["decode_ms_per_token"], rel=0.01)
    assert {"ttft_ms", "queue_ms", "prefill_ms", "saved_ms", "prefill_tokens_per_s"} <= \
        set(by_node[node])
    status, bad = await post(client, "/v1/complete", {"request_id": "x", "node_id": node,
                                                      "ttft_ms": -1})
    assert status == 400 and "ttft_ms" in bad["detail"]


async def test_the_schema_and_the_machine_agree_on_limits(client):
    """A body at every stated maximum is applied; an id over the byte limit is refused at the
    edge, naming the field, though its character count is within maxLength."""
    from cache_plane import limits

    node_id = "n" * limits.MAX_ID_BYTES
    status, out = await post(client, "/v1/nodes", {
        "node_id": node_id, "address": "a" * limits.MAX_ID_BYTES, "models": ["llama"],
        "capacity_blocks": limits.MAX_CAPACITY_BLOCKS, "max_active": limits.MAX_ACTIVE,
        "max_running": limits.MAX_ACTIVE, "instance_id": "i" * limits.MAX_ID_BYTES})
    assert status == 200 and out["created"]
    status, out = await post(client, f"/v1/nodes/{node_id}/heartbeat", {
        "active_requests": limits.MAX_REPORTED, "queue_depth": limits.MAX_REPORTED,
        "used_blocks": limits.MAX_CAPACITY_BLOCKS})
    assert status == 200
    r = await client.delete(f"/v1/nodes/{node_id}", headers=AUTH)
    assert r.status == 200
    wide = "é" * 200  # 200 characters, 400 bytes
    status, out = await post(client, "/v1/route", {"model": wide, "token_ids": [1]})
    assert status == 400 and out["detail"].startswith("model:") and "bytes" in out["detail"]

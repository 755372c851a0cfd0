"""A live member honours its own OpenAPI document: schemathesis, every check, every endpoint.

One real single-member cluster (real Raft, LMDB, HTTPS on a loopback port with a throwaway
CA, role tokens, served from a background thread) is fuzzed through its served
`/openapi.json` with the admin token: positive and negative cases of every operation
(schemathesis' coverage and fuzzing phases), under every built-in check
(`max_response_time` is left unset: the project puts no timing thresholds in tests). Destructive operations (deleting
nodes, invalidating models, membership changes) hit the test's own member; adding a member
is always refused there (409: with one member, a second one that is not running would leave
no reachable majority), so it cannot break the member for later cases.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Iterator

import pytest
import requests
import schemathesis
from aiohttp import web

from cache_plane.api import create_app
from cache_plane.machine import CachePlaneMachine
from tests.members import single_member
from veristore_py.config import NodeSettings
from veristore_py.localcluster import free_ports, throwaway_pki
from veristore_py.tls import server_context

TOKEN = "admin-token-for-the-contract-tests"
# The throwaway CA's certificate file, set by the `member` fixture before anything connects.
TLS: dict[str, str] = {}
# Fuzzing cases per operation (the coverage phase adds its own): ~1,600 requests in all, ~40 s
# on 2 cores. The seed is fixed so a run is repeatable; change both locally to explore.
EXAMPLES = 25
SEED = 20260


class BackgroundServer:
    """Serve an aiohttp app on a free loopback port from an event loop in its own thread."""

    def __init__(self, app: web.Application, ssl_context: ssl.SSLContext) -> None:
        self.ssl_context = ssl_context
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner = web.AppRunner(app)
        self.url = ""

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        return self

    async def _start(self) -> None:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=self.ssl_context).start()
        host, port = self.runner.addresses[0][:2]
        self.url = f"https://{host}:{port}"

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


@pytest.fixture(scope="module")
def member(tmp_path_factory) -> Iterator[str]:
    """A single-member cluster serving the cache_plane app; yields its base URL."""
    raft, http = free_ports(2)
    directory = tmp_path_factory.mktemp("contract")
    pki = throwaway_pki(str(directory))
    cert, key = pki["cert"], pki["key"]
    TLS["ca"] = pki["ca"]
    tokens = directory / "tokens"
    tokens.write_text("route route-token-for-the-contract-tests\n"
                      "read read-token-for-the-contract-tests\n")
    settings = NodeSettings(raft_address=f"127.0.0.1:{raft}", http_address=f"127.0.0.1:{http}",
                            data_dir=str(directory / "data"), password="test-password",
                            api_token=TOKEN, tokens_file=str(tokens), tls_cert_file=cert,
                            tls_key_file=key).validate()
    with single_member(settings, CachePlaneMachine()) as node, \
            BackgroundServer(create_app(node, settings), server_context(cert, key)) as server:
        yield server.url


@pytest.fixture(scope="module")
def api_schema(member: str) -> schemathesis.BaseSchema:
    """The member's served document, with every check on and the admin token for `bearer`."""
    config = schemathesis.Config.from_dict({
        "seed": SEED,
        "checks": {"enabled": True},
        "tls-verify": TLS["ca"],
        "generation": {"mode": "all", "max-examples": EXAMPLES},
        "auth": {"openapi": {"bearer": {"bearer": TOKEN}}},
        "operations": [{
            # A route that no node can take now is refused with 503 + Retry-After by design
            # (no_node_for_model, all_nodes_busy, no_room: documented, definite, retry later),
            # and fuzzed models have no nodes. Any other 5xx there still fails the check.
            "include-path": "/v1/route", "include-method": "POST",
            "checks": {"not_a_server_error": {
                "expected-statuses": ["2xx", "3xx", "4xx", "503"]}},
        }],
    })
    return schemathesis.openapi.from_url(f"{member}/openapi.json", config=config,
                                         verify=TLS["ca"])


schema = schemathesis.pytest.from_fixture("api_schema")


def call(member: str, method: str, path: str, **kwargs: object) -> requests.Response:
    return requests.request(method, member + path, timeout=30, verify=TLS["ca"],
                            headers={"Authorization": f"Bearer {TOKEN}"}, **kwargs)


def test_a_405_names_the_allowed_methods(member):
    """An undeclared method gets 405 with `Allow` and the JSON error body."""
    r = call(member, "PATCH", "/v1/nodes/x")
    assert r.status_code == 405 and set(r.headers["Allow"].split(",")) >= {"GET", "DELETE"}
    assert r.json()["error"] == "method_not_allowed"


def test_membership_refusals_say_what_is_wrong(member):
    """Removing a non-member is a 404; a change the members refuse is a 409; a malformed
    address is a 400."""
    r = call(member, "DELETE", "/v1/cluster/members/10.9.9.9:7000")
    assert (r.status_code, r.json()["error"]) == (404, "unknown_member")
    r = call(member, "POST", "/v1/cluster/members",
             json={"raft": "10.9.9.9:7000", "http": "10.9.9.9:8000"})
    assert (r.status_code, r.json()["error"]) == (409, "membership_conflict")
    own = call(member, "GET", "/v1/status").json()["raft_address"]
    r = call(member, "DELETE", f"/v1/cluster/members/{own}")
    assert (r.status_code, r.json()["error"]) == (409, "membership_conflict")
    r = call(member, "DELETE", "/v1/cluster/members/h:0")
    assert r.status_code == 400


def test_a_reused_idempotency_key_is_a_conflict(member):
    """An idempotency key used for another key answers 409, not 400."""
    body = {"value": "v", "idempotency_key": "contract-idem"}
    assert call(member, "PUT", "/v1/kv/contract-a", json=body).status_code == 200
    r = call(member, "PUT", "/v1/kv/contract-b", json=body)
    assert (r.status_code, r.json()["error"]) == (409, "idempotency_key_reused")


def test_an_integral_float_is_an_integer(member):
    """522.0 is the JSON Schema integer 522: accepted and stored as 522."""
    r = call(member, "POST", "/v1/models", json={"model_id": "float-model", "block_size": 32.0})
    assert r.status_code == 200 and r.json()["block_size"] == 32
    r = call(member, "POST", "/v1/models", json={"model_id": "float-model", "block_size": 32.5})
    assert r.status_code == 400


def test_a_scan_after_outside_the_prefix(member):
    """`after` before the prefix changes nothing; after it, the page is empty."""
    call(member, "PUT", "/v1/kv/scan-b", json={"value": "1"})
    keys = [i["key"] for i in call(member, "GET", "/v1/kv", params={
        "prefix": "scan-", "after": "a"}).json()["items"]]
    assert keys == ["scan-b"]
    r = call(member, "GET", "/v1/kv", params={"prefix": "scan-", "after": "z"})
    assert r.json() == {"items": [], "more": False}


def test_backups_without_writes_between_them_do_not_wait(member):
    """A second backup with nothing applied since the first streams that snapshot at once
    (it used to wait for one PySyncObj never builds: the leader's expiry, applied every
    second, may also come between them, and then a new one is built as quickly)."""
    first = call(member, "POST", "/v1/backup")
    second = call(member, "POST", "/v1/backup")  # it used to hang into call's 30 s timeout
    assert first.status_code == second.status_code == 200
    assert second.content[:8] == b"VERISNAP"


@schema.parametrize()
def test_the_member_honours_its_openapi_document(case):
    """Every response of every operation conforms to the document, under every check."""
    case.call_and_validate()

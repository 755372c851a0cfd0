"""aiohttp API of a veristore node: generic KV, cluster status and health.

Routes (JSON):
  GET    /v1/kv/{key}?consistency=linearizable|lease|stale   read one key (404 if absent)
  PUT    /v1/kv/{key}        {"value": str, "idempotency_key"?: str}
  DELETE /v1/kv/{key}        {"idempotency_key"?: str} (body optional)
  POST   /v1/kv/{key}/cas    {"expected": str|null, "value": str|null, "idempotency_key"?: str}
  GET    /v1/kv?prefix=&after=&limit=&consistency=            prefix scan
  GET    /v1/status          leader, term, commit/applied index, members
  GET    /v1/digest          SHA-256 of this replica's state (convergence checks)
  GET    /health/live, /health/ready

Writes and linearizable reads go through the Raft log on the leader. A follower answers them
with ``307`` and the leader's URL (``Location`` header and ``leader`` field); with no leader it
answers ``503`` with ``Retry-After``. Errors are ``{"error", "detail", "definite"}``;
``definite: true`` means the operation certainly did not take effect. Mutating methods require
``Authorization: Bearer <token>`` when a token is configured.

`add_error_middleware`, `add_kv_routes` and `add_status_routes` are reused by the cache_plane API.
"""

from __future__ import annotations

import asyncio
import hmac
import os
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from . import proposals
from .config import NodeSettings
from .errors import (
    CommitTimeoutError,
    InvalidCommandError,
    LeadershipLostError,
    NoLeaderError,
    NotLeaderError,
    OverloadedError,
    StorageError,
    VeristoreError,
)
from .node import VeristoreNode
from .state import MAX_IDEM_BYTES, MAX_KEY_BYTES, MAX_SCAN_LIMIT

NODE = web.AppKey("node", VeristoreNode)
SETTINGS = web.AppKey("settings", NodeSettings)
API_TOKEN = web.AppKey("api_token", str)

MAX_BODY_BYTES = 2 << 20
MUTATING = frozenset({"POST", "PUT", "DELETE", "PATCH"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Error types -> HTTP status, most specific first; an error's own `status` wins over it.
_STATUS: tuple[tuple[type[VeristoreError], int], ...] = (
    (InvalidCommandError, 400),
    (NoLeaderError, 503),
    (OverloadedError, 503),
    (LeadershipLostError, 503),
    (StorageError, 503),
    (CommitTimeoutError, 504),
)


def http_status(exc: VeristoreError) -> int:
    """The HTTP status for `exc`: its own, else the table's for its type, else 503."""
    if exc.status is not None:
        return exc.status
    return next((status for kind, status in _STATUS if isinstance(exc, kind)), 503)


def json_response(body: Any, status: int = 200,
                  headers: dict[str, str] | None = None) -> web.Response:
    """A JSON response encoded with orjson (several times faster than the json module)."""
    return web.Response(body=orjson.dumps(body), status=status, headers=headers,
                        content_type="application/json")


def error_response(status: int, code: str, detail: str, definite: bool,
                   headers: dict[str, str] | None = None, **extra: Any) -> web.Response:
    """Build the uniform JSON error body."""
    body = {"error": code, "detail": detail, "definite": definite, **extra}
    return json_response(body, status=status, headers=headers)


def leader_url(request: web.Request, exc: NotLeaderError) -> str | None:
    """The URL of this same request on the leader, if its HTTP address is known."""
    http = request.app[NODE].peer_http(exc.leader)
    return None if http is None else f"http://{http}{request.rel_url}"


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map every failure to a JSON error; an unexpected exception is a 500 (and a bug)."""
    try:
        return await handler(request)
    except NotLeaderError as exc:
        url = leader_url(request, exc)
        if url is None:
            return error_response(503, "no_leader", exc.detail, True, {"Retry-After": "1"})
        return error_response(307, exc.code, exc.detail, True, {"Location": url}, leader=url)
    except VeristoreError as exc:
        # Domain errors may carry their own HTTP status and extra body fields.
        status = http_status(exc)
        headers = {"Retry-After": "1"} if status == 503 else None
        return error_response(status, exc.code, exc.detail, exc.definite, headers,
                              **exc.extra)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large",
                401: "unauthorized"}.get(exc.status, "http_error")
        return error_response(exc.status, code, exc.reason, True)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a bug: report it as such, never leak a traceback
        request.app.logger.exception("unhandled_error")
        return error_response(500, "internal_error", type(exc).__name__, False)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Require the bearer token on mutating methods when one is configured."""
    token = request.app.get(API_TOKEN)
    if token and request.method in MUTATING:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return error_response(401, "unauthorized", "missing or wrong bearer token", True,
                                  {"WWW-Authenticate": "Bearer"})
    return await handler(request)


def add_error_middleware(app: web.Application) -> None:
    app.middlewares.extend([error_middleware, auth_middleware])


async def read_json(request: web.Request, *, optional: bool = False) -> dict[str, Any]:
    """Parse the body as a JSON object or raise InvalidCommandError (400)."""
    raw = await request.read()
    if not raw.strip():
        if optional:
            return {}
        raise InvalidCommandError("request body must be a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidCommandError(f"body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidCommandError("request body must be a JSON object")
    return body


def _text(body: dict[str, Any], name: str, *, nullable: bool, limit: int) -> bytes | None:
    if name not in body:
        raise InvalidCommandError(f"missing field '{name}'")
    value = body[name]
    if value is None and nullable:
        return None
    if not isinstance(value, str):
        kind = "a string or null" if nullable else "a string"
        raise InvalidCommandError(f"field '{name}' must be {kind}")
    encoded = value.encode()
    if len(encoded) > limit:
        raise InvalidCommandError(f"field '{name}' is {len(encoded)} bytes; the limit is {limit}")
    return encoded


def _key(request: web.Request) -> bytes:
    key = request.match_info["key"].encode()
    if not key or len(key) > MAX_KEY_BYTES:
        raise InvalidCommandError(f"key must be 1..{MAX_KEY_BYTES} bytes")
    return key


def _idem(body: dict[str, Any]) -> dict[str, bytes]:
    value = body.get("idempotency_key")
    if value is None:
        return {}
    if not isinstance(value, str) or not 0 < len(value.encode()) <= MAX_IDEM_BYTES:
        raise InvalidCommandError(f"field 'idempotency_key' must be a string of 1..{MAX_IDEM_BYTES} bytes")
    return {"idem": value.encode()}


def _decode(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "replace")


async def read(request: web.Request, command: dict[str, Any]) -> dict[str, Any]:
    """Run a read-only command at the consistency level the request asks for."""
    return await proposals.read(request.app[NODE], command,
                                request.query.get("consistency", "linearizable"))


async def kv_get(request: web.Request) -> web.Response:
    result = await read(request, {"op": "get", "key": _key(request)})
    if not result["found"]:
        return error_response(404, "key_not_found", "no such key", True)
    return json_response({"key": request.match_info["key"], "value": _decode(result["value"]),
                              "revision": result["revision"]})


async def kv_put(request: web.Request) -> web.Response:
    body = await read_json(request)
    value = _text(body, "value", nullable=False, limit=1 << 20)
    result = await proposals.propose(request.app[NODE],
                           {"op": "put", "key": _key(request), "value": value, **_idem(body)})
    return json_response({"revision": result["revision"],
                              "prev_revision": result.get("prev_revision", 0),
                              "replayed": result.get("replayed", False)})


async def kv_delete(request: web.Request) -> web.Response:
    body = await read_json(request, optional=True)
    result = await proposals.propose(request.app[NODE], {"op": "delete", "key": _key(request), **_idem(body)})
    return json_response({"deleted": result["deleted"], "revision": result["revision"],
                              "replayed": result.get("replayed", False)})


async def kv_cas(request: web.Request) -> web.Response:
    body = await read_json(request)
    command = {
        "op": "cas",
        "key": _key(request),
        "expected": _text(body, "expected", nullable=True, limit=1 << 20),
        "value": _text(body, "value", nullable=True, limit=1 << 20),
        **_idem(body),
    }
    result = await proposals.propose(request.app[NODE], command)
    return json_response({"succeeded": result["succeeded"], "current": _decode(result["current"]),
                              "revision": result["revision"],
                              "replayed": result.get("replayed", False)})


async def kv_scan(request: web.Request) -> web.Response:
    query = request.query
    command: dict[str, Any] = {"op": "scan", "prefix": query.get("prefix", "").encode()}
    if "after" in query:
        command["after"] = query["after"].encode()
    if "limit" in query:
        if not query["limit"].isdigit() or not 1 <= int(query["limit"]) <= MAX_SCAN_LIMIT:
            raise InvalidCommandError(f"query 'limit' must be an integer in 1..{MAX_SCAN_LIMIT}")
        command["limit"] = int(query["limit"])
    result = await read(request, command)
    items = [{"key": _decode(k), "value": _decode(v), "revision": r} for k, v, r in result["items"]]
    return json_response({"items": items, "more": result["more"]})


async def status(request: web.Request) -> web.Response:
    return json_response(request.app[NODE].status())


async def digest(request: web.Request) -> web.Response:
    applied, value = await asyncio.to_thread(request.app[NODE].store.indexed_digest)
    return json_response({"applied_index": applied, "digest": value})


async def live(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    node = request.app[NODE]
    if node.is_ready():
        return json_response({"status": "ready", "leader": node.leader_address()})
    return error_response(503, "not_ready", "no known leader or not caught up", True,
                          {"Retry-After": "1"})


def add_kv_routes(app: web.Application) -> None:
    app.router.add_get("/v1/kv", kv_scan)
    app.router.add_get("/v1/kv/{key}", kv_get)
    app.router.add_put("/v1/kv/{key}", kv_put)
    app.router.add_delete("/v1/kv/{key}", kv_delete)
    app.router.add_post("/v1/kv/{key}/cas", kv_cas)


async def backup(request: web.Request) -> web.StreamResponse:
    """POST /v1/backup: take a snapshot now and stream it (`cache-plane restore` seeds a fresh
    member's data dir with it). Authenticated like every mutating request."""
    node = request.app[NODE]
    path = await asyncio.to_thread(node.fresh_snapshot)
    with open(path, "rb") as f:  # opened once: a newer snapshot renamed over it cannot tear it
        size = os.fstat(f.fileno()).st_size
        response = web.StreamResponse(headers={
            "Content-Type": "application/octet-stream", "Content-Length": str(size),
            "Content-Disposition": 'attachment; filename="snapshot.bin"'})
        await response.prepare(request)
        while chunk := await asyncio.to_thread(f.read, 1 << 20):
            await response.write(chunk)
    await response.write_eof()
    return response


async def add_member(request: web.Request) -> web.Response:
    """POST /v1/cluster/members {raft, http}: add a member (leader only; one at a time)."""
    body = await read_json(request)
    raft = _address(body, "raft")
    http = _address(body, "http")
    await asyncio.to_thread(request.app[NODE].change_membership, "add", raft, http)
    return json_response({"added": raft, "http": http})


async def remove_member(request: web.Request) -> web.Response:
    """DELETE /v1/cluster/members/{raft}: remove a member (leader only; not the leader)."""
    raft = request.match_info["raft"]
    await asyncio.to_thread(request.app[NODE].change_membership, "remove", raft)
    return json_response({"removed": raft})


def _address(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    host, sep, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        raise InvalidCommandError(f"field {name!r} must be host:port")
    return str(value)


def add_membership_routes(app: web.Application) -> None:
    app.router.add_post("/v1/cluster/members", add_member)
    app.router.add_delete("/v1/cluster/members/{raft}", remove_member)


def add_status_routes(app: web.Application) -> None:
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/digest", digest)
    app.router.add_get("/health/live", live)
    app.router.add_get("/health/ready", ready)
    app.router.add_post("/v1/backup", backup)
    add_membership_routes(app)


def create_app(node: VeristoreNode, settings: NodeSettings, api_token: str | None) -> web.Application:
    """Build the aiohttp application of one veristore node."""
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[NODE] = node
    app[SETTINGS] = settings
    if api_token:
        app[API_TOKEN] = api_token
    add_error_middleware(app)
    add_kv_routes(app)
    add_status_routes(app)
    return app

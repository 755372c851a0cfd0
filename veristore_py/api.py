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
  POST   /v1/backup          this member's snapshot (application/octet-stream)
  POST   /v1/cluster/members {"raft": host:port, "http": host:port}   add a member
  DELETE /v1/cluster/members/{raft}                                   remove a member

Writes and linearizable reads go through the Raft log on the leader. A follower answers them
with ``307`` and the leader's URL (``Location`` header and ``leader`` field); with no leader it
answers ``503`` with ``Retry-After``. Errors are ``{"error", "detail", "definite"}``;
``definite: true`` means the operation certainly did not take effect. When tokens are
configured, every endpoint but health needs ``Authorization: Bearer <token>`` of a role the
endpoint's entry in `ACCESS` names (`auth.py`: read < route < admin): 401 without a known
token, 403 with a too-weak one.

`add_error_middleware`, `add_kv_routes` and `add_status_routes` are reused by the cache_plane API.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from . import proposals
from .auth import PUBLIC, Tokens, allows, required_role
from .config import NodeSettings
from .errors import (
    BodyTimeoutError,
    CommandRejectedError,
    CommitTimeoutError,
    ConfigError,
    IdempotencyConflictError,
    InvalidCommandError,
    LeadershipLostError,
    NoLeaderError,
    NotLeaderError,
    OverloadedError,
    StorageError,
    VeristoreError,
)
from .node import VeristoreNode
from .state import MAX_IDEM_BYTES, MAX_KEY_BYTES, MAX_SCAN_LIMIT, MAX_VALUE_BYTES

NODE = web.AppKey("node", VeristoreNode)
SETTINGS = web.AppKey("settings", NodeSettings)
TOKENS = web.AppKey("tokens", Tokens)
ACCESS = web.AppKey("access", dict[tuple[str, str], str])

# (method, path template) -> the role it needs. Applications built on veristore add theirs
# (cache_plane/api/app.py); an endpoint missing from the table needs admin.
ACCESS_TABLE: dict[tuple[str, str], str] = {
    ("GET", "/v1/kv"): "read",
    ("GET", "/v1/kv/{key}"): "read",
    ("PUT", "/v1/kv/{key}"): "admin",
    ("DELETE", "/v1/kv/{key}"): "admin",
    ("POST", "/v1/kv/{key}/cas"): "admin",
    ("GET", "/v1/status"): "read",
    ("GET", "/v1/digest"): "read",
    ("GET", "/health/live"): PUBLIC,
    ("GET", "/health/ready"): PUBLIC,
    ("POST", "/v1/backup"): "admin",
    ("POST", "/v1/cluster/members"): "admin",
    ("DELETE", "/v1/cluster/members/{raft}"): "admin",
}

MAX_BODY_BYTES = 2 << 20
# A client has this long to send a body once its headers arrived (slow clients cannot hold a
# handler forever; docs/security.md).
BODY_READ_TIMEOUT_S = 30.0
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# A member's address, host:port: a host name, IPv4 or IPv6 address (bracketed or not) and a
# port in 1..65535 without leading zeros. The OpenAPI document states this same pattern (ECMA
# and Python read it alike: ASCII classes only), so schema and handler agree.
ADDRESS_PATTERN = (r"^[A-Za-z0-9._\[\]:-]+:(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}"
                   r"|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])$")
ADDRESS_RE = re.compile(ADDRESS_PATTERN.removeprefix("^").removesuffix("$"))
MAX_ADDRESS_CHARS = 256
_DIGITS = re.compile("[0-9]+")
# JSON Schema counts characters, not UTF-8 bytes. So a string the store limits to N bytes is
# limited at the edge, and stated in the OpenAPI document (`text_schema`), as any text of at
# most N // 4 characters or ASCII of at most N: both fit in N bytes, and the document says
# exactly what the handlers take. (The bound of the whole is stated apart from the ASCII
# pattern: schemathesis folds a branch's maxLength into its regex, too large at 1 MiB.)
ASCII_PATTERN = "^[\\x00-\\x7f]*$"


def text_fits(text: str, max_bytes: int) -> bool:
    """True if `text` is within a limit of `max_bytes` UTF-8 bytes, as the API states it."""
    return len(text) <= max_bytes // 4 or (len(text) <= max_bytes and text.isascii())


def text_limit(max_bytes: int) -> str:
    """The words for `text_fits`' limit, for error details."""
    return f"at most {max_bytes // 4} characters, or {max_bytes} if ASCII"


def text_schema(max_bytes: int, min_length: int = 0) -> dict[str, Any]:
    """The JSON Schema of a string `text_fits` in `max_bytes`."""
    schema: dict[str, Any] = {
        "type": "string", "maxLength": max_bytes,
        "anyOf": [{"maxLength": max_bytes // 4}, {"pattern": ASCII_PATTERN}],
        "x-max-bytes": max_bytes}
    if min_length:
        schema["minLength"] = min_length
    return schema


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
    scheme = request.app[SETTINGS].http_scheme  # members of one cluster share the scheme
    return None if http is None else f"{scheme}://{http}{request.rel_url}"


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
                401: "unauthorized", 403: "forbidden"}.get(exc.status, "http_error")
        # a 405 must name the methods the resource does allow (RFC 9110 section 15.5.6)
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(exc.status, code, exc.reason, True, allow)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a bug: report it as such, never leak a traceback
        request.app.logger.exception("unhandled_error")
        return error_response(500, "internal_error", type(exc).__name__, False)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Require a bearer token of the endpoint's role, when tokens are configured."""
    tokens = request.app.get(TOKENS)
    match = request.match_info
    if not tokens or match.http_exception is not None:  # 404 / 405: the router answers
        return await handler(request)
    resource = match.route.resource
    access: dict[tuple[str, str], str] = request.app[ACCESS]
    need = required_role(access, request.method,
                         resource.canonical if resource is not None else "")
    if need == PUBLIC:
        return await handler(request)
    role = tokens.role_of(request.headers.get("Authorization"))
    if role is None:
        return error_response(401, "unauthorized", "missing or unknown bearer token", True,
                              {"WWW-Authenticate": "Bearer"})
    if not allows(role, need):
        return error_response(403, "forbidden", f"this endpoint needs the {need} role", True)
    return await handler(request)


def add_error_middleware(app: web.Application) -> None:
    app.middlewares.extend([error_middleware, auth_middleware])


async def read_json(request: web.Request, *, optional: bool = False) -> dict[str, Any]:
    """Parse the body as a JSON object or raise InvalidCommandError (400); a body that does
    not arrive within `BODY_READ_TIMEOUT_S` is a BodyTimeoutError (408)."""
    try:
        async with asyncio.timeout(BODY_READ_TIMEOUT_S):  # (no task per request: wait_for's)
            raw = await request.read()
    except TimeoutError:
        raise BodyTimeoutError(f"the request body did not arrive within "
                               f"{BODY_READ_TIMEOUT_S:g} s") from None
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
    if not text_fits(value, limit):
        raise InvalidCommandError(f"field '{name}' must be {text_limit(limit)}")
    return value.encode()


def _key(request: web.Request) -> bytes:
    key = request.match_info["key"]
    if not key or not text_fits(key, MAX_KEY_BYTES):
        raise InvalidCommandError(f"key must be 1 character or more, {text_limit(MAX_KEY_BYTES)}")
    return key.encode()


def _idem(body: dict[str, Any]) -> dict[str, bytes]:
    value = body.get("idempotency_key")
    if value is None:
        return {}
    if not isinstance(value, str) or not value or not text_fits(value, MAX_IDEM_BYTES):
        raise InvalidCommandError("field 'idempotency_key' must be a string of 1 character or "
                                  f"more, {text_limit(MAX_IDEM_BYTES)}")
    return {"idem": value.encode()}


def _decode(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "replace")


# The machine's refusals of a KV command that are not malformed requests -> their errors.
_REFUSALS: dict[str, type[InvalidCommandError]] = {
    "idempotency_key_reused": IdempotencyConflictError,
}


async def propose(request: web.Request, command: dict[str, Any]) -> dict[str, Any]:
    """Propose a KV write; a refusal in `_REFUSALS` raises its own error type."""
    try:
        return await proposals.propose(request.app[NODE], command)
    except CommandRejectedError as exc:
        kind = _REFUSALS.get(exc.reason)
        if kind is None:
            raise
        raise kind(exc.reason_detail) from exc


def _consistency(request: web.Request) -> str:
    level = request.query.get("consistency", "linearizable")
    if level not in proposals.CONSISTENCY:
        raise InvalidCommandError("query 'consistency' must be linearizable, lease or stale")
    return level


async def read(request: web.Request, command: dict[str, Any]) -> dict[str, Any]:
    """Run a read-only command at the consistency level the request asks for."""
    return await proposals.read(request.app[NODE], command, _consistency(request))


async def kv_get(request: web.Request) -> web.Response:
    result = await read(request, {"op": "get", "key": _key(request)})
    if not result["found"]:
        return error_response(404, "key_not_found", "no such key", True)
    return json_response({"key": request.match_info["key"], "value": _decode(result["value"]),
                              "revision": result["revision"]})


async def kv_put(request: web.Request) -> web.Response:
    body = await read_json(request)
    value = _text(body, "value", nullable=False, limit=MAX_VALUE_BYTES)
    result = await propose(request, {"op": "put", "key": _key(request), "value": value,
                                     **_idem(body)})
    return json_response({"revision": result["revision"],
                              "prev_revision": result.get("prev_revision", 0),
                              "replayed": result.get("replayed", False)})


async def kv_delete(request: web.Request) -> web.Response:
    body = await read_json(request, optional=True)
    result = await propose(request, {"op": "delete", "key": _key(request), **_idem(body)})
    return json_response({"deleted": result["deleted"], "revision": result["revision"],
                              "replayed": result.get("replayed", False)})


async def kv_cas(request: web.Request) -> web.Response:
    body = await read_json(request)
    command = {
        "op": "cas",
        "key": _key(request),
        "expected": _text(body, "expected", nullable=True, limit=MAX_VALUE_BYTES),
        "value": _text(body, "value", nullable=True, limit=MAX_VALUE_BYTES),
        **_idem(body),
    }
    result = await propose(request, command)
    return json_response({"succeeded": result["succeeded"], "current": _decode(result["current"]),
                              "revision": result["revision"],
                              "replayed": result.get("replayed", False)})


async def kv_scan(request: web.Request) -> web.Response:
    query = request.query
    for name in ("prefix", "after"):
        if not text_fits(query.get(name, ""), MAX_KEY_BYTES):
            raise InvalidCommandError(f"query '{name}' must be {text_limit(MAX_KEY_BYTES)}")
    prefix, after = query.get("prefix", "").encode(), query.get("after", "").encode()
    command: dict[str, Any] = {"op": "scan", "prefix": prefix}
    if "limit" in query:
        # ASCII digits only: str.isdigit() also takes '²', which int() refuses
        if not _DIGITS.fullmatch(query["limit"]) or not 1 <= int(query["limit"]) <= MAX_SCAN_LIMIT:
            raise InvalidCommandError(f"query 'limit' must be an integer in 1..{MAX_SCAN_LIMIT}")
        command["limit"] = int(query["limit"])
    consistency = _consistency(request)
    if after and not after.startswith(prefix):
        # The machine takes only an `after` within the prefix. Any other one is before every
        # key with the prefix (so it changes nothing) or after them all (an empty page, on
        # any replica).
        if after > prefix:
            return json_response({"items": [], "more": False})
        after = b""
    if after:
        command["after"] = after
    result = await proposals.read(request.app[NODE], command, consistency)
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
        return json_response({"status": "ready"})  # (public: no addresses; /v1/status has them)
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
    raft = _address({"raft": request.match_info["raft"]}, "raft")
    await asyncio.to_thread(request.app[NODE].change_membership, "remove", raft)
    return json_response({"removed": raft})


def _address(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not (isinstance(value, str) and len(value) <= MAX_ADDRESS_CHARS
            and ADDRESS_RE.fullmatch(value)):
        raise InvalidCommandError(f"field {name!r} must be host:port (port 1..65535, "
                                  f"at most {MAX_ADDRESS_CHARS} characters)")
    return value


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


def add_security(app: web.Application, settings: NodeSettings,
                 access: dict[tuple[str, str], str]) -> None:
    """Install the settings' tokens and the endpoint -> role table `access` on `app`.

    Fails closed: tokens are read again here (after `validate`), and a member that must have
    them (beyond loopback, not `insecure`) refuses to build its app without any."""
    tokens = settings.resolved_tokens()
    if not tokens and settings.tokens_required:
        raise ConfigError([f"http_address {settings.http_address} is beyond loopback and no "
                           "token is configured (the tokens file is empty)"])
    app[TOKENS] = tokens
    app[ACCESS] = access


def create_app(node: VeristoreNode, settings: NodeSettings) -> web.Application:
    """Build the aiohttp application of one veristore node."""
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[NODE] = node
    app[SETTINGS] = settings
    add_security(app, settings, ACCESS_TABLE)
    add_error_middleware(app)
    add_kv_routes(app)
    add_status_routes(app)
    return app

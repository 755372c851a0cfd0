"""The response cache's endpoints (`/v1/cache/*`) of a member; see docs/response_cache.md.

Stores, touches, deletes and purges go to the leader (307 from followers); reads (one entry,
pages of entries, the change feed, stats) answer from this member's replica.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from veristore_py import api as kv_api
from veristore_py.errors import InvalidCommandError

from ..responses.cluster import ResponseCacheService
from .validation import VALIDATORS

RESPONSES = web.AppKey("responses", ResponseCacheService)
_KEY = re.compile(r"[0-9a-f]{64}")
_DIGITS = re.compile(r"[0-9]{1,18}")

ACCESS_TABLE: dict[tuple[str, str], str] = {
    ("POST", "/v1/cache/entries"): "route",
    ("GET", "/v1/cache/entries"): "read",
    ("GET", "/v1/cache/entries/{key}"): "read",
    ("DELETE", "/v1/cache/entries/{key}"): "admin",
    ("GET", "/v1/cache/changes"): "read",
    ("POST", "/v1/cache/touch"): "route",
    ("POST", "/v1/cache/purge"): "admin",
    ("GET", "/v1/cache/stats"): "read",
}


def _key(text: str, name: str) -> str:
    if not _KEY.fullmatch(text):
        raise InvalidCommandError(f"{name}: must be 64 lowercase hex characters")
    return text


def _int(request: web.Request, name: str, low: int, high: int, default: int | None) -> int:
    raw = request.query.get(name)
    if raw is None:
        if default is None:
            raise InvalidCommandError(f"query '{name}' is required")
        return default
    if not _DIGITS.fullmatch(raw) or not low <= int(raw) <= high:
        raise InvalidCommandError(f"query '{name}' must be an integer in {low}..{high}")
    return int(raw)


def _svc(request: web.Request) -> ResponseCacheService:
    return request.app[RESPONSES]


async def _body(request: web.Request, schema: str) -> dict[str, Any]:
    return VALIDATORS[schema](await kv_api.read_json(request))


async def put_entry(request: web.Request) -> web.Response:
    return kv_api.json_response(await _svc(request).put(await _body(request, "CachePut")))


async def list_entries(request: web.Request) -> web.Response:
    after = request.query.get("after")
    if after is not None:
        _key(after, "query 'after'")
    return kv_api.json_response(_svc(request).page(after or "",
                                                   _int(request, "limit", 1, 5000, 1000)))


async def get_entry(request: web.Request) -> web.Response:
    key = _key(request.match_info["key"], "key")
    return kv_api.json_response(_svc(request).get(key))


async def delete_entry(request: web.Request) -> web.Response:
    key = _key(request.match_info["key"], "key")
    return kv_api.json_response(await _svc(request).delete(key))


async def changes(request: web.Request) -> web.Response:
    return kv_api.json_response(await _svc(request).changes(
        _int(request, "since", 0, 1 << 60, None), _int(request, "wait_ms", 0, 5000, 0),
        _int(request, "limit", 1, 5000, 1000)))


async def touch(request: web.Request) -> web.Response:
    body = await _body(request, "CacheTouch")
    return kv_api.json_response(await _svc(request).touch(body["keys"]))


async def purge(request: web.Request) -> web.Response:
    body = await _body(request, "CachePurge")
    if not ({"tenant", "model", "namespace"} & body.keys()) and not body.get("all"):
        raise InvalidCommandError("body: give tenant, model and/or namespace, or all: true")
    return kv_api.json_response(await _svc(request).purge(body))


async def stats(request: web.Request) -> web.Response:
    return kv_api.json_response(_svc(request).stats())


def add_routes(app: web.Application, service: ResponseCacheService) -> None:
    app[RESPONSES] = service
    r = app.router
    r.add_post("/v1/cache/entries", put_entry)
    r.add_get("/v1/cache/entries", list_entries)
    r.add_get("/v1/cache/entries/{key}", get_entry)
    r.add_delete("/v1/cache/entries/{key}", delete_entry)
    r.add_get("/v1/cache/changes", changes)
    r.add_post("/v1/cache/touch", touch)
    r.add_post("/v1/cache/purge", purge)
    r.add_get("/v1/cache/stats", stats)

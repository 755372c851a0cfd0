"""Answering from the response cache (the shell): a hit as JSON or as a replayed SSE stream,
and the backend's own answer to a sampled semantic hit (verification, `ResponseCache`)."""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from ..responses import replay
from . import core
from .cache import Hit, Plan

if TYPE_CHECKING:
    from .app import Gateway


async def answer_hit(request: web.Request, gateway: Gateway, parsed: core.ChatRequest,
                     plan: Plan, hit: Hit, path: str, body: dict[str, Any]) -> web.StreamResponse:
    """A cached answer: as JSON, or replayed as an SSE stream; sampled semantic hits are
    verified against the backend in the background."""
    gateway.cache.served(hit, plan)
    gateway.cache.maybe_verify(hit, lambda: ask_backend(gateway, path, parsed, body))
    response_id = ("chatcmpl-" if parsed.chat else "cmpl-") + uuid.uuid4().hex
    created = hit.info.created_ms if hit.info is not None else time.time() * 1000
    headers = {"X-Request-Id": request.headers.get("X-Request-Id") or response_id,
               "x-cache": hit.kind, "x-cache-key": hit.key, "x-cache-tier": hit.tier,
               "age": str(max(0, int(time.time() - created / 1000)))}
    if hit.similarity is not None:
        headers["x-cache-similarity"] = f"{hit.similarity:.4f}"
    if not parsed.stream:
        return web.Response(body=orjson.dumps(replay.as_response(hit.response, response_id)),
                            content_type="application/json", headers=headers)
    out = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                      "Cache-Control": "no-cache", **headers})
    await out.prepare(request)
    for event in replay.sse_events(hit.response, response_id, parsed.include_usage):
        await out.write(event)
    await out.write_eof()
    return out


async def ask_backend(gateway: Gateway, path: str, parsed: core.ChatRequest,
                       body: dict[str, Any]) -> dict[str, Any] | None:
    """The backend's own answer to a request served from the cache (verification)."""
    ask = {k: v for k, v in body.items() if k not in ("stream", "stream_options", "cache")}
    spec = await gateway.model(parsed.model)
    form, _ = await gateway.block_hashes(parsed, ask, spec)
    request_id = "verify-" + uuid.uuid4().hex
    route = await gateway.route(parsed, form, None, request_id)
    attempt = await gateway.call(path, orjson.dumps(ask), route, request_id, False)
    if attempt.error is not None or attempt.response is None:
        gateway.report(route, "failed")
        return None
    try:
        data = await attempt.response.read()
    finally:
        attempt.response.release()
    ok = attempt.response.status < 400
    gateway.report(route, "ok" if ok else "failed")
    return orjson.loads(data) if ok else None

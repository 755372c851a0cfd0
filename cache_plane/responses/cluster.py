"""The response cache's cluster operations (the shell): stamp, compress, propose, read.

The leader stamps each stored entry's creation and expiry (its clock plus the request's TTL,
else `response_cache_ttl_s`) and the byte budget (`response_cache_max_bytes`), and compresses
the body (zlib) so the Raft log and every member's LMDB hold it compressed. Stores and
touches are proposed lazily (they share Raft entries; nobody waits on them). Reads answer from
the member's own replica: an entry's metadata from memory, its body from LMDB.
"""

from __future__ import annotations

import asyncio
import base64
import time
import zlib
from typing import Any

import numpy as np
import orjson

from .. import commands
from ..errors import CachePlaneError
from ..machine.responses import BODY_PREFIX, ResponseTable
from ..service import CachePlaneService, now_ms

POLL_S = 0.025


def _entry_view(table: ResponseTable, key: str) -> dict[str, Any] | None:
    entry = table.entries.get(key)
    if entry is None:
        return None
    view = entry.view(key)
    view["embedding"] = base64.b64encode(entry.embedding).decode() if entry.embedding else None
    return view


class ResponseCacheService:
    """`/v1/cache/*` operations of one member (see module docstring)."""

    def __init__(self, service: CachePlaneService) -> None:
        self.service = service
        self.store = service.node.store

    async def put(self, body: dict[str, Any]) -> dict[str, Any]:
        s = self.service.settings
        now = now_ms()
        ttl_s = body.get("ttl_s") or s.response_cache_ttl_s
        with np.errstate(over="ignore"):  # (beyond float16's range: inf, harmless)
            embedding = np.asarray(body.get("embedding") or (), dtype="<f2").tobytes()
        response = orjson.dumps(body["response"])
        command = commands.cache_put(
            body["key"], tenant=body["tenant"], model=body["model"], epoch=body["epoch"],
            namespace=body.get("namespace", ""), bucket=body.get("bucket"),
            question=body.get("question"), body=zlib.compress(response, 6),
            embedding=embedding, now_ms=now, expires_ms=now + ttl_s * 1000,
            max_bytes=s.response_cache_max_bytes,
            prompt_tokens=body.get("prompt_tokens", 0),
            completion_tokens=body.get("completion_tokens", 0),
            latency_ms=body.get("latency_ms", 0))
        return await self.service.submit(command, lazy=True)

    def get(self, key: str) -> dict[str, Any]:
        raw = self.store.get(BODY_PREFIX + key.encode())  # first: memory may be ahead of disk
        view = self.store.view(lambda m: _entry_view(m.responses, key))
        if raw is None or view is None:
            raise CachePlaneError("unknown_entry", f"no cached response under {key!r}")
        return {"entry": view, "response": orjson.loads(zlib.decompress(raw))}

    def page(self, after: str, limit: int) -> dict[str, Any]:
        """Entries' metadata in key order after `after`; `rev` is read first, so following
        the change feed from it misses nothing that changed while the pages were read."""
        # (the keys are sorted outside the store's lock, which applying commands needs)
        rev, keys = self.store.view(lambda m: (m.responses.rev, list(m.responses.entries)))
        page = sorted(k for k in keys if k > after)[:limit + 1]
        views = self.store.view(lambda m: [_entry_view(m.responses, k) for k in page[:limit]])
        return {"rev": rev, "entries": [v for v in views if v is not None],
                "next": page[limit - 1] if len(page) > limit else None}

    async def changes(self, since: int, wait_ms: int, limit: int) -> dict[str, Any]:
        """Keys changed after revision `since`, each with its entry (null: gone); waits up to
        `wait_ms` for one. ``reset``: this member no longer has them all, reload the list."""
        deadline = time.monotonic() + wait_ms / 1000

        def read(m: Any) -> dict[str, Any]:
            table: ResponseTable = m.responses
            reset, keys, reached = table.changes_since(since, limit)
            return {"rev": reached, "reset": reset,
                    "changes": [{"key": k, "entry": _entry_view(table, k)} for k in keys]}
        while True:
            out = self.store.view(read)
            if out["reset"] or out["changes"] or time.monotonic() >= deadline:
                return out
            await asyncio.sleep(POLL_S)

    async def touch(self, keys: list[str]) -> dict[str, Any]:
        return await self.service.submit(commands.cache_touch(keys, now_ms()), lazy=True)

    async def delete(self, key: str) -> dict[str, Any]:
        return await self.service.submit(commands.cache_delete(key))

    async def purge(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self.service.submit(commands.cache_purge(
            body.get("tenant"), body.get("model"), body.get("namespace"),
            bool(body.get("all"))))

    def stats(self) -> dict[str, Any]:
        def read(m: Any) -> dict[str, Any]:
            table: ResponseTable = m.responses
            return {"entries": len(table.entries), "bytes": table.bytes, "rev": table.rev,
                    "max_bytes": self.service.settings.response_cache_max_bytes,
                    **table.counters}
        return self.store.view(read)


__all__ = ["ResponseCacheService"]

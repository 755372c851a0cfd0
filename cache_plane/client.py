"""asyncio client for a cache_plane cluster (routers, gateways, inference-node agents).

Built on `veristore_py.client.VeristoreClient`: it follows 307s to the leader, retries on
leader change and times out cleanly. Every mutating call is safe to retry: routes carry a
request id (generated unless given; a repeated id returns the original decision), completions
are keyed by request id, KV events by (node, seq), registrations and heartbeats are
idempotent by nature.
"""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import quote

from veristore_py.client import VeristoreClient

from .errors import STATUS


class CachePlaneClient(VeristoreClient):
    """`async with CachePlaneClient(["http://127.0.0.1:8000", ...], token=...) as c: ...`"""

    # A route's admission refusals (errors.py): no node can take it now; the caller decides.
    final_codes = frozenset(code for code, status in STATUS.items() if status == 503)

    async def register_model(self, model_id: str, block_size: int = 16,
                             hash_seed: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"model_id": model_id, "block_size": block_size}
        if hash_seed is not None:
            body["hash_seed"] = hash_seed
        return await self.request("POST", "/v1/models", json=body)

    async def register_node(self, node_id: str, address: str, models: list[str],
                            capacity_blocks: int, max_active: int = 64,
                            labels: dict[str, str] | None = None,
                            instance_id: str | None = None,
                            max_running: int | None = None,
                            kv_events: dict[str, Any] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"node_id": node_id, "address": address, "models": models,
                                "capacity_blocks": capacity_blocks, "max_active": max_active,
                                "labels": labels or {}}
        if instance_id is not None:
            body["instance_id"] = instance_id
        if max_running is not None:
            body["max_running"] = max_running
        if kv_events is not None:
            body["kv_events"] = kv_events
        return await self.request("POST", "/v1/nodes", json=body)

    async def heartbeat(self, node_id: str, active_requests: int = 0,
                        queue_depth: int = 0, used_blocks: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"active_requests": active_requests, "queue_depth": queue_depth}
        if used_blocks is not None:
            body["used_blocks"] = used_blocks
        return await self.request("POST", f"/v1/nodes/{quote(node_id, safe='')}/heartbeat",
                                  json=body)

    async def route(self, model: str, *, token_ids: list[int] | None = None,
                    block_hashes: list[int] | None = None, prompt: str | None = None,
                    session_id: str | None = None, request_id: str | None = None,
                    dry_run: bool = False, ack: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "request_id": request_id or uuid.uuid4().hex}
        for name, value in (("token_ids", token_ids), ("block_hashes", block_hashes),
                            ("prompt", prompt), ("session_id", session_id)):
            if value is not None:
                body[name] = value
        if dry_run:
            body["dry_run"] = True
        if ack is not None:
            body["ack"] = ack
        return await self.request("POST", "/v1/route", json=body)

    async def node_unreachable(self, node_id: str) -> dict[str, Any]:
        return await self.request("POST", f"/v1/nodes/{quote(node_id, safe='')}/unreachable")

    async def complete(self, request_id: str, node_id: str, status: str = "ok",
                       block_hashes: list[int] | None = None,
                       **usage: int | None) -> dict[str, Any]:
        """Report a completion; `usage` may carry prompt_tokens, output_tokens,
        cached_tokens, ttft_ms and latency_ms (they calibrate the load model)."""
        body: dict[str, Any] = {"request_id": request_id, "node_id": node_id, "status": status,
                                "block_hashes": block_hashes or []}
        body.update((k, v) for k, v in usage.items() if v is not None)
        return await self.request("POST", "/v1/complete", json=body)

    async def complete_batch(self, reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Report several completions (each a `/v1/complete` body) in one request; each
        report's result, or ``{"error": {"code", "detail"}}``, in order."""
        return (await self.request("POST", "/v1/complete/batch",
                                   json={"reports": reports}))["results"]

    async def kv_events(self, node_id: str, seq: int, events: list[dict[str, Any]],
                        model: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"node_id": node_id, "seq": seq, "events": events}
        if model is not None:
            body["model"] = model
        return await self.request("POST", "/v1/kv-events", json=body)

    async def nodes(self) -> list[dict[str, Any]]:
        return (await self.request("GET", "/v1/nodes"))["nodes"]

    async def stats(self) -> dict[str, Any]:
        return await self.request("GET", "/v1/stats")

    async def cluster(self, endpoint: str | None = None) -> dict[str, Any]:
        return await self.request("GET", "/v1/cluster", endpoint=endpoint)

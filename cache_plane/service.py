"""Leader-side orchestration: turn API calls into stamped, replicated commands (the shell).

The service stamps what the pure machine must not compute itself: the leader's clock
(`now_ms`), request ids, lease and TTL lengths. It hashes prompts into block hashes with the
model's block size and seed, proposes commands through the node's group committer, and maps
machine results to errors. It also runs the leader's housekeeping: `cp.expire` every
`expire_interval_s`, carrying the leader's clock (Patroni's `_expire` pattern), and
`cp.compact_log` for each node whose block log has outgrown its index.

Reads of the machine's memory state (node tables, dry-run decisions) happen under the store's
lock, on the leader after its quorum check.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import structlog

from veristore_py.api import propose
from veristore_py.errors import CommandRejectedError, VeristoreError
from veristore_py.node import VeristoreNode

from . import commands, hashing
from .errors import CachePlaneError
from .index import victim_pairs
from .machine import CachePlaneMachine, decision_result
from .model import RouteDecision
from .policy import load_model, running_slots
from .settings import ServiceSettings

log = structlog.get_logger(__name__)



def _merged(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in sorted(a.keys() | b.keys())}


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class CachePlaneService:
    """API operations of one cluster member (see module docstring)."""

    def __init__(self, node: VeristoreNode, settings: ServiceSettings) -> None:
        self.node = node
        self.settings = settings
        machine = node.store.machine
        if not isinstance(machine, CachePlaneMachine):
            raise TypeError("the node must run a CachePlaneMachine")
        self.machine = machine
        # node -> (routes, new blocks) proposed and not yet applied
        self._inflight: dict[str, tuple[int, int]] = {}
        # Rejections decided here before proposing (not replicated; reset on restart).
        self._rejections: dict[str, int] = {}

    # -- proposing -------------------------------------------------------------------------

    async def submit(self, command: dict[str, Any]) -> dict[str, Any]:
        """Propose `command` (stamped with the leader's clock) and return its result."""
        command.setdefault("now_ms", now_ms())
        try:
            return await propose(self.node, command)
        except CommandRejectedError as exc:  # the machine answered {"ok": False, ...}
            raise CachePlaneError(exc.reason, exc.reason_detail) from None

    # -- nodes and models ------------------------------------------------------------------

    def priors(self) -> dict[str, Any]:
        """The load model's priors (settings) that the leader stamps into commands."""
        s = self.settings
        return commands.priors(s.prefill_tokens_per_s, s.decode_ms_per_token,
                               s.mean_output_tokens)

    async def register_node(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self.submit(commands.register_node(
            body["node_id"], body["address"], body["models"], body["capacity_blocks"],
            body.get("max_active", 64), body.get("labels", {}), self.settings.node_lease_ms,
            instance_id=body.get("instance_id"), max_running=body.get("max_running")))

    async def heartbeat(self, node_id: str, body: dict[str, Any]) -> dict[str, Any]:
        # (`used_blocks` is the engine's own count, shown beside the index's)
        return await self.submit(commands.heartbeat(
            node_id, body.get("active_requests", 0), body.get("queue_depth", 0),
            self.settings.node_lease_ms, body.get("used_blocks")))

    async def drain(self, node_id: str) -> dict[str, Any]:
        return await self.submit(commands.drain(node_id))

    async def remove_node(self, node_id: str) -> dict[str, Any]:
        return await self.submit(commands.remove_node(node_id))

    async def register_model(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self.submit(commands.register_model(
            body["model_id"], body.get("block_size", 16),
            body.get("hash_seed", hashing.DEFAULT_SEED)))

    async def invalidate_model(self, model_id: str) -> dict[str, Any]:
        return await self.submit(commands.invalidate_model(model_id))

    def nodes(self) -> list[dict[str, Any]]:
        with self.node.store.lock:
            return [self._node_json(rec.id) for rec in sorted(self.machine.nodes.values(),
                                                              key=lambda r: r.id)]

    def node_info(self, node_id: str) -> dict[str, Any]:
        with self.node.store.lock:
            if node_id not in self.machine.nodes:
                raise CachePlaneError("unknown_node", f"node {node_id!r} is not registered")
            return self._node_json(node_id)

    def _node_json(self, node_id: str) -> dict[str, Any]:
        rec = self.machine.nodes[node_id]
        used = self.machine.index.used(rec.slot)
        pace = self.machine.pace(rec, self.machine.prior_of(self.priors()))
        learned = rec.learned
        model = self.machine.models.get(rec.models[0]) if rec.models else None
        block_size = model.block_size if model else 16
        wait = load_model(rec, pace, now_ms(), block_size)
        return {"node_id": rec.id, "address": rec.address, "models": list(rec.models),
                "state": rec.state, "capacity_blocks": rec.capacity_blocks,
                "used_blocks": used, "free_blocks": max(rec.capacity_blocks - used, 0),
                "max_active": rec.max_active, "max_running": rec.slots,
                "running_slots": running_slots(rec, pace, block_size),
                "active_requests": rec.active, "queue_depth": rec.queue,
                "expected_wait_ms": round(wait.backlog_ms + wait.queue_ms, 1),
                "speeds": {
                    "prefill_tokens_per_s": round(1000 / pace.prefill_ms_per_token),
                    "decode_ms_per_token": round(pace.decode_ms_per_token, 3),
                    "mean_output_tokens": round(pace.output_tokens, 1),
                    "mean_new_tokens": round(pace.new_tokens, 1),
                    "samples": {"prefill": learned.prefill_n, "decode": learned.decode_n,
                                "completions": learned.output_n}},
                "labels": dict(rec.labels),
                "lease_until_ms": rec.lease_until_ms, "instance_id": rec.instance,
                "reported_used_blocks": rec.reported_used if rec.reported_used >= 0 else None}

    def models(self) -> list[dict[str, Any]]:
        with self.node.store.lock:
            return [{"model_id": m.id, "block_size": m.block_size, "hash_seed": m.hash_seed,
                     "epoch": m.epoch} for m in sorted(self.machine.models.values(),
                                                       key=lambda m: m.id)]

    # -- routing ---------------------------------------------------------------------------

    def _blocks(self, body: dict[str, Any]) -> list[int]:
        """The request's block hashes, from whichever prompt form it carries."""
        with self.node.store.lock:
            model = self.machine.models.get(body["model"])
        if model is None:
            raise CachePlaneError("unknown_model", f"model {body['model']!r} is not registered")
        forms = [k for k in ("token_ids", "block_hashes", "prompt") if k in body]
        if len(forms) != 1:
            raise CachePlaneError("invalid_request",
                                  "give exactly one of 'token_ids', 'block_hashes', 'prompt'")
        if "block_hashes" in body:
            return list(body["block_hashes"])
        if "token_ids" in body:
            if len(body["token_ids"]) > self.settings.max_prompt_tokens:
                raise CachePlaneError("prompt_too_large", "too many tokens")
            return hashing.block_hashes(body["token_ids"], model.block_size, model.hash_seed)
        return hashing.text_block_hashes(body["prompt"], model.block_size, model.hash_seed)

    async def route(self, body: dict[str, Any]) -> dict[str, Any]:
        """Decide where a request goes on the leader and, unless dry-run, commit the decision.

        The decision (node, eviction victims) travels in the command; every replica applies
        it, or re-decides from the replicated state if commands applied in between made it
        impossible (see `CachePlaneMachine._planned`). Routes proposed but not yet applied
        count as active on their node, so concurrent decisions spread out.
        """
        # Decided from local state: a new leader must first apply the previous term's entries
        # (else e.g. a just-registered model looks unknown, a definite but false answer), and
        # a follower must redirect before it judges the request against its own state (one
        # rebuilding its store after a crash knows no models yet).
        self.node.require_current_leader()
        # Hashing holds the GIL (cbor2), so a thread would not help; it is bounded by
        # max_prompt_tokens and done inline.
        blocks = self._blocks(body)
        request_id = body.get("request_id") or os.urandom(16).hex()
        command = commands.route(
            body["model"], blocks, request_id, now_ms(), self.settings.request_ttl_ms,
            self.settings.session_ttl_ms, self.priors(), self.settings.load_weight,
            self.settings.session_max_load, body.get("session_id"))
        dry_run = bool(body.get("dry_run"))
        with self.node.store.lock:
            index = self.node.store.applied_index
            decision: RouteDecision | None = None
            if request_id not in self.machine.requests or dry_run:
                # (a retry of a routed request skips this: the machine replays its answer)
                decided = self.machine.decide(command, self._inflight, hashes_checked=True)
                if not isinstance(decided, RouteDecision):
                    raise CachePlaneError(str(decided["error"]), str(decided["detail"]))
                decision = decided
                model = self.machine.models[body["model"]]
                address = (self.machine.nodes[decision.node_id].address
                           if decision.node_id else None)
        if decision is None:
            return self._route_result(await self.submit(command), body, request_id)
        result = decision_result(decision, model, request_id, address)
        if decision.node_id is not None and not dry_run:
            commands.with_decision(command, decision.node_id, decision.route_type,
                                   decision.matched_blocks, victim_pairs(decision.evict))
            node_id = decision.node_id
            new_blocks = decision.total_blocks - decision.matched_blocks
            sent, sent_blocks = self._inflight.get(node_id, (0, 0))
            self._inflight[node_id] = (sent + 1, sent_blocks + new_blocks)
            try:
                applied = await self.submit(command)
            finally:
                sent, sent_blocks = self._inflight.pop(node_id)
                if sent > 1:
                    self._inflight[node_id] = (sent - 1, sent_blocks - new_blocks)
            if (not applied.pop("replanned", False) and not applied.get("duplicate")
                    and applied.get("node_id") == node_id):
                applied["candidates"] = result["candidates"]  # the decision's breakdown
            return self._route_result(applied, body, request_id)
        if decision.node_id is None and not dry_run:
            code = str(decision.rejected)
            self._rejections[code] = self._rejections.get(code, 0) + 1
        return self._route_result({**result, "index": index}, body, request_id)

    def _route_result(self, result: dict[str, Any], body: dict[str, Any],
                      request_id: str) -> dict[str, Any]:
        result = {**result, "term": self.node.raftCurrentTerm,
                  "index": result.get("index", self.node.store.applied_index),
                  "dry_run": bool(body.get("dry_run"))}
        result.pop("ok", None)
        result.pop("replanned", None)
        if not result["routed"]:
            code = result["rejected"]
            raise CachePlaneError(code, result["detail"],
                                  candidates=result["candidates"], request_id=request_id)
        return result

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self.submit(commands.complete(
            body["request_id"], body["node_id"], body.get("status", "ok"),
            body.get("block_hashes", []), body, self.priors()))

    async def kv_events(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self.submit(commands.kv_events(body["node_id"], body["seq"],
                                                    body["events"], body.get("model")))

    # -- introspection ---------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        with self.node.store.lock:
            s = self.machine.stats
            routed = sum(s.routes.values())
            return {
                "routes": dict(s.routes), "routes_total": routed,
                "rejections": _merged(s.rejections, self._rejections),
                "replanned": s.replanned,
                "blocks_requested": s.blocks_requested, "blocks_reused": s.blocks_reused,
                "block_hit_rate": s.blocks_reused / s.blocks_requested if s.blocks_requested else 0.0,
                "tokens_reused": s.tokens_reused, "evictions": s.evictions,
                "indexed_blocks": self.machine.index.size(),
                "nodes": len(self.machine.nodes), "active_requests": len(self.machine.requests),
            }

    def block_log_records(self) -> int:
        with self.node.store.lock:
            return self.machine.log.record_count

    # -- housekeeping ----------------------------------------------------------------------

    async def housekeeping(self) -> None:
        """On the leader, propose expiry with the leader's clock every interval (forever)."""
        while True:
            await asyncio.sleep(self.settings.expire_interval_s)
            if not (self.node.is_leader() and self.node.has_quorum_lease()):
                continue
            try:
                out = await self.submit(commands.expire(now_ms(), self.settings.block_ttl_ms,
                                                        self.priors()))
                if out.get("nodes_down"):
                    log.warning("nodes_declared_down", nodes=out["nodes_down"])
                with self.node.store.lock:
                    due = self.machine.compaction_due(self.settings.block_log_slack_blocks,
                                                      self.settings.block_log_max_records)
                for slot in due:  # one node per command: apply stalls for one node at most
                    await self.submit(commands.compact_log(slot))
            except VeristoreError as exc:
                log.info("housekeeping_not_committed", error=exc.detail)

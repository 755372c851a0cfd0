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

from veristore_py.errors import CommandRejectedError, VeristoreError
from veristore_py.node import VeristoreNode
from veristore_py.proposals import propose

from . import commands, hashing, views
from .errors import CachePlaneError
from .index import victim_pairs
from .machine import CachePlaneMachine, decision_result
from .model import RouteDecision
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
        # `ack: decided` routes answered before their commit, by request id (see `route`).
        self._deciding: dict[str, asyncio.Task[None]] = {}
        self._decided = {"answered": 0, "committed": 0, "dropped": 0, "lost": 0}

    # -- proposing -------------------------------------------------------------------------

    async def submit(self, command: dict[str, Any], lazy: bool = False) -> dict[str, Any]:
        """Propose `command` (stamped with the leader's clock) and return its result.

        `lazy`: nobody waits for this commit; it may wait `lazy_commit_ms` for company.
        """
        command.setdefault("now_ms", now_ms())
        try:
            return await propose(self.node, command,
                                 self.settings.lazy_commit_ms / 1000 if lazy else 0.0)
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
            instance_id=body.get("instance_id"), max_running=body.get("max_running"),
            kv_events=body.get("kv_events")))

    async def heartbeat(self, node_id: str, body: dict[str, Any]) -> dict[str, Any]:
        # (`used_blocks` is the engine's own count, shown beside the index's)
        return await self.submit(commands.heartbeat(
            node_id, body.get("active_requests", 0), body.get("queue_depth", 0),
            self.settings.node_lease_ms, body.get("used_blocks")))

    async def node_unreachable(self, node_id: str) -> dict[str, Any]:
        return await self.submit(commands.node_unreachable(node_id))

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
        prior, now = CachePlaneMachine.prior_of(self.priors()), now_ms()
        return self.node.store.view(lambda m: views.node_views(m, prior, now))

    def node_info(self, node_id: str) -> dict[str, Any]:
        prior, now = CachePlaneMachine.prior_of(self.priors()), now_ms()
        view = self.node.store.view(lambda m: views.node_view(m, node_id, prior, now))
        if view is None:
            raise CachePlaneError("unknown_node", f"node {node_id!r} is not registered")
        return view

    def kv_streams(self) -> list[dict[str, Any]]:
        """Every node's KV-event streams (see `views.stream_view`), by node and rank."""
        return self.node.store.view(views.kv_streams)

    def node_blocks(self, node_id: str) -> dict[str, Any]:
        found = self.node.store.view(lambda m: views.node_blocks(m, node_id))
        if found is None:
            raise CachePlaneError("unknown_node", f"node {node_id!r} is not registered")
        return found

    def models(self) -> list[dict[str, Any]]:
        return self.node.store.view(views.model_views)

    # -- routing ---------------------------------------------------------------------------

    def _blocks(self, body: dict[str, Any]) -> list[int]:
        """The request's block hashes, from whichever prompt form it carries."""
        model = self.node.store.view(lambda m: views.model_spec(m, body["model"]))
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
        impossible (see `machine.routing.planned_decision`). Routes proposed but not yet applied count as
        active on their node, so concurrent decisions spread out.
        """
        # Decided from local state: a new leader must first apply the previous term's entries
        # (else e.g. a just-registered model looks unknown, a definite but false answer), and
        # a follower must redirect before it judges the request against its own state (one
        # rebuilding its store after a crash knows no models yet).
        self.node.require_current_leader()
        dry_run = bool(body.get("dry_run"))
        command = self._route_command(body)
        request_id = str(command["request_id"])
        store = self.node.store
        plan = store.view(lambda m: views.route_plan(m, store.applied_index, command,
                                                     self._inflight, replay_retries=not dry_run))
        if plan.decision is None:  # a retry: the machine replays its recorded answer
            return self._route_result(await self.submit(command), dry_run, request_id)
        decision = plan.decision
        if not isinstance(decision, RouteDecision):
            raise CachePlaneError(str(decision["error"]), str(decision["detail"]))
        assert plan.model is not None
        result = decision_result(decision, plan.model, request_id, plan.address)
        if dry_run:
            return self._route_result({**result, "index": plan.applied_index}, dry_run,
                                      request_id)
        if decision.node_id is None:
            code = str(decision.rejected)
            self._rejections[code] = self._rejections.get(code, 0) + 1
            return self._route_result({**result, "index": plan.applied_index}, dry_run,
                                      request_id)
        if body.get("ack") == "decided":
            return self._answer_decided(command, decision, result, plan.applied_index)
        applied = await self._commit_route(command, decision)
        if (not applied.pop("replanned", False) and not applied.get("duplicate")
                and applied.get("node_id") == decision.node_id):
            applied["candidates"] = result["candidates"]  # the decision's breakdown
        return self._route_result(applied, dry_run, request_id)

    def _route_command(self, body: dict[str, Any]) -> dict[str, Any]:
        """The `cp.route` command for a request body, stamped with the leader's clock."""
        # Hashing holds the GIL (cbor2), so a thread would not help; it is bounded by
        # max_prompt_tokens and done inline.
        s = self.settings
        return commands.route(
            body["model"], self._blocks(body), body.get("request_id") or os.urandom(16).hex(),
            now_ms(), s.request_ttl_ms, s.session_ttl_ms, self.priors(), s.load_weight,
            s.session_max_load, body.get("session_id"))

    def _hold(self, command: dict[str, Any], decision: RouteDecision,
              binding: bool = False) -> tuple[str, int]:
        """Stamp `decision` into `command` and count it in flight until `_release`."""
        node_id = decision.node_id
        assert node_id is not None
        commands.with_decision(command, node_id, decision.route_type, decision.matched_blocks,
                               victim_pairs(decision.evict), binding=binding)
        new_blocks = decision.total_blocks - decision.matched_blocks
        sent, sent_blocks = self._inflight.get(node_id, (0, 0))
        self._inflight[node_id] = (sent + 1, sent_blocks + new_blocks)
        return node_id, new_blocks

    def _release(self, node_id: str, new_blocks: int) -> None:
        sent, sent_blocks = self._inflight.pop(node_id)
        if sent > 1:
            self._inflight[node_id] = (sent - 1, sent_blocks - new_blocks)

    async def _commit_route(self, command: dict[str, Any],
                            decision: RouteDecision) -> dict[str, Any]:
        """Stamp `decision` into `command` and propose it, counting it in flight meanwhile."""
        held = self._hold(command, decision)
        try:
            return await self.submit(command)
        finally:
            self._release(*held)

    def _answer_decided(self, command: dict[str, Any], decision: RouteDecision,
                        result: dict[str, Any], applied_index: int) -> dict[str, Any]:
        """Answer a route before its commit (``ack: decided``) and commit it in the background.

        The decision is binding (see `commands.with_decision`). Until it applies it counts in
        flight like any proposed route, and a completion report for it waits for it (so the
        report never overtakes its route). If this leader is lost first, the decision is
        forgotten: the report is then a no-op and KV events correct the index.
        """
        held = self._hold(command, decision, binding=True)
        request_id = str(command["request_id"])
        self._decided["answered"] += 1

        async def commit() -> None:
            try:
                applied = await self.submit(command, lazy=True)
                self._decided["dropped" if applied.get("dropped") else "committed"] += 1
            except (VeristoreError, CachePlaneError) as exc:
                self._decided["lost"] += 1
                log.info("decided_route_not_committed", request_id=request_id,
                         error=getattr(exc, "detail", str(exc)))
            finally:
                self._release(*held)
                self._deciding.pop(request_id, None)

        self._deciding[request_id] = asyncio.create_task(commit())
        answer = self._route_result({**result, "index": applied_index}, False, request_id)
        answer["ack"] = "decided"
        return answer

    def _route_result(self, result: dict[str, Any], dry_run: bool,
                      request_id: str) -> dict[str, Any]:
        """The API's answer: term and index added; a rejection raised as an error."""
        result = {**result, "term": self.node.term,
                  "index": result.get("index", self.node.store.applied_index),
                  "dry_run": dry_run}
        result.pop("ok", None)
        result.pop("replanned", None)
        result.setdefault("ack", "committed")
        if not result["routed"]:
            code = result["rejected"]
            raise CachePlaneError(code, result["detail"],
                                  candidates=result["candidates"], request_id=request_id)
        return result

    async def complete(self, body: dict[str, Any], lazy: bool = False) -> dict[str, Any]:
        pending = self._deciding.get(body["request_id"])
        if pending is not None:  # its route was answered before commit: let it land first
            await asyncio.shield(pending)
        return await self.submit(commands.complete(
            body["request_id"], body["node_id"], body.get("status", "ok"),
            body.get("block_hashes", []), body, self.priors()), lazy)

    async def complete_batch(self, reports: list[dict[str, Any]]) -> dict[str, Any]:
        """Apply several completion reports; ``results`` in order, each a result or an error.

        The reports are proposed together and lazily (`lazy_commit_ms`), so they share Raft
        entries with each other and with other commands. Only a member that is not the leader fails the whole batch (the client then
        follows the leader and sends it again: a report already applied is a duplicate).
        """
        self.node.require_current_leader()
        outcomes = await asyncio.gather(*(self.complete(r, lazy=True) for r in reports),
                                        return_exceptions=True)
        results: list[dict[str, Any]] = []
        for outcome in outcomes:
            if isinstance(outcome, CachePlaneError | VeristoreError):
                results.append({"error": {"code": getattr(outcome, "code", "unavailable"),
                                          "detail": outcome.detail}})
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                results.append(outcome)
        return {"results": results}

    async def kv_events(self, body: dict[str, Any]) -> dict[str, Any]:
        """`POST /v1/kv-events`: one batch of the node's stream `rank`, through the same path
        as the engines' ZMQ streams (`cp.kv_batches`), applied even after a hole (an HTTP
        reporter cannot replay; the hole is counted in the stream's ``gaps``)."""
        seq = body["seq"]
        out = await self.submit(commands.kv_batches(
            body["node_id"], body.get("rank", 0), [[seq, now_ms(), body["events"]]],
            model=body.get("model"), contiguous=False))
        if out["duplicates"]:
            return {"ok": True, "duplicate": True, "seq": seq}
        return {"ok": True, "seq": seq, "stored": out["stored"], "removed": out["removed"],
                "ignored_full": out["ignored_full"]}

    # -- introspection ---------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        stats = self.node.store.view(views.stats_view)
        stats["rejections"] = _merged(stats["rejections"], self._rejections)
        stats["decided_routes"] = dict(self._decided)
        return stats

    def block_log_records(self) -> int:
        return self.node.store.view(views.block_log_records)

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
                due = self.node.store.view(lambda m: m.compaction_due(
                    self.settings.block_log_slack_blocks, self.settings.block_log_max_records))
                for slot in due:  # one node per command: apply stalls for one node at most
                    await self.submit(commands.compact_log(slot))
            except VeristoreError as exc:
                log.info("housekeeping_not_committed", error=exc.detail)

"""Read views of the replicated state, as the API shows them. PURE.

Each view is a function of the machine (and of the leader's clock and priors where it
estimates), returning plain data. The service asks for them through `StateStore.view`, which
holds the store's lock for the duration, so a view never sees half an apply.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .calibration import Speeds
from .index import TIER_NAMES
from .machine import CachePlaneMachine
from .model import ModelSpec, RouteDecision, StreamState
from .policy import load_model, running_slots


def model_spec(machine: CachePlaneMachine, model_id: str) -> ModelSpec | None:
    return machine.models.get(model_id)


@dataclass(frozen=True)
class RoutePlan:
    """The leader's decision for a route command, made on a view of the state.

    `decision` is None for a retry of a request the state already records (the machine
    replays its answer when the command is proposed again); a dict is a refusal of the
    command itself (`{error, detail}`); a `RouteDecision` may still reject (no node fits).
    `applied_index` is the state's index the decision was made at.
    """

    applied_index: int
    decision: RouteDecision | dict[str, Any] | None
    model: ModelSpec | None = None
    address: str | None = None  # the chosen node's address


def route_plan(machine: CachePlaneMachine, applied_index: int, command: Mapping[str, Any],
               inflight: Mapping[str, tuple[int, int]], replay_retries: bool) -> RoutePlan:
    """Decide `command` (a `cp.route`) against the state, counting routes `inflight`
    (proposed, not applied) on their nodes. With `replay_retries`, a known request id plans
    nothing (see `RoutePlan`)."""
    if replay_retries and command["request_id"] in machine.requests:
        return RoutePlan(applied_index, None)
    decided = machine.decide(command, inflight, hashes_checked=True)
    if not isinstance(decided, RouteDecision):
        return RoutePlan(applied_index, decided)
    address = machine.nodes[decided.node_id].address if decided.node_id else None
    return RoutePlan(applied_index, decided, machine.models[command["model"]], address)


def model_views(machine: CachePlaneMachine) -> list[dict[str, Any]]:
    return [{"model_id": m.id, "block_size": m.block_size, "hash_seed": m.hash_seed,
             "epoch": m.epoch} for m in sorted(machine.models.values(), key=lambda m: m.id)]


def node_view(machine: CachePlaneMachine, node_id: str, prior: Speeds,
              now_ms: int) -> dict[str, Any] | None:
    """One node as `GET /v1/nodes/{id}` shows it, or None if it is not registered.

    `expected_wait_ms` is the load model's wait for one more request at `now_ms`; `speeds`
    are the ones the node is priced with (its learned values shrunk towards the fleet's,
    `prior` where nothing is learned yet).
    """
    rec = machine.nodes.get(node_id)
    if rec is None:
        return None
    used = machine.index.used(rec.slot)
    pace = machine.pace(rec, prior)
    learned = rec.learned
    model = machine.models.get(rec.models[0]) if rec.models else None
    block_size = model.block_size if model else 16
    wait = load_model(rec, pace, now_ms, block_size)
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
            "reported_used_blocks": rec.reported_used if rec.reported_used >= 0 else None,
            "kv_events": None if rec.kv_source is None else {
                "endpoint": rec.kv_source.endpoint,
                "replay_endpoint": rec.kv_source.replay_endpoint, "topic": rec.kv_source.topic,
                "hash_form": rec.kv_source.hash_form, "ranks": rec.kv_source.ranks},
            "kv_streams": [{"rank": rank, **stream_view(stream)}
                           for rank, stream in sorted(rec.streams.items())]}


def node_blocks(machine: CachePlaneMachine, node_id: str) -> dict[str, Any] | None:
    """The blocks the index says `node_id` holds, by model, LRU first (None: no such node)."""
    rec = machine.nodes.get(node_id)
    if rec is None:
        return None
    names = {spec.code: spec.id for spec in machine.models.values()}
    by_model: dict[str, list[list[Any]]] = {}
    for model, block in machine.index.lru_order(rec.slot):
        tier = machine.index.tier(model, block, rec.slot)
        by_model.setdefault(names.get(model, str(model)), []).append(
            [block, TIER_NAMES[tier if tier is not None else 0]])
    return {"node_id": node_id, "blocks": sum(len(v) for v in by_model.values()),
            "models": by_model}


def kv_streams(machine: CachePlaneMachine) -> list[dict[str, Any]]:
    return [{"node_id": node_id, "rank": rank, **stream_view(stream)}
            for node_id in sorted(machine.nodes)
            for rank, stream in sorted(machine.nodes[node_id].streams.items())]


def stream_view(stream: StreamState) -> dict[str, Any]:
    """One KV-event stream as the replicated state follows it (see `model.StreamState`)."""
    return {"last_seq": stream.last_seq, "stale": stream.stale, "batches": stream.batches,
            "events": stream.events, "blocks_stored": stream.stored,
            "blocks_removed": stream.removed, "duplicates": stream.duplicates,
            "gaps": stream.gaps, "replays": stream.replays, "resyncs": stream.resyncs,
            "restarts": stream.restarts, "rebuilds": stream.rebuilds,
            "last_event_ms": stream.last_ts_ms or None, "last_lag_ms": stream.last_lag_ms}


def node_views(machine: CachePlaneMachine, prior: Speeds, now_ms: int) -> list[dict[str, Any]]:
    """Every node, in id order (see `node_view`)."""
    views = (node_view(machine, node_id, prior, now_ms) for node_id in sorted(machine.nodes))
    return [view for view in views if view is not None]


def stats_view(machine: CachePlaneMachine) -> dict[str, Any]:
    """Replicated routing statistics (the service adds what it rejected before proposing)."""
    s = machine.stats
    return {
        "routes": dict(s.routes), "routes_total": sum(s.routes.values()),
        "rejections": dict(s.rejections), "replanned": s.replanned,
        "blocks_requested": s.blocks_requested, "blocks_reused": s.blocks_reused,
        "block_hit_rate": s.blocks_reused / s.blocks_requested if s.blocks_requested else 0.0,
        "tokens_reused": s.tokens_reused, "evictions": s.evictions,
        "indexed_blocks": machine.index.size(),
        "nodes": len(machine.nodes), "active_requests": len(machine.requests),
    }


def block_log_records(machine: CachePlaneMachine) -> int:
    return machine.log.record_count

"""Handlers of routing: route (the leader's decision, or decided here) and completion. PURE."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from veristore_py.codec import pack
from veristore_py.state import ApplyContext, Result, error

from ..calibration import Report, learn
from ..index import GPU, PENDING, block_keys, victim_keys
from ..limits import MAX_TIME_MS
from ..model import Candidate, ModelSpec, RouteDecision
from ..policy import load_model, route_type, running_slots
from .fields import (
    MASK64,
    Invalid,
    hashes_field,
    int_field,
    opt_int,
    pairs_field,
    policy_field,
    prior_field,
    str_field,
)
from .records import RequestRecord, request_key, session_key
from .state import State


def route_inputs(st: State, cmd: Mapping[str, Any],
                 hashes_checked: bool = False) -> tuple[ModelSpec | None, list[int], str | None]:
    """The model (None if unknown), block hashes and session a route command names."""
    model_id = str_field(cmd, "model")
    blocks = cmd["blocks"] if hashes_checked else hashes_field(cmd, "blocks")
    session = str_field(cmd, "session_id", optional=True)
    return st.models.get(model_id or ""), blocks, session


def route(st: State, cmd: Mapping[str, Any], ctx: ApplyContext) -> Result:
    """Route a request: the leader's decision if it still holds, else decided here."""
    model, blocks, session = route_inputs(st, cmd)
    request_id = str_field(cmd, "request_id")
    assert request_id is not None
    now = int_field(cmd, "now_ms", 0, MAX_TIME_MS)
    ttl = int_field(cmd, "request_ttl_ms", 1, 1 << 40, 30_000)
    session_ttl = int_field(cmd, "session_ttl_ms", 1, 1 << 40, 600_000)
    prior = prior_field(cmd)
    planned = str_field(cmd, "node", optional=True)
    victims = pairs_field(cmd, "evict")
    policy = policy_field(cmd, st.policy)
    if model is None:
        return error("unknown_model", f"model {cmd.get('model')!r} is not registered").result
    if request_id in st.requests:  # a retried route: answer with the original decision
        return replay_route(st, request_id, model, len(blocks), ctx)
    keys = block_keys(model.code, blocks)
    decision = None
    replanned = False
    if planned is not None:
        decision = planned_decision(st, model, keys, session, now, planned,
                                    victim_keys(victims), cmd.get("route_type"),
                                    cmd.get("matched"))
        replanned = decision is None
        if replanned and cmd.get("binding") is True:
            # Already answered (ack: decided): the request went to `planned`. Record nothing
            # rather than a different node; its completion report is then a no-op and the
            # engine's KV events bring the index up to date.
            return {"ok": True, "request_id": request_id, "routed": False, "dropped": True,
                    "node_id": planned, "index": ctx.index}
        st.stats.replanned += replanned
    if decision is None:
        decision = st.route_decision(model, keys, session, now, prior, policy=policy)
    result = decision_result(decision, model, request_id,
                             st.nodes[decision.node_id].address if decision.node_id else None)
    result["index"] = ctx.index
    result["replanned"] = replanned
    if decision.node_id is None:
        reason = decision.rejected or "rejected"
        st.stats.rejections[reason] = st.stats.rejections.get(reason, 0) + 1
        return result
    rec = st.nodes[decision.node_id]
    slot = rec.slot
    for key in decision.evict:
        st.del_block(slot, key)
    st.stats.evictions += len(decision.evict)
    # The decision's matched blocks are held from block 0; past them, held blocks are
    # reused too and the rest become pending (the engine is about to compute them).
    # Both go to the most recent end tail-first, so that eviction takes a chain's tail
    # before its head (a head without its tail still serves shorter prompts; not so the
    # other way round).
    reused = keys[:decision.matched_blocks]
    held, pending = st.index.split(slot, keys[decision.matched_blocks:])
    st.put_blocks(slot, model.code, pending[::-1], PENDING)
    st.touch(slot, model.code, (reused + held if held else reused)[::-1])
    st.pin(slot, keys)
    kind = decision.route_type or "miss"
    pending_blocks = pending if model.code == 0 else list(map(MASK64.__and__, pending))
    pace = st.pace(rec, prior)
    wait = load_model(rec, pace, now, model.block_size)
    request = RequestRecord(rec.id, model.code, tuple(blocks), tuple(pending_blocks),
                            now + ttl, kind, decision.matched_blocks, now,
                            round(wait.backlog_ms + wait.queue_ms),
                            not wait.queue_ms and wait.backlog_ms <= pace.fixed_ms)
    st.requests[request_id] = request
    st.m.append((request_key(request_id), pack(request.wire())))
    if session is not None:
        st.set_session(session, rec.id, now + session_ttl)
        st.m.append((session_key(session), pack([rec.id, now + session_ttl])))
    if rec.active + rec.queue < running_slots(rec, pace, model.block_size):
        # A free running slot: its prefill starts behind the prefill already under way.
        rec.active += 1
        rec.prefill_until_ms = max(rec.prefill_until_ms, now) + round(
            len(pending) * model.block_size * pace.prefill_ms_per_token)
    else:
        rec.queue += 1  # it waits for a slot; its prefill starts when it gets one
    st.save_node(rec)
    st.stats.routes[kind] = st.stats.routes.get(kind, 0) + 1
    st.stats.blocks_requested += len(blocks)
    st.stats.blocks_reused += decision.matched_blocks
    st.stats.tokens_reused += decision.matched_blocks * model.block_size
    return result


def planned_decision(st: State, model: ModelSpec, keys: list[int], session: str | None, now: int,
             node_id: str, victims: list[int], kind: Any,
             matched_hint: Any = None) -> RouteDecision | None:
    """The leader's decision (node + eviction victims) if it can still be carried out.

    The leader decided against its applied state; commands applied since (other routes in
    the same batch, expiries) may have filled the node or taken its victims. The decision
    stands if the node is up, serves the model, has a free active slot, and its listed
    victims that are still evictable make room for the prompt's new blocks. Otherwise None,
    and the route is decided here from the replicated state (same result on every replica).
    """
    rec = st.nodes.get(node_id)
    if (rec is None or rec.state != "up" or model.id not in rec.models
            or rec.active + rec.queue >= rec.max_active or len(keys) > rec.capacity_blocks):
        return None
    slot = rec.slot
    # The leader's matched count only speeds up the check (see `PrefixIndex.prefix`).
    matched = st.index.prefix(slot, keys, matched_hint if type(matched_hint) is int
                                else None)
    new = len(st.index.missing(slot, keys[matched:]))
    evict: list[int] = []
    if victims:
        prompt = set(keys)
        evict = [k for k in dict.fromkeys(victims) if k not in prompt
                 and st.index.holds(slot, k) and not st.is_pinned(slot, k)]
    if st.index.used(slot) - len(evict) + new > rec.capacity_blocks:
        return None
    if kind != "session" or st.session_node(session, now) != node_id:
        kind = route_type(matched, len(keys))
    return RouteDecision(node_id, kind, matched, len(keys), tuple(evict))


def replay_route(st: State, request_id: str, model: ModelSpec, total: int,
                  ctx: ApplyContext) -> Result:
    request = st.requests[request_id]
    rec = st.nodes[request.node]
    return {"ok": True, "request_id": request_id, "routed": True, "duplicate": True,
            "node_id": rec.id, "address": rec.address, "route_type": request.route_type,
            "rejected": None, "detail": "", "matched_blocks": request.matched,
            "matched_tokens": request.matched * model.block_size, "total_blocks": total,
            "evicted_blocks": 0, "candidates": [], "index": ctx.index}


def complete(st: State, cmd: Mapping[str, Any], ctx: ApplyContext) -> Result:
    """Completion report: confirm (or drop) the request's pending blocks, add output blocks."""
    request_id = str_field(cmd, "request_id")
    node_id = str_field(cmd, "node")
    status = cmd.get("status", "ok")
    if status not in ("ok", "failed", "cancelled"):
        raise Invalid("field 'status' must be ok, failed or cancelled")
    output = hashes_field(cmd, "output_blocks")
    prior = prior_field(cmd)
    report = Report(*(opt_int(cmd, name) for name in (
        "prompt_tokens", "output_tokens", "cached_tokens", "ttft_ms", "latency_ms")))
    request = st.requests.get(request_id or "")
    if request is None:
        return {"ok": True, "duplicate": True, "request_id": request_id}
    if request.node != node_id:
        return error("node_mismatch",
                     f"request {request_id!r} was routed to {request.node!r}").result
    assert request_id is not None
    rec = st.nodes[request.node]
    if status == "ok":
        model = st.model_by_code(request.model)
        st.forget_speeds()
        rec.learned = learn(rec.learned, report, prior,
                            elapsed_ms=max(st.now - request.routed_ms, 0),
                            expected_wait_ms=request.expected_wait_ms,
                            clear=request.clear,
                            expected_new_tokens=len(request.pending) * model.block_size)
    st.drop_request(request_id, confirm=status == "ok", prior=prior)
    added = 0
    if status == "ok":
        added = st.store_blocks(rec, request.model, block_keys(request.model, output),
                                   GPU, stop_when_full=True)[1]
    return {"ok": True, "request_id": request_id, "confirmed": status == "ok",
            "output_blocks_added": added}


def decision_result(decision: RouteDecision, model: ModelSpec, request_id: str,
                    address: str | None) -> Result:
    """The JSON-friendly result of a route decision."""
    return {
        "ok": True,
        "request_id": request_id,
        "routed": decision.node_id is not None,
        "node_id": decision.node_id,
        "address": address,
        "route_type": decision.route_type,
        "rejected": decision.rejected,
        "detail": decision.detail,
        "matched_blocks": decision.matched_blocks,
        "matched_tokens": decision.matched_blocks * model.block_size,
        "total_blocks": decision.total_blocks,
        "evicted_blocks": len(decision.evict),
        "candidates": [dict(zip(Candidate._fields, c, strict=True)) for c in decision.candidates],
    }

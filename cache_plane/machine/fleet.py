"""Handlers of the fleet: models, nodes, heartbeats, draining, removal, expiry. PURE."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from veristore_py.codec import pack
from veristore_py.state import ApplyContext, Result, error

from ..limits import (
    MAX_ACTIVE,
    MAX_BLOCK_SIZE,
    MAX_CAPACITY_BLOCKS,
    MAX_ID_BYTES,
    MAX_REPORTED,
    MAX_SLOTS,
    MAX_TIME_MS,
)
from ..model import KVSource, ModelSpec, Node
from . import responses
from .fields import Invalid, int_field, prior_field, str_field
from .records import model_key, node_key, session_key
from .state import State


def register_model(st: State, cmd: Mapping[str, Any], ctx: ApplyContext) -> Result:
    model_id = str_field(cmd, "model")
    assert model_id is not None
    block_size = int_field(cmd, "block_size", 1, MAX_BLOCK_SIZE, 16)
    seed = cmd.get("hash_seed", "vllm-none-hash")
    if not isinstance(seed, str) or len(seed) > MAX_ID_BYTES:
        raise Invalid("field 'hash_seed' must be a string")
    old = st.models.get(model_id)
    if old is None:
        if st.next_model >= MAX_SLOTS:
            return error("too_many_models", "model code space exhausted").result
        spec = ModelSpec(model_id, st.next_model, block_size, seed, 0)
        st.next_model += 1
    else:
        spec = ModelSpec(model_id, old.code, block_size, seed, old.epoch)
        if (old.block_size, old.hash_seed) != (block_size, seed):
            st.drop_model_blocks(old)  # hashes of another scheme are meaningless now
            spec = ModelSpec(model_id, old.code, block_size, seed, old.epoch + 1)
    st.models[model_id] = spec
    st.m.append((model_key(model_id),
              pack([spec.code, spec.block_size, spec.hash_seed, spec.epoch])))
    return {"ok": True, "model": model_id, "block_size": block_size, "hash_seed": seed,
            "epoch": spec.epoch, "created": old is None}


def invalidate_model(st: State, cmd: Mapping[str, Any], ctx: ApplyContext) -> Result:
    model_id = str_field(cmd, "model")
    old = st.models.get(model_id or "")
    if old is None:
        return error("unknown_model", f"model {model_id!r} is not registered").result
    dropped = st.drop_model_blocks(old)
    spec = ModelSpec(old.id, old.code, old.block_size, old.hash_seed, old.epoch + 1)
    st.models[old.id] = spec
    st.m.append((model_key(old.id),
              pack([spec.code, spec.block_size, spec.hash_seed, spec.epoch])))
    return {"ok": True, "model": old.id, "epoch": spec.epoch, "dropped_blocks": dropped,
            "dropped_responses": responses.drop_model_entries(st, old.id)}


def register_node(st: State, cmd: Mapping[str, Any], ctx: ApplyContext) -> Result:
    node_id = str_field(cmd, "node")
    address = str_field(cmd, "address")
    assert node_id is not None and address is not None
    models = cmd.get("models")
    if (not isinstance(models, list) or not models
            or not all(isinstance(x, str) and x for x in models)):
        raise Invalid("field 'models' must be a non-empty list of model ids")
    unknown = [x for x in models if x not in st.models]
    capacity = int_field(cmd, "capacity_blocks", 1, MAX_CAPACITY_BLOCKS)
    max_active = int_field(cmd, "max_active", 1, MAX_ACTIVE)
    max_running = int_field(cmd, "max_running", 0, MAX_ACTIVE, 0)
    now = int_field(cmd, "now_ms", 0, MAX_TIME_MS)
    lease = int_field(cmd, "lease_ms", 1, 1 << 40)
    labels = cmd.get("labels", {})
    if not isinstance(labels, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise Invalid("field 'labels' must map strings to strings")
    if unknown:
        return error("unknown_model", f"models not registered: {', '.join(unknown)}").result
    instance = cmd.get("instance_id", "")
    if not isinstance(instance, str) or len(instance.encode()) > MAX_ID_BYTES:
        raise Invalid(f"field 'instance_id' must be a string of at most {MAX_ID_BYTES} bytes")
    kv_source = _kv_source(cmd.get("kv_events"))
    rec = st.nodes.get(node_id)
    created = rec is None
    restarted = rec is not None and bool(instance) and bool(rec.instance) and \
        instance != rec.instance
    if restarted:
        # A new engine process behind the same node id: its KV cache is empty, its
        # requests are gone, and its KV-event sequence numbers start over.
        assert rec is not None
        st.drop_node_state(rec)
        rec.last_event_seq = -1
        rec.streams = {}
    if rec is None:
        if st.next_slot >= MAX_SLOTS:
            return error("too_many_nodes", "node slot space exhausted").result
        rec = Node(node_id, st.next_slot, address, tuple(models), capacity, max_active)
        st.next_slot += 1
        st.nodes[node_id] = rec
        st.forget_speeds()
    rec.address, rec.models = address, tuple(models)
    rec.capacity_blocks, rec.max_active = capacity, max_active
    rec.max_running = min(max_running, max_active)
    rec.labels = tuple(sorted(labels.items()))
    rec.state, rec.lease_until_ms = "up", now + lease
    if instance:
        rec.instance = instance
    rec.kv_source = kv_source
    while st.index.used(rec.slot) > rec.capacity_blocks:  # capacity shrank
        if not st.make_room(rec):
            break
    st.save_node(rec)
    return {"ok": True, "node": node_id, "slot": rec.slot, "created": created,
            "restarted": restarted}


KV_HASH_FORMS = ("vllm", "sglang")
MAX_DP_RANKS = 256


def _kv_source(raw: Any) -> KVSource | None:
    """A registration's ``kv_events`` (None: the node reports over HTTP only)."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise Invalid("field 'kv_events' must be an object")

    def text(name: str, optional: bool) -> str | None:
        value = raw.get(name)
        if value is None and optional:
            return None
        if not isinstance(value, str) or len(value.encode()) > MAX_ID_BYTES or \
                (name != "topic" and not value):
            raise Invalid(f"field 'kv_events.{name}' must be a string of at most "
                          f"{MAX_ID_BYTES} bytes")
        return value

    endpoint = text("endpoint", False)
    assert endpoint is not None
    hash_form = raw.get("hash_form", "vllm")
    if hash_form not in KV_HASH_FORMS:
        raise Invalid("field 'kv_events.hash_form' must be vllm or sglang")
    ranks = raw.get("ranks", 1)
    if isinstance(ranks, bool) or not isinstance(ranks, int) or not 1 <= ranks <= MAX_DP_RANKS:
        raise Invalid(f"field 'kv_events.ranks' must be an integer in [1, {MAX_DP_RANKS}]")
    return KVSource(endpoint, text("replay_endpoint", True), text("topic", True) or "",
                    hash_form, ranks)


def heartbeat(st: State, cmd: Mapping[str, Any], ctx: ApplyContext) -> Result:
    active = int_field(cmd, "active", 0, MAX_REPORTED)
    queue = int_field(cmd, "queue", 0, MAX_REPORTED)
    now = int_field(cmd, "now_ms", 0, MAX_TIME_MS)
    lease = int_field(cmd, "lease_ms", 1, 1 << 40)
    used = int_field(cmd, "used", 0, MAX_CAPACITY_BLOCKS) if cmd.get("used") is not None else None
    rec = st.known_node(cmd)
    rec.active, rec.queue, rec.lease_until_ms = active, queue, now + lease
    if used is not None:
        rec.reported_used = used
    if rec.state in ("down", "unreachable"):
        rec.state = "up"
    st.save_node(rec)
    return {"ok": True, "node": rec.id, "state": rec.state}


def node_unreachable(st: State, cmd: Mapping[str, Any], ctx: ApplyContext) -> Result:
    """A gateway failed to reach the node: out of routing until its next heartbeat.

    Its blocks stay indexed (a node that only dropped a connection still holds them; one
    that restarted re-registers with a new instance id, which clears them), and its lease
    runs on: if no heartbeat comes, expiry declares it down as usual.
    """
    rec = st.known_node(cmd)
    if rec.state == "up":
        rec.state = "unreachable"
    st.save_node(rec)
    return {"ok": True, "node": rec.id, "state": rec.state}


def drain(st: State, cmd: Mapping[str, Any], ctx: ApplyContext) -> Result:
    rec = st.known_node(cmd)
    if rec.state == "up":
        rec.state = "draining"
    st.save_node(rec)
    return {"ok": True, "node": rec.id, "state": rec.state}


def remove_node(st: State, cmd: Mapping[str, Any], ctx: ApplyContext) -> Result:
    rec = st.known_node(cmd)
    st.drop_node_state(rec)
    del st.nodes[rec.id]
    st.forget_speeds()
    st.m.append((node_key(rec.id), None))
    return {"ok": True, "node": rec.id, "removed": True}


def expire(st: State, cmd: Mapping[str, Any], ctx: ApplyContext) -> Result:
    """Leader-proposed expiry at the leader's `now_ms`: leases, sessions, requests."""
    now = int_field(cmd, "now_ms", 0, MAX_TIME_MS)
    block_ttl = int_field(cmd, "block_ttl_ms", 0, 1 << 62, 0)
    downed = []
    for node_id in sorted(st.nodes):
        rec = st.nodes[node_id]
        if rec.state != "down" and rec.lease_until_ms < now:
            st.drop_node_state(rec)
            rec.state = "down"
            st.save_node(rec)
            downed.append(node_id)
    expired_sessions = sorted(s for s, (_, exp) in st.sessions.items() if exp <= now)
    for sid in expired_sessions:
        st.del_session(sid)
        st.m.append((session_key(sid), None))
    expired_requests = sorted(r for r, req in st.requests.items() if req.expires_ms <= now)
    prior = prior_field(cmd)
    for rid in expired_requests:
        st.drop_request(rid, confirm=False, prior=prior)
    idle = 0
    if block_ttl:
        for node_id in sorted(st.nodes):
            slot = st.nodes[node_id].slot
            for key in st.index.idle_since(slot, now - block_ttl):
                if not st.is_pinned(slot, key):
                    idle += st.del_block(slot, key)
    return {"ok": True, "nodes_down": downed, "sessions_expired": len(expired_sessions),
            "requests_expired": len(expired_requests), "blocks_expired": idle,
            "responses_expired": responses.expire_entries(st, now)}

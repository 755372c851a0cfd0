"""Handlers of the prefix index: engine KV events and block-log checkpoints. PURE."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from veristore_py.state import ApplyContext, Result, error

from ..blocklog import BlockLog
from ..index import TIER_CODES, block_keys
from ..limits import MAX_SEQ, MAX_SLOTS
from .fields import Invalid, hashes_field, int_field
from .state import State


def compact_log(st: State, cmd: Mapping[str, Any], ctx: ApplyContext) -> Result:
    """Checkpoint one node's index and delete its block log (see `blocklog`).

    `slot` names the node (by slot: a removed node's log is compacted too); without it,
    the slot with the largest log. The memory state is unchanged.
    """
    slot = cmd.get("slot")
    if slot is None:
        slot = st.log.largest()
    elif isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < MAX_SLOTS:
        raise Invalid(f"field 'slot' must be an integer in [0, {MAX_SLOTS - 1}]")
    if slot is None:
        return {"ok": True, "slot": None, "records": 0, "blocks": 0, "remaining": 0}
    legacy: list[bytes] = []
    if slot in st.log.legacy and st.reader is not None:
        prefix = BlockLog.legacy_prefix(slot)
        legacy = [key for key, _ in st.reader.scan(prefix, prefix, 1 << 62)]
    records, blocks = st.log.checkpoint(st.m, slot, st.index, legacy)
    return {"ok": True, "slot": slot, "records": records, "blocks": blocks,
            "remaining": st.log.record_count}


def kv_events(st: State, cmd: Mapping[str, Any], ctx: ApplyContext) -> Result:
    """Engine KV events, applied exactly once per (node, seq)."""
    seq = int_field(cmd, "seq", 0, MAX_SEQ)
    events = cmd.get("events")
    if not isinstance(events, list):
        raise Invalid("field 'events' must be a list")
    parsed = []
    for i, event in enumerate(events):
        if not isinstance(event, Mapping) or event.get("type") not in ("stored", "removed",
                                                                        "cleared"):
            raise Invalid(f"events[{i}].type must be stored, removed or cleared")
        tier = event.get("tier", "gpu")
        if tier not in ("gpu", "cpu", "disk"):
            raise Invalid(f"events[{i}].tier must be gpu, cpu or disk")
        parsed.append((event["type"], hashes_field(event, "block_hashes"), TIER_CODES[tier]))
    rec = st.known_node(cmd)
    model_id = cmd.get("model") or rec.models[0]
    model = st.models.get(model_id) if isinstance(model_id, str) else None
    if model is None:
        return error("unknown_model", f"model {model_id!r} is not registered").result
    if seq <= rec.last_event_seq:
        return {"ok": True, "duplicate": True, "seq": seq}
    if rec.state == "down":
        return error("node_down", f"node {rec.id!r} is down; heartbeat or re-register first").result
    stored = removed = ignored = 0
    for kind, hashes, tier in parsed:
        if kind == "cleared":
            st.del_all(rec.slot, st.index.drop_node(rec.slot))
            continue
        keys = list(dict.fromkeys(block_keys(model.code, hashes)))
        if kind == "removed":
            removed += sum(st.del_block(rec.slot, key) for key in keys)
        else:
            done = st.store_blocks(rec, model.code, keys, tier)[0]
            stored += done
            ignored += len(keys) - done
    gap = seq - rec.last_event_seq - 1 if rec.last_event_seq >= 0 else 0
    rec.last_event_seq = seq
    st.save_node(rec)
    return {"ok": True, "seq": seq, "stored": stored, "removed": removed,
            "ignored_full": ignored, "missed_batches": gap}

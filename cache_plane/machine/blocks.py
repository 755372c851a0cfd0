"""Handlers of the prefix index: engine KV events and block-log checkpoints. PURE."""

from __future__ import annotations

from collections.abc import Mapping
from itertools import compress
from typing import Any

from veristore_py.state import ApplyContext, Result, error

from ..blocklog import BlockLog
from ..index import TIER_CODES, best_tier, block_keys, ref_add, ref_count
from ..limits import MAX_SEQ, MAX_SLOTS
from ..model import ModelSpec, Node, StreamState
from .fields import MASK64, Invalid, hashes_field, int_field
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


def _events(events: Any, where: str = "events") -> list[tuple[str, list[int], int]]:
    """Validate a list of KV events: (kind, block hashes, tier code) each."""
    if not isinstance(events, list):
        raise Invalid(f"field '{where}' must be a list")
    parsed = []
    for i, event in enumerate(events):
        if not isinstance(event, Mapping) or event.get("type") not in ("stored", "removed",
                                                                        "cleared"):
            raise Invalid(f"{where}[{i}].type must be stored, removed or cleared")
        tier = event.get("tier", "gpu")
        if tier not in ("gpu", "cpu", "disk"):
            raise Invalid(f"{where}[{i}].tier must be gpu, cpu or disk")
        parsed.append((event["type"], hashes_field(event, "block_hashes"), TIER_CODES[tier]))
    return parsed


def _node_model(st: State, cmd: Mapping[str, Any]) -> tuple[Node, ModelSpec | None]:
    rec = st.known_node(cmd)
    model_id = cmd.get("model") or rec.models[0]
    return rec, st.models.get(model_id) if isinstance(model_id, str) else None


def _apply_events(st: State, rec: Node, model: ModelSpec,
                  parsed: list[tuple[str, list[int], int]],
                  counted: bool = False) -> tuple[int, int, int]:
    """Apply parsed events to `rec`'s index: (stored, removed, ignored for lack of room).

    With `counted` (engine streams), stores and removals keep reference counts per block and
    tier (`index.ref_add`): a duplicate store counts, a removal deletes the block only when
    no tier holds a reference any more. A block the router placed (no references yet) takes
    its first reference from the engine's store, and goes with the engine's removal.
    """
    stored = removed = ignored = 0
    for kind, hashes, tier in parsed:
        if kind == "cleared":
            st.del_all(rec.slot, st.index.drop_node(rec.slot))
            continue
        keys = list(dict.fromkeys(block_keys(model.code, hashes)))
        if not counted:
            if kind == "removed":
                removed += sum(st.del_block(rec.slot, key) for key in keys)
            else:
                done = st.store_blocks(rec, model.code, keys, tier)[0]
                stored += done
                ignored += len(keys) - done
        elif kind == "removed":
            removed += _remove_counted(st, rec, model, keys, tier)
        else:
            done, missed = _store_counted(st, rec, model, keys, tier)
            stored, ignored = stored + done, ignored + missed
    return stored, removed, ignored


def _store_counted(st: State, rec: Node, model: ModelSpec, keys: list[int],
                   tier: int) -> tuple[int, int]:
    """Stores of an engine stream: one more reference at `tier` each; (stored, no room)."""
    counts = [ref_add(st.index.refs(rec.slot, key), tier, 1) for key in keys]
    by_tier: dict[int, list[int]] = {}
    for key, count in zip(keys, counts, strict=True):
        best = best_tier(count)  # (GPU is 0: not `or`)
        by_tier.setdefault(tier if best is None else best, []).append(key)
    for best, group in sorted(by_tier.items()):
        st.store_blocks(rec, model.code, group, best)
    held = [st.index.holds(rec.slot, key) for key in keys]
    st.set_refs(rec.slot, model.code, list(compress(keys, held)), list(compress(counts, held)))
    done = sum(held)
    return done, len(keys) - done


def _remove_counted(st: State, rec: Node, model: ModelSpec, keys: list[int], tier: int) -> int:
    """Removals of an engine stream: one reference less at `tier`; deleted at none left."""
    removed = 0
    kept: list[tuple[int, int]] = []
    for key in keys:
        count = st.index.refs(rec.slot, key)
        if count and not ref_count(count, tier):
            continue  # a copy in a tier it never reported: nothing to take back
        count = ref_add(count, tier, -1)
        best = best_tier(count)
        if best is None:
            removed += st.del_block(rec.slot, key)
            continue
        if st.index.tier(model.code, key & MASK64, rec.slot) != best:
            st.put_blocks(rec.slot, model.code, [key], best)
        kept.append((key, count))
    if kept:
        st.set_refs(rec.slot, model.code, [k for k, _ in kept], [c for _, c in kept])
    return removed


def kv_events(st: State, cmd: Mapping[str, Any], ctx: ApplyContext) -> Result:
    """Engine KV events, applied exactly once per (node, seq) (the original HTTP form; new
    HTTP reports are `cp.kv_batches` commands, this stays for entries already logged)."""
    seq = int_field(cmd, "seq", 0, MAX_SEQ)
    parsed = _events(cmd.get("events"))
    rec, model = _node_model(st, cmd)
    if model is None:
        return error("unknown_model", f"model {cmd.get('model')!r} is not registered").result
    if seq <= rec.last_event_seq:
        return {"ok": True, "duplicate": True, "seq": seq}
    if rec.state == "down":
        return error("node_down", f"node {rec.id!r} is down; heartbeat or re-register first").result
    stored, removed, ignored = _apply_events(st, rec, model, parsed)
    gap = seq - rec.last_event_seq - 1 if rec.last_event_seq >= 0 else 0
    rec.last_event_seq = seq
    st.save_node(rec)
    return {"ok": True, "seq": seq, "stored": stored, "removed": removed,
            "ignored_full": ignored, "missed_batches": gap}


RESYNC_COUNTERS = {"gap": "resyncs", "restart": "restarts", "rebuild": "rebuilds"}
RESYNC_REASONS = tuple(RESYNC_COUNTERS)


def kv_batches(st: State, cmd: Mapping[str, Any], ctx: ApplyContext) -> Result:
    """Batches of one engine KV-event stream (node, rank), exactly once per seq.

    Fields: ``node``, ``rank``, ``model`` (optional), ``batches`` (``[seq, ts_ms, events]``
    each, in order), ``resync`` (optional: ``gap``, ``restart`` or ``rebuild``: clear the
    node's blocks first and take the first batch as the stream's new start; with no batches
    the stream is stale and its watermark -1, so whatever comes next starts it),
    ``contiguous`` (true: a batch after a hole is not applied, nor any after it, and
    ``gap_at`` names it; false, for reporters that cannot replay: applied, and the hole
    counted in ``gaps``), and ``gaps``/``replays``: what the ingester saw. Events are
    reference-counted (`_apply_events`).

    Each batch is applied whole or not at all; batches at or below the stream's watermark
    are duplicates. The result gives the new ``watermark``.
    """
    rank = int_field(cmd, "rank", 0, MAX_SLOTS)
    raw = cmd.get("batches")
    if not isinstance(raw, list):
        raise Invalid("field 'batches' must be a list")
    batches = []
    for i, batch in enumerate(raw):
        if not isinstance(batch, list | tuple) or len(batch) != 3:
            raise Invalid(f"batches[{i}] must be [seq, ts_ms, events]")
        seq, ts_ms = batch[0], batch[1]
        if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= MAX_SEQ:
            raise Invalid(f"batches[{i}].seq must be an integer in [0, {MAX_SEQ}]")
        if isinstance(ts_ms, bool) or not isinstance(ts_ms, int) or not 0 <= ts_ms <= MAX_SEQ:
            raise Invalid(f"batches[{i}].ts_ms must be an integer in [0, {MAX_SEQ}]")
        batches.append((seq, ts_ms, _events(batch[2], f"batches[{i}].events")))
    resync = cmd.get("resync")
    if resync is not None and resync not in RESYNC_REASONS:
        raise Invalid("field 'resync' must be gap, restart or rebuild")
    contiguous = cmd.get("contiguous", True)
    if not isinstance(contiguous, bool):
        raise Invalid("field 'contiguous' must be a boolean")
    seen = [int_field(cmd, name, 0, MAX_SEQ, 0) for name in ("gaps", "replays")]
    rec, model = _node_model(st, cmd)
    if model is None:
        return error("unknown_model", f"model {cmd.get('model')!r} is not registered").result
    if rec.state == "down":
        return error("node_down", f"node {rec.id!r} is down; heartbeat or re-register first").result
    stream = rec.streams.get(rank)
    if stream is None:
        stream = rec.streams[rank] = StreamState(rec.watermark(rank))
    stream.gaps += seen[0]
    stream.replays += seen[1]
    if resync is not None:
        st.del_all(rec.slot, st.index.drop_node(rec.slot))
        counter = RESYNC_COUNTERS[resync]
        setattr(stream, counter, getattr(stream, counter) + 1)
        stream.stale = not batches
        # the stream starts again at its first batch; with none, at whatever comes next
        stream.last_seq = batches[0][0] - 1 if batches else -1
    applied = duplicates = stored = removed = ignored = 0
    gap_at = None
    for seq, ts_ms, parsed in batches:
        if seq <= stream.last_seq:
            duplicates += 1
            continue
        if seq != stream.last_seq + 1:
            if contiguous:
                gap_at = seq
                break
            if stream.last_seq >= 0:
                stream.gaps += seq - stream.last_seq - 1
        done = _apply_events(st, rec, model, parsed, counted=True)
        stored, removed, ignored = stored + done[0], removed + done[1], ignored + done[2]
        stream.last_seq = seq
        stream.last_ts_ms = ts_ms
        stream.last_lag_ms = st.now - ts_ms  # the leader's clock, stamped in the command
        stream.stale = False
        stream.batches += 1
        stream.events += len(parsed)
        applied += 1
    stream.stored += stored
    stream.removed += removed
    stream.duplicates += duplicates
    if rank == 0:
        rec.last_event_seq = stream.last_seq
    st.save_node(rec)
    return {"ok": True, "rank": rank, "watermark": stream.last_seq, "applied": applied,
            "duplicates": duplicates, "gap_at": gap_at, "stored": stored, "removed": removed,
            "ignored_full": ignored, "stale": stream.stale}

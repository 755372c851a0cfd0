"""How the prefix index is stored in LMDB: a block log plus per-node checkpoints. PURE.

A route changes hundreds of blocks (adds its new ones, touches the reused ones); writing one
record per block was most of its apply time. Instead:

- Each block operation of a command (add at a tier, touch, remove) is one ``cp/log/`` record
  listing its blocks; consecutive operations of the same shape share a record. A record
  reserves one sequence number per block, in program order.
- ``cp.compact_log`` (proposed by the leader) checkpoints one node: it writes the node's
  whole index from memory, in LRU order, as ``cp/ck/`` records and deletes the node's log
  records. Its cost is linear in the node's index, so the leader proposes it once the node's
  log holds more blocks than its index (plus a slack): each logged block then pays O(1) for
  its compaction, in C-level array packing, instead of a Python-level rewrite per block.
- Stores written before checkpoints existed hold ``cp/blk/`` records (one per block, with its
  sequence number); they are still read, and a node's checkpoint deletes its own.

`replay` rebuilds the index from all three kinds merged by sequence number (a checkpoint
carries the sequence number it was taken at and replaces everything of its node before it),
which repeats every operation in the order it happened: the rebuilt index, LRU order, tiers
and touch times equal the live ones.

Store keys::

    cp/log/<first_seq:u64>         <op:u8><tier:u8><slot:u16><model:u16><at_ms:u64><block:u64>...
                                   (op SET_REFS: <block:u64><packed counts:u64> pairs)
    cp/ck/<slot:u16><part:u32>     <seq:u64><count:u32> then count blocks (u64), touch times
                                   (u64), model codes (u16), tiers (u8), and, when the node
                                   has KV-event reference counts, packed counts (u64);
                                   little-endian arrays
    cp/blk/<slot:u16><model:u16><block:u64>   <tier:u8><seq:u64><touched_ms:u64>  (legacy)
"""

from __future__ import annotations

import operator
import struct
import sys
from array import array
from collections.abc import Iterable, Sequence
from itertools import repeat
from typing import Any

from .index import PrefixIndex, block_keys

Mutation = tuple[bytes, bytes | None]

LOG = b"cp/log/"
CHECKPOINT = b"cp/ck/"
LEGACY_BLOCK = b"cp/blk/"
_LOG_KEY = struct.Struct(">Q")
_LOG_HEAD = struct.Struct(">BBHHQ")  # op, tier, slot, model, at_ms; then blocks (u64 each)
_CK_KEY = struct.Struct(">HI")  # slot, part
_CK_HEAD = struct.Struct("<QI")  # seq, count
_SLOT = struct.Struct(">H")
_LEGACY_KEY = struct.Struct(">HHQ")
_LEGACY_VALUE = struct.Struct(">BQQ")
TOUCH, ADD, REMOVE = 0, 1, 2
SET_REFS = 4  # KV-event reference counts of blocks (see `index.ref_add`); 0 forgets them
MASK64 = (1 << 64) - 1
CHECKPOINT_PART = 16_384  # entries per checkpoint record (~440 KB)
# A node is due for a checkpoint when its log lists more blocks than its index holds plus this
# slack (so rebuild replays at most about twice the index), or has this many records.
LOG_SLACK_BLOCKS = 65_536
MAX_LOG_RECORDS = 4_096
_CHECKPOINT_OP = 3  # replay event kind (never stored as a log op)


def _little(typecode: str, values: Iterable[int]) -> bytes:
    packed = array(typecode, values)
    if sys.byteorder != "little":
        packed.byteswap()
    return packed.tobytes()


def _from_little(typecode: str, raw: bytes) -> array[int]:
    values = array(typecode)
    values.frombytes(raw)
    if sys.byteorder != "little":
        values.byteswap()
    return values


def _log_blocks(raw: bytes) -> tuple[int, ...]:
    count = (len(raw) - _LOG_HEAD.size) // 8
    return struct.unpack_from(f">{count}Q", raw, _LOG_HEAD.size)


class BlockLog:
    """The write side: buffers block operations into records, checkpoints nodes.

    Its fields are part of the replicated state (every replica holds the same ones, and
    `replay` restores them), so the choice of a checkpoint's node is deterministic.
    """

    def __init__(self) -> None:
        self.seq = 0  # last sequence number reserved
        self.records: dict[int, list[int]] = {}  # slot -> first_seq of each of its log records
        self.blocks: dict[int, int] = {}  # slot -> blocks listed in its log records
        self.parts: dict[int, int] = {}  # slot -> records of its checkpoint
        self.legacy: set[int] = set()  # slots that may still have cp/blk/ records
        self._buffer: list[Any] | None = None

    @property
    def record_count(self) -> int:
        return sum(map(len, self.records.values()))

    def log(self, m: list[Mutation], op: int, slot: int, model: int, keys: Iterable[int],
            tier: int, at_ms: int) -> None:
        """Log a block operation; consecutive operations of the same shape share one record.

        Operations that share a block do not: replaying one record keeps a block listed
        twice at its first position, where two operations move it to the second.
        """
        listed = dict.fromkeys(keys)  # a block listed twice in one operation: first position
        buffered = self._buffer
        if (buffered is not None and buffered[:5] == [op, tier, slot, model, at_ms]
                and not any(map(buffered[5].__contains__, listed))):
            buffered[5].update(listed)
            return
        self.flush(m)
        self._buffer = [op, tier, slot, model, at_ms, listed]

    def log_refs(self, m: list[Mutation], slot: int, model: int, keys: Sequence[int],
                 values: Sequence[int], at_ms: int) -> None:
        """Log the packed reference counts of `keys` (in one record, after what is buffered)."""
        self.flush(m)
        if not keys:
            return
        first = self.seq + 1
        self.seq += len(keys)
        self.records.setdefault(slot, []).append(first)
        self.blocks[slot] = self.blocks.get(slot, 0) + len(keys)
        blocks = keys if model == 0 else list(map(MASK64.__and__, keys))
        pairs = [v for pair in zip(blocks, values, strict=True) for v in pair]
        m.append((LOG + _LOG_KEY.pack(first), _LOG_HEAD.pack(SET_REFS, 0, slot, model, at_ms)
                  + struct.pack(f">{len(pairs)}Q", *pairs)))

    def discard(self) -> None:
        """Forget the buffered operation (its command was refused)."""
        self._buffer = None

    def flush(self, m: list[Mutation]) -> None:
        """Write the buffered operation (call at the end of every command)."""
        buffered, self._buffer = self._buffer, None
        if buffered is None or not buffered[5]:
            return
        op, tier, slot, model, at_ms, listed = buffered
        keys = list(listed)
        first = self.seq + 1
        self.seq += len(keys)
        self.records.setdefault(slot, []).append(first)
        self.blocks[slot] = self.blocks.get(slot, 0) + len(keys)
        blocks = keys if model == 0 else list(map(MASK64.__and__, keys))
        m.append((LOG + _LOG_KEY.pack(first), _LOG_HEAD.pack(op, tier, slot, model, at_ms)
                  + struct.pack(f">{len(blocks)}Q", *blocks)))

    def due(self, used: Iterable[tuple[int, int]], live_slots: set[int],
            slack_blocks: int = LOG_SLACK_BLOCKS,
            max_records: int = MAX_LOG_RECORDS) -> list[int]:
        """Slots whose log should be checkpointed, largest log first.

        `used` gives (slot, indexed blocks) per slot; a slot no node has any more is due as
        soon as it has records (its checkpoint deletes them), and so is a slot with legacy
        block records (its checkpoint replaces them, once).
        """
        used_by_slot = dict(used)
        due = {slot for slot, records in self.records.items() if records and (
            slot not in live_slots or len(records) >= max_records
            or self.blocks.get(slot, 0) >= used_by_slot.get(slot, 0) + slack_blocks)}
        return sorted(due | self.legacy, key=lambda s: (-self.blocks.get(s, 0), s))

    def largest(self) -> int | None:
        """The slot with the most logged blocks (lowest slot on ties), if any has a log."""
        return min(((-n, slot) for slot, n in self.blocks.items() if self.records.get(slot)),
                   default=(0, None))[1]

    def checkpoint(self, m: list[Mutation], slot: int, index: PrefixIndex,
                   legacy_keys: Sequence[bytes] = ()) -> tuple[int, int]:
        """Replace node `slot`'s log with its current index; returns (records deleted, blocks).

        `legacy_keys` are the slot's ``cp/blk/`` keys to delete (the caller reads them).
        """
        self.flush(m)
        keys, times, tiers = index.export(slot)
        refs = index.export_refs(slot, keys)
        parts = 0
        for start in range(0, len(keys), CHECKPOINT_PART):
            chunk = keys[start:start + CHECKPOINT_PART]
            if chunk and max(chunk) > MASK64:
                blocks: Sequence[int] = list(map(MASK64.__and__, chunk))
                models: Iterable[int] = map(operator.rshift, chunk, repeat(64))
            else:
                blocks, models = chunk, repeat(0, len(chunk))
            m.append((CHECKPOINT + _CK_KEY.pack(slot, parts),
                      _CK_HEAD.pack(self.seq, len(chunk)) + _little("Q", blocks)
                      + _little("Q", times[start:start + CHECKPOINT_PART])
                      + _little("H", models) + bytes(tiers[start:start + CHECKPOINT_PART])
                      + (_little("Q", refs[start:start + CHECKPOINT_PART]) if refs else b"")))
            parts += 1
        m.extend((CHECKPOINT + _CK_KEY.pack(slot, part), None)
                 for part in range(parts, self.parts.get(slot, 0)))
        records = self.records.pop(slot, [])
        m.extend((LOG + _LOG_KEY.pack(first), None) for first in records)
        m.extend((key, None) for key in legacy_keys)
        self.blocks.pop(slot, None)
        self.legacy.discard(slot)
        if parts:
            self.parts[slot] = parts
        else:
            self.parts.pop(slot, None)
        return len(records), len(keys)

    @staticmethod
    def legacy_prefix(slot: int) -> bytes:
        return LEGACY_BLOCK + _SLOT.pack(slot)


class Replay:
    """The read side: takes stored records (`add`), then rebuilds an index (`into`).

    Bookkeeping (which log records each node has, checkpoint sizes, legacy nodes) goes into
    `log` as records arrive; `log.seq` is the caller's (it is stored with the machine's meta).
    """

    def __init__(self, log: BlockLog) -> None:
        self.log = log
        self._events: list[tuple[int, int, int, int, int, int, Any]] = []
        self._checkpoints: dict[int, list[Any]] = {}  # slot -> [seq, keys, times, tiers]

    def add(self, key: bytes, raw: bytes) -> bool:
        """Take one stored pair if it belongs to the index; False if it does not."""
        log = self.log
        if key.startswith(LOG):
            (seq,) = _LOG_KEY.unpack(key[len(LOG):])
            op, tier, slot, model, at = _LOG_HEAD.unpack_from(raw)
            blocks = _log_blocks(raw)
            self._events.append((seq, op, tier, slot, model, at, blocks))
            log.records.setdefault(slot, []).append(seq)  # keys arrive in sequence order
            log.blocks[slot] = log.blocks.get(slot, 0) + (len(blocks) // 2 if op == SET_REFS
                                                          else len(blocks))
        elif key.startswith(CHECKPOINT):
            slot, _part = _CK_KEY.unpack(key[len(CHECKPOINT):])
            seq, count = _CK_HEAD.unpack_from(raw)
            at = _CK_HEAD.size
            hashes = _from_little("Q", raw[at:at + 8 * count])
            times = _from_little("Q", raw[at + 8 * count:at + 16 * count])
            models = _from_little("H", raw[at + 16 * count:at + 18 * count])
            tiers = raw[at + 18 * count:at + 19 * count]
            refs_raw = raw[at + 19 * count:at + 27 * count]
            keys = (list(hashes) if not any(models) else
                    list(map(operator.or_, map(operator.lshift, models, repeat(64)), hashes)))
            entry = self._checkpoints.setdefault(slot, [seq, [], [], bytearray(), []])
            entry[1].extend(keys)
            entry[2].extend(times)
            entry[3].extend(tiers)
            entry[4].extend(_from_little("Q", refs_raw) if len(refs_raw) == 8 * count
                            else repeat(0, count))
            log.parts[slot] = log.parts.get(slot, 0) + 1
        elif key.startswith(LEGACY_BLOCK):
            slot, model, block = _LEGACY_KEY.unpack(key[len(LEGACY_BLOCK):])
            tier, seq, touched = _LEGACY_VALUE.unpack(raw)
            self._events.append((seq, ADD, tier, slot, model, touched, (block,)))
            log.legacy.add(slot)
        else:
            return False
        return True

    def into(self, index: PrefixIndex) -> None:
        """Rebuild `index` (empty) from everything added, merged by sequence number."""
        events = self._events
        events.extend((seq, _CHECKPOINT_OP, 0, slot, 0, 0,
                       (keys, times, bytes(tiers), refs if any(refs) else None))
                      for slot, (seq, keys, times, tiers, refs) in self._checkpoints.items())
        events.sort(key=lambda e: e[0])
        for _seq, op, tier, slot, model, at, blocks in events:
            if op == _CHECKPOINT_OP:
                index.restore(slot, *blocks)
                continue
            if op == SET_REFS:
                index.set_refs(slot, block_keys(model, blocks[0::2]), blocks[1::2])
                continue
            keys = block_keys(model, blocks)
            if op == ADD:
                index.add(slot, keys, tier, at)
            elif op == TOUCH:
                index.touch_held(slot, keys, at)
            else:
                for removed in keys:
                    index.remove(slot, removed)
        self._events, self._checkpoints = [], {}


__all__ = ["ADD", "REMOVE", "SET_REFS", "TOUCH", "BlockLog", "Replay"]

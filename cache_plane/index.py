"""The prefix index: which node holds which block, and each node's LRU order. PURE.

Data layout, chosen for memory (the target is under 300 bytes per indexed block) and so that
the per-block work of a route runs in C loops (`map`, `dict.fromkeys`, `compress`) instead of
Python ones:

- ``_lru[slot]`` is an insertion-ordered dict per node whose keys are
  ``model_code << 64 | block_hash`` (for model code 0 the key *is* the block hash, so the
  prompt's own hash objects are reused) and whose values are the leader's time (ms) of the
  last touch; the first key is the least recently used block. Blocks touched by one command
  share one int object, so the time costs next to nothing.
- ``_refs[slot]`` maps the keys an engine's KV events stored to their reference counts per
  tier, packed in one int (`REF_BITS` bits per tier: a block vLLM stores twice is removed
  only by its second removal; one stored on GPU and CPU stays while either copy does). Keys
  placed only by routes and completion reports (the router's prediction) have none.
- ``_tiers[slot]`` maps the keys held in CPU or disk tiers to that tier, and ``_pending[slot]``
  holds the keys placed by a routed request that its engine is still computing; any other
  held key is a GPU block. Most blocks are GPU blocks, so both stay small, and the scorer
  only walks ``_tiers`` (pending blocks get full credit: the request that placed them is
  computing them right now).

Nodes and models get small integer codes (`slot`, `model_code`) in the order they first
appear; the replicated machine assigns them, so every replica has the same codes.

Longest-prefix lookup (`match`) probes the prompt's keys against each candidate node's dict
from block 0 in growing chunks and stops at the first miss: O(matched blocks) per node that
holds block 0, never a scan of the index.
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import compress, filterfalse, islice, repeat

GPU, CPU, DISK, PENDING = 0, 1, 2, 3
TIER_NAMES = ("gpu", "cpu", "disk", "pending")
TIER_CODES = {name: code for code, name in enumerate(TIER_NAMES)}
# Credit for a reused block by tier (Dynamo credits host 0.75, disk 0.25; llm-d CPU 0.8).
TIER_WEIGHTS = (1.0, 0.8, 0.25, 1.0)
_SHORTFALL = tuple(1.0 - w for w in TIER_WEIGHTS)
_MASK64 = (1 << 64) - 1
_FIRST_CHUNK = 32
REF_BITS = 20
_REF_MAX = (1 << REF_BITS) - 1


def ref_count(packed: int, tier: int) -> int:
    """A block's KV-event references at `tier` (GPU, CPU or DISK) in its packed counts."""
    return packed >> (tier * REF_BITS) & _REF_MAX


def ref_add(packed: int, tier: int, delta: int) -> int:
    """`packed` with `tier`'s count moved by `delta` (kept within 0 and its maximum)."""
    count = min(max(ref_count(packed, tier) + delta, 0), _REF_MAX)
    shift = tier * REF_BITS
    return packed & ~(_REF_MAX << shift) | count << shift


def best_tier(packed: int) -> int | None:
    """The fastest tier with a reference (GPU, then CPU, then disk), or None."""
    for tier in (GPU, CPU, DISK):
        if ref_count(packed, tier):
            return tier
    return None


@dataclass(frozen=True, slots=True)
class Match:
    """How much of a prompt one node can reuse."""

    slot: int
    blocks: int        # consecutive blocks held from block 0
    weighted: float    # the same blocks weighted by tier


def block_keys(model: int, blocks: Sequence[int]) -> list[int]:
    """The index keys of `blocks` of model `model` (the hashes themselves for model 0)."""
    if model == 0:
        return list(blocks)
    return list(map((model << 64).__or__, blocks))


def split_key(key: int) -> tuple[int, int]:
    """(model, block) of an index key."""
    return key >> 64, key & _MASK64


def victim_pairs(keys: Iterable[int]) -> list[list[int]]:
    """Eviction victims (index keys) in their wire form: `[model code, block hash]` pairs."""
    return [[key >> 64, key & _MASK64] for key in keys]


def victim_keys(pairs: Iterable[tuple[int, int]]) -> list[int]:
    """The index keys of `[model code, block hash]` pairs (the inverse of `victim_pairs`)."""
    return [model << 64 | block for model, block in pairs]


def _consume(iterator: Iterable[object]) -> None:
    deque(iterator, maxlen=0)


class PrefixIndex:
    """Per-node block dicts in LRU order, plus non-GPU tiers (see module docstring)."""

    def __init__(self) -> None:
        self._lru: dict[int, dict[int, int]] = {}
        self._tiers: dict[int, dict[int, int]] = {}
        self._pending: dict[int, dict[int, None]] = {}
        self._refs: dict[int, dict[int, int]] = {}

    # -- queries ---------------------------------------------------------------------------

    def used(self, slot: int) -> int:
        """Blocks currently indexed on node `slot` (all tiers, pending included)."""
        lru = self._lru.get(slot)
        return 0 if lru is None else len(lru)

    def holds(self, slot: int, key: int) -> bool:
        lru = self._lru.get(slot)
        return lru is not None and key in lru

    def tier(self, model: int, block: int, slot: int) -> int | None:
        """The tier of `block` on `slot`, or None if that node does not hold it."""
        key = model << 64 | block
        if not self.holds(slot, key):
            return None
        if key in self._pending.get(slot, ()):
            return PENDING
        return self._tiers.get(slot, {}).get(key, GPU)

    def still_pending(self, slot: int, keys: Iterable[int]) -> list[int]:
        """Those of `keys` that are pending on node `slot`, in order (C-level)."""
        pending = self._pending.get(slot)
        return list(filter(pending.__contains__, keys)) if pending else []

    def holders(self, model: int, block: int) -> list[tuple[int, int]]:
        """(slot, tier) pairs holding `block`, by slot (visits every node)."""
        return [(slot, tier) for slot in sorted(self._lru)
                if (tier := self.tier(model, block, slot)) is not None]

    def prefix(self, slot: int, keys: Sequence[int], hint: int | None = None) -> int:
        """How many of `keys`, from the first, node `slot` holds consecutively.

        `hint`, a guess of the answer (the leader's, carried in a command), only makes the
        call faster when it is right (one C-level pass, no lists): the answer never depends
        on it.
        """
        lru = self._lru.get(slot)
        if not lru or not keys or keys[0] not in lru:
            return 0
        if (hint is not None and 0 < hint <= len(keys)
                and (hint == len(keys) or keys[hint] not in lru)
                and all(map(lru.__contains__, islice(keys, hint)))):
            return hint
        start, step, total = 0, _FIRST_CHUNK, len(keys)
        while start < total:
            chunk = keys[start:start + step]
            held = list(map(lru.__contains__, chunk))
            if not all(held):
                return start + held.index(False)
            start += len(chunk)
            step *= 2
        return total

    def weighted(self, slot: int, keys: Sequence[int], count: int) -> float:
        """The tier-weighted credit of the first `count` keys (all held on `slot`)."""
        tiers = self._tiers.get(slot)
        if not tiers or not count:
            return float(count)
        return count - sum(map(_SHORTFALL.__getitem__, filter(None, map(tiers.get,
                                                                         keys[:count]))))

    def match(self, keys: Sequence[int], slots: Iterable[int]) -> dict[int, Match]:
        """Per node of `slots` that holds a prefix of `keys`: its length and weight."""
        if not keys:
            return {}
        first, lrus = keys[0], self._lru
        out = {}
        for slot in slots:
            lru = lrus.get(slot)
            if lru is not None and first in lru:
                count = self.prefix(slot, keys)
                out[slot] = Match(slot, count, self.weighted(slot, keys, count))
        return out

    def split(self, slot: int, keys: Sequence[int]) -> tuple[list[int], list[int]]:
        """(the keys node `slot` holds, the distinct keys it does not), each in order."""
        lru = self._lru.get(slot)
        if not lru:
            return [], list(dict.fromkeys(keys))
        flags = list(map(lru.__contains__, keys))
        return (list(compress(keys, flags)),
                list(dict.fromkeys(compress(keys, map(operator.not_, flags)))))

    def missing(self, slot: int, keys: Sequence[int]) -> list[int]:
        """The distinct keys of `keys` that node `slot` does not hold, in order."""
        lru = self._lru.get(slot)
        if not lru:
            return list(dict.fromkeys(keys))
        return list(dict.fromkeys(filterfalse(lru.__contains__, keys)))

    def lru_keys(self, slot: int) -> Iterator[int]:
        """Keys on node `slot`, least recently used first."""
        return iter(self._lru.get(slot, {}))

    def lru_order(self, slot: int) -> Iterator[tuple[int, int]]:
        """(model, block) on node `slot`, least recently used first."""
        return map(split_key, self.lru_keys(slot))

    def idle_since(self, slot: int, before_ms: int) -> list[int]:
        """Keys on `slot` last touched before `before_ms`, walking from the LRU end.

        Stops at the first block touched later; with a leader clock that went backwards (a new
        leader) some idle blocks may wait for a later call, none is dropped too early.
        """
        idle = []
        for key, touched in self._lru.get(slot, {}).items():
            if touched >= before_ms:
                break
            idle.append(key)
        return idle

    def size(self) -> int:
        """Total (node, block) entries."""
        return sum(len(lru) for lru in self._lru.values())

    def refs(self, slot: int, key: int) -> int:
        """`key`'s packed KV-event reference counts on `slot` (0: none, or not held)."""
        return self._refs.get(slot, {}).get(key, 0)

    def export_refs(self, slot: int, keys: Sequence[int]) -> list[int] | None:
        """The packed counts of `keys` on `slot` (None when the node has none at all)."""
        refs = self._refs.get(slot)
        return list(map(refs.get, keys, repeat(0))) if refs else None

    def set_refs(self, slot: int, keys: Sequence[int], values: Sequence[int]) -> None:
        """Set the packed counts of held `keys` (0: forget them)."""
        refs = self._refs.setdefault(slot, {})
        lru = self._lru.get(slot, {})
        for key, value in zip(keys, values, strict=True):
            if value and key in lru:
                refs[key] = value
            else:
                refs.pop(key, None)

    def export(self, slot: int) -> tuple[list[int], list[int], bytes]:
        """Node `slot`'s (keys, touch times, tiers), least recently used first (C-level)."""
        lru = self._lru.get(slot)
        if not lru:
            return [], [], b""
        keys, times = list(lru), list(lru.values())
        tiers, pending = self._tiers.get(slot), self._pending.get(slot)
        if not tiers and not pending:
            return keys, times, bytes(len(keys))
        merged = dict(tiers or {})
        merged.update(dict.fromkeys(pending or (), PENDING))
        return keys, times, bytes(map(merged.get, keys, repeat(GPU)))

    def restore(self, slot: int, keys: Sequence[int], times: Sequence[int],
                tiers: bytes, refs: Sequence[int] | None = None) -> None:
        """Replace node `slot`'s state with an `export` (and `export_refs`) of it."""
        self.drop_node(slot)
        if not keys:
            return
        self._lru[slot] = dict(zip(keys, times, strict=True))
        if refs is not None:
            self._refs[slot] = {key: value for key, value in zip(keys, refs, strict=True)
                                if value}
        if not any(tiers):  # all GPU: the usual case
            self._tiers[slot], self._pending[slot] = {}, {}
            return
        self._tiers[slot] = {key: tier for key, tier in zip(keys, tiers, strict=True)
                             if tier in (CPU, DISK)}
        self._pending[slot] = dict.fromkeys(compress(keys, map(PENDING.__eq__, tiers)))

    # -- updates ---------------------------------------------------------------------------

    def add(self, slot: int, keys: Sequence[int], tier: int, at_ms: int = 0) -> None:
        """Record that `slot` holds `keys` at `tier`, most recent (in order) as of `at_ms`."""
        lru = self._lru.setdefault(slot, {})
        _consume(map(lru.pop, keys, repeat(None)))
        lru.update(dict.fromkeys(keys, at_ms))
        tiers = self._tiers.setdefault(slot, {})
        pending = self._pending.setdefault(slot, {})
        if tier in (CPU, DISK):
            tiers.update(dict.fromkeys(keys, tier))
        elif tiers:
            _consume(map(tiers.pop, keys, repeat(None)))
        if tier == PENDING:
            pending.update(dict.fromkeys(keys))
        elif pending:
            _consume(map(pending.pop, keys, repeat(None)))

    def touch_held(self, slot: int, keys: Sequence[int], at_ms: int) -> Sequence[int]:
        """Make `keys` (held on `slot`) the most recent, in order, as of `at_ms`.

        A key listed twice keeps the position of its first listing; a key that is not held is
        ignored. Returns the keys touched (distinct, held). Three C-level passes.
        """
        lru = self._lru.get(slot)
        if not lru:
            return []
        popped = list(map(lru.pop, keys, repeat(None)))
        if None in popped:  # not held, or listed before: keep first listings of held keys
            keys = list(compress(keys, map(operator.is_not, popped, repeat(None))))
        lru.update(zip(keys, repeat(at_ms)))
        return keys

    def remove(self, slot: int, key: int) -> bool:
        """Forget that `slot` holds `key`; False if it did not."""
        lru = self._lru.get(slot)
        if lru is None or lru.pop(key, None) is None:
            return False
        self._tiers.get(slot, {}).pop(key, None)
        self._pending.get(slot, {}).pop(key, None)
        self._refs.get(slot, {}).pop(key, None)
        return True

    def drop_node(self, slot: int) -> list[int]:
        """Forget every block of `slot`; return the keys dropped (LRU first)."""
        dropped = list(self._lru.pop(slot, {}))
        self._tiers.pop(slot, None)
        self._pending.pop(slot, None)
        self._refs.pop(slot, None)
        return dropped

    def drop_model(self, model: int) -> list[tuple[int, int]]:
        """Forget every block of `model`; return the (slot, key) pairs dropped, by slot."""
        dropped = [(slot, key) for slot in sorted(self._lru) for key in self._lru[slot]
                   if key >> 64 == model]
        for slot, key in dropped:
            self.remove(slot, key)
        return dropped

"""The prefix index: which node holds which block, and each node's LRU order. PURE.

Data layout, chosen for memory (the target is under 300 bytes per indexed block):

- ``_holders[model][block_hash]`` is either one small int ``slot * 4 + tier`` (the common
  case: one holder; Python caches small ints, so the value costs nothing) or a tuple of them.
- ``_lru[slot]`` is an insertion-ordered dict per node whose keys are
  ``model_code << 64 | block_hash`` and whose values are the leader's time (ms) of the last
  touch; the first key is the least recently used block. Blocks touched by one command share
  one int object, so the time costs next to nothing.

Nodes and models get small integer codes (`slot`, `model_code`) in the order they first
appear; the replicated machine assigns them, so every replica has the same codes.

Longest-prefix lookup (`match`) walks the prompt's hashes from block 0 and stops as soon as
no node still holds a consecutive prefix: O(blocks in the prompt x holders), never a scan.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

GPU, CPU, DISK, PENDING = 0, 1, 2, 3
TIER_NAMES = ("gpu", "cpu", "disk", "pending")
TIER_CODES = {name: code for code, name in enumerate(TIER_NAMES)}
# Credit for a reused block by tier (Dynamo credits host 0.75, disk 0.25; llm-d CPU 0.8).
TIER_WEIGHTS = (1.0, 0.8, 0.25, 0.9)
_MASK64 = (1 << 64) - 1

Holders = int | tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Match:
    """How much of a prompt one node can reuse."""

    slot: int
    blocks: int        # consecutive blocks held from block 0
    weighted: float    # the same blocks weighted by tier


def _entries(value: Holders) -> tuple[int, ...]:
    return value if isinstance(value, tuple) else (value,)


class PrefixIndex:
    """Block hash -> holders per model, plus per-node LRU order (see module docstring)."""

    def __init__(self) -> None:
        self._holders: dict[int, dict[int, Holders]] = {}
        self._lru: dict[int, dict[int, int]] = {}

    # -- queries ---------------------------------------------------------------------------

    def used(self, slot: int) -> int:
        """Blocks currently indexed on node `slot` (all tiers, pending included)."""
        lru = self._lru.get(slot)
        return 0 if lru is None else len(lru)

    def tier(self, model: int, block: int, slot: int) -> int | None:
        """The tier of `block` on `slot`, or None if that node does not hold it."""
        value = self._holders.get(model, {}).get(block)
        if value is None:
            return None
        for entry in _entries(value):
            if entry >> 2 == slot:
                return entry & 3
        return None

    def holders(self, model: int, block: int) -> list[tuple[int, int]]:
        """(slot, tier) pairs holding `block`."""
        value = self._holders.get(model, {}).get(block)
        return [] if value is None else [(e >> 2, e & 3) for e in _entries(value)]

    def match(self, model: int, blocks: Iterable[int]) -> dict[int, Match]:
        """Per node: consecutive blocks held from the start of `blocks`, and their weight."""
        table = self._holders.get(model)
        if not table:
            return {}
        counts: dict[int, int] = {}
        weights: dict[int, float] = {}
        for i, block in enumerate(blocks):
            value = table.get(block)
            if value is None:
                break
            advanced = False
            for entry in _entries(value):
                slot = entry >> 2
                if counts.get(slot, 0) == i:
                    counts[slot] = i + 1
                    weights[slot] = weights.get(slot, 0.0) + TIER_WEIGHTS[entry & 3]
                    advanced = True
            if not advanced:
                break
        return {slot: Match(slot, n, weights[slot]) for slot, n in counts.items()}

    def lru_order(self, slot: int) -> Iterator[tuple[int, int]]:
        """(model, block) on node `slot`, least recently used first."""
        for key in self._lru.get(slot, {}):
            yield key >> 64, key & _MASK64

    def idle_since(self, slot: int, before_ms: int) -> list[tuple[int, int]]:
        """(model, block) on `slot` last touched before `before_ms`, walking from the LRU end.

        Stops at the first block touched later; with a leader clock that went backwards (a new
        leader) some idle blocks may wait for a later call, none is dropped too early.
        """
        idle = []
        for key, touched in self._lru.get(slot, {}).items():
            if touched >= before_ms:
                break
            idle.append((key >> 64, key & _MASK64))
        return idle

    def size(self) -> int:
        """Total (node, block) entries."""
        return sum(len(lru) for lru in self._lru.values())

    # -- updates ---------------------------------------------------------------------------

    def add(self, model: int, block: int, slot: int, tier: int, at_ms: int = 0) -> bool:
        """Record that `slot` holds `block` at `tier`, most recent as of `at_ms`; True if new."""
        table = self._holders.setdefault(model, {})
        entry = slot << 2 | tier
        value = table.get(block)
        new = True
        if value is None:
            table[block] = entry
        else:
            kept = [e for e in _entries(value) if e >> 2 != slot]
            new = len(kept) == len(_entries(value))
            table[block] = entry if not kept else tuple(sorted([*kept, entry]))
        lru = self._lru.setdefault(slot, {})
        key = model << 64 | block
        lru.pop(key, None)
        lru[key] = at_ms
        return new

    def touch(self, model: int, block: int, slot: int, at_ms: int) -> int | None:
        """Make a held block most recent as of `at_ms`; return its tier (None: not held)."""
        lru = self._lru.get(slot)
        key = model << 64 | block
        if lru is None or key not in lru:
            return None
        del lru[key]
        lru[key] = at_ms
        for entry in _entries(self._holders[model][block]):
            if entry >> 2 == slot:
                return entry & 3
        return None  # pragma: no cover (holders and LRU agree)

    def remove(self, model: int, block: int, slot: int) -> bool:
        """Forget that `slot` holds `block`; False if it did not."""
        lru = self._lru.get(slot)
        key = model << 64 | block
        if lru is None or key not in lru:
            return False
        del lru[key]
        table = self._holders[model]
        kept = [e for e in _entries(table[block]) if e >> 2 != slot]
        if not kept:
            del table[block]
        else:
            table[block] = kept[0] if len(kept) == 1 else tuple(kept)
        return True

    def drop_node(self, slot: int) -> list[tuple[int, int]]:
        """Forget every block of `slot`; return the (model, block) pairs dropped."""
        dropped = list(self.lru_order(slot))
        for model, block in dropped:
            self.remove(model, block, slot)
        self._lru.pop(slot, None)
        return dropped

    def drop_model(self, model: int) -> list[tuple[int, int]]:
        """Forget every block of `model`; return the (slot, block) pairs dropped."""
        dropped = [(e >> 2, block) for block, value in self._holders.get(model, {}).items()
                   for e in _entries(value)]
        for slot, block in dropped:
            self.remove(model, block, slot)
        self._holders.pop(model, None)
        return dropped

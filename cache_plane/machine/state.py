"""The replicated tables and their bookkeeping, and the mutations of the command being applied.

`State` holds what the machine knows in memory (models, nodes, the prefix index, sessions,
requests, pins, stats, the block log) and the helpers every handler shares: pins, block
operations that log themselves, sessions, node records. Each helper appends the LMDB
mutations its change needs to `self.m`, the list of the command being applied (set by
`CachePlaneMachine.apply`), so no mutation list is threaded through the calls.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from itertools import compress, repeat
from typing import Any

from veristore_py.codec import pack
from veristore_py.state import Mutation, Reader

from ..blocklog import ADD, LOG_SLACK_BLOCKS, MAX_LOG_RECORDS, REMOVE, TOUCH, BlockLog
from ..calibration import DEFAULT_SPEEDS, Speeds
from ..index import GPU, PrefixIndex, block_keys
from ..model import ModelSpec, Node, RouteDecision
from ..policy import DEFAULT_POLICY, PolicyConfig, decide, fleet_speeds
from .fields import Rejected, str_field
from .records import (
    RequestRecord,
    Stats,
    by_model,
    consume,
    node_key,
    node_wire,
    request_key,
    session_key,
)
from .responses import ResponseTable


class State:
    """What the machine holds in memory, and the helpers its handlers share."""

    def __init__(self, policy: PolicyConfig = DEFAULT_POLICY) -> None:
        self.policy = policy
        self.reset()

    def reset(self) -> None:
        self.models: dict[str, ModelSpec] = {}
        self.nodes: dict[str, Node] = {}
        self.index = PrefixIndex()
        self.sessions: dict[str, tuple[str, int]] = {}
        self.session_count: dict[str, int] = {}  # node -> live sessions mapped to it
        self.requests: dict[str, RequestRecord] = {}
        self.pins: dict[int, Counter[int]] = {}  # slot -> index key -> active requests
        self.stats = Stats()
        self.m: list[Mutation] = []  # the mutations of the command being applied
        self._paces_cache: tuple[Speeds, dict[str, Speeds]] | None = None
        self.log = BlockLog()
        self.responses = ResponseTable()
        self.reader: Reader | None = None
        self.now = 0
        self.next_slot = 0
        self.next_model = 0

    # -- pricing and sessions --------------------------------------------------------------

    def pace(self, rec: Node, prior: Speeds) -> Speeds:
        """The speeds the load model prices `rec` with (see `calibration.speeds`)."""
        return self.paces(prior)[rec.id]

    def forget_speeds(self) -> None:
        """A node came or went, or learned something: work its speeds out again when asked."""
        self._paces_cache = None

    def paces(self, prior: Speeds) -> dict[str, Speeds]:
        """Every node's speeds under `prior`, cached until a node or what it learned changes.

        (Priors are interned by `fields.speeds_of`, so the same settings give the same object.)
        """
        if self._paces_cache is None or self._paces_cache[0] is not prior:
            self._paces_cache = (prior, fleet_speeds(self.nodes.values(), prior))
        return self._paces_cache[1]

    def session_node(self, session: str | None, now_ms: Any) -> str | None:
        if session is not None and session in self.sessions:
            node_id, expires = self.sessions[session]
            if isinstance(now_ms, int) and expires > now_ms:
                return node_id
        return None

    def route_decision(self, model: ModelSpec, keys: list[int], session: str | None, now_ms: Any,
                prior: Speeds,
                inflight: Mapping[str, tuple[int, int]] | None = None,
                policy: PolicyConfig | None = None) -> RouteDecision:
        session_node = self.session_node(session, now_ms)
        # A new session commits its later turns to the node chosen now: spread sessions too.
        new_session = session is not None and session_node is None
        return decide(model, keys, list(self.nodes.values()), self.index, self.is_pinned,
                      self.pinned_count, session_node, policy or self.policy, inflight or {},
                      now_ms if isinstance(now_ms, int) else 0, prior,
                      self.session_count if new_session else None, self.paces(prior))

    def set_session(self, session: str, node_id: str, expires_ms: int) -> None:
        old = self.sessions.get(session)
        if old is not None:
            self.count_session(old[0], -1)
        self.sessions[session] = (node_id, expires_ms)
        self.count_session(node_id, +1)

    def del_session(self, session: str) -> None:
        node_id, _ = self.sessions.pop(session)
        self.count_session(node_id, -1)

    def count_session(self, node_id: str, delta: int) -> None:
        count = self.session_count.get(node_id, 0) + delta
        if count > 0:
            self.session_count[node_id] = count
        else:
            self.session_count.pop(node_id, None)

    # -- meta, pins, blocks, records -------------------------------------------------------

    def meta_wire(self) -> bytes:
        return pack([self.next_slot, self.next_model, self.log.seq, self.stats.wire(),
                     self.now])

    def is_pinned(self, slot: int, key: int) -> bool:
        return key in self.pins.get(slot, ())

    def pinned_count(self, slot: int) -> int:
        return len(self.pins.get(slot, ()))

    def pin(self, slot: int, keys: Iterable[int]) -> None:
        self.pins.setdefault(slot, Counter()).update(keys)

    def unpin(self, slot: int, keys: Sequence[int]) -> None:
        pins = self.pins.get(slot)
        if pins is None:
            return
        if len(dict.fromkeys(keys)) == len(keys):  # distinct keys (the usual case): C-level
            counts = list(map(operator.sub, map(pins.get, keys, repeat(0)), repeat(1)))
            dict.update(pins, zip(keys, counts, strict=True))
            consume(map(pins.pop, compress(keys, map((0).__ge__, counts)), repeat(None)))
            return
        for key in keys:
            count = pins.get(key, 0) - 1
            if count > 0:
                pins[key] = count
            else:
                pins.pop(key, None)

    def log_op(self, op: int, slot: int, model: int,
                keys: Iterable[int], tier: int = 0) -> None:
        self.log.log(self.m, op, slot, model, keys, tier, self.now)

    def put_blocks(self, slot: int, model: int, keys: Sequence[int],
                    tier: int) -> None:
        """Add (or move to most recent) `keys` of `model` on `slot` at `tier`."""
        if keys:
            self.index.add(slot, keys, tier, self.now)
            self.log_op(ADD, slot, model, keys, tier)

    def set_refs(self, slot: int, model: int, keys: Sequence[int],
                 values: Sequence[int]) -> None:
        """Set (and log) the KV-event reference counts of held `keys` of `model` on `slot`."""
        if keys:
            self.index.set_refs(slot, keys, values)
            self.log.log_refs(self.m, slot, model, keys, values, self.now)

    def touch(self, slot: int, model: int, keys: Sequence[int]) -> None:
        """Make the held ones of `keys` of `model` on `slot` the most recently used."""
        # Only what was touched is logged: compaction reads a touch as "held at that point".
        touched = self.index.touch_held(slot, keys, self.now) if keys else ()
        if touched:
            self.log_op(TOUCH, slot, model, touched)

    def del_block(self, slot: int, key: int) -> bool:
        if self.index.remove(slot, key):
            self.log_op(REMOVE, slot, key >> 64, (key,))
            return True
        return False

    def del_all(self, slot: int, keys: list[int]) -> None:
        """Log the removal of `keys` from `slot` (already dropped from the index)."""
        for model, group in by_model(keys).items():
            self.log_op(REMOVE, slot, model, group)

    def make_room(self, rec: Node, keep: frozenset[int] = frozenset()) -> bool:
        """Evict the least recently used unpinned block of `rec` if it is full; False if none."""
        if self.index.used(rec.slot) < rec.capacity_blocks:
            return True
        for key in self.index.lru_keys(rec.slot):
            if key in keep or self.is_pinned(rec.slot, key):
                continue
            self.del_block(rec.slot, key)
            self.stats.evictions += 1
            return True
        return False

    def store_blocks(self, rec: Node, model: int, keys: list[int],
                      tier: int, stop_when_full: bool = False) -> tuple[int, int]:
        """Put `keys` on `rec` at `tier`, evicting LRU unpinned blocks (never `keys`) for room.

        Returns (keys stored, keys that were new). A key that finds no room is skipped, or
        with `stop_when_full` ends the call (a chain's tail is useless without its head).
        """
        keys = list(dict.fromkeys(keys))
        new = self.index.missing(rec.slot, keys)
        if self.index.used(rec.slot) + len(new) <= rec.capacity_blocks:
            self.put_blocks(rec.slot, model, keys, tier)
            return len(keys), len(new)
        keep = frozenset(keys)
        stored = added = 0
        for key in keys:
            held = self.index.holds(rec.slot, key)
            if not held and not self.make_room(rec, keep):
                if stop_when_full:
                    break
                continue
            self.put_blocks(rec.slot, model, (key,), tier)
            stored += 1
            added += not held
        return stored, added

    def save_node(self, rec: Node) -> None:
        self.m.append((node_key(rec.id), pack(node_wire(rec))))

    def drop_request(self, request_id: str, confirm: bool,
                      prior: Speeds = DEFAULT_SPEEDS) -> None:
        request = self.requests.pop(request_id)
        self.m.append((request_key(request_id), None))
        rec = self.nodes.get(request.node)
        if rec is None:
            return
        self.unpin(rec.slot, block_keys(request.model, request.blocks))
        pending = self.index.still_pending(rec.slot, block_keys(request.model, request.pending))
        if confirm:
            # The request is done with its blocks: they become GPU blocks and, like vLLM's
            # free queue, the chain's tail becomes the least recently used part of it.
            self.put_blocks(rec.slot, request.model, pending[::-1], GPU)
            reused = block_keys(request.model, request.blocks[:request.matched])
            self.touch(rec.slot, request.model, reused[::-1])
        else:
            for key in pending:
                self.del_block(rec.slot, key)
        self.leave(rec, prior)
        self.save_node(rec)

    def leave(self, rec: Node, prior: Speeds) -> None:
        """A request left `rec`: the first waiting one (FCFS) takes its slot and prefills."""
        if rec.queue:
            rec.queue -= 1
            pace = self.pace(rec, prior)
            rec.prefill_until_ms = max(rec.prefill_until_ms, self.now) + round(
                pace.new_tokens * pace.prefill_ms_per_token)
        else:
            rec.active = max(rec.active - 1, 0)

    def drop_node_state(self, rec: Node) -> None:
        self.del_all(rec.slot, self.index.drop_node(rec.slot))
        self.pins.pop(rec.slot, None)
        for sid in sorted(s for s, (node, _) in self.sessions.items() if node == rec.id):
            self.del_session(sid)
            self.m.append((session_key(sid), None))
        for rid in sorted(r for r, req in self.requests.items() if req.node == rec.id):
            del self.requests[rid]
            self.m.append((request_key(rid), None))
        rec.active = 0

    def drop_model_blocks(self, spec: ModelSpec) -> int:
        dropped = self.index.drop_model(spec.code)
        for slot in sorted({slot for slot, _ in dropped}):
            self.del_all(slot, [key for s, key in dropped if s == slot])
        return len(dropped)

    def known_node(self, cmd: Mapping[str, Any]) -> Node:
        node_id = str_field(cmd, "node")
        rec = self.nodes.get(node_id or "")
        if rec is None:
            raise Rejected("unknown_node", f"node {node_id!r} is not registered")
        return rec

    def compaction_due(self, slack_blocks: int = LOG_SLACK_BLOCKS,
                       max_records: int = MAX_LOG_RECORDS) -> list[int]:
        """Slots whose block log the leader should compact now, largest log first."""
        live = {rec.slot for rec in self.nodes.values()}
        return self.log.due(((slot, self.index.used(slot)) for slot in self.log.records), live,
                            slack_blocks, max_records)

    def model_by_code(self, code: int) -> ModelSpec:
        return next((spec for spec in self.models.values() if spec.code == code),
                    ModelSpec("", code))

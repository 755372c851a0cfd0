"""The replicated cache_plane state machine: commands -> state changes + results. PURE.

It implements veristore's `Machine` protocol. The working state lives in memory (the prefix
index must answer in O(prompt)), and every change is also emitted as an LMDB mutation so the
store holds the full state: `rebuild(items)` reconstructs the memory state from the store at
open, after a snapshot install, and after an aborted write. Commands it does not know (``put``,
``cas``, ...) go to the generic `KVMachine`, so one cluster serves both.

Determinism: decisions (routing, placement, eviction victims) are computed here, from the
replicated state and the command alone, so every replica reaches the same decision; the leader
stamps ``now_ms``, ids and TTLs into each command and nothing here reads a clock. Whatever
iterates several nodes does it in node-id order. A handler validates everything before it
changes anything, so an invalid command leaves no trace; no handler raises.

Touch log: a route touches (LRU) every block it reuses. Instead of rewriting one record per
block, it appends one ``cp/tl/`` record listing them. `rebuild` replays block records and touch
records merged by their sequence numbers, which reproduces the live LRU order exactly: a
touch of a block that was (re)written later is replayed before that block exists and is
skipped, as it should be. `cp.compact_touches`, proposed by the leader when the log grows,
folds the oldest touch records back into block records (deduplicated) and deletes them.

Store keys (all under ``cp/``)::

    cp/meta                               counters, next slot / model code, LRU sequence,
                                          last leader time seen
    cp/model/<id>                         [code, block_size, hash_seed, epoch]
    cp/node/<id>                          Node fields
    cp/blk/<slot:u16><model:u16><hash:u64> <tier:u8><lru_seq:u64><touched_ms:u64>
    cp/tl/<first_seq:u64>                 <slot:u16><model:u16><touched_ms:u64><block:u64>...
                                          (reserves sequence numbers first .. first + n - 1)
                                          one route's LRU touches (see "touch log" below)
    cp/sess/<id>                          [node_id, expires_ms]
    cp/req/<id>                           [node_id, model_code, blocks, pending, expires_ms,
                                           route_type, matched_blocks]
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from veristore_py.codec import pack, unpack
from veristore_py.state import ApplyContext, KVMachine, Mutation, Outcome, Reader, Result, error

from .index import GPU, PENDING, TIER_CODES, TIER_NAMES, PrefixIndex
from .model import ModelSpec, Node, RouteDecision
from .policy import DEFAULT_POLICY, PolicyConfig, decide

PREFIX = b"cp/"
META_KEY = b"cp/meta"
_BLK = b"cp/blk/"
_BLK_KEY = struct.Struct(">HHQ")
_BLK_VALUE = struct.Struct(">BQQ")  # tier, lru_seq, touched_ms (fixed layout: hot path)
_TL = b"cp/tl/"
_TL_KEY = struct.Struct(">Q")
_TL_HEAD = struct.Struct(">HHQ")  # slot, model, touched_ms; then the blocks as big-endian u64
MASK64 = (1 << 64) - 1
MAX_PROMPT_BLOCKS = 1 << 17
MAX_SLOTS = 1 << 16
MAX_ID_BYTES = 256


class _Invalid(Exception):
    """Internal: a field failed validation (never escapes `apply`)."""


class _Rejected(Exception):
    """Internal: the command refers to something that does not exist (never escapes `apply`).

    Like `_Invalid`, raised only before a handler changes anything.
    """

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code


def _node_wire(node: Node) -> list[Any]:
    return [node.slot, node.address, list(node.models), node.capacity_blocks, node.max_active,
            [list(p) for p in node.labels], node.state, node.active, node.queue,
            node.lease_until_ms, node.last_event_seq]


def _node_from_wire(node_id: str, w: list[Any]) -> Node:
    return Node(node_id, w[0], w[1], tuple(w[2]), w[3], w[4], tuple(tuple(p) for p in w[5]),
                w[6], w[7], w[8], w[9], w[10])


@dataclass(slots=True)
class RequestRecord:
    node: str
    model: int
    blocks: tuple[int, ...]
    pending: tuple[int, ...]
    expires_ms: int
    route_type: str = "miss"
    matched: int = 0


@dataclass(slots=True)
class Stats:
    routes: dict[str, int] = field(default_factory=dict)
    rejections: dict[str, int] = field(default_factory=dict)
    blocks_requested: int = 0
    blocks_reused: int = 0
    tokens_reused: int = 0
    evictions: int = 0

    def wire(self) -> list[Any]:
        return [self.routes, self.rejections, self.blocks_requested, self.blocks_reused,
                self.tokens_reused, self.evictions]


def block_key(slot: int, model: int, block: int) -> bytes:
    return _BLK + _BLK_KEY.pack(slot, model, block)


def _touch_blocks(raw: bytes) -> tuple[int, ...]:
    """The block hashes of a touch record."""
    count = (len(raw) - _TL_HEAD.size) // 8
    return struct.unpack_from(f">{count}Q", raw, _TL_HEAD.size)


# -- field validation ------------------------------------------------------------------------

def _str(cmd: Mapping[str, Any], name: str, *, optional: bool = False) -> str | None:
    value = cmd.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value or len(value.encode()) > MAX_ID_BYTES:
        raise _Invalid(f"field '{name}' must be a non-empty string of at most {MAX_ID_BYTES} bytes")
    return value


def _int(cmd: Mapping[str, Any], name: str, lo: int, hi: int, default: int | None = None) -> int:
    value = cmd.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _Invalid(f"field '{name}' must be an integer in [{lo}, {hi}]")
    return value


def _hashes(cmd: Mapping[str, Any], name: str, limit: int = MAX_PROMPT_BLOCKS) -> list[int]:
    value = cmd.get(name, [])
    if not isinstance(value, list) or len(value) > limit:
        raise _Invalid(f"field '{name}' must be a list of at most {limit} block hashes")
    for h in value:
        if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h <= MASK64:
            raise _Invalid(f"field '{name}' must hold unsigned 64-bit integers")
    return value


class CachePlaneMachine:
    """Nodes, models, the prefix index, sessions and in-flight requests (see module docstring)."""

    def __init__(self, policy: PolicyConfig = DEFAULT_POLICY) -> None:
        self.policy = policy
        self.kv = KVMachine()
        self.reset()
        self._handlers: dict[str, Callable[[Mapping[str, Any], ApplyContext, list[Mutation]], Result]] = {
            "cp.register_model": self._register_model,
            "cp.invalidate_model": self._invalidate_model,
            "cp.register_node": self._register_node,
            "cp.heartbeat": self._heartbeat,
            "cp.drain": self._drain,
            "cp.remove_node": self._remove_node,
            "cp.expire": self._expire,
            "cp.route": self._route,
            "cp.complete": self._complete,
            "cp.kv_events": self._kv_events,
            "cp.compact_touches": self._compact_touches,
        }

    def reset(self) -> None:
        self.models: dict[str, ModelSpec] = {}
        self.nodes: dict[str, Node] = {}
        self.index = PrefixIndex()
        self.sessions: dict[str, tuple[str, int]] = {}
        self.requests: dict[str, RequestRecord] = {}
        self.pins: dict[int, dict[int, int]] = {}
        self.stats = Stats()
        self.seq = 0
        self.touch_log = 0  # touch records not yet compacted
        self._reader: Reader | None = None
        self.now = 0
        self.next_slot = 0
        self.next_model = 0

    # -- veristore Machine protocol --------------------------------------------------------

    def apply(self, command: Any, reader: Reader, ctx: ApplyContext) -> Outcome:
        """Apply one command; never raises."""
        if not isinstance(command, Mapping):
            return error("invalid_command", "command must be a map")
        op = command.get("op")
        handler = self._handlers.get(op) if isinstance(op, str) else None
        if handler is None:
            return self.kv.apply(command, reader, ctx)
        mutations: list[Mutation] = []
        self._reader = reader
        now = command.get("now_ms", self.now)
        if isinstance(now, int) and not isinstance(now, bool) and now >= 0:
            self.now = now  # the leader's clock, stamped into the command
        try:
            result = handler(command, ctx, mutations)
        except _Invalid as exc:
            return error("invalid_command", str(exc))
        except _Rejected as exc:
            return error(exc.code, str(exc))
        finally:
            self._reader = None  # only valid inside this apply
        mutations.append((META_KEY, self._meta_wire()))
        return Outcome(tuple(mutations), result)

    def rebuild(self, items: Iterable[tuple[bytes, bytes]]) -> None:
        """Reconstruct the memory state from every stored (key, value) pair."""
        self.reset()
        blocks: list[tuple[int, int, int, int, int, int]] = []
        touches: list[tuple[int, int, int, int, bytes]] = []
        for key, raw in items:
            if not key.startswith(PREFIX):
                continue
            if key.startswith(_BLK):
                slot, model, block = _BLK_KEY.unpack(key[len(_BLK):])
                tier, seq, touched = _BLK_VALUE.unpack(raw)
                blocks.append((seq, slot, model, block, tier, touched))
                continue
            if key.startswith(_TL):
                (seq,) = _TL_KEY.unpack(key[len(_TL):])
                slot, model, touched = _TL_HEAD.unpack_from(raw)
                touches.append((seq, slot, model, touched, raw))
                continue
            value = unpack(raw)
            if key == META_KEY:
                self.next_slot, self.next_model, self.seq, stats, self.now = value
                self.stats = Stats(*stats)
            elif key.startswith(b"cp/model/"):
                model_id = key[9:].decode()
                self.models[model_id] = ModelSpec(model_id, *value)
            elif key.startswith(b"cp/node/"):
                node_id = key[8:].decode()
                self.nodes[node_id] = _node_from_wire(node_id, value)
            elif key.startswith(b"cp/sess/"):
                self.sessions[key[8:].decode()] = (value[0], value[1])
            elif key.startswith(b"cp/req/"):
                node, model, req_blocks, pending, expires, kind, matched = value
                self.requests[key[7:].decode()] = RequestRecord(
                    node, model, tuple(req_blocks), tuple(pending), expires, kind, matched)
        events: list[tuple[int, int, Any]] = [(b[0], 0, b) for b in blocks]
        events += [(t[0], 1, t) for t in touches]
        for _seq, kind, event in sorted(events, key=lambda e: e[0]):
            if kind == 0:
                _, slot, model, block, tier, touched = event
                self.index.add(model, block, slot, tier, touched)
            else:
                _, slot, model, touched, raw = event
                for block in _touch_blocks(raw):
                    self.index.touch(model, block, slot, touched)
        self.touch_log = len(touches)
        for request in self.requests.values():
            self._pin_all(self.nodes[request.node].slot, request.model, request.blocks, +1)

    # -- views -----------------------------------------------------------------------------

    def decide(self, command: Mapping[str, Any]) -> RouteDecision | Result:
        """Compute a route decision without changing anything (dry run); error dict if invalid."""
        try:
            model, blocks, session = self._route_inputs(command)
        except _Invalid as exc:
            return error("invalid_command", str(exc)).result
        if model is None:
            return error("unknown_model", f"model {command.get('model')!r} is not registered").result
        return self._decide(model, blocks, session, command.get("now_ms", 0))

    def _decide(self, model: ModelSpec, blocks: list[int], session: str | None,
                now_ms: Any) -> RouteDecision:
        session_node = None
        if session is not None and session in self.sessions:
            node_id, expires = self.sessions[session]
            if isinstance(now_ms, int) and expires > now_ms:
                session_node = node_id
        return decide(model, blocks, list(self.nodes.values()), self.index, self._is_pinned,
                      self._pinned_count, session_node, self.policy)

    # -- internals: meta, blocks, pins -----------------------------------------------------

    def _meta_wire(self) -> bytes:
        return pack([self.next_slot, self.next_model, self.seq, self.stats.wire(), self.now])

    def _is_pinned(self, slot: int, key: int) -> bool:
        return key in self.pins.get(slot, ())

    def _pinned_count(self, slot: int) -> int:
        return len(self.pins.get(slot, ()))

    def _pin_all(self, slot: int, model: int, blocks: Iterable[int], delta: int) -> None:
        pins = self.pins.setdefault(slot, {})
        for block in blocks:
            key = model << 64 | block
            count = pins.get(key, 0) + delta
            if count > 0:
                pins[key] = count
            else:
                pins.pop(key, None)

    def _put_block(self, m: list[Mutation], model: int, block: int, slot: int, tier: int) -> None:
        self.index.add(model, block, slot, tier, self.now)
        self.seq += 1
        m.append((block_key(slot, model, block), _BLK_VALUE.pack(tier, self.seq, self.now)))

    def _touch_blocks(self, m: list[Mutation], model: int, blocks: list[int], slot: int) -> None:
        """Touch `blocks` (LRU) on `slot` and log it as one touch record."""
        touched = [b for b in blocks if self.index.touch(model, b, slot, self.now) is not None]
        if not touched:
            return
        # The record reserves one sequence number per block (first .. first + n - 1), so
        # compaction can give each block its own position in the replay order.
        first = self.seq + 1
        self.seq += len(touched)
        self.touch_log += 1
        m.append((_TL + _TL_KEY.pack(first),
                  _TL_HEAD.pack(slot, model, self.now) + struct.pack(f">{len(touched)}Q", *touched)))

    def _del_block(self, m: list[Mutation], model: int, block: int, slot: int) -> bool:
        if self.index.remove(model, block, slot):
            m.append((block_key(slot, model, block), None))
            return True
        return False

    def _make_room(self, m: list[Mutation], rec: Node, keep: frozenset[int] = frozenset()) -> bool:
        """Evict the least recently used unpinned block of `rec` if it is full; False if none."""
        if self.index.used(rec.slot) < rec.capacity_blocks:
            return True
        for model, block in self.index.lru_order(rec.slot):
            key = model << 64 | block
            if key in keep or self._is_pinned(rec.slot, key):
                continue
            self._del_block(m, model, block, rec.slot)
            self.stats.evictions += 1
            return True
        return False

    def _save_node(self, m: list[Mutation], rec: Node) -> None:
        m.append((b"cp/node/" + rec.id.encode(), pack(_node_wire(rec))))

    def _drop_request(self, m: list[Mutation], request_id: str, confirm: bool) -> None:
        request = self.requests.pop(request_id)
        m.append((b"cp/req/" + request_id.encode(), None))
        rec = self.nodes.get(request.node)
        if rec is None:
            return
        self._pin_all(rec.slot, request.model, request.blocks, -1)
        for block in request.pending:
            if self.index.tier(request.model, block, rec.slot) == PENDING:
                if confirm:
                    self._put_block(m, request.model, block, rec.slot, GPU)
                else:
                    self._del_block(m, request.model, block, rec.slot)
        rec.active = max(rec.active - 1, 0)
        self._save_node(m, rec)

    def _drop_node_state(self, m: list[Mutation], rec: Node) -> None:
        for model, block in self.index.drop_node(rec.slot):
            m.append((block_key(rec.slot, model, block), None))
        self.pins.pop(rec.slot, None)
        for sid in sorted(s for s, (node, _) in self.sessions.items() if node == rec.id):
            del self.sessions[sid]
            m.append((b"cp/sess/" + sid.encode(), None))
        for rid in sorted(r for r, req in self.requests.items() if req.node == rec.id):
            del self.requests[rid]
            m.append((b"cp/req/" + rid.encode(), None))
        rec.active = 0

    # -- handlers --------------------------------------------------------------------------

    def _register_model(self, cmd: Mapping[str, Any], ctx: ApplyContext, m: list[Mutation]) -> Result:
        model_id = _str(cmd, "model")
        assert model_id is not None
        block_size = _int(cmd, "block_size", 1, 1 << 16, 16)
        seed = cmd.get("hash_seed", "vllm-none-hash")
        if not isinstance(seed, str) or len(seed) > MAX_ID_BYTES:
            raise _Invalid("field 'hash_seed' must be a string")
        old = self.models.get(model_id)
        if old is None:
            if self.next_model >= MAX_SLOTS:
                return error("too_many_models", "model code space exhausted").result
            spec = ModelSpec(model_id, self.next_model, block_size, seed, 0)
            self.next_model += 1
        else:
            spec = ModelSpec(model_id, old.code, block_size, seed, old.epoch)
            if (old.block_size, old.hash_seed) != (block_size, seed):
                self._drop_model_blocks(m, old)  # hashes of another scheme are meaningless now
                spec = ModelSpec(model_id, old.code, block_size, seed, old.epoch + 1)
        self.models[model_id] = spec
        m.append((b"cp/model/" + model_id.encode(),
                  pack([spec.code, spec.block_size, spec.hash_seed, spec.epoch])))
        return {"ok": True, "model": model_id, "block_size": block_size, "hash_seed": seed,
                "epoch": spec.epoch, "created": old is None}

    def _drop_model_blocks(self, m: list[Mutation], spec: ModelSpec) -> int:
        dropped = self.index.drop_model(spec.code)
        for slot, block in dropped:
            m.append((block_key(slot, spec.code, block), None))
        return len(dropped)

    def _invalidate_model(self, cmd: Mapping[str, Any], ctx: ApplyContext, m: list[Mutation]) -> Result:
        model_id = _str(cmd, "model")
        old = self.models.get(model_id or "")
        if old is None:
            return error("unknown_model", f"model {model_id!r} is not registered").result
        dropped = self._drop_model_blocks(m, old)
        spec = ModelSpec(old.id, old.code, old.block_size, old.hash_seed, old.epoch + 1)
        self.models[old.id] = spec
        m.append((b"cp/model/" + old.id.encode(),
                  pack([spec.code, spec.block_size, spec.hash_seed, spec.epoch])))
        return {"ok": True, "model": old.id, "epoch": spec.epoch, "dropped_blocks": dropped}

    def _register_node(self, cmd: Mapping[str, Any], ctx: ApplyContext, m: list[Mutation]) -> Result:
        node_id = _str(cmd, "node")
        address = _str(cmd, "address")
        assert node_id is not None and address is not None
        models = cmd.get("models")
        if (not isinstance(models, list) or not models
                or not all(isinstance(x, str) and x for x in models)):
            raise _Invalid("field 'models' must be a non-empty list of model ids")
        unknown = [x for x in models if x not in self.models]
        capacity = _int(cmd, "capacity_blocks", 1, 1 << 31)
        max_active = _int(cmd, "max_active", 1, 1 << 20)
        now = _int(cmd, "now_ms", 0, 1 << 62)
        lease = _int(cmd, "lease_ms", 1, 1 << 40)
        labels = cmd.get("labels", {})
        if not isinstance(labels, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise _Invalid("field 'labels' must map strings to strings")
        if unknown:
            return error("unknown_model", f"models not registered: {', '.join(unknown)}").result
        rec = self.nodes.get(node_id)
        created = rec is None
        if rec is None:
            if self.next_slot >= MAX_SLOTS:
                return error("too_many_nodes", "node slot space exhausted").result
            rec = Node(node_id, self.next_slot, address, tuple(models), capacity, max_active)
            self.next_slot += 1
            self.nodes[node_id] = rec
        rec.address, rec.models = address, tuple(models)
        rec.capacity_blocks, rec.max_active = capacity, max_active
        rec.labels = tuple(sorted(labels.items()))
        rec.state, rec.lease_until_ms = "up", now + lease
        while self.index.used(rec.slot) > rec.capacity_blocks:  # capacity shrank
            if not self._make_room(m, rec):
                break
        self._save_node(m, rec)
        return {"ok": True, "node": node_id, "slot": rec.slot, "created": created}

    def _known_node(self, cmd: Mapping[str, Any]) -> Node:
        node_id = _str(cmd, "node")
        rec = self.nodes.get(node_id or "")
        if rec is None:
            raise _Rejected("unknown_node", f"node {node_id!r} is not registered")
        return rec

    def _heartbeat(self, cmd: Mapping[str, Any], ctx: ApplyContext, m: list[Mutation]) -> Result:
        active = _int(cmd, "active", 0, 1 << 30)
        queue = _int(cmd, "queue", 0, 1 << 30)
        now = _int(cmd, "now_ms", 0, 1 << 62)
        lease = _int(cmd, "lease_ms", 1, 1 << 40)
        rec = self._known_node(cmd)
        rec.active, rec.queue, rec.lease_until_ms = active, queue, now + lease
        if rec.state == "down":
            rec.state = "up"
        self._save_node(m, rec)
        return {"ok": True, "node": rec.id, "state": rec.state}

    def _drain(self, cmd: Mapping[str, Any], ctx: ApplyContext, m: list[Mutation]) -> Result:
        rec = self._known_node(cmd)
        if rec.state == "up":
            rec.state = "draining"
        self._save_node(m, rec)
        return {"ok": True, "node": rec.id, "state": rec.state}

    def _remove_node(self, cmd: Mapping[str, Any], ctx: ApplyContext, m: list[Mutation]) -> Result:
        rec = self._known_node(cmd)
        self._drop_node_state(m, rec)
        del self.nodes[rec.id]
        m.append((b"cp/node/" + rec.id.encode(), None))
        return {"ok": True, "node": rec.id, "removed": True}

    def _expire(self, cmd: Mapping[str, Any], ctx: ApplyContext, m: list[Mutation]) -> Result:
        """Leader-proposed expiry at the leader's `now_ms`: leases, sessions, requests."""
        now = _int(cmd, "now_ms", 0, 1 << 62)
        block_ttl = _int(cmd, "block_ttl_ms", 0, 1 << 62, 0)
        downed = []
        for node_id in sorted(self.nodes):
            rec = self.nodes[node_id]
            if rec.state != "down" and rec.lease_until_ms < now:
                self._drop_node_state(m, rec)
                rec.state = "down"
                self._save_node(m, rec)
                downed.append(node_id)
        expired_sessions = sorted(s for s, (_, exp) in self.sessions.items() if exp <= now)
        for sid in expired_sessions:
            del self.sessions[sid]
            m.append((b"cp/sess/" + sid.encode(), None))
        expired_requests = sorted(r for r, req in self.requests.items() if req.expires_ms <= now)
        for rid in expired_requests:
            self._drop_request(m, rid, confirm=False)
        idle = 0
        if block_ttl:
            for node_id in sorted(self.nodes):
                slot = self.nodes[node_id].slot
                for model, block in self.index.idle_since(slot, now - block_ttl):
                    if not self._is_pinned(slot, model << 64 | block):
                        idle += self._del_block(m, model, block, slot)
        return {"ok": True, "nodes_down": downed, "sessions_expired": len(expired_sessions),
                "requests_expired": len(expired_requests), "blocks_expired": idle}

    def _route_inputs(self, cmd: Mapping[str, Any]) -> tuple[ModelSpec | None, list[int], str | None]:
        model_id = _str(cmd, "model")
        blocks = _hashes(cmd, "blocks")
        session = _str(cmd, "session_id", optional=True)
        return self.models.get(model_id or ""), blocks, session

    def _route(self, cmd: Mapping[str, Any], ctx: ApplyContext, m: list[Mutation]) -> Result:
        model, blocks, session = self._route_inputs(cmd)
        request_id = _str(cmd, "request_id")
        assert request_id is not None
        now = _int(cmd, "now_ms", 0, 1 << 62)
        ttl = _int(cmd, "request_ttl_ms", 1, 1 << 40, 30_000)
        session_ttl = _int(cmd, "session_ttl_ms", 1, 1 << 40, 600_000)
        if model is None:
            return error("unknown_model", f"model {cmd.get('model')!r} is not registered").result
        if request_id in self.requests:  # a retried route: answer with the original decision
            return self._replay_route(request_id, model, len(blocks), ctx)
        decision = self._decide(model, blocks, session, now)
        result = decision_result(decision, model, request_id,
                                 self.nodes[decision.node_id].address if decision.node_id else None)
        result["index"] = ctx.index
        if decision.node_id is None:
            reason = decision.rejected or "rejected"
            self.stats.rejections[reason] = self.stats.rejections.get(reason, 0) + 1
            return result
        rec = self.nodes[decision.node_id]
        slot = rec.slot
        for key in decision.evict:
            self._del_block(m, key >> 64, key & MASK64, slot)
        self.stats.evictions += len(decision.evict)
        pending, reused = [], []
        for i, block in enumerate(blocks):
            if i >= decision.matched_blocks and self.index.tier(model.code, block, slot) is None:
                self._put_block(m, model.code, block, slot, PENDING)
                pending.append(block)
            else:
                reused.append(block)
        self._touch_blocks(m, model.code, reused, slot)
        self._pin_all(slot, model.code, blocks, +1)
        kind = decision.route_type or "miss"
        request = RequestRecord(rec.id, model.code, tuple(blocks), tuple(pending), now + ttl,
                                kind, decision.matched_blocks)
        self.requests[request_id] = request
        m.append((b"cp/req/" + request_id.encode(),
                  pack([rec.id, model.code, list(blocks), pending, request.expires_ms, kind,
                        decision.matched_blocks])))
        if session is not None:
            self.sessions[session] = (rec.id, now + session_ttl)
            m.append((b"cp/sess/" + session.encode(), pack([rec.id, now + session_ttl])))
        rec.active += 1
        self._save_node(m, rec)
        self.stats.routes[kind] = self.stats.routes.get(kind, 0) + 1
        self.stats.blocks_requested += len(blocks)
        self.stats.blocks_reused += decision.matched_blocks
        self.stats.tokens_reused += decision.matched_blocks * model.block_size
        return result

    def _compact_touches(self, cmd: Mapping[str, Any], ctx: ApplyContext,
                         m: list[Mutation]) -> Result:
        """Fold the oldest `limit` touch records into block records, then delete them.

        Each still-held block touched in those records gets its block record rewritten with
        the sequence number of its latest touch among them (a record reserves one number per
        block, in touch order), unless the block record is already newer, so the merged replay
        order in `rebuild` is unchanged.
        """
        limit = _int(cmd, "limit", 1, 1 << 20, 1000)
        folded: dict[tuple[int, int, int], tuple[int, int]] = {}
        records = self._reader.scan(_TL, _TL, limit) if self._reader is not None else []
        for key, raw in records:
            (first,) = _TL_KEY.unpack(key[len(_TL):])
            slot, model, touched = _TL_HEAD.unpack_from(raw)
            for position, block in enumerate(_touch_blocks(raw)):
                folded[(slot, model, block)] = (first + position, touched)
            m.append((key, None))
        rewritten = 0
        for (slot, model, block), (seq, touched) in folded.items():
            tier = self.index.tier(model, block, slot)
            stored = self._reader.get(block_key(slot, model, block)) if self._reader else None
            if tier is None or stored is None or _BLK_VALUE.unpack(stored)[1] > seq:
                continue
            m.append((block_key(slot, model, block), _BLK_VALUE.pack(tier, seq, touched)))
            rewritten += 1
        self.touch_log = max(self.touch_log - len(records), 0)
        return {"ok": True, "records": len(records), "blocks_rewritten": rewritten,
                "remaining": self.touch_log}

    def _replay_route(self, request_id: str, model: ModelSpec, total: int,
                      ctx: ApplyContext) -> Result:
        request = self.requests[request_id]
        rec = self.nodes[request.node]
        return {"ok": True, "request_id": request_id, "routed": True, "duplicate": True,
                "node_id": rec.id, "address": rec.address, "route_type": request.route_type,
                "rejected": None, "detail": "", "matched_blocks": request.matched,
                "matched_tokens": request.matched * model.block_size, "total_blocks": total,
                "evicted_blocks": 0, "candidates": [], "index": ctx.index}

    def _complete(self, cmd: Mapping[str, Any], ctx: ApplyContext, m: list[Mutation]) -> Result:
        """Completion report: confirm (or drop) the request's pending blocks, add output blocks."""
        request_id = _str(cmd, "request_id")
        node_id = _str(cmd, "node")
        status = cmd.get("status", "ok")
        if status not in ("ok", "failed", "cancelled"):
            raise _Invalid("field 'status' must be ok, failed or cancelled")
        output = _hashes(cmd, "output_blocks")
        request = self.requests.get(request_id or "")
        if request is None:
            return {"ok": True, "duplicate": True, "request_id": request_id}
        if request.node != node_id:
            return error("node_mismatch",
                         f"request {request_id!r} was routed to {request.node!r}").result
        assert request_id is not None
        self._drop_request(m, request_id, confirm=status == "ok")
        rec = self.nodes[request.node]
        added = 0
        if status == "ok":
            keep = frozenset(request.model << 64 | b for b in output)
            for block in output:
                if self.index.tier(request.model, block, rec.slot) is None:
                    if not self._make_room(m, rec, keep):
                        break
                    added += 1
                self._put_block(m, request.model, block, rec.slot, GPU)
        return {"ok": True, "request_id": request_id, "confirmed": status == "ok",
                "output_blocks_added": added}

    def _kv_events(self, cmd: Mapping[str, Any], ctx: ApplyContext, m: list[Mutation]) -> Result:
        """Engine KV events, applied exactly once per (node, seq)."""
        seq = _int(cmd, "seq", 0, 1 << 62)
        events = cmd.get("events")
        if not isinstance(events, list):
            raise _Invalid("field 'events' must be a list")
        parsed = []
        for i, event in enumerate(events):
            if not isinstance(event, Mapping) or event.get("type") not in ("stored", "removed",
                                                                            "cleared"):
                raise _Invalid(f"events[{i}].type must be stored, removed or cleared")
            tier = event.get("tier", "gpu")
            if tier not in ("gpu", "cpu", "disk"):
                raise _Invalid(f"events[{i}].tier must be gpu, cpu or disk")
            parsed.append((event["type"], _hashes(event, "block_hashes"), TIER_CODES[tier]))
        rec = self._known_node(cmd)
        model_id = cmd.get("model") or rec.models[0]
        model = self.models.get(model_id) if isinstance(model_id, str) else None
        if model is None:
            return error("unknown_model", f"model {model_id!r} is not registered").result
        if seq <= rec.last_event_seq:
            return {"ok": True, "duplicate": True, "seq": seq}
        if rec.state == "down":
            return error("node_down", f"node {rec.id!r} is down; heartbeat or re-register first").result
        stored = removed = ignored = 0
        for kind, hashes, tier in parsed:
            if kind == "cleared":
                for model_code, block in self.index.drop_node(rec.slot):
                    m.append((block_key(rec.slot, model_code, block), None))
                continue
            for block in hashes:
                if kind == "removed":
                    removed += self._del_block(m, model.code, block, rec.slot)
                elif self.index.tier(model.code, block, rec.slot) is not None or \
                        self._make_room(m, rec):
                    self._put_block(m, model.code, block, rec.slot, tier)
                    stored += 1
                else:
                    ignored += 1
        gap = seq - rec.last_event_seq - 1 if rec.last_event_seq >= 0 else 0
        rec.last_event_seq = seq
        self._save_node(m, rec)
        return {"ok": True, "seq": seq, "stored": stored, "removed": removed,
                "ignored_full": ignored, "missed_batches": gap}


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
        "candidates": [
            {"node_id": c.node_id, "overlap_blocks": c.overlap_blocks,
             "weighted_overlap": c.weighted_overlap, "load": c.load,
             "free_blocks": c.free_blocks, "evict_blocks": c.evict_blocks, "score": c.score,
             "eligible": c.eligible, "reason": c.reason}
            for c in decision.candidates
        ],
    }


__all__ = ["CachePlaneMachine", "RequestRecord", "decision_result", "TIER_NAMES"]

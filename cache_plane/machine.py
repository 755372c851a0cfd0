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

The prefix index is stored as a block log plus per-node checkpoints (`blocklog`): a command
writes one record per block operation, not one per block, and `cp.compact_log`, proposed by
the leader, replaces one node's log with a checkpoint of its index.

Store keys (all under ``cp/``)::

    cp/meta                               counters, next slot / model code, block-log
                                          sequence, last leader time seen
    cp/model/<id>                         [code, block_size, hash_seed, epoch]
    cp/node/<id>                          Node fields
    cp/log/..., cp/ck/..., cp/blk/...     the prefix index (see `blocklog`)
    cp/sess/<id>                          [node_id, expires_ms]
    cp/req/<id>                           [node_id, model_code, blocks, pending, expires_ms,
                                           route_type, matched_blocks, routed_ms,
                                           expected_wait_ms, clear]

Records written by older code lack the trailing fields; they read as their defaults.
"""

from __future__ import annotations

import functools
import operator
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import compress, repeat
from typing import Any

from veristore_py.codec import pack, unpack
from veristore_py.state import ApplyContext, KVMachine, Mutation, Outcome, Reader, Result, error

from .blocklog import ADD, LOG_SLACK_BLOCKS, MAX_LOG_RECORDS, REMOVE, TOUCH, BlockLog, Replay
from .calibration import DEFAULT_SPEEDS, Learned, Report, Speeds, learn
from .index import GPU, PENDING, TIER_CODES, TIER_NAMES, PrefixIndex, block_keys, victim_keys
from .limits import (
    MAX_ACTIVE,
    MAX_BLOCK_SIZE,
    MAX_CAPACITY_BLOCKS,
    MAX_COUNT,
    MAX_ID_BYTES,
    MAX_PROMPT_BLOCKS,
    MAX_REPORTED,
    MAX_SEQ,
    MAX_SLOTS,
    MAX_TIME_MS,
)
from .model import Candidate, ModelSpec, Node, RouteDecision
from .policy import (
    DEFAULT_POLICY,
    PolicyConfig,
    decide,
    fleet_speeds,
    load_model,
    route_type,
    running_slots,
)

PREFIX = b"cp/"
META_KEY = b"cp/meta"
MASK64 = (1 << 64) - 1


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
            node.lease_until_ms, node.last_event_seq, node.prefill_until_ms, node.instance,
            node.reported_used, node.max_running, node.learned.wire()]


def _node_from_wire(node_id: str, w: list[Any]) -> Node:
    return Node(node_id, w[0], w[1], tuple(w[2]), w[3], w[4], tuple(tuple(p) for p in w[5]),
                w[6], w[7], w[8], w[9], w[10], w[11] if len(w) > 11 else 0,
                w[12] if len(w) > 12 else "", w[13] if len(w) > 13 else -1,
                w[14] if len(w) > 14 else 0,
                Learned.from_wire(w[15]) if len(w) > 15 else Learned())


@dataclass(slots=True)
class RequestRecord:
    node: str
    model: int
    blocks: tuple[int, ...]
    pending: tuple[int, ...]
    expires_ms: int
    route_type: str = "miss"
    matched: int = 0
    routed_ms: int = 0          # the leader's clock when it was routed
    expected_wait_ms: int = 0   # the wait the load model expected for it (calibration)
    clear: bool = False         # it found a free slot and at most one step of prefill ahead

    def wire(self) -> list[Any]:
        return [self.node, self.model, list(self.blocks), list(self.pending), self.expires_ms,
                self.route_type, self.matched, self.routed_ms, self.expected_wait_ms,
                self.clear]


@dataclass(slots=True)
class Stats:
    routes: dict[str, int] = field(default_factory=dict)
    rejections: dict[str, int] = field(default_factory=dict)
    blocks_requested: int = 0
    blocks_reused: int = 0
    tokens_reused: int = 0
    evictions: int = 0
    replanned: int = 0  # leader decisions that no longer held at apply and were re-decided

    def wire(self) -> list[Any]:
        return [self.routes, self.rejections, self.blocks_requested, self.blocks_reused,
                self.tokens_reused, self.evictions, self.replanned]


def _consume(iterator: Iterable[object]) -> None:
    deque(iterator, maxlen=0)


def _by_model(keys: Iterable[int]) -> dict[int, list[int]]:
    """Index keys grouped by model code (groups in code order, keys in their given order)."""
    groups: dict[int, list[int]] = {}
    for key in keys:
        groups.setdefault(key >> 64, []).append(key)
    return dict(sorted(groups.items()))


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


def _policy(cmd: Mapping[str, Any], default: PolicyConfig) -> PolicyConfig:
    """The policy the leader stamped into a route command (its settings), else `default`.

    Operators set `load_weight` and `session_max_load` per member; a replica re-deciding a
    route must use the leader's values, not its own, or replicas with different settings
    would diverge.
    """
    weights = []
    for name, positive in (("load_weight", False), ("session_max_load", True)):
        value = cmd.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not 0 <= value <= 1e6 or (positive and value == 0)):
            raise _Invalid(f"field '{name}' must be a number in {'(' if positive else '['}0, 1e6]")
        weights.append(value)
    if weights == [None, None]:
        return default
    return _with_weights(default, *weights)


@functools.lru_cache(maxsize=64)
def _with_weights(default: PolicyConfig, load_weight: float | None,
                  session_max_load: float | None) -> PolicyConfig:
    return replace(default, load_weight=default.load_weight if load_weight is None
                   else float(load_weight),
                   session_max_load=default.session_max_load if session_max_load is None
                   else float(session_max_load))


_PRIOR_FIELDS = (("prefill_tokens_per_s", 1 << 40), ("decode_ms_per_token", 1e6),
                 ("mean_output_tokens", 1 << 24))


def _prior(cmd: Mapping[str, Any]) -> Speeds:
    """The speeds the leader stamped into the command (its settings), else the defaults.

    They are the load model's priors: a node's learned speeds replace them one by one as
    completion reports arrive (`calibration`). 0 or absent means the default.
    """
    values = []
    for name, hi in _PRIOR_FIELDS:
        value = cmd.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not 0 <= value <= hi):
            raise _Invalid(f"field '{name}' must be a number in [0, {hi:g}]")
        values.append(value or None)
    return _speeds(*values)


@functools.lru_cache(maxsize=64)
def _speeds(rate: float | None, decode: float | None, output: float | None) -> Speeds:
    d = DEFAULT_SPEEDS
    return Speeds(1000 / rate if rate else d.prefill_ms_per_token,
                  float(decode) if decode else d.decode_ms_per_token,
                  float(output) if output else d.output_tokens)


def _opt_int(cmd: Mapping[str, Any], name: str, hi: int = MAX_COUNT) -> int | None:
    return None if cmd.get(name) is None else _int(cmd, name, 0, hi)


def _pairs(cmd: Mapping[str, Any], name: str) -> list[tuple[int, int]]:
    """A list of [model_code, block_hash] pairs (eviction victims)."""
    value = cmd.get(name, [])
    if not isinstance(value, list) or len(value) > MAX_PROMPT_BLOCKS:
        raise _Invalid(f"field '{name}' must be a list of [model, block] pairs")
    out = []
    for pair in value:
        if (not isinstance(pair, list | tuple) or len(pair) != 2
                or not all(type(x) is int for x in pair)
                or not (0 <= pair[0] < MAX_SLOTS and 0 <= pair[1] <= MASK64)):
            raise _Invalid(f"field '{name}' must be a list of [model, block] pairs")
        out.append((pair[0], pair[1]))
    return out


def _hashes(cmd: Mapping[str, Any], name: str, limit: int = MAX_PROMPT_BLOCKS) -> list[int]:
    value = cmd.get(name, [])
    if not isinstance(value, list) or len(value) > limit:
        raise _Invalid(f"field '{name}' must be a list of at most {limit} block hashes")
    # One C-level pass (prompts carry hundreds of hashes and every replica checks them):
    # array('Q') refuses anything but integers in [0, 2**64). It takes a bool as 0/1, which is
    # harmless here (deterministic); the HTTP layer refuses bools with a clear message.
    try:
        array("Q", value)
    except (TypeError, OverflowError):
        raise _Invalid(f"field '{name}' must hold unsigned 64-bit integers") from None
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
            "cp.compact_log": self._compact_log,
        }

    def reset(self) -> None:
        self.models: dict[str, ModelSpec] = {}
        self.nodes: dict[str, Node] = {}
        self.index = PrefixIndex()
        self.sessions: dict[str, tuple[str, int]] = {}
        self.session_count: dict[str, int] = {}  # node -> live sessions mapped to it
        self.requests: dict[str, RequestRecord] = {}
        self.pins: dict[int, Counter[int]] = {}  # slot -> index key -> active requests
        self.stats = Stats()
        self._paces_cache: tuple[Speeds, dict[str, Speeds]] | None = None
        self.log = BlockLog()
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
        self.log.discard()  # an operation a refused command left buffered
        before = self.now
        now = command.get("now_ms", self.now)
        if isinstance(now, int) and not isinstance(now, bool) and 0 <= now <= MAX_TIME_MS:
            self.now = now  # the leader's clock, stamped into the command
        try:
            result = handler(command, ctx, mutations)
        except (_Invalid, _Rejected) as exc:
            # A refused command leaves no trace, the clock included: it is stored only in
            # the meta record that a refused command does not write, so a replica restored
            # from a snapshot would not have it.
            self.now = before
            code = exc.code if isinstance(exc, _Rejected) else "invalid_command"
            return error(code, str(exc))
        finally:
            self._reader = None  # only valid inside this apply
        self.log.flush(mutations)
        mutations.append((META_KEY, self._meta_wire()))
        return Outcome(tuple(mutations), result)

    def rebuild(self, items: Iterable[tuple[bytes, bytes]]) -> None:
        """Reconstruct the memory state from every stored (key, value) pair.

        The index is replayed from its block log and checkpoints (see `blocklog`), which
        reproduces the live index and LRU order exactly.
        """
        self.reset()
        replay = Replay(self.log)
        for key, raw in items:
            if not key.startswith(PREFIX) or replay.add(key, raw):
                continue
            value = unpack(raw)
            if key == META_KEY:
                self.next_slot, self.next_model, self.log.seq, stats, self.now = value
                self.stats = Stats(*stats)
            elif key.startswith(b"cp/model/"):
                model_id = key[9:].decode()
                self.models[model_id] = ModelSpec(model_id, *value)
            elif key.startswith(b"cp/node/"):
                node_id = key[8:].decode()
                self.nodes[node_id] = _node_from_wire(node_id, value)
            elif key.startswith(b"cp/sess/"):
                self._set_session(key[8:].decode(), value[0], value[1])
            elif key.startswith(b"cp/req/"):
                node, model, req_blocks, pending, expires, kind, matched, *extra = value
                self.requests[key[7:].decode()] = RequestRecord(
                    node, model, tuple(req_blocks), tuple(pending), expires, kind, matched,
                    *extra)
        replay.into(self.index)
        for request in self.requests.values():
            self._pin(self.nodes[request.node].slot, block_keys(request.model, request.blocks))

    # -- views -----------------------------------------------------------------------------

    def decide(self, command: Mapping[str, Any],
               inflight: Mapping[str, tuple[int, int]] | None = None,
               hashes_checked: bool = False) -> RouteDecision | Result:
        """Compute a route decision without changing anything; an error dict if invalid.

        The leader calls this before proposing a route (and for dry runs); `inflight` counts
        (routes, new blocks) the leader has proposed per node and not applied yet. `hashes_checked` skips
        re-checking block hashes the caller already validated (apply always checks them).
        """
        try:
            model, blocks, session = self._route_inputs(command, hashes_checked)
            policy = _policy(command, self.policy)
            prior = _prior(command)
        except _Invalid as exc:
            return error("invalid_command", str(exc)).result
        if model is None:
            return error("unknown_model", f"model {command.get('model')!r} is not registered").result
        return self._decide(model, block_keys(model.code, blocks), session,
                            command.get("now_ms", 0), prior, inflight, policy)

    @staticmethod
    def prior_of(command: Mapping[str, Any]) -> Speeds:
        """The load model's priors in `command` (defaults where absent or invalid)."""
        try:
            return _prior(command)
        except _Invalid:
            return DEFAULT_SPEEDS

    def pace(self, rec: Node, prior: Speeds) -> Speeds:
        """The speeds the load model prices `rec` with (see `calibration.speeds`)."""
        return self._paces(prior)[rec.id]

    def _paces(self, prior: Speeds) -> dict[str, Speeds]:
        """Every node's speeds under `prior`, cached until a node or what it learned changes.

        (Priors are interned by `_speeds`, so the same settings give the same object.)
        """
        if self._paces_cache is None or self._paces_cache[0] is not prior:
            self._paces_cache = (prior, fleet_speeds(self.nodes.values(), prior))
        return self._paces_cache[1]

    def _session_node(self, session: str | None, now_ms: Any) -> str | None:
        if session is not None and session in self.sessions:
            node_id, expires = self.sessions[session]
            if isinstance(now_ms, int) and expires > now_ms:
                return node_id
        return None

    def _decide(self, model: ModelSpec, keys: list[int], session: str | None, now_ms: Any,
                prior: Speeds,
                inflight: Mapping[str, tuple[int, int]] | None = None,
                policy: PolicyConfig | None = None) -> RouteDecision:
        session_node = self._session_node(session, now_ms)
        # A new session commits its later turns to the node chosen now: spread sessions too.
        new_session = session is not None and session_node is None
        return decide(model, keys, list(self.nodes.values()), self.index, self._is_pinned,
                      self._pinned_count, session_node, policy or self.policy, inflight or {},
                      now_ms if isinstance(now_ms, int) else 0, prior,
                      self.session_count if new_session else None, self._paces(prior))

    def _set_session(self, session: str, node_id: str, expires_ms: int) -> None:
        old = self.sessions.get(session)
        if old is not None:
            self._count_session(old[0], -1)
        self.sessions[session] = (node_id, expires_ms)
        self._count_session(node_id, +1)

    def _del_session(self, session: str) -> None:
        node_id, _ = self.sessions.pop(session)
        self._count_session(node_id, -1)

    def _count_session(self, node_id: str, delta: int) -> None:
        count = self.session_count.get(node_id, 0) + delta
        if count > 0:
            self.session_count[node_id] = count
        else:
            self.session_count.pop(node_id, None)

    # -- internals: meta, blocks, pins -----------------------------------------------------

    def _meta_wire(self) -> bytes:
        return pack([self.next_slot, self.next_model, self.log.seq, self.stats.wire(),
                     self.now])

    def _is_pinned(self, slot: int, key: int) -> bool:
        return key in self.pins.get(slot, ())

    def _pinned_count(self, slot: int) -> int:
        return len(self.pins.get(slot, ()))

    def _pin(self, slot: int, keys: Iterable[int]) -> None:
        self.pins.setdefault(slot, Counter()).update(keys)

    def _unpin(self, slot: int, keys: Sequence[int]) -> None:
        pins = self.pins.get(slot)
        if pins is None:
            return
        if len(dict.fromkeys(keys)) == len(keys):  # distinct keys (the usual case): C-level
            counts = list(map(operator.sub, map(pins.get, keys, repeat(0)), repeat(1)))
            dict.update(pins, zip(keys, counts, strict=True))
            _consume(map(pins.pop, compress(keys, map((0).__ge__, counts)), repeat(None)))
            return
        for key in keys:
            count = pins.get(key, 0) - 1
            if count > 0:
                pins[key] = count
            else:
                pins.pop(key, None)

    def _log_op(self, m: list[Mutation], op: int, slot: int, model: int,
                keys: Iterable[int], tier: int = 0) -> None:
        self.log.log(m, op, slot, model, keys, tier, self.now)

    def _put_blocks(self, m: list[Mutation], slot: int, model: int, keys: Sequence[int],
                    tier: int) -> None:
        """Add (or move to most recent) `keys` of `model` on `slot` at `tier`."""
        if keys:
            self.index.add(slot, keys, tier, self.now)
            self._log_op(m, ADD, slot, model, keys, tier)

    def _touch(self, m: list[Mutation], slot: int, model: int, keys: Sequence[int]) -> None:
        """Make the held ones of `keys` of `model` on `slot` the most recently used."""
        # Only what was touched is logged: compaction reads a touch as "held at that point".
        touched = self.index.touch_held(slot, keys, self.now) if keys else ()
        if touched:
            self._log_op(m, TOUCH, slot, model, touched)

    def _del_block(self, m: list[Mutation], slot: int, key: int) -> bool:
        if self.index.remove(slot, key):
            self._log_op(m, REMOVE, slot, key >> 64, (key,))
            return True
        return False

    def _del_all(self, m: list[Mutation], slot: int, keys: list[int]) -> None:
        """Log the removal of `keys` from `slot` (already dropped from the index)."""
        for model, group in _by_model(keys).items():
            self._log_op(m, REMOVE, slot, model, group)

    def _make_room(self, m: list[Mutation], rec: Node, keep: frozenset[int] = frozenset()) -> bool:
        """Evict the least recently used unpinned block of `rec` if it is full; False if none."""
        if self.index.used(rec.slot) < rec.capacity_blocks:
            return True
        for key in self.index.lru_keys(rec.slot):
            if key in keep or self._is_pinned(rec.slot, key):
                continue
            self._del_block(m, rec.slot, key)
            self.stats.evictions += 1
            return True
        return False

    def _store_blocks(self, m: list[Mutation], rec: Node, model: int, keys: list[int],
                      tier: int, stop_when_full: bool = False) -> tuple[int, int]:
        """Put `keys` on `rec` at `tier`, evicting LRU unpinned blocks (never `keys`) for room.

        Returns (keys stored, keys that were new). A key that finds no room is skipped, or
        with `stop_when_full` ends the call (a chain's tail is useless without its head).
        """
        keys = list(dict.fromkeys(keys))
        new = self.index.missing(rec.slot, keys)
        if self.index.used(rec.slot) + len(new) <= rec.capacity_blocks:
            self._put_blocks(m, rec.slot, model, keys, tier)
            return len(keys), len(new)
        keep = frozenset(keys)
        stored = added = 0
        for key in keys:
            held = self.index.holds(rec.slot, key)
            if not held and not self._make_room(m, rec, keep):
                if stop_when_full:
                    break
                continue
            self._put_blocks(m, rec.slot, model, (key,), tier)
            stored += 1
            added += not held
        return stored, added

    def _save_node(self, m: list[Mutation], rec: Node) -> None:
        m.append((b"cp/node/" + rec.id.encode(), pack(_node_wire(rec))))

    def _drop_request(self, m: list[Mutation], request_id: str, confirm: bool,
                      prior: Speeds = DEFAULT_SPEEDS) -> None:
        request = self.requests.pop(request_id)
        m.append((b"cp/req/" + request_id.encode(), None))
        rec = self.nodes.get(request.node)
        if rec is None:
            return
        self._unpin(rec.slot, block_keys(request.model, request.blocks))
        pending = self.index.still_pending(rec.slot, block_keys(request.model, request.pending))
        if confirm:
            # The request is done with its blocks: they become GPU blocks and, like vLLM's
            # free queue, the chain's tail becomes the least recently used part of it.
            self._put_blocks(m, rec.slot, request.model, pending[::-1], GPU)
            reused = block_keys(request.model, request.blocks[:request.matched])
            self._touch(m, rec.slot, request.model, reused[::-1])
        else:
            for key in pending:
                self._del_block(m, rec.slot, key)
        self._leave(rec, prior)
        self._save_node(m, rec)

    def _leave(self, rec: Node, prior: Speeds) -> None:
        """A request left `rec`: the first waiting one (FCFS) takes its slot and prefills."""
        if rec.queue:
            rec.queue -= 1
            pace = self.pace(rec, prior)
            rec.prefill_until_ms = max(rec.prefill_until_ms, self.now) + round(
                pace.new_tokens * pace.prefill_ms_per_token)
        else:
            rec.active = max(rec.active - 1, 0)

    def _drop_node_state(self, m: list[Mutation], rec: Node) -> None:
        self._del_all(m, rec.slot, self.index.drop_node(rec.slot))
        self.pins.pop(rec.slot, None)
        for sid in sorted(s for s, (node, _) in self.sessions.items() if node == rec.id):
            self._del_session(sid)
            m.append((b"cp/sess/" + sid.encode(), None))
        for rid in sorted(r for r, req in self.requests.items() if req.node == rec.id):
            del self.requests[rid]
            m.append((b"cp/req/" + rid.encode(), None))
        rec.active = 0

    # -- handlers --------------------------------------------------------------------------

    def _register_model(self, cmd: Mapping[str, Any], ctx: ApplyContext, m: list[Mutation]) -> Result:
        model_id = _str(cmd, "model")
        assert model_id is not None
        block_size = _int(cmd, "block_size", 1, MAX_BLOCK_SIZE, 16)
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
        for slot in sorted({slot for slot, _ in dropped}):
            self._del_all(m, slot, [key for s, key in dropped if s == slot])
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
        capacity = _int(cmd, "capacity_blocks", 1, MAX_CAPACITY_BLOCKS)
        max_active = _int(cmd, "max_active", 1, MAX_ACTIVE)
        max_running = _int(cmd, "max_running", 0, MAX_ACTIVE, 0)
        now = _int(cmd, "now_ms", 0, MAX_TIME_MS)
        lease = _int(cmd, "lease_ms", 1, 1 << 40)
        labels = cmd.get("labels", {})
        if not isinstance(labels, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise _Invalid("field 'labels' must map strings to strings")
        if unknown:
            return error("unknown_model", f"models not registered: {', '.join(unknown)}").result
        instance = cmd.get("instance_id", "")
        if not isinstance(instance, str) or len(instance.encode()) > MAX_ID_BYTES:
            raise _Invalid(f"field 'instance_id' must be a string of at most {MAX_ID_BYTES} bytes")
        rec = self.nodes.get(node_id)
        created = rec is None
        restarted = rec is not None and bool(instance) and bool(rec.instance) and \
            instance != rec.instance
        if restarted:
            # A new engine process behind the same node id: its KV cache is empty, its
            # requests are gone, and its KV-event sequence numbers start over.
            assert rec is not None
            self._drop_node_state(m, rec)
            rec.last_event_seq = -1
        if rec is None:
            if self.next_slot >= MAX_SLOTS:
                return error("too_many_nodes", "node slot space exhausted").result
            rec = Node(node_id, self.next_slot, address, tuple(models), capacity, max_active)
            self.next_slot += 1
            self.nodes[node_id] = rec
            self._paces_cache = None
        rec.address, rec.models = address, tuple(models)
        rec.capacity_blocks, rec.max_active = capacity, max_active
        rec.max_running = min(max_running, max_active)
        rec.labels = tuple(sorted(labels.items()))
        rec.state, rec.lease_until_ms = "up", now + lease
        if instance:
            rec.instance = instance
        while self.index.used(rec.slot) > rec.capacity_blocks:  # capacity shrank
            if not self._make_room(m, rec):
                break
        self._save_node(m, rec)
        return {"ok": True, "node": node_id, "slot": rec.slot, "created": created,
                "restarted": restarted}

    def _known_node(self, cmd: Mapping[str, Any]) -> Node:
        node_id = _str(cmd, "node")
        rec = self.nodes.get(node_id or "")
        if rec is None:
            raise _Rejected("unknown_node", f"node {node_id!r} is not registered")
        return rec

    def _heartbeat(self, cmd: Mapping[str, Any], ctx: ApplyContext, m: list[Mutation]) -> Result:
        active = _int(cmd, "active", 0, MAX_REPORTED)
        queue = _int(cmd, "queue", 0, MAX_REPORTED)
        now = _int(cmd, "now_ms", 0, MAX_TIME_MS)
        lease = _int(cmd, "lease_ms", 1, 1 << 40)
        used = _int(cmd, "used", 0, MAX_CAPACITY_BLOCKS) if cmd.get("used") is not None else None
        rec = self._known_node(cmd)
        rec.active, rec.queue, rec.lease_until_ms = active, queue, now + lease
        if used is not None:
            rec.reported_used = used
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
        self._paces_cache = None
        m.append((b"cp/node/" + rec.id.encode(), None))
        return {"ok": True, "node": rec.id, "removed": True}

    def _expire(self, cmd: Mapping[str, Any], ctx: ApplyContext, m: list[Mutation]) -> Result:
        """Leader-proposed expiry at the leader's `now_ms`: leases, sessions, requests."""
        now = _int(cmd, "now_ms", 0, MAX_TIME_MS)
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
            self._del_session(sid)
            m.append((b"cp/sess/" + sid.encode(), None))
        expired_requests = sorted(r for r, req in self.requests.items() if req.expires_ms <= now)
        prior = _prior(cmd)
        for rid in expired_requests:
            self._drop_request(m, rid, confirm=False, prior=prior)
        idle = 0
        if block_ttl:
            for node_id in sorted(self.nodes):
                slot = self.nodes[node_id].slot
                for key in self.index.idle_since(slot, now - block_ttl):
                    if not self._is_pinned(slot, key):
                        idle += self._del_block(m, slot, key)
        return {"ok": True, "nodes_down": downed, "sessions_expired": len(expired_sessions),
                "requests_expired": len(expired_requests), "blocks_expired": idle}

    def _route_inputs(self, cmd: Mapping[str, Any], hashes_checked: bool = False,
                      ) -> tuple[ModelSpec | None, list[int], str | None]:
        model_id = _str(cmd, "model")
        blocks = cmd["blocks"] if hashes_checked else _hashes(cmd, "blocks")
        session = _str(cmd, "session_id", optional=True)
        return self.models.get(model_id or ""), blocks, session

    def _route(self, cmd: Mapping[str, Any], ctx: ApplyContext, m: list[Mutation]) -> Result:
        """Route a request: the leader's decision if it still holds, else decided here."""
        model, blocks, session = self._route_inputs(cmd)
        request_id = _str(cmd, "request_id")
        assert request_id is not None
        now = _int(cmd, "now_ms", 0, MAX_TIME_MS)
        ttl = _int(cmd, "request_ttl_ms", 1, 1 << 40, 30_000)
        session_ttl = _int(cmd, "session_ttl_ms", 1, 1 << 40, 600_000)
        prior = _prior(cmd)
        planned = _str(cmd, "node", optional=True)
        victims = _pairs(cmd, "evict")
        policy = _policy(cmd, self.policy)
        if model is None:
            return error("unknown_model", f"model {cmd.get('model')!r} is not registered").result
        if request_id in self.requests:  # a retried route: answer with the original decision
            return self._replay_route(request_id, model, len(blocks), ctx)
        keys = block_keys(model.code, blocks)
        decision = None
        replanned = False
        if planned is not None:
            decision = self._planned(model, keys, session, now, planned, victim_keys(victims),
                                     cmd.get("route_type"), cmd.get("matched"))
            replanned = decision is None
            self.stats.replanned += replanned
        if decision is None:
            decision = self._decide(model, keys, session, now, prior, policy=policy)
        result = decision_result(decision, model, request_id,
                                 self.nodes[decision.node_id].address if decision.node_id else None)
        result["index"] = ctx.index
        result["replanned"] = replanned
        if decision.node_id is None:
            reason = decision.rejected or "rejected"
            self.stats.rejections[reason] = self.stats.rejections.get(reason, 0) + 1
            return result
        rec = self.nodes[decision.node_id]
        slot = rec.slot
        for key in decision.evict:
            self._del_block(m, slot, key)
        self.stats.evictions += len(decision.evict)
        # The decision's matched blocks are held from block 0; past them, held blocks are
        # reused too and the rest become pending (the engine is about to compute them).
        # Both go to the most recent end tail-first, so that eviction takes a chain's tail
        # before its head (a head without its tail still serves shorter prompts; not so the
        # other way round).
        reused = keys[:decision.matched_blocks]
        held, pending = self.index.split(slot, keys[decision.matched_blocks:])
        self._put_blocks(m, slot, model.code, pending[::-1], PENDING)
        self._touch(m, slot, model.code, (reused + held if held else reused)[::-1])
        self._pin(slot, keys)
        kind = decision.route_type or "miss"
        pending_blocks = pending if model.code == 0 else list(map(MASK64.__and__, pending))
        pace = self.pace(rec, prior)
        wait = load_model(rec, pace, now, model.block_size)
        request = RequestRecord(rec.id, model.code, tuple(blocks), tuple(pending_blocks),
                                now + ttl, kind, decision.matched_blocks, now,
                                round(wait.backlog_ms + wait.queue_ms),
                                not wait.queue_ms and wait.backlog_ms <= pace.fixed_ms)
        self.requests[request_id] = request
        m.append((b"cp/req/" + request_id.encode(), pack(request.wire())))
        if session is not None:
            self._set_session(session, rec.id, now + session_ttl)
            m.append((b"cp/sess/" + session.encode(), pack([rec.id, now + session_ttl])))
        if rec.active + rec.queue < running_slots(rec, pace, model.block_size):
            # A free running slot: its prefill starts behind the prefill already under way.
            rec.active += 1
            rec.prefill_until_ms = max(rec.prefill_until_ms, now) + round(
                len(pending) * model.block_size * pace.prefill_ms_per_token)
        else:
            rec.queue += 1  # it waits for a slot; its prefill starts when it gets one
        self._save_node(m, rec)
        self.stats.routes[kind] = self.stats.routes.get(kind, 0) + 1
        self.stats.blocks_requested += len(blocks)
        self.stats.blocks_reused += decision.matched_blocks
        self.stats.tokens_reused += decision.matched_blocks * model.block_size
        return result

    def _planned(self, model: ModelSpec, keys: list[int], session: str | None, now: int,
                 node_id: str, victims: list[int], kind: Any,
                 matched_hint: Any = None) -> RouteDecision | None:
        """The leader's decision (node + eviction victims) if it can still be carried out.

        The leader decided against its applied state; commands applied since (other routes in
        the same batch, expiries) may have filled the node or taken its victims. The decision
        stands if the node is up, serves the model, has a free active slot, and its listed
        victims that are still evictable make room for the prompt's new blocks. Otherwise None,
        and the route is decided here from the replicated state (same result on every replica).
        """
        rec = self.nodes.get(node_id)
        if (rec is None or rec.state != "up" or model.id not in rec.models
                or rec.active + rec.queue >= rec.max_active or len(keys) > rec.capacity_blocks):
            return None
        slot = rec.slot
        # The leader's matched count only speeds up the check (see `PrefixIndex.prefix`).
        matched = self.index.prefix(slot, keys, matched_hint if type(matched_hint) is int
                                    else None)
        new = len(self.index.missing(slot, keys[matched:]))
        evict: list[int] = []
        if victims:
            prompt = set(keys)
            evict = [k for k in dict.fromkeys(victims) if k not in prompt
                     and self.index.holds(slot, k) and not self._is_pinned(slot, k)]
        if self.index.used(slot) - len(evict) + new > rec.capacity_blocks:
            return None
        if kind != "session" or self._session_node(session, now) != node_id:
            kind = route_type(matched, len(keys))
        return RouteDecision(node_id, kind, matched, len(keys), tuple(evict))

    def _compact_log(self, cmd: Mapping[str, Any], ctx: ApplyContext,
                     m: list[Mutation]) -> Result:
        """Checkpoint one node's index and delete its block log (see `blocklog`).

        `slot` names the node (by slot: a removed node's log is compacted too); without it,
        the slot with the largest log. The memory state is unchanged.
        """
        slot = cmd.get("slot")
        if slot is None:
            slot = self.log.largest()
        elif isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < MAX_SLOTS:
            raise _Invalid(f"field 'slot' must be an integer in [0, {MAX_SLOTS - 1}]")
        if slot is None:
            return {"ok": True, "slot": None, "records": 0, "blocks": 0, "remaining": 0}
        legacy: list[bytes] = []
        if slot in self.log.legacy and self._reader is not None:
            prefix = BlockLog.legacy_prefix(slot)
            legacy = [key for key, _ in self._reader.scan(prefix, prefix, 1 << 62)]
        records, blocks = self.log.checkpoint(m, slot, self.index, legacy)
        return {"ok": True, "slot": slot, "records": records, "blocks": blocks,
                "remaining": self.log.record_count}

    def compaction_due(self, slack_blocks: int = LOG_SLACK_BLOCKS,
                       max_records: int = MAX_LOG_RECORDS) -> list[int]:
        """Slots whose block log the leader should compact now, largest log first."""
        live = {rec.slot for rec in self.nodes.values()}
        return self.log.due(((slot, self.index.used(slot)) for slot in self.log.records), live,
                            slack_blocks, max_records)

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
        prior = _prior(cmd)
        report = Report(*(_opt_int(cmd, name) for name in (
            "prompt_tokens", "output_tokens", "cached_tokens", "ttft_ms", "latency_ms")))
        request = self.requests.get(request_id or "")
        if request is None:
            return {"ok": True, "duplicate": True, "request_id": request_id}
        if request.node != node_id:
            return error("node_mismatch",
                         f"request {request_id!r} was routed to {request.node!r}").result
        assert request_id is not None
        rec = self.nodes[request.node]
        if status == "ok":
            model = self._model_by_code(request.model)
            self._paces_cache = None
            rec.learned = learn(rec.learned, report, prior,
                                elapsed_ms=max(self.now - request.routed_ms, 0),
                                expected_wait_ms=request.expected_wait_ms,
                                clear=request.clear,
                                expected_new_tokens=len(request.pending) * model.block_size)
        self._drop_request(m, request_id, confirm=status == "ok", prior=prior)
        added = 0
        if status == "ok":
            added = self._store_blocks(m, rec, request.model, block_keys(request.model, output),
                                       GPU, stop_when_full=True)[1]
        return {"ok": True, "request_id": request_id, "confirmed": status == "ok",
                "output_blocks_added": added}

    def _model_by_code(self, code: int) -> ModelSpec:
        return next((spec for spec in self.models.values() if spec.code == code),
                    ModelSpec("", code))

    def _kv_events(self, cmd: Mapping[str, Any], ctx: ApplyContext, m: list[Mutation]) -> Result:
        """Engine KV events, applied exactly once per (node, seq)."""
        seq = _int(cmd, "seq", 0, MAX_SEQ)
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
                self._del_all(m, rec.slot, self.index.drop_node(rec.slot))
                continue
            keys = list(dict.fromkeys(block_keys(model.code, hashes)))
            if kind == "removed":
                removed += sum(self._del_block(m, rec.slot, key) for key in keys)
            else:
                done = self._store_blocks(m, rec, model.code, keys, tier)[0]
                stored += done
                ignored += len(keys) - done
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
        "candidates": [dict(zip(Candidate._fields, c, strict=True)) for c in decision.candidates],
    }


__all__ = ["CachePlaneMachine", "RequestRecord", "decision_result", "TIER_NAMES"]

"""The replicated cache_plane state machine: commands -> state changes + results. PURE.

The package: `state` (the tables and their bookkeeping, and the mutations of the command
being applied), `records` (the LMDB key schema and record codecs), `fields` (command
validation), and the handlers by concern: `fleet` (models, nodes, heartbeats, expiry),
`routing` (route, complete), `blocks` (KV events, block-log checkpoints). `HANDLERS` maps
each command to its handler.

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

Store keys and record codecs: `records` (the prefix index's own: `blocklog`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from veristore_py.codec import unpack
from veristore_py.state import ApplyContext, KVMachine, Outcome, Reader, Result, error

from ..blocklog import Replay
from ..calibration import DEFAULT_SPEEDS, Speeds
from ..index import TIER_NAMES, block_keys
from ..limits import MAX_TIME_MS
from ..model import ModelSpec, RouteDecision
from ..policy import DEFAULT_POLICY, PolicyConfig
from . import blocks, fleet, responses, routing
from .fields import MASK64, Invalid, Rejected, policy_field, prior_field
from .records import (
    META_KEY,
    MODEL_PREFIX,
    NODE_PREFIX,
    PREFIX,
    REQUEST_PREFIX,
    SESSION_PREFIX,
    RequestRecord,
    Stats,
    node_from_wire,
)
from .routing import decision_result, route_inputs
from .state import State

Handler = Callable[[State, Mapping[str, Any], ApplyContext], Result]
HANDLERS: dict[str, Handler] = {
    "cp.register_model": fleet.register_model,
    "cp.invalidate_model": fleet.invalidate_model,
    "cp.register_node": fleet.register_node,
    "cp.heartbeat": fleet.heartbeat,
    "cp.drain": fleet.drain,
    "cp.node_unreachable": fleet.node_unreachable,
    "cp.remove_node": fleet.remove_node,
    "cp.expire": fleet.expire,
    "cp.route": routing.route,
    "cp.complete": routing.complete,
    "cp.kv_events": blocks.kv_events,
    "cp.kv_batches": blocks.kv_batches,
    "cp.compact_log": blocks.compact_log,
    "cp.cache_put": responses.put,
    "cp.cache_touch": responses.touch,
    "cp.cache_delete": responses.delete,
    "cp.cache_purge": responses.purge,
}


class CachePlaneMachine(State):
    """Nodes, models, the prefix index, sessions and in-flight requests (see module docstring)."""

    def __init__(self, policy: PolicyConfig = DEFAULT_POLICY) -> None:
        self.kv = KVMachine()
        super().__init__(policy)

    # -- veristore Machine protocol --------------------------------------------------------

    def apply(self, command: Any, reader: Reader, ctx: ApplyContext) -> Outcome:
        """Apply one command; never raises."""
        if not isinstance(command, Mapping):
            return error("invalid_command", "command must be a map")
        op = command.get("op")
        handler = HANDLERS.get(op) if isinstance(op, str) else None
        if handler is None:
            return self.kv.apply(command, reader, ctx)
        self.m = []
        self.reader = reader
        self.log.discard()  # an operation a refused command left buffered
        before = self.now
        now = command.get("now_ms", self.now)
        if isinstance(now, int) and not isinstance(now, bool) and 0 <= now <= MAX_TIME_MS:
            self.now = now  # the leader's clock, stamped into the command
        try:
            result = handler(self, command, ctx)
        except (Invalid, Rejected) as exc:
            # A refused command leaves no trace, the clock included: it is stored only in
            # the meta record that a refused command does not write, so a replica restored
            # from a snapshot would not have it.
            self.now = before
            code = exc.code if isinstance(exc, Rejected) else "invalid_command"
            return error(code, str(exc))
        finally:
            self.reader = None  # only valid inside this apply
        self.log.flush(self.m)
        self.m.append((META_KEY, self.meta_wire()))
        return Outcome(tuple(self.m), result)

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
            if key.startswith(responses.RC_PREFIX):
                if key.startswith(responses.ENTRY_PREFIX):
                    self.responses.load(key[len(responses.ENTRY_PREFIX):].decode(), unpack(raw))
                elif key == responses.RC_META_KEY:
                    self.responses.load_meta(unpack(raw))
                continue  # (bodies stay on disk)
            value = unpack(raw)
            if key == META_KEY:
                self.next_slot, self.next_model, self.log.seq, stats, self.now = value
                self.stats = Stats(*stats)
            elif key.startswith(MODEL_PREFIX):
                model_id = key[len(MODEL_PREFIX):].decode()
                self.models[model_id] = ModelSpec(model_id, *value)
            elif key.startswith(NODE_PREFIX):
                node_id = key[len(NODE_PREFIX):].decode()
                self.nodes[node_id] = node_from_wire(node_id, value)
            elif key.startswith(SESSION_PREFIX):
                self.set_session(key[len(SESSION_PREFIX):].decode(), value[0], value[1])
            elif key.startswith(REQUEST_PREFIX):
                node, model, req_blocks, pending, expires, kind, matched, *extra = value
                self.requests[key[len(REQUEST_PREFIX):].decode()] = RequestRecord(
                    node, model, tuple(req_blocks), tuple(pending), expires, kind, matched,
                    *extra)
        replay.into(self.index)
        self.responses.finish_load()
        for request in self.requests.values():
            self.pin(self.nodes[request.node].slot, block_keys(request.model, request.blocks))

    # -- views ---------------------------------------------------------------------------

    def decide(self, command: Mapping[str, Any],
               inflight: Mapping[str, tuple[int, int]] | None = None,
               hashes_checked: bool = False) -> RouteDecision | Result:
        """Compute a route decision without changing anything; an error dict if invalid.

        The leader calls this before proposing a route (and for dry runs); `inflight` counts
        (routes, new blocks) the leader has proposed per node and not applied yet. `hashes_checked` skips
        re-checking block hashes the caller already validated (apply always checks them).
        """
        try:
            model, hashes, session = route_inputs(self, command, hashes_checked)
            policy = policy_field(command, self.policy)
            prior = prior_field(command)
        except Invalid as exc:
            return error("invalid_command", str(exc)).result
        if model is None:
            return error("unknown_model", f"model {command.get('model')!r} is not registered").result
        return self.route_decision(model, block_keys(model.code, hashes), session,
                                   command.get("now_ms", 0), prior, inflight, policy)

    @staticmethod
    def prior_of(command: Mapping[str, Any]) -> Speeds:
        """The load model's priors in `command` (defaults where absent or invalid)."""
        try:
            return prior_field(command)
        except Invalid:
            return DEFAULT_SPEEDS


__all__ = ["CachePlaneMachine", "HANDLERS", "MASK64", "RequestRecord", "TIER_NAMES",
           "decision_result"]

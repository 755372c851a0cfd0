"""cache_plane as a fleet-simulator policy, in process: the real machine on the virtual clock.

`InProcessCachePlane` holds a real `CachePlaneMachine` and applies to it the commands the
leader's service would propose (`cp.register_model`, `cp.register_node`, `cp.route`,
`cp.complete`, `cp.kv_events`, `cp.heartbeat`, and its housekeeping `cp.expire` /
`cp.compact_log`), one log index each, with the simulation's virtual time as the leader's
clock (`now_ms`). No Raft and no HTTP: a route costs what the machine's apply costs, so a
sweep of many regimes runs in minutes, and whatever policy the machine implements is the one
measured. `policies.CachePlanePolicy` is the same router as a real cluster over HTTP.

Where the virtual time comes from: an arrival is handled at its arrival time
(`request.arrival_ms`), a step result at its end (`ends_ms`), a heartbeat at the `now_ms`
the fleet loop passes. The clock never goes backwards.

The operator's priors (`prefill_tokens_per_s`, `decode_ms_per_token`, `mean_output_tokens`)
are stamped into every route, completion and expiry command, as the leader stamps its
settings; `policy_overrides` is merged into every route command (e.g. ``{"load_weight":
1.0}``). Node agents' facts are the simulated node's (`server.py`): a heartbeat carries the
engine's running and waiting counts and the KV blocks it holds; a completion carries the
request's usage and timings, unless the engine refused it.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterable, Mapping
from typing import Any

from veristore_py.state import ApplyContext, Mutation

from .. import commands
from ..errors import CachePlaneError
from ..hashing import DEFAULT_SEED
from ..machine import CachePlaneMachine
from .engine import Engine, Request, StepResult
from .fleet import Fleet
from .policies import kv_events, usage

LEASE_MS = 10**12          # nodes never expire in a simulation
REQUEST_TTL_MS = 10**9     # nor do routed requests: every one is reported
SESSION_TTL_MS = 600_000
HOUSEKEEPING_MS = 1_000    # the leader's expire interval (settings.expire_interval_s)


class MemoryStore:
    """A `state.Reader` over a dict that absorbs each command's mutations (None deletes)."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def scan(self, prefix: bytes, start: bytes, limit: int) -> list[tuple[bytes, bytes]]:
        """Return up to `limit` (key, value) pairs with `prefix`, keys >= `start`, in order."""
        keys = sorted(k for k in self.data if k.startswith(prefix))
        first = bisect.bisect_left(keys, start)
        return [(k, self.data[k]) for k in keys[first:first + limit]]

    def write(self, mutations: Iterable[Mutation]) -> None:
        for key, value in mutations:
            if value is None:
                self.data.pop(key, None)
            else:
                self.data[key] = value


class InProcessCachePlane:
    """Route with a real `CachePlaneMachine` applied in process (see module docstring)."""

    name = "cache_plane"

    def __init__(self, fleet: Fleet, *, prefill_tokens_per_s: float,
                 decode_ms_per_token: float, mean_output_tokens: int, model: str = "sim",
                 policy_overrides: Mapping[str, Any] | None = None,
                 machine: CachePlaneMachine | None = None,
                 heartbeat_loss: float = 0.0) -> None:
        self.machine = machine if machine is not None else CachePlaneMachine()
        self.store = MemoryStore()
        self.model = model
        self.priors = commands.priors(round(prefill_tokens_per_s), decode_ms_per_token,
                                      mean_output_tokens)
        self.overrides = dict(policy_overrides or {})
        # a share of heartbeats lost on the way, drawn per node from a seeded generator
        self.heartbeat_loss = heartbeat_loss
        self._losses = {node: random.Random(node) for node in fleet.engines}
        self.now_ms = 0
        self.index = 0
        self.seq: dict[str, int] = {}
        self.decisions: dict[str, int] = {}     # route types
        self.route_errors: dict[str, int] = {}  # rejections by reason
        self._next_housekeeping = HOUSEKEEPING_MS
        sizes = {engine.config.block_size for engine in fleet.engines.values()}
        if len(sizes) != 1:
            raise ValueError("every engine of the fleet must use the same block size")
        self.apply(commands.register_model(model, sizes.pop(), DEFAULT_SEED))
        for node, engine in fleet.engines.items():
            slots = engine.config.max_num_seqs
            # The router never refuses for "busy" here: the engine queues what it cannot run.
            self.apply(commands.register_node(node, "sim", [model],
                                              engine.config.capacity_blocks, slots * 64, {},
                                              LEASE_MS, max_running=slots))

    # -- applying --------------------------------------------------------------------------

    def apply(self, command: dict[str, Any]) -> dict[str, Any]:
        """Apply `command` as the next log entry, stamped with the leader's clock as the
        service stamps it; raise CachePlaneError if the machine refuses it."""
        command.setdefault("now_ms", self.now_ms)
        self.index += 1
        outcome = self.machine.apply(command, self.store,
                                     ApplyContext(index=self.index, position=0,
                                                  stamp_ms=self.now_ms))
        self.store.write(outcome.mutations)
        result = outcome.result
        if result.get("ok") is False:
            code = str(result.get("error"))
            raise CachePlaneError(code, str(result.get("detail", code)))
        return result

    def _advance(self, now_ms: float) -> int:
        """Move the leader's clock to `now_ms` (never back); run housekeeping when due."""
        self.now_ms = max(self.now_ms, int(now_ms))
        if self.now_ms >= self._next_housekeeping:  # (once after a gap, as the leader's loop)
            self._next_housekeeping = self.now_ms + HOUSEKEEPING_MS
            self.apply(commands.expire(self.now_ms, 0, self.priors))
            for slot in self.machine.compaction_due():
                self.apply(commands.compact_log(slot))
        return self.now_ms

    # -- the fleet's Policy protocol -------------------------------------------------------

    async def choose(self, request: Request, fleet: Fleet) -> str | None:
        now = self._advance(request.arrival_ms)
        policy = self.machine.policy
        command = commands.route(self.model, list(request.blocks), request.request_id, now,
                                 REQUEST_TTL_MS, SESSION_TTL_MS, self.priors,
                                 policy.load_weight, policy.session_max_load, request.session)
        result = self.apply({**command, **self.overrides})
        if not result["routed"]:
            reason = str(result["rejected"])
            self.route_errors[reason] = self.route_errors.get(reason, 0) + 1
            return None
        kind = str(result["route_type"])
        self.decisions[kind] = self.decisions.get(kind, 0) + 1
        return str(result["node_id"])

    async def observe(self, node: str, result: StepResult) -> None:
        self._advance(result.ends_ms)
        for request in result.finished:
            # (a refused request has no usage to learn from)
            self.apply(commands.complete(request.request_id, node,
                                         "failed" if request.rejected else "ok",
                                         list(request.output_blocks), usage(request),
                                         self.priors))
        events = kv_events(result)
        if events:
            self.seq[node] = self.seq.get(node, 0) + 1
            self.apply(commands.kv_events(node, self.seq[node], events, self.model))

    async def heartbeat(self, node: str, engine: Engine, now_ms: float) -> None:
        if self.heartbeat_loss and self._losses[node].random() < self.heartbeat_loss:
            return
        self._advance(now_ms)
        self.apply(commands.heartbeat(node, len(engine.running), len(engine.waiting), LEASE_MS,
                                      engine.held_blocks))

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

from ..errors import CachePlaneError
from ..machine import CachePlaneMachine
from .engine import Engine, Request, StepResult
from .fleet import Fleet
from .policies import kv_events

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
        self.priors: dict[str, Any] = {
            "prefill_tokens_per_s": round(prefill_tokens_per_s),
            "decode_ms_per_token": decode_ms_per_token,
            "mean_output_tokens": mean_output_tokens,
        }
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
        self.apply({"op": "cp.register_model", "model": model, "block_size": sizes.pop(),
                    "now_ms": 0})
        for node, engine in fleet.engines.items():
            slots = engine.config.max_num_seqs
            # The router never refuses for "busy" here: the engine queues what it cannot run.
            self.apply({"op": "cp.register_node", "node": node, "address": "sim",
                        "models": [model], "capacity_blocks": engine.config.capacity_blocks,
                        "max_active": slots * 64, "max_running": slots, "now_ms": 0,
                        "lease_ms": LEASE_MS})

    # -- applying --------------------------------------------------------------------------

    def apply(self, command: dict[str, Any]) -> dict[str, Any]:
        """Apply `command` as the next log entry; raise CachePlaneError if the machine refuses."""
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
            self.apply({"op": "cp.expire", "now_ms": self.now_ms, "block_ttl_ms": 0,
                        **self.priors})
            for slot in self.machine.compaction_due():
                self.apply({"op": "cp.compact_log", "slot": slot, "now_ms": self.now_ms})
        return self.now_ms

    # -- the fleet's Policy protocol -------------------------------------------------------

    async def choose(self, request: Request, fleet: Fleet) -> str | None:
        now = self._advance(request.arrival_ms)
        command: dict[str, Any] = {
            "op": "cp.route", "model": self.model, "blocks": list(request.blocks),
            "request_id": request.request_id, "now_ms": now,
            "request_ttl_ms": REQUEST_TTL_MS, "session_ttl_ms": SESSION_TTL_MS,
            **self.priors, **self.overrides,
        }
        if request.session:
            command["session_id"] = request.session
        result = self.apply(command)
        if not result["routed"]:
            reason = str(result["rejected"])
            self.route_errors[reason] = self.route_errors.get(reason, 0) + 1
            return None
        kind = str(result["route_type"])
        self.decisions[kind] = self.decisions.get(kind, 0) + 1
        return str(result["node_id"])

    async def observe(self, node: str, result: StepResult) -> None:
        now = self._advance(result.ends_ms)
        for request in result.finished:
            command: dict[str, Any] = {
                "op": "cp.complete", "request_id": request.request_id, "node": node,
                "status": "failed" if request.rejected else "ok",
                "output_blocks": list(request.output_blocks), "now_ms": now, **self.priors,
            }
            if not request.rejected:  # a refused request has no usage to learn from
                command.update(prompt_tokens=request.prompt_tokens,
                               output_tokens=request.output_tokens,
                               cached_tokens=request.reused_tokens,
                               ttft_ms=round(request.ttft_ms), latency_ms=round(request.e2e_ms))
            self.apply(command)
        events = kv_events(result)
        if events:
            self.seq[node] = self.seq.get(node, 0) + 1
            self.apply({"op": "cp.kv_events", "node": node, "seq": self.seq[node],
                        "events": events, "model": self.model, "now_ms": now})

    async def heartbeat(self, node: str, engine: Engine, now_ms: float) -> None:
        if self.heartbeat_loss and self._losses[node].random() < self.heartbeat_loss:
            return
        now = self._advance(now_ms)
        self.apply({"op": "cp.heartbeat", "node": node, "active": len(engine.running),
                    "queue": len(engine.waiting), "used": engine.held_blocks,
                    "lease_ms": LEASE_MS, "now_ms": now})

"""Routing policies compared by `benchmarks/routing_quality.py` (and used by the demo).

Baselines, each with only the knowledge its real counterpart has (facts in ANCHORS.md):

- `RoundRobin`, `LeastLoaded` (fewest requests in flight, as the router counts them),
  `SessionHash` (rendezvous hash of the session id; requests without one hash their id);
- `SGLangStyle`: an approximate per-worker prefix tree built from the router's own routing
  history (it never hears evictions); if the in-flight spread exceeds 64 and 1.5x, least
  loaded; else the best-matching worker when its match rate exceeds 0.3; else least loaded;
- `LlmdStyle`: a precise prefix index fed by the engines' KV events (stored / removed), plus
  a speculative entry for every routed prompt; score = 3 x prefix score (consecutive hits from
  block 0 / prompt blocks) + 2 x queue score ((max - q) / (max - min) over waiting queues, 1
  when equal), the default weights of llm-d's scheduler profile;
- `Oracle`: reads every engine's true cache and picks the longest cached prefix (ties: fewest
  in flight); an upper bound for hit rate, blind to overload;
- `CachePlanePolicy`: asks a real cache_plane cluster over HTTP (`/v1/route`) and reports
  completions (`/v1/complete`, with output blocks and usage: tokens in, out and cached, time
  to first token, latency), evictions (`/v1/kv-events`) and, on the fleet's heartbeat timer,
  each engine's running and waiting requests, as a router plus node agents would.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from ..client import CachePlaneClient
from .engine import Engine, Request, StepResult
from .fleet import Fleet


class _InFlight:
    """Requests routed and not finished, per node, as the router itself counts them."""

    name = "base"

    def __init__(self) -> None:
        self.inflight: dict[str, int] = {}

    def _least_loaded(self, nodes: Sequence[str]) -> str:
        return min(nodes, key=lambda n: (self.inflight.get(n, 0), n))

    def _sent(self, node: str) -> str:
        self.inflight[node] = self.inflight.get(node, 0) + 1
        return node

    async def observe(self, node: str, result: StepResult) -> None:
        self.inflight[node] = self.inflight.get(node, 0) - len(result.finished)


class RoundRobin(_InFlight):
    name = "round-robin"

    def __init__(self) -> None:
        super().__init__()
        self._next = 0

    async def choose(self, request: Request, fleet: Fleet) -> str | None:
        ids = fleet.ids
        node = ids[self._next % len(ids)]
        self._next += 1
        return self._sent(node)


class LeastLoaded(_InFlight):
    name = "least-loaded"

    async def choose(self, request: Request, fleet: Fleet) -> str | None:
        return self._sent(self._least_loaded(fleet.ids))


class SessionHash(_InFlight):
    name = "session-hash"

    async def choose(self, request: Request, fleet: Fleet) -> str | None:
        key = (request.session or request.request_id).encode()
        return self._sent(max(fleet.ids, key=lambda n: hashlib.blake2b(
            key + b"\0" + n.encode(), digest_size=8).digest()))


class SGLangStyle(_InFlight):
    name = "sglang-style"
    balance_abs, balance_rel, match_threshold = 64, 1.5, 0.3

    def __init__(self) -> None:
        super().__init__()
        self.trees: dict[str, OrderedDict[int, None]] = {}

    async def choose(self, request: Request, fleet: Fleet) -> str | None:
        ids = fleet.ids
        loads = [self.inflight.get(n, 0) for n in ids]
        if max(loads) - min(loads) > self.balance_abs and \
                max(loads) > self.balance_rel * min(loads):
            node = self._least_loaded(ids)
        else:
            matches = {n: _prefix_in(self.trees.get(n, {}), request.blocks) for n in ids}
            best = max(ids, key=lambda n: (matches[n], -self.inflight.get(n, 0)))
            rate = matches[best] / len(request.blocks) if request.blocks else 0.0
            node = best if rate > self.match_threshold else self._least_loaded(ids)
        tree = self.trees.setdefault(node, OrderedDict())
        for block in request.blocks:
            tree[block] = None
            tree.move_to_end(block)
        return self._sent(node)


class LlmdStyle(_InFlight):
    name = "llm-d-style"
    prefix_weight, queue_weight = 3.0, 2.0

    def __init__(self) -> None:
        super().__init__()
        self.index: dict[str, set[int]] = {}

    async def choose(self, request: Request, fleet: Fleet) -> str | None:
        ids = fleet.ids
        queues = {n: len(fleet.engines[n].waiting) for n in ids}  # scraped engine metric
        lo, hi = min(queues.values()), max(queues.values())
        total = len(request.blocks) or 1

        def score(n: str) -> float:
            prefix = _prefix_in(self.index.get(n, set()), request.blocks) / total
            queue = 1.0 if hi == lo else (hi - queues[n]) / (hi - lo)
            return self.prefix_weight * prefix + self.queue_weight * queue

        node = max(ids, key=lambda n: (score(n), -self.inflight.get(n, 0)))
        self.index.setdefault(node, set()).update(request.blocks)  # speculative entry
        return self._sent(node)

    async def observe(self, node: str, result: StepResult) -> None:
        await super().observe(node, result)
        held = self.index.setdefault(node, set())
        held.update(result.stored)
        held.difference_update(result.removed)


class Oracle(_InFlight):
    name = "oracle"

    async def choose(self, request: Request, fleet: Fleet) -> str | None:
        node = max(fleet.ids, key=lambda n: (fleet.engines[n].cached_prefix(request.blocks),
                                             -self.inflight.get(n, 0)))
        return self._sent(node)


class CachePlanePolicy:
    """Route through a cache_plane cluster; report completions and evictions back to it."""

    name = "cache_plane"

    def __init__(self, client: CachePlaneClient, model: str, pace: float = 1.0) -> None:
        self.client = client
        self.model = model
        # Virtual time runs `pace` times faster than the leader's clock (see fleet.run):
        # reported times are divided by it, so the leader learns speeds on its own clock.
        self.pace = pace
        self.seq: dict[str, int] = {}
        self.decisions: dict[str, int] = {}   # route types
        self.route_errors: dict[str, int] = {}

    async def choose(self, request: Request, fleet: Fleet) -> str | None:
        from veristore_py.errors import VeristoreError

        try:
            decision = await self.client.route(self.model, block_hashes=list(request.blocks),
                                               session_id=request.session,
                                               request_id=request.request_id)
        except VeristoreError as exc:  # a rejection (503 no_room / all_nodes_busy, ...)
            self.route_errors[exc.code] = self.route_errors.get(exc.code, 0) + 1
            return None
        kind = decision["route_type"]
        self.decisions[kind] = self.decisions.get(kind, 0) + 1
        return str(decision["node_id"])

    async def heartbeat(self, node: str, engine: Engine, now_ms: float) -> None:
        await self.client.heartbeat(node, active_requests=len(engine.running),
                                    queue_depth=len(engine.waiting),
                                    used_blocks=engine.held_blocks)

    async def observe(self, node: str, result: StepResult) -> None:
        for request in result.finished:
            await self.client.complete(request.request_id, node,
                                       "failed" if request.rejected else "ok",
                                       block_hashes=list(request.output_blocks),
                                       **usage(request, self.pace))
        events = kv_events(result)
        if events:
            self.seq[node] = self.seq.get(node, 0) + 1
            await self.client.kv_events(node, self.seq[node], events, model=self.model)


def kv_events(result: StepResult) -> list[dict[str, Any]]:
    """The engine's KV events of one step, as its publisher would send them.

    Removals first: within a step the engine evicts before it stores (a block evicted by
    one admission and computed again by a later one ends the step stored).
    """
    events: list[dict[str, Any]] = []
    if result.removed:
        events.append({"type": "removed", "block_hashes": list(result.removed)})
    if result.stored:
        events.append({"type": "stored", "block_hashes": list(result.stored)})
    return events


def usage(request: Request, pace: float = 1.0) -> dict[str, int]:
    """What an engine's completion says of a request (OpenAI usage plus its timings, in
    virtual ms divided by `pace`)."""
    if request.rejected:
        return {}
    return {"prompt_tokens": request.prompt_tokens, "output_tokens": request.output_tokens,
            "cached_tokens": request.reused_tokens, "ttft_ms": round(request.ttft_ms / pace),
            "latency_ms": round(request.e2e_ms / pace)}


def _prefix_in(held: Any, blocks: Sequence[int]) -> int:
    n = 0
    for block in blocks:
        if block not in held:
            break
        n += 1
    return n


BASELINES = (RoundRobin, LeastLoaded, SessionHash, SGLangStyle, LlmdStyle, Oracle)

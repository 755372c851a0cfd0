"""Run a workload against a fleet of simulated engines under a routing policy (virtual time).

A discrete-event loop: request arrivals (from the workload) and engine step ends, in time
order. At an arrival the policy chooses a node (it may be a real cache_plane cluster over
HTTP: policies are async); the engine admits the request at its next step. At a step end the
policy hears what happened (requests finished, blocks stored and evicted), as a router hears
completions and KV events. Virtual time means a 17-minute trace runs as fast as the policy can
decide, and every policy sees exactly the same fleet and arrivals.

With `heartbeat_ms`, every node also heartbeats on a timer of virtual time, as node agents do:
the policy's optional `heartbeat(node, engine, now_ms)` hears the engine's running and
waiting counts and KV usage. Node i beats at i x heartbeat_ms / nodes and then every
heartbeat_ms (so the fleet's beats are spread, deterministically); heartbeats stop once no
arrival remains and every engine is idle.

A policy that reads a real clock (cache_plane's leader stamps its own into every command and
estimates prefill backlogs with it) needs virtual time to pass at a known pace: with `pace`,
the loop never lets virtual time run more than `pace` times ahead of real time (it sleeps),
so such a policy is configured with rates multiplied by `pace`.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .engine import Engine, EngineConfig, Request, StepResult


class Policy(Protocol):
    """A router under test. `choose` returns a node id, or None to reject the request.

    A policy may also define ``async heartbeat(node, engine, now_ms)``, called on the
    heartbeat timer of `run` (see the module docstring).
    """

    name: str

    async def choose(self, request: Request, fleet: Fleet) -> str | None: ...

    async def observe(self, node: str, result: StepResult) -> None: ...


@dataclass
class Fleet:
    """Engines by node id, in a fixed order."""

    engines: dict[str, Engine]

    @classmethod
    def build(cls, nodes: int, config: EngineConfig) -> Fleet:
        return cls({f"node-{i:02d}": Engine(f"node-{i:02d}", config) for i in range(nodes)})

    @property
    def ids(self) -> list[str]:
        return list(self.engines)


@dataclass
class RunResult:
    policy: str
    requests: list[Request]
    rejected: int
    makespan_ms: float
    avg_load: dict[str, float]   # time-averaged requests on each node (running + waiting)

    def summary(self) -> dict[str, Any]:
        done = [r for r in self.requests if r.finished_ms >= 0 and not r.rejected]
        prompt = sum(r.prompt_tokens for r in done)
        reused = sum(r.reused_tokens for r in done)
        ttft = sorted(r.ttft_ms for r in done)
        e2e = sorted(r.e2e_ms for r in done)
        loads = list(self.avg_load.values())
        mean_load = statistics.fmean(loads) if loads else 0.0
        seconds = self.makespan_ms / 1000 or math.inf
        return {
            "policy": self.policy,
            "requests": len(self.requests),
            "completed": len(done),
            "rejected": self.rejected,
            "hit_rate": reused / prompt if prompt else 0.0,
            "ttft_p50_ms": _pct(ttft, 50), "ttft_p90_ms": _pct(ttft, 90),
            "ttft_p99_ms": _pct(ttft, 99),
            "e2e_p50_ms": _pct(e2e, 50), "e2e_p90_ms": _pct(e2e, 90),
            "throughput_rps": len(done) / seconds,
            "output_tokens_per_s": sum(r.output_tokens for r in done) / seconds,
            "imbalance": max(loads) / mean_load if mean_load else 1.0,
        }


def _pct(values: Sequence[float], p: float) -> float:
    if not values:
        return math.nan
    return values[min(len(values) - 1, int(len(values) * p / 100))]


# Event kinds, in the order they are taken at the same instant (after the heap's sequence).
_ARRIVAL, _STEP_END, _HEARTBEAT = 0, 1, 2


async def run(fleet: Fleet, requests: Sequence[Request], policy: Policy,
              pace: float | None = None, heartbeat_ms: float | None = None) -> RunResult:
    """Replay `requests` (sorted by arrival) through `policy` on `fleet` (see module doc).

    Terminates once every arrival is handled and every engine is idle; the makespan is the
    time of the last arrival or step end (heartbeats do not extend it).
    """
    heap: list[tuple[float, int, int, Any]] = []
    order = 0
    for request in requests:
        heap.append((request.arrival_ms, order, _ARRIVAL, request))
        order += 1
    beat = getattr(policy, "heartbeat", None) if heartbeat_ms else None
    if beat is not None:
        assert heartbeat_ms is not None and heartbeat_ms > 0
        for i, node in enumerate(fleet.engines):
            heap.append((i * heartbeat_ms / len(fleet.engines), order, _HEARTBEAT, node))
            order += 1
    heapq.heapify(heap)
    arrivals_left = len(requests)
    active: set[str] = set()
    area = dict.fromkeys(fleet.engines, 0.0)
    last_t = 0.0
    rejected = 0
    end = 0.0
    wall_start = time.monotonic()

    def start(node: str, at: float) -> None:
        nonlocal order
        result = fleet.engines[node].step(at)
        if result is None:
            active.discard(node)
            return
        active.add(node)
        heapq.heappush(heap, (result.ends_ms, order, _STEP_END, (node, result)))
        order += 1

    while heap:
        now, _, kind, payload = heapq.heappop(heap)
        if kind == _HEARTBEAT and not arrivals_left and not active:
            continue  # the run is over: let the timer stop
        if pace:
            ahead = now / pace / 1000 - (time.monotonic() - wall_start)
            if ahead > 0:
                await asyncio.sleep(ahead)
        for node, engine in fleet.engines.items():
            area[node] += engine.load * (now - last_t)
        last_t = now
        if kind == _HEARTBEAT:
            node = payload
            assert beat is not None and heartbeat_ms is not None
            await beat(node, fleet.engines[node], now)
            heapq.heappush(heap, (now + heartbeat_ms, order, _HEARTBEAT, node))
            order += 1
            continue
        end = now
        if kind == _ARRIVAL:
            arrivals_left -= 1
            arrival: Request = payload
            chosen = await policy.choose(arrival, fleet)
            if chosen is None or chosen not in fleet.engines:
                arrival.rejected = True
                rejected += 1
                continue
            fleet.engines[chosen].submit(arrival)
            if chosen not in active:
                start(chosen, now)
        else:
            node, result = payload
            rejected += sum(1 for r in result.finished if r.rejected)
            await policy.observe(node, result)
            start(node, now)
    span = end or 1.0
    return RunResult(policy.name, list(requests), rejected, end,
                     {node: a / span for node, a in area.items()})

"""Checkers over a recorded history (pure: no I/O, no clock).

- `check_register`: per-key linearizability of a compare-and-set register (Wing & Gong's
  search with memoization, as Knossos does). `ok` operations must take effect between their
  invocation and completion with the result observed; `info` operations (outcome unknown) may
  take effect at any point after their invocation, or never; `fail` operations never did. A
  time budget turns a search that would take too long into "unknown" instead of a hang.
- `check_acked_writes`: every write acknowledged `ok` is present in the final state.
- `check_decisions`: route decisions (committed and dry-run) come from a leader that held its
  quorum: no `ok` decision reports an older log position than a committed decision that had
  completed before it was invoked, and one log index never carries two terms.
- `check_route_count`: the replicated route counter agrees with the acknowledged routes.
- `failover_stats`: percentiles of fault -> first successful write.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

INF = math.inf


@dataclass(frozen=True, slots=True)
class Op:
    """One client operation as the history records it."""

    process: int
    kind: str          # "read" | "cas" | "put"
    key: str
    args: tuple[Any, ...]  # read: (); cas: (expected, new); put: (value,)
    invoke: float
    complete: float    # INF for info (unknown outcome)
    outcome: str       # "ok" | "fail" | "info"
    result: Any = None  # read: value or None; cas: succeeded (bool); put: None


class Unknown(Exception):
    """The search ran out of its time budget."""


def _step(op: Op, state: Any) -> tuple[bool, Any]:
    """Apply `op` to register value `state`; (consistent with what was observed, new state)."""
    if op.kind == "read":
        return (op.outcome == "info" or op.result == state), state
    if op.kind == "put":
        return True, op.args[0]
    expected, new = op.args
    applied = state == expected
    if op.outcome == "info":
        return True, new if applied else state
    return applied == op.result, new if applied else state


def check_register(ops: Sequence[Op], initial: Any = None, budget_s: float = 5.0,
                   clock: Callable[[], float] | None = None,
                   max_configurations: int = 20_000) -> str:
    """"ok", "violation" or "unknown" for one key's history (see module docstring).

    The history is cut into segments at quiescent points (every `ok` operation invoked so far
    has completed). Each segment is searched Wing & Gong style from every configuration the
    previous one could end in: (register value, `info` operations not yet applied, which may
    still take effect later). Segments stay small, so long histories check in linear time.
    """
    if clock is None:
        import time

        clock = time.monotonic
    deadline = clock() + budget_s
    live = sorted((op for op in ops if op.outcome != "fail"), key=lambda o: o.invoke)
    segments: list[list[Op]] = []
    horizon = -INF
    for op in live:
        if not segments or op.invoke > horizon:
            segments.append([])
        segments[-1].append(op)
        if op.outcome == "ok":
            horizon = max(horizon, op.complete)
    configs: set[tuple[Any, frozenset[Op]]] = {(initial, frozenset())}
    try:
        for segment in segments:
            required = [op for op in segment if op.outcome == "ok"]
            fresh = frozenset(op for op in segment if op.outcome == "info")
            ends: set[tuple[Any, frozenset[Op]]] = set()
            for state, pending in configs:
                _explore(required, pending | fresh, state, ends, deadline, clock)
                if len(ends) > max_configurations:
                    return "unknown"
            if not ends:
                return "violation"
            configs = ends
    except Unknown:
        return "unknown"
    return "ok"


def _explore(required: list[Op], pending: frozenset[Op], state: Any,
             ends: set[tuple[Any, frozenset[Op]]], deadline: float,
             clock: Callable[[], float]) -> None:
    """Add to `ends` every (state, unapplied infos) after linearizing all of `required`."""
    seen: set[tuple[int, frozenset[Op], Any]] = set()
    full = (1 << len(required)) - 1
    stack: list[tuple[int, frozenset[Op], Any]] = [(0, pending, state)]
    steps = 0
    while stack:
        done, infos, value = stack.pop()
        if (done, infos, value) in seen:
            continue
        seen.add((done, infos, value))
        steps += 1
        if steps % 512 == 0 and clock() > deadline:
            raise Unknown
        if done == full:
            ends.add((value, infos))
            continue
        horizon = min(op.complete for i, op in enumerate(required) if not done >> i & 1)
        for i, op in enumerate(required):
            if done >> i & 1 or op.invoke > horizon:
                continue
            ok, after = _step(op, value)
            if ok:
                stack.append((done | 1 << i, infos, after))
        for op in infos:
            if op.invoke <= horizon:
                stack.append((done, infos - {op}, _step(op, value)[1]))


def check_acked_writes(ops: Iterable[Op], final: dict[str, Any]) -> list[Op]:
    """The `ok` puts whose key does not hold their value in `final` (should be none)."""
    return [op for op in ops if op.kind == "put" and op.outcome == "ok"
            and final.get(op.key) != op.args[0]]


def check_decisions(ops: Iterable[Op]) -> list[str]:
    """Violations among `ok` route decisions (kind "route" or "route-dry", result =
    (term, index, node_id)); see the module docstring. A leader cut off from its quorum that
    kept answering from its stale state would report an index below one already committed.
    """
    decided = sorted((op for op in ops if op.kind in ("route", "route-dry")
                      and op.outcome == "ok"), key=lambda op: op.invoke)
    committed = sorted((op for op in decided if op.kind == "route"), key=lambda op: op.complete)
    problems: list[str] = []
    terms: dict[int, tuple[int, str]] = {}
    floor, floor_op, j = -1, "", 0
    for op in decided:
        while j < len(committed) and committed[j].complete < op.invoke:
            if committed[j].result[1] > floor:
                floor, floor_op = committed[j].result[1], committed[j].key
            j += 1
        term, index = op.result[0], op.result[1]
        if index < floor:
            problems.append(f"{op.kind} {op.key} decided at index {index} (term {term}) after "
                            f"route {floor_op} had committed index {floor}: a stale leader")
        if op.kind == "route":
            seen = terms.setdefault(index, (term, op.key))
            if seen[0] != term:
                problems.append(f"index {index} carries term {seen[0]} (route {seen[1]}) and "
                                f"term {term} (route {op.key})")
    return problems


def check_route_count(ops: Iterable[Op], routes_total: int) -> str | None:
    """None if the replicated count of routed requests is between the `ok` routes and the
    `ok` + `info` routes (each request id counts once); else what is wrong."""
    ops = list(ops)
    ok = len({op.key for op in ops if op.kind == "route" and op.outcome == "ok"})
    maybe = len({op.key for op in ops if op.kind == "route" and op.outcome == "info"})
    if ok <= routes_total <= ok + maybe:
        return None
    return f"{routes_total} routes recorded, expected between {ok} (acknowledged) and " \
           f"{ok + maybe} (acknowledged + unknown)"


def percentile(values: Sequence[float], p: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


def failover_stats(samples: Sequence[float]) -> dict[str, float]:
    return {"count": len(samples), "p50_s": percentile(samples, 50),
            "p99_s": percentile(samples, 99), "max_s": max(samples) if samples else math.nan}

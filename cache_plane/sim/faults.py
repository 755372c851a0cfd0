"""Failure injection for the simulated node: what a gateway must survive from an engine.

A `FaultPlan` names one mode, applied to each generation request (`/v1/completions`,
`/v1/chat/completions`) as it arrives, for the next `count` requests (None: until changed):

- ``none``: serve normally.
- ``refuse_5xx``: answer `status` (500-599, default 503) with a vLLM-shaped error body before
  the engine sees the request.
- ``hang``: send nothing for `hang_s` seconds (or until the plan is changed or the node shuts
  down), then serve normally: a gateway's read timeout fires first.
- ``break_midstream``: a streamed response sends `after_chunks` SSE events (the role chunk
  counts) and then the connection is closed without the stream's end; a non-streamed request's
  connection is closed before any response.

`Faults` holds a node's current plan; `parse_fault_plan` validates the admin endpoint's JSON
(``POST /sim/faults``), returning every problem at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

MODES = ("none", "refuse_5xx", "hang", "break_midstream")


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """Which fault to inject, and for how many requests (see the module docstring)."""

    mode: str = "none"
    status: int = 503
    hang_s: float = 3600.0
    after_chunks: int = 1
    count: int | None = None

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_fault_plan(body: Any) -> FaultPlan:
    """Return the plan `body` describes; raise ValueError naming every problem."""
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    problems = []
    fields = {f.name for f in dataclasses.fields(FaultPlan)}
    unknown = sorted(set(body) - fields)
    if unknown:
        problems.append(f"unknown fields: {', '.join(unknown)}")
    mode = body.get("mode", "none")
    if mode not in MODES:
        problems.append(f"mode must be one of {', '.join(MODES)}")
    status = body.get("status", 503)
    if not _is_int(status) or not 500 <= status <= 599:
        problems.append("status must be an integer in [500, 599]")
    hang_s = body.get("hang_s", 3600.0)
    if isinstance(hang_s, bool) or not isinstance(hang_s, int | float) or \
            not math.isfinite(hang_s) or hang_s < 0:
        problems.append("hang_s must be a number >= 0")
    after_chunks = body.get("after_chunks", 1)
    if not _is_int(after_chunks) or after_chunks < 0:
        problems.append("after_chunks must be an integer >= 0")
    count = body.get("count")
    if count is not None and (not _is_int(count) or count < 1):
        problems.append("count must be null or an integer >= 1")
    if problems:
        raise ValueError("; ".join(problems))
    return FaultPlan(mode, status, float(hang_s), after_chunks, count)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Faults:
    """A node's current plan; each generation request takes the mode it must suffer."""

    def __init__(self, plan: FaultPlan = FaultPlan()) -> None:
        self.plan = plan
        self._left = plan.count
        self._changed = asyncio.Event()  # set when the plan changes: releases hung requests

    def set(self, plan: FaultPlan) -> None:
        """Install `plan`, releasing every request hanging under the previous one."""
        self.plan = plan
        self._left = plan.count
        self.release()

    def release(self) -> None:
        """Release the hung requests (the plan is changing, or the node shutting down)."""
        self._changed.set()
        self._changed = asyncio.Event()

    def take(self) -> FaultPlan:
        """Return the plan for one arriving request, and count it against the plan's `count`."""
        plan = self.plan
        if plan.mode == "none":
            return plan
        if self._left is not None:
            self._left -= 1
            if self._left <= 0:
                self.plan, self._left = FaultPlan(), None
        return plan

    async def hang(self, plan: FaultPlan) -> None:
        """Wait `plan.hang_s` seconds, or less if the plan changes first."""
        changed = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), plan.hang_s)

    def view(self) -> dict[str, Any]:
        """The current plan as JSON, with the requests it has left (null: unlimited)."""
        return {**self.plan.as_json(), "remaining": self._left}

"""Group commit: many concurrent proposals become one Raft entry, one durable write.

Callers `submit()` commands from any thread and get a `concurrent.futures.Future` each. A
single proposer thread keeps at most `max_inflight` entries in flight; while every slot is
busy, new commands queue up, and when a slot frees they all leave together in one entry
(bounded by `max_commands` and `max_bytes`). An idle system therefore proposes each command
at once (low latency) and a loaded one batches more (high throughput), with no fixed timer;
`window_s` optionally waits a little longer for company.

A command submitted with ``linger_s`` is in no hurry (nobody waits for its commit: a report,
a decision already answered): it does not start an entry of its own before `linger_s` has
passed, but rides along in any entry that leaves before then. Under steady load such
commands share entries instead of costing one each.

Failure mapping (what the caller may assume):
- rejected before proposing (queue full, not leader)        -> definite errors, raised by submit
- PySyncObj says the entry was never appended or was replaced -> definite (NoLeader/Overloaded)
- no answer by `commit_timeout_s`, or leadership lost          -> indefinite (may still commit)
"""

from __future__ import annotations

import bisect
import collections
import functools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import structlog

from .codec import encode_batch, pack
from .errors import (
    CommitTimeoutError,
    InvalidCommandError,
    LeadershipLostError,
    NoLeaderError,
    OverloadedError,
    VeristoreError,
)
from .raft import FAIL_REASON

log = structlog.get_logger(__name__)

# propose(entry_bytes, callback(result, fail_reason)); must not block.
Proposer = Callable[[bytes, Callable[[Any, int], None]], None]


@dataclass(slots=True)
class _Proposal:
    futures: list[Future[Any]]
    deadline: float
    size: int = 0


# Upper bounds of the batch-size histogram (commands per Raft entry); the last is +Inf.
BATCH_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass(slots=True)
class CommitStats:
    """Counters for metrics and benchmarks."""

    commands: int = 0
    largest_batch: int = 0
    timeouts: int = 0
    # entries by batch size: batch_counts[i] counts sizes <= BATCH_BOUNDS[i] (and above the
    # previous bound); the extra last slot counts larger batches
    batch_counts: list[int] = field(default_factory=lambda: [0] * (len(BATCH_BOUNDS) + 1))

    @property
    def entries(self) -> int:
        return sum(self.batch_counts)

    def count_batch(self, size: int) -> None:
        self.commands += size
        self.largest_batch = max(self.largest_batch, size)
        self.batch_counts[bisect.bisect_left(BATCH_BOUNDS, size)] += 1


def failure(reason: int) -> VeristoreError:
    """The error for a PySyncObj FAIL_REASON (definite where nothing was committed)."""
    if reason == FAIL_REASON.QUEUE_FULL:
        return OverloadedError("Raft command queue is full")
    if reason in (FAIL_REASON.MISSING_LEADER, FAIL_REASON.NOT_LEADER, FAIL_REASON.DISCARDED):
        return NoLeaderError(f"entry not committed (PySyncObj reason {reason}); safe to retry")
    return LeadershipLostError(f"outcome unknown (PySyncObj reason {reason})")


class GroupCommitter:
    """Batch submitted commands into Raft entries; see the module docstring."""

    def __init__(
        self,
        propose: Proposer,
        *,
        max_commands: int = 512,
        max_bytes: int = 1 << 20,
        max_inflight: int = 4,
        max_queue: int = 100_000,
        window_s: float = 0.0,
        commit_timeout_s: float = 5.0,
        wall_clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self._propose = propose
        self._max_commands = max_commands
        self._max_bytes = max_bytes
        self._max_inflight = max_inflight
        self._max_queue = max_queue
        self._window_s = window_s
        self._commit_timeout_s = commit_timeout_s
        self._wall_clock_ms = wall_clock_ms
        self._cond = threading.Condition()
        self._queue: collections.deque[tuple[bytes, Future[Any]]] = collections.deque()
        self._due = float("inf")  # when the earliest queued command must leave (monotonic)
        self._inflight: dict[int, _Proposal] = {}
        self._next_id = 0
        self._running = True
        self.stats = CommitStats()
        self._thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
        self._thread.start()

    def submit(self, command: Any, linger_s: float = 0.0) -> Future[Any]:
        """Queue `command` for the next entry; the future resolves to its apply result.

        With `linger_s`, the command starts no entry before that many seconds (see above).
        """
        try:
            packed = pack(command)
        except (TypeError, ValueError, OverflowError) as exc:
            raise InvalidCommandError(f"command cannot be encoded: {exc}") from exc
        if len(packed) > self._max_bytes:
            raise InvalidCommandError(
                f"command is {len(packed)} bytes; the limit is {self._max_bytes}")
        future: Future[Any] = Future()
        with self._cond:
            if not self._running:
                raise NoLeaderError("node is shutting down")
            if len(self._queue) >= self._max_queue:
                raise OverloadedError(f"{self._max_queue} commands already queued")
            self._queue.append((packed, future))
            due = time.monotonic() + linger_s if linger_s > 0 else 0.0
            if due < self._due:
                self._due = due
                self._cond.notify_all()
        return future

    def fail_all(self, exc: VeristoreError) -> None:
        """Fail every queued and in-flight command with `exc` (e.g. leadership was lost)."""
        with self._cond:
            queued = [f for _, f in self._queue]
            self._queue.clear()
            self._due = float("inf")
            inflight = [f for p in self._inflight.values() for f in p.futures]
            self._inflight.clear()
            self._cond.notify_all()
        for future in queued:
            _settle(future, exc=NoLeaderError("leadership lost before the command was proposed"))
        for future in inflight:
            _settle(future, exc=exc)

    def close(self) -> None:
        """Stop proposing and fail whatever is still pending."""
        with self._cond:
            self._running = False
            self._cond.notify_all()
        self._thread.join(timeout=5)
        self.fail_all(LeadershipLostError("node stopped with the command in flight"))

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue) + sum(len(p.futures) for p in self._inflight.values())

    # -- proposer thread -------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                batch = self._next_batch()
                if batch is None:
                    return
                commands, futures, size = batch
                proposal_id = self._next_id
                self._next_id += 1
                deadline = time.monotonic() + self._commit_timeout_s
                self._inflight[proposal_id] = _Proposal(futures, deadline, size)
            self.stats.count_batch(len(commands))
            entry = encode_batch(self._wall_clock_ms(), commands)
            try:
                self._propose(entry, functools.partial(self._done, proposal_id))
            except Exception as exc:  # translate at the boundary; never kill the thread
                log.error("propose_failed", error=repr(exc))
                self._done(proposal_id, None, FAIL_REASON.MISSING_LEADER)

    def _next_batch(self) -> tuple[list[bytes], list[Future[Any]], int] | None:
        """Wait for a free slot and queued work; take as much as one entry may carry."""
        while True:
            self._expire()
            if not self._running:
                return None
            wait = 0.05
            if self._queue and len(self._inflight) < self._max_inflight:
                wait = self._due - time.monotonic()
                if wait <= 0:
                    break
            self._cond.wait(timeout=min(wait, 0.05))
        if self._window_s > 0 and len(self._queue) < self._max_commands:
            self._cond.wait(timeout=self._window_s)
        commands: list[bytes] = []
        futures: list[Future[Any]] = []
        size = 0
        while self._queue and len(commands) < self._max_commands:
            packed, future = self._queue[0]
            if commands and size + len(packed) > self._max_bytes:
                break
            self._queue.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            commands.append(packed)
            futures.append(future)
            size += len(packed)
        # What stays behind (past max_commands/max_bytes) leaves with the next free slot.
        self._due = 0.0 if self._queue else float("inf")
        if not commands:
            return self._next_batch()
        return commands, futures, size

    def _expire(self) -> None:
        now = time.monotonic()
        expired = [pid for pid, p in self._inflight.items() if p.deadline <= now]
        for pid in expired:
            proposal = self._inflight.pop(pid)
            self.stats.timeouts += 1
            for future in proposal.futures:
                _settle(future, exc=CommitTimeoutError(
                    f"not applied within {self._commit_timeout_s}s; it may still commit"))

    def _done(self, proposal_id: int, result: Any, reason: int) -> None:
        """PySyncObj's callback (tick thread): hand each caller its own result."""
        with self._cond:
            proposal = self._inflight.pop(proposal_id, None)
            self._cond.notify_all()
        if proposal is None:
            return  # already timed out or failed over
        if reason != FAIL_REASON.SUCCESS:
            exc = failure(reason)
            for future in proposal.futures:
                _settle(future, exc=exc)
            return
        if not isinstance(result, list) or len(result) != len(proposal.futures):
            exc2 = LeadershipLostError("entry applied without per-command results")
            for future in proposal.futures:
                _settle(future, exc=exc2)
            return
        for future, value in zip(proposal.futures, result, strict=True):
            _settle(future, value=value)


def _settle(future: Future[Any], value: Any = None, exc: BaseException | None = None) -> None:
    if future.done():
        return
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(value)
    except Exception:  # raced with another settle; the first one wins
        pass

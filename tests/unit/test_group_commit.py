"""GroupCommitter with a fake proposer: batching, per-caller results, failure mapping."""

from __future__ import annotations

import threading

import pytest
from pysyncobj import FAIL_REASON

from veristore_py.codec import decode_batch
from veristore_py.errors import (
    CommitTimeoutError,
    InvalidCommandError,
    LeadershipLostError,
    NoLeaderError,
)
from veristore_py.group_commit import BATCH_BOUNDS, GroupCommitter


class FakeRaft:
    """Holds proposals until `release()`; answers each command with its own key."""

    def __init__(self, reason=FAIL_REASON.SUCCESS):
        self.entries: list[bytes] = []
        self.pending = []
        self.reason = reason
        self.lock = threading.Lock()

    def propose(self, entry, callback):
        with self.lock:
            self.entries.append(entry)
            self.pending.append((entry, callback))

    def release(self):
        with self.lock:
            pending, self.pending = self.pending, []
        for entry, callback in pending:
            batch = decode_batch(entry)
            callback([{"ok": True, "key": c["key"]} for c in batch.commands]
                     if self.reason == FAIL_REASON.SUCCESS else None, self.reason)


def test_each_caller_gets_its_own_result_and_waiting_commands_share_an_entry():
    """With every slot busy, queued commands leave together in one entry."""
    raft = FakeRaft()
    gc = GroupCommitter(raft.propose, max_inflight=1, wall_clock_ms=lambda: 42)
    try:
        first = gc.submit({"op": "put", "key": b"k0"})
        while not raft.pending:
            threading.Event().wait(0.001)
        rest = [gc.submit({"op": "put", "key": b"k%d" % i}) for i in range(1, 50)]
        raft.release()
        assert first.result(5)["key"] == b"k0"
        while len(raft.entries) < 2:
            threading.Event().wait(0.001)
        raft.release()
        assert [f.result(5)["key"] for f in rest] == [b"k%d" % i for i in range(1, 50)]
        assert len(raft.entries) == 2 and decode_batch(raft.entries[1]).stamp_ms == 42
    finally:
        gc.close()


def test_batches_respect_command_limit():
    """No entry carries more than max_commands."""
    raft = FakeRaft()
    gc = GroupCommitter(raft.propose, max_inflight=1, max_commands=10)
    try:
        futures = [gc.submit({"op": "put", "key": b"k"}) for _ in range(35)]
        while not all(f.done() for f in futures):
            raft.release()
            threading.Event().wait(0.001)
        sizes = [len(decode_batch(e).commands) for e in raft.entries]
        assert max(sizes) <= 10
        # the batch-size histogram (exported as cache_plane_raft_entry_commands) saw each entry
        stats = gc.stats
        assert (stats.entries, stats.commands, sum(stats.batch_counts)) == (len(sizes), 35,
                                                                            len(sizes))
        assert stats.batch_counts[BATCH_BOUNDS.index(16)] == sum(1 for n in sizes if n > 8)
    finally:
        gc.close()


@pytest.mark.parametrize("reason, error", [
    (FAIL_REASON.MISSING_LEADER, NoLeaderError),
    (FAIL_REASON.DISCARDED, NoLeaderError),
    (FAIL_REASON.LEADER_CHANGED, LeadershipLostError),
])
def test_failures_map_to_definite_or_indefinite_errors(reason, error):
    """PySyncObj fail reasons become definite or indefinite errors as documented."""
    raft = FakeRaft(reason)
    gc = GroupCommitter(raft.propose)
    try:
        future = gc.submit({"op": "put", "key": b"k"})
        while not raft.pending:
            threading.Event().wait(0.001)
        raft.release()
        with pytest.raises(error):
            future.result(5)
    finally:
        gc.close()


def test_unanswered_proposal_times_out_as_indefinite():
    """A proposal with no answer fails with CommitTimeoutError (may still commit)."""
    raft = FakeRaft()
    gc = GroupCommitter(raft.propose, commit_timeout_s=0.1)
    try:
        future = gc.submit({"op": "put", "key": b"k"})
        with pytest.raises(CommitTimeoutError) as err:
            future.result(5)
        assert err.value.definite is False
    finally:
        gc.close()


def test_fail_all_settles_queued_and_inflight():
    """Losing leadership fails in-flight commands indefinitely and queued ones definitely."""
    raft = FakeRaft()
    gc = GroupCommitter(raft.propose, max_inflight=1)
    try:
        inflight = gc.submit({"op": "put", "key": b"a"})
        while not raft.pending:
            threading.Event().wait(0.001)
        queued = gc.submit({"op": "put", "key": b"b"})
        gc.fail_all(LeadershipLostError("lost"))
        with pytest.raises(LeadershipLostError):
            inflight.result(5)
        with pytest.raises(NoLeaderError):
            queued.result(5)
    finally:
        gc.close()


def test_unencodable_or_oversize_command_rejected_at_submit():
    """Commands that cannot be encoded or are too big never reach Raft."""
    raft = FakeRaft()
    gc = GroupCommitter(raft.propose, max_bytes=100)
    try:
        with pytest.raises(InvalidCommandError):
            gc.submit({"op": "put", "value": object()})
        with pytest.raises(InvalidCommandError):
            gc.submit({"op": "put", "value": b"x" * 200})
        assert raft.entries == []
    finally:
        gc.close()


def test_a_lingering_command_rides_along_with_the_next_eager_one():
    """A command in no hurry starts no entry of its own; an eager one takes it along."""
    raft = FakeRaft()
    gc = GroupCommitter(raft.propose, max_inflight=1, wall_clock_ms=lambda: 42)
    try:
        lazy = gc.submit({"op": "put", "key": b"lazy"}, linger_s=30.0)
        threading.Event().wait(0.05)
        assert not raft.entries  # it waits (up to 30 s) for company
        eager = gc.submit({"op": "put", "key": b"eager"})
        while not raft.pending:
            threading.Event().wait(0.001)
        raft.release()
        assert lazy.result(5)["key"] == b"lazy" and eager.result(5)["key"] == b"eager"
        assert len(raft.entries) == 1
        assert [c["key"] for c in decode_batch(raft.entries[0]).commands] == [b"lazy", b"eager"]
    finally:
        gc.close()


def test_a_lingering_command_alone_leaves_after_its_linger():
    """With no company, a lingering command is proposed on its own once its time is up."""
    raft = FakeRaft()
    gc = GroupCommitter(raft.propose, max_inflight=1)
    try:
        lazy = gc.submit({"op": "put", "key": b"alone"}, linger_s=0.02)
        while not raft.pending:
            threading.Event().wait(0.001)
        raft.release()
        assert lazy.result(5)["key"] == b"alone" and len(raft.entries) == 1
    finally:
        gc.close()

"""The stream tracker (pure): gaps replayed, lost history resynced, restarts detected.

A simulated engine publishes batches (one incarnation after another: a restart starts again
at seq 0), a lossy wire delivers some live, a replay buffer keeps the last few, and a model
of the replicated state applies the tracker's actions exactly as the state machine will
(skipping seqs at or below its watermark, refusing holes). Hypothesis drives the schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from cache_plane.kvevents.stream import Action, Apply, Replay, Resync, StreamTracker


def seqs(actions: list[Action], seq_of: Any) -> list[tuple[str, list[int]]]:
    """A readable form of `actions`: (kind, seqs or [start])."""
    out: list[tuple[str, list[int]]] = []
    for action in actions:
        if isinstance(action, Replay):
            out.append(("replay", [action.start]))
        elif isinstance(action, Resync):
            out.append((f"resync:{action.reason}", [seq_of(b) for b in action.batches]))
        else:
            out.append(("apply", [seq_of(b) for b in action.batches]))
    return out


@dataclass(frozen=True)
class B:
    incarnation: int
    seq: int


def seq_of(batch: B) -> int:
    return batch.seq


@dataclass
class Index:
    """The replicated state's view of the stream: its watermark and what it holds."""

    watermark: int = -1
    held: list[B] = field(default_factory=list)
    stale: bool = False

    def do(self, actions) -> None:
        for action in actions:
            if isinstance(action, Resync):
                self.held = []
                self.stale = not action.batches
                self.watermark = action.batches[0].seq - 1 if action.batches else -1
                self._apply(action.batches)
            elif isinstance(action, Apply):
                self._apply(action.batches)

    def _apply(self, batches) -> None:
        for b in batches:
            if b.seq <= self.watermark:
                continue  # exactly once: the machine skips what it applied
            assert b.seq == self.watermark + 1, f"hole: {self.watermark} then {b.seq}"
            self.watermark = b.seq
            self.held.append(b)
            self.stale = False


@dataclass
class Engine:
    buffer_size: int
    incarnation: int = 0
    published: list[B] = field(default_factory=list)

    def publish(self) -> B:
        batch = B(self.incarnation, len(self.published))
        self.published.append(batch)
        return batch

    def restart(self) -> None:
        self.incarnation += 1
        self.published = []

    def replay(self, start: int) -> list[B]:
        return [b for b in self.published[-self.buffer_size:] if b.seq >= start]


class Harness:
    def __init__(self, buffer_size: int, has_replay: bool = True) -> None:
        self.engine = Engine(buffer_size)
        self.tracker: StreamTracker[B] = StreamTracker(has_replay=has_replay, max_held=50)
        self.index = Index()
        self.pending: int | None = None

    def act(self, actions) -> None:
        self.index.do(actions)
        for action in actions:
            if isinstance(action, Replay):
                self.pending = action.start

    def run_replay(self, fail: bool = False) -> None:
        if self.pending is None:
            return
        start, self.pending = self.pending, None
        if fail:
            self.act(self.tracker.replay_failed())
            return
        for batch in self.engine.replay(start):
            self.act(self.tracker.replayed(batch.seq, batch))
            if self.pending is not None:  # superseded: the rest of this reply is dropped
                return
        self.act(self.tracker.replay_ended())

    def begin_and_deliver(self, n: int) -> None:
        """Subscribe (nothing buffered yet), then publish `n` batches, each delivered live."""
        self.act(self.tracker.start(-1))
        self.run_replay()
        for _ in range(n):
            batch = self.engine.publish()
            self.act(self.tracker.live(batch.seq, batch))

    def settle(self) -> None:
        for _ in range(20):
            if self.pending is None:
                return
            self.run_replay()
        raise AssertionError("replays never ended")


OPS = st.lists(st.one_of(
    st.tuples(st.just("publish"), st.booleans()),       # delivered live or dropped
    st.tuples(st.just("replay"), st.booleans()),        # the pending replay answers / fails
    st.tuples(st.just("restart"), st.just(True)),
    st.tuples(st.just("reconnect"), st.just(True)),
    st.tuples(st.just("idle"), st.just(True)),           # quiet: probe for a lost tail
), max_size=60)


@settings(max_examples=400, deadline=None)
@given(ops=OPS, buffer_size=st.integers(1, 30))
def test_at_quiescence_the_index_holds_a_contiguous_suffix_of_the_engines_history(
        ops, buffer_size):
    """Whatever the losses, restarts, replay failures and reconnects: never a hole, never an
    old incarnation's batch after a detected restart, and once every replay has answered and
    the last batch was delivered, the index holds the current incarnation's batches from
    some seq up to its last one (all of them if the replay buffer kept them and no replay
    failed)."""
    h = Harness(buffer_size)
    h.act(h.tracker.start(-1))
    restarted_unseen = False  # a restart whose first batch has not reached the tracker yet
    failed = False
    for op, flag in ops:
        if op == "publish":
            batch = h.engine.publish()
            delivered = flag or restarted_unseen  # a restart shows itself by its seq going back
            restarted_unseen = False
            if delivered:
                h.act(h.tracker.live(batch.seq, batch))
        elif op == "replay":
            failed |= not flag and h.pending is not None
            h.run_replay(fail=not flag)
        elif op == "restart":
            h.engine.restart()
            restarted_unseen = True
        elif op == "idle":
            h.act(h.tracker.idle())
        else:
            h.pending = None
            h.act(h.tracker.start(h.index.watermark))
    last = h.engine.publish()  # one more, delivered: then everything settles
    h.act(h.tracker.live(last.seq, last))
    h.settle()
    held = h.index.held
    assert held, "the last batch was delivered: the index cannot be empty"
    assert all(b.incarnation == h.engine.incarnation for b in held)
    assert [b.seq for b in held] == list(range(held[0].seq, last.seq + 1))
    if buffer_size > last.seq and not failed:  # the engine still buffers everything
        assert held[0].seq == 0


def test_a_quiet_stream_probes_for_a_lost_last_batch():
    h = Harness(buffer_size=100)
    h.begin_and_deliver(2)
    h.engine.publish()  # lost on the wire, and nothing comes after it
    actions = h.tracker.idle()
    assert seqs(actions, seq_of) == [("replay", [2])]
    h.act(actions)
    h.run_replay()
    assert [b.seq for b in h.index.held] == [0, 1, 2] and h.tracker.counters.probes == 1


def test_a_gap_is_replayed_and_the_held_batches_follow():
    h = Harness(buffer_size=100)
    h.act(h.tracker.start(-1))
    h.run_replay()  # nothing buffered yet
    batches = [h.engine.publish() for _ in range(5)]
    h.act(h.tracker.live(0, batches[0]))
    actions = h.tracker.live(3, batches[3])  # 1 and 2 lost on the wire
    assert seqs(actions, seq_of) == [("replay", [1])]
    h.act(actions)
    h.act(h.tracker.live(4, batches[4]))  # held while replaying
    h.run_replay()
    assert [b.seq for b in h.index.held] == [0, 1, 2, 3, 4]
    assert h.tracker.counters.gaps == 1 and h.tracker.counters.resyncs == 0


def test_history_the_engine_no_longer_buffers_is_a_resync():
    h = Harness(buffer_size=2)
    h.act(h.tracker.start(-1))
    h.run_replay()
    batches = [h.engine.publish() for _ in range(6)]
    h.act(h.tracker.live(0, batches[0]))
    h.act(h.tracker.live(5, batches[5]))  # 1..4 lost; the engine keeps only 4 and 5
    h.run_replay()
    assert [b.seq for b in h.index.held] == [4, 5]
    assert h.tracker.counters.resyncs == 1


def test_without_a_replay_socket_a_gap_resyncs_at_once_and_a_timeout_leaves_it_stale():
    h = Harness(buffer_size=10, has_replay=False)
    assert h.tracker.start(-1) == []
    batches = [h.engine.publish() for _ in range(4)]
    h.act(h.tracker.live(0, batches[0]))
    h.act(h.tracker.live(2, batches[2]))
    assert [b.seq for b in h.index.held] == [2]
    t: StreamTracker[B] = StreamTracker()
    index = Index()
    index.do(t.start(7))
    index.do(t.replay_failed())  # the replay socket does not answer
    assert index.stale and index.held == [] and t.phase == "stale"
    index.do(t.live(12, B(0, 12)))
    assert not index.stale and [b.seq for b in index.held] == [12]


def test_a_seq_that_goes_back_is_a_restart_rebuilt_from_the_new_history():
    h = Harness(buffer_size=100)
    h.begin_and_deliver(4)
    h.engine.restart()
    first = h.engine.publish()
    second = h.engine.publish()
    actions = h.tracker.live(second.seq, second)  # seq 1 < 3: the engine restarted
    assert seqs(actions, seq_of) == [("resync:restart", []), ("replay", [0])]
    h.act(actions)
    h.run_replay()
    assert [(b.incarnation, b.seq) for b in h.index.held] == [(1, 0), (1, 1)]
    assert first.seq == 0 and h.tracker.counters.restarts == 1


def test_a_reconnect_rebuilds_from_seq_0_when_the_engine_still_has_it():
    """After a new leader or a reconnect, the whole buffered history replaces the index's:
    right even if the engine restarted while nobody listened."""
    h = Harness(buffer_size=100)
    h.begin_and_deliver(3)
    h.engine.restart()  # unseen: no subscriber at the time
    for _ in range(5):
        h.engine.publish()
    actions = h.tracker.start(h.index.watermark)
    assert seqs(actions, seq_of) == [("replay", [0])]
    h.act(actions)
    h.run_replay()
    assert [(b.incarnation, b.seq) for b in h.index.held] == [(1, s) for s in range(5)]


def test_a_reconnect_continues_from_the_watermark_when_seq_0_is_gone():
    h = Harness(buffer_size=3)
    h.begin_and_deliver(6)
    h.engine.publish()
    h.act(h.tracker.start(h.index.watermark))
    h.run_replay()  # the buffer holds 4, 5, 6: 4 and 5 are skipped, 6 follows
    assert [b.seq for b in h.index.held] == list(range(7))
    assert h.tracker.counters.resyncs == 0

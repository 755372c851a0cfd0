"""What to do with one engine KV-event stream's batches: apply, hold, replay, resync. PURE.

One `StreamTracker` follows one stream: one engine process's data-parallel rank, whose
batches carry a sequence number that starts at 0 and goes up by one per batch (vLLM and
SGLang publish `[topic, seq, payload]` over ZMQ; a restarted engine starts again at 0 and
announces nothing). The tracker sees live batches and replayed ones and says what the shell
must do, as a list of actions:

- `Apply(batches)`: propose these batches, in order; they continue the stream.
- `Resync(batches, reason)`: clear the node's blocks, then apply these batches as the
  stream's new start. Reasons: ``rebuild`` (the engine still buffers its whole history, from
  seq 0: rebuild from it), ``restart`` (the engine's seq went back), ``gap`` (history that
  replay cannot give). With no batches, the node stays stale (no blocks) until one comes.
- `Replay(start)`: ask the engine's replay socket for every batch from `start` on (one replay
  at a time; answer with `replayed`, then `replay_ended` or `replay_failed`).

`start(applied)` begins a subscription: `applied` is the replicated state's watermark for the
stream (-1: none). Exactly-once does not rest on the tracker: the state machine skips any seq
at or below its watermark. The tracker's job is order and completeness: never apply a newer
batch before an older one it can still get, and clear what it cannot vouch for.

- **On start** (a new subscription: first connect, a new leader, a reconnect), with a replay
  socket, it replays from 0. If the engine still buffers seq 0, its whole history is there
  and the stream is rebuilt from it, which is right whether or not the engine restarted while
  nobody listened. Otherwise the replay is skipped up to the watermark and continues from it.
  Without a replay socket, the first live batch must follow the watermark.
- **Live batches**: ``seq == next`` is applied. ``seq > next``: batches were lost on the wire
  (ZMQ drops past its high-water mark; a subscriber misses what was sent before it joined):
  hold it and replay from `next`. ``seq < next`` is a duplicate only if it equals the batch
  applied under that seq (a replay gave it first; batches compare by value: the shell passes
  decoded batches with their timestamps). Otherwise, like a seq at or below the previous live
  one, it means the engine restarted: clear, and replay its new history from 0 (or start from
  this batch without a replay socket).
- **During a replay** live batches are held (at most `max_held`, else resync). Replayed
  batches below `next` are skipped; one above `next` (the engine no longer buffers what was
  asked, or a hole) means that history is gone: resync from it. At the end, held batches that
  follow are applied; a hole left between the replay and them is replayed again, at most
  `max_replays` times in a row, then resync from the held ones.
- **A failed replay** (timeout, no answer): resync from the oldest held batch, or stale.
- **An idle stream** (`idle()`, called by the shell when no live batch came for a while) asks
  a replay from `next`: batches lost at the end of a burst show no gap until another comes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

B = TypeVar("B")

LIVE = "live"
REPLAYING = "replaying"
STALE = "stale"  # history lost and nothing to resync from yet: waiting for a batch


@dataclass(frozen=True, slots=True)
class Apply(Generic[B]):
    batches: tuple[B, ...]


@dataclass(frozen=True, slots=True)
class Resync(Generic[B]):
    batches: tuple[B, ...]
    reason: str  # "gap" (history lost) or "restart" (the engine's seq went back)


@dataclass(frozen=True, slots=True)
class Replay:
    """Ask for every batch from `start` on. A new `Replay` supersedes the one under way: the
    shell drops what is left of the old reply (a socket per replay does that)."""

    start: int


Action = Apply[Any] | Resync[Any] | Replay


@dataclass(slots=True)
class StreamCounters:
    """What happened to a stream (for `GET /v1/nodes/{id}` and metrics)."""

    gaps: int = 0          # live batches found ahead of the next seq
    replays: int = 0       # replay requests made
    resyncs: int = 0       # history lost: blocks cleared, stream restarted from a later seq
    restarts: int = 0      # the engine's seq went back: blocks cleared
    duplicates: int = 0    # batches dropped as already applied or already given
    held_max: int = 0      # the most live batches held at once during a replay
    probes: int = 0        # replays asked because the stream was idle (a lost tail)


@dataclass(slots=True)
class StreamTracker(Generic[B]):
    """The ordering logic of one stream (see the module docstring). Batches are opaque."""

    has_replay: bool = True
    max_held: int = 10_000
    max_replays: int = 3
    recent_size: int = 4096         # applied batches remembered, to tell duplicates apart
    phase: str = STALE
    next: int = 0
    last_live: int | None = None    # the last live seq since `start`
    recent: dict[int, B] = field(default_factory=dict)
    probing: bool = False           # the replay under way is `start`'s replay from 0
    held: dict[int, B] = field(default_factory=dict)
    replays_in_a_row: int = 0
    counters: StreamCounters = field(default_factory=StreamCounters)

    # -- inputs ----------------------------------------------------------------------------

    def start(self, applied: int) -> list[Action]:
        """A new subscription; the replicated watermark is `applied` (-1: nothing yet)."""
        self.next = applied + 1
        self.last_live = None
        self.held.clear()
        self.recent.clear()
        self.replays_in_a_row = 0
        if self.has_replay:
            self.probing = True
            return self._replay(0)
        self.probing = False
        self.phase = LIVE
        return []

    def live(self, seq: int, batch: B) -> list[Action]:
        """A batch from the live (PUB) socket."""
        previous = self.last_live
        first = previous is None
        self.last_live = seq
        if previous is not None and seq <= previous:
            return self._restart(seq, batch)
        if seq < self.next:
            if self.recent.get(seq) != batch:  # not the batch applied under that seq
                return self._restart(seq, batch)
            self.counters.duplicates += 1
            return []
        if self.phase == REPLAYING:
            self.held[seq] = batch
            self.counters.held_max = max(self.counters.held_max, len(self.held))
            return self._lost() if len(self.held) > self.max_held else []
        if self.phase == STALE:
            return self._resync([batch], seq, "gap", count=False)
        if seq == self.next:
            return self._apply(batch)
        self.counters.gaps += 1
        if not self.has_replay:
            if first:  # after a reconnect: a restarted engine or lost batches, either way
                self.counters.restarts += 1
                return self._resync([batch], seq, "restart")
            return self._resync([batch], seq, "gap")
        self.held[seq] = batch
        return self._replay(self.next)

    def replayed(self, seq: int, batch: B) -> list[Action]:
        """A batch from the replay reply (ignored unless a replay is under way)."""
        if self.phase != REPLAYING:
            return []
        if self.probing:
            self.probing = False
            if seq == 0 and self.next > 0:  # the engine's whole history: rebuild from it
                self.next = 0
                self.recent.clear()
                return self._resync([batch], 0, "rebuild", drain=False)
        if seq < self.next:
            self.counters.duplicates += 1
            return []
        if seq == self.next:
            return self._apply(batch)
        # seq > next: the engine no longer has what came before it
        self.held = {s: b for s, b in self.held.items() if s > seq}
        return self._resync([batch], seq, "gap", drain=False)

    def idle(self) -> list[Action]:
        """No live batch for a while: replay from `next` in case the last ones were lost
        (a lost last batch shows no gap until the next one comes)."""
        if self.phase != LIVE or not self.has_replay:
            return []
        self.counters.probes += 1
        self.replays_in_a_row = 0
        self.phase = REPLAYING
        return [Replay(self.next)]

    def replay_ended(self) -> list[Action]:
        """The replay's end marker came: apply the held batches that follow."""
        if self.phase != REPLAYING:
            return []
        self.probing = False
        self.phase = LIVE
        return self._drain()

    def replay_failed(self) -> list[Action]:
        """The replay timed out or could not be asked: the history since `next` is gone."""
        if self.phase != REPLAYING:
            return []
        self.probing = False
        return self._lost()

    # -- internals -------------------------------------------------------------------------

    def _apply(self, batch: B) -> list[Action]:
        self._remember(self.next, batch)
        self.next += 1
        return [Apply((batch,))]

    def _remember(self, seq: int, batch: B) -> None:
        self.recent[seq] = batch
        if len(self.recent) >= 2 * self.recent_size:  # prune in bulk: O(1) per batch
            for old in [s for s in self.recent if s <= seq - self.recent_size]:
                del self.recent[old]

    def _replay(self, start: int) -> list[Action]:
        self.phase = REPLAYING
        self.replays_in_a_row += 1
        self.counters.replays += 1
        return [Replay(start)]

    def _restart(self, seq: int, batch: B) -> list[Action]:
        """The engine's seq went back: clear, then its new history (replayed from 0 if it can
        be, else from this batch)."""
        self.counters.restarts += 1
        self.probing = False
        self.replays_in_a_row = 0
        self.recent.clear()
        if not self.has_replay:
            self.held.clear()
            return self._resync([batch], seq, "restart")
        self.held = {seq: batch}
        self.next = 0
        return [Resync((), "restart"), *self._replay(0)]

    def _drain(self) -> list[Action]:
        for seq in [s for s in self.held if s < self.next]:
            del self.held[seq]
            self.counters.duplicates += 1
        if not self.held:
            self.replays_in_a_row = 0
            return []
        if min(self.held) > self.next:  # a hole between what replay gave and what is held
            if self.replays_in_a_row >= self.max_replays:
                return self._lost()
            return self._replay(self.next)
        self.replays_in_a_row = 0
        run = []
        while self.next in self.held:
            run.append(self.held.pop(self.next))
            self._remember(self.next, run[-1])
            self.next += 1
        return [Apply(tuple(run)), *(self._drain() if self.held else [])]

    def _lost(self) -> list[Action]:
        """History since `next` is unrecoverable: resync from the oldest held batch, or stale."""
        if not self.held:
            self.phase = STALE
            self.counters.resyncs += 1
            return [Resync((), "gap")]
        first = min(self.held)
        return self._resync([self.held.pop(first)], first, "gap")

    def _resync(self, batches: Sequence[B], seq: int, reason: str, count: bool = True,
                drain: bool = True) -> list[Action]:
        """Restart the stream at `seq` (the first of `batches`), then the held that follow
        (with `drain`; without, a replay under way goes on)."""
        if reason == "gap" and count:
            self.counters.resyncs += 1
        self.recent.clear()
        for i, batch in enumerate(batches):
            self._remember(seq + i, batch)
        self.next = seq + len(batches)
        self.replays_in_a_row = 0
        if not drain:
            return [Resync(tuple(batches), reason)]
        self.phase = LIVE
        return [Resync(tuple(batches), reason), *self._drain()]


"""Follow one engine KV-event stream over ZMQ: subscribe, replay, hand on in order (the shell).

A `StreamSubscriber` owns a SUB socket on the engine's publisher, a DEALER per replay on its
replay socket, and a `stream.StreamTracker`. Every live frame and every replayed batch is
decoded (`wire`) and given to the tracker; what the tracker decides (`Apply`, `Resync`) goes to
the `sink`, one action at a time and in order, and `Replay` starts a replay (a new one cancels
the one under way and closes its socket, so its late replies are never read). A stream quiet
for `idle_probe_s` asks a replay from its next seq: a lost last batch shows no gap otherwise.

The sink proposes to the cluster. It answers None, or the cluster's watermark for the stream
when it is not where the tracker thought (another ingester applied more, a leader changed):
the tracker then starts again from it. `watermark()` gives the cluster's watermark when the
subscription begins and after the publisher's connection comes back (a reconnect may hide an
engine restart: the tracker's start replays from 0 to find out).

Counters (`stats`): the tracker's, plus frames received, decode errors, events skipped by the
decoder, and lag: the time from a batch's engine timestamp to the sink's answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from . import wire
from .stream import Action, Apply, Replay, StreamTracker

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class StreamSource:
    """Where one stream comes from: a node's engine, one data-parallel rank."""

    node_id: str
    rank: int
    endpoint: str                      # the engine's PUB, e.g. tcp://10.0.0.5:5557
    replay_endpoint: str | None = None  # its ROUTER, e.g. tcp://10.0.0.5:5558
    topic: str = ""
    hash_form: str = "vllm"


Sink = Callable[[StreamSource, Action], Awaitable[int | None]]


@dataclass(slots=True)
class SubscriberStats:
    frames: int = 0
    decode_errors: int = 0
    skipped_events: int = 0
    reconnects: int = 0
    lag_ms: list[float] = field(default_factory=list)  # recent batches (bounded)


def merged(actions: list[Action]) -> list[Action]:
    """`actions` with consecutive `Apply`s joined into one (one command for the cluster)."""
    out: list[Action] = []
    for action in actions:
        if isinstance(action, Apply) and out and isinstance(out[-1], Apply):
            out[-1] = Apply(out[-1].batches + action.batches)
        else:
            out.append(action)
    return out


class StreamSubscriber:
    """One stream's subscription (see the module docstring). `run()` until cancelled."""

    LAG_SAMPLES = 1024

    def __init__(self, context: zmq.asyncio.Context, source: StreamSource, sink: Sink,
                 watermark: Callable[[], Awaitable[int]], *, hwm: int = 100_000,
                 replay_idle_s: float = 2.0, replay_total_s: float = 120.0,
                 max_held: int = 10_000, idle_probe_s: float = 2.0,
                 max_coalesce: int = 256) -> None:
        self.context = context
        self.source = source
        self.sink = sink
        self.watermark = watermark
        self.hwm = hwm
        self.replay_idle_s = replay_idle_s
        self.replay_total_s = replay_total_s
        self.idle_probe_s = idle_probe_s
        self.max_coalesce = max_coalesce
        self.tracker: StreamTracker[wire.Batch] = StreamTracker(
            has_replay=source.replay_endpoint is not None, max_held=max_held)
        self.stats = SubscriberStats()
        self._lock = asyncio.Lock()
        self._replay: asyncio.Task[None] | None = None

    # -- the live socket -------------------------------------------------------------------

    async def run(self) -> None:
        sub = self.context.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, self.hwm)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, self.source.topic.encode())
        monitor = sub.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        sub.connect(self.source.endpoint)
        poller = zmq.asyncio.Poller()
        poller.register(sub, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        disconnected = False
        try:
            await self._begin()
            while True:
                ready = dict(await poller.poll(timeout=int(self.idle_probe_s * 1000)))
                if not ready:  # quiet: ask for what may have been lost at the end of a burst
                    async with self._lock:
                        await self._do(self.tracker.idle())
                    continue
                if monitor in ready:
                    event = parse_monitor_message(await monitor.recv_multipart())
                    if event["event"] == zmq.EVENT_DISCONNECTED:
                        disconnected = True
                    elif event["event"] == zmq.EVENT_CONNECTED and disconnected:
                        disconnected = False
                        self.stats.reconnects += 1
                        log.info("kv_stream_reconnected", node=self.source.node_id,
                                 rank=self.source.rank)
                        await self._begin()
                if sub in ready:
                    # Everything already queued goes together: consecutive batches to apply
                    # travel in one command (up to `max_coalesce` frames).
                    async with self._lock:  # decide and carry out in one order
                        actions: list[Action] = []
                        for _ in range(self.max_coalesce):
                            try:
                                frames = await sub.recv_multipart(flags=zmq.NOBLOCK)
                            except zmq.Again:
                                break
                            actions += self._frame(frames)
                        await self._do(merged(actions))
        finally:
            if self._replay is not None:
                self._replay.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._replay
            sub.disable_monitor()
            monitor.close(linger=0)
            sub.close(linger=0)

    def _frame(self, frames: list[bytes]) -> list[Action]:
        """One live frame, decoded and given to the tracker (the caller holds the lock)."""
        self.stats.frames += 1
        try:
            batch = wire.decode_frames(frames, self.source.hash_form)
        except wire.WireError as exc:
            self.stats.decode_errors += 1
            log.warning("kv_event_frame_refused", node=self.source.node_id,
                        rank=self.source.rank, error=str(exc))
            return []  # its seq is then a gap: replay brings it, or a resync
        self.stats.skipped_events += batch.skipped
        return self.tracker.live(batch.seq, batch)

    async def _begin(self) -> None:
        applied = await self.watermark()
        async with self._lock:
            await self._do(self.tracker.start(applied))

    # -- actions ---------------------------------------------------------------------------

    async def _do(self, actions: list[Action]) -> None:
        """Carry out `actions` in order (the caller holds the lock)."""
        for action in actions:
            if isinstance(action, Replay):
                self._start_replay(action.start)
                continue
            restart_at = await self.sink(self.source, action)
            self._lag(action)
            if restart_at is not None:  # the cluster's stream is elsewhere: follow it
                log.info("kv_stream_watermark_moved", node=self.source.node_id,
                         rank=self.source.rank, watermark=restart_at)
                await self._do(self.tracker.start(restart_at))
                return

    def _lag(self, action: Action) -> None:
        batches = getattr(action, "batches", ())
        if batches:
            lag = (time.time() - batches[0].ts) * 1000  # the oldest: the worst case
            samples = self.stats.lag_ms
            samples.append(lag)
            if len(samples) > self.LAG_SAMPLES:
                del samples[:len(samples) - self.LAG_SAMPLES]

    # -- replays ---------------------------------------------------------------------------

    def _start_replay(self, start: int) -> None:
        if self._replay is not None and not self._replay.done():
            self._replay.cancel()
        self._replay = asyncio.get_running_loop().create_task(self._run_replay(start))

    async def _run_replay(self, start: int) -> None:
        """Ask the replay socket for every batch from `start`; feed the tracker what comes."""
        assert self.source.replay_endpoint is not None
        dealer = self.context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        deadline = time.monotonic() + self.replay_total_s
        try:
            dealer.connect(self.source.replay_endpoint)
            await dealer.send_multipart(wire.replay_request(start))
            while True:
                wait = min(self.replay_idle_s, deadline - time.monotonic())
                if wait <= 0:
                    raise TimeoutError
                frames = await asyncio.wait_for(dealer.recv_multipart(), wait)
                async with self._lock:
                    if asyncio.current_task() is not self._replay:
                        return  # superseded while waiting for the lock
                    # What already arrived goes together: one command for many batches.
                    actions: list[Action] = []
                    ended = False
                    for i in range(self.max_coalesce):
                        if i:
                            try:
                                frames = await dealer.recv_multipart(flags=zmq.NOBLOCK)
                            except zmq.Again:
                                break
                        try:
                            batch = wire.parse_replay_reply(frames, self.source.hash_form)
                        except wire.WireError:
                            await self._do(merged(actions))  # what was decided, then fail
                            raise
                        if batch is None:
                            actions += self.tracker.replay_ended()
                            ended = True
                            break
                        self.stats.skipped_events += batch.skipped
                        actions += self.tracker.replayed(batch.seq, batch)
                    await self._do(merged(actions))
                    if ended:
                        return
        except (TimeoutError, wire.WireError, zmq.ZMQError) as exc:
            log.warning("kv_stream_replay_failed", node=self.source.node_id,
                        rank=self.source.rank, start=start, error=repr(exc))
            async with self._lock:
                if asyncio.current_task() is self._replay:
                    await self._do(self.tracker.replay_failed())
        finally:
            dealer.close(linger=0)

    def snapshot(self) -> dict[str, Any]:
        """The stream's counters and state, for the node's view and metrics."""
        c = self.tracker.counters
        lag = sorted(self.stats.lag_ms)
        return {"node_id": self.source.node_id, "rank": self.source.rank,
                "phase": self.tracker.phase, "next_seq": self.tracker.next,
                "frames": self.stats.frames, "decode_errors": self.stats.decode_errors,
                "skipped_events": self.stats.skipped_events,
                "reconnects": self.stats.reconnects, "gaps": c.gaps, "replays": c.replays,
                "resyncs": c.resyncs, "restarts": c.restarts, "duplicates": c.duplicates,
                "idle_probes": c.probes,
                "lag_ms_p50": lag[len(lag) // 2] if lag else None,
                "lag_ms_p99": lag[min(len(lag) - 1, int(len(lag) * 0.99))] if lag else None}

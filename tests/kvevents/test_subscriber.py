"""The ZMQ subscriber against the sim-node's real publisher (real PUB/ROUTER sockets).

The sink is a model of the replicated state (exactly once per seq, refusing holes, clearing
on resync); each test ends when the model holds what the engine published, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
import zmq.asyncio

from cache_plane.kvevents import wire
from cache_plane.kvevents.stream import Apply, Resync
from cache_plane.kvevents.subscriber import StreamSource, StreamSubscriber
from cache_plane.sim.kv_publisher import KVEventPublisher, KVEventsSettings, block_stored
from veristore_py.localcluster import free_ports


class Model:
    """What the cluster would hold for the stream: batches applied since the last clear."""

    def __init__(self) -> None:
        self.watermark = -1
        self.seqs: list[int] = []
        self.hashes: list[int] = []
        self.resyncs: list[str] = []

    async def sink(self, source: StreamSource, action) -> int | None:
        if isinstance(action, Resync):
            self.resyncs.append(action.reason)
            self.seqs, self.hashes = [], []
            self.watermark = action.batches[0].seq - 1 if action.batches else -1
        assert isinstance(action, Apply | Resync)
        for batch in action.batches:
            if batch.seq <= self.watermark:
                continue
            assert batch.seq == self.watermark + 1, (self.watermark, batch.seq)
            self.watermark = batch.seq
            self.seqs.append(batch.seq)
            for event in batch.events:
                assert isinstance(event, wire.Stored)
                self.hashes.extend(event.block_hashes)
        return None

    async def mark(self) -> int:
        return self.watermark


def store(i: int, layout: str = "array") -> list:
    return [block_stored(layout, [1000 + i], None, list(range(4)), 4)]


@contextlib.contextmanager
def publisher(**overrides):
    pub_port, replay_port = free_ports(2)
    settings = KVEventsSettings(endpoint=f"tcp://127.0.0.1:{pub_port}",
                                replay_endpoint=f"tcp://127.0.0.1:{replay_port}", **overrides)
    with KVEventPublisher(settings) as pub:
        yield pub, settings


async def follow(settings: KVEventsSettings, model: Model, body, replay: bool = True,
                 **kwargs) -> StreamSubscriber:
    context = zmq.asyncio.Context()
    source = StreamSource("gpu0", 0, settings.endpoint,
                          settings.replay_endpoint if replay else None, settings.topic)
    subscriber = StreamSubscriber(context, source, model.sink, model.mark, **kwargs)
    task = asyncio.create_task(subscriber.run())
    try:
        await asyncio.sleep(0.3)  # the SUB's handshake (what it misses, replay brings)
        await body()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        context.term()
    return subscriber


async def until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("layout,framing", [("array", "v025"), ("map", "v026")])
async def test_batches_before_the_subscription_and_lost_live_ones_are_replayed(layout, framing):
    with publisher(layout=layout, replay_framing=framing) as (pub, settings):
        for i in range(3):  # published before anyone listens: only replay has them
            pub.publish(store(i, layout))
        pub.sync()
        model = Model()

        async def body() -> None:
            pub.drop_live(2)  # 3 and 4 never arrive live
            for i in range(3, 8):
                pub.publish(store(i, layout))
            await until(lambda: model.watermark == 7)

        sub = await follow(settings, model, body)
    assert model.seqs == list(range(8)) and model.hashes == [1000 + i for i in range(8)]
    assert sub.tracker.counters.gaps >= 1 and not model.resyncs


async def test_history_the_engine_evicted_is_a_resync_from_what_it_still_has():
    with publisher(buffer_steps=2) as (pub, settings):
        model = Model()

        async def body() -> None:
            pub.publish(store(0))
            await until(lambda: model.watermark == 0)
            pub.drop_live(4)  # 1..4 lost live; the engine keeps only the last 2 batches
            for i in range(1, 6):
                pub.publish(store(i))
            await until(lambda: model.watermark == 5)

        await follow(settings, model, body)
    assert model.resyncs == ["gap"] and model.seqs == [4, 5]


async def test_an_engine_restart_clears_and_rebuilds_from_its_new_history():
    with publisher() as (pub, settings):
        model = Model()

        async def body() -> None:
            for i in range(4):
                pub.publish(store(i))
            await until(lambda: model.watermark == 3)
            pub.restart()  # seq back to 0, buffer emptied
            pub.publish(store(100))
            pub.publish(store(101))
            await until(lambda: model.hashes == [1100, 1101])

        sub = await follow(settings, model, body)
    assert "restart" in model.resyncs and model.seqs == [0, 1]
    assert sub.tracker.counters.restarts == 1


async def test_without_a_replay_socket_a_gap_resyncs_from_the_next_batch():
    with publisher() as (pub, settings):
        model = Model()

        async def body() -> None:
            pub.publish(store(0))
            await until(lambda: model.watermark == 0)
            pub.drop_live(2)
            for i in range(1, 5):
                pub.publish(store(i))
            await until(lambda: model.watermark == 4)

        await follow(settings, model, body, replay=False)
    assert model.resyncs == ["gap"] and model.seqs == [3, 4]


async def test_a_replay_that_never_answers_times_out_and_leaves_the_node_stale():
    with publisher() as (pub, settings):
        dead = f"tcp://127.0.0.1:{free_ports(1)[0]}"  # nothing listens: no answer
        model = Model()
        settings = KVEventsSettings(endpoint=settings.endpoint, replay_endpoint=dead)

        async def body() -> None:
            await until(lambda: model.resyncs == ["gap"])  # start's replay timed out
            pub.publish(store(0))
            await until(lambda: model.watermark == 0)

        sub = await follow(settings, model, body, replay_idle_s=0.3)
    assert model.seqs == [0] and sub.tracker.phase == "live"


async def test_a_slow_consumer_dropped_at_the_high_water_mark_catches_up_by_replay():
    """ZMQ drops what a slow subscriber cannot take (its high-water mark): gaps, replayed."""
    with publisher(hwm=4) as (pub, settings):
        model = Model()
        slow_sink = model.sink

        async def sink(source, action):
            await asyncio.sleep(0.002)  # a cluster that commits slower than the engine publishes
            return await slow_sink(source, action)

        model.sink = sink  # type: ignore[method-assign]

        async def body() -> None:
            for i in range(300):
                pub.publish(store(i))
            await until(lambda: model.watermark == 299, timeout=30)

        sub = await follow(settings, model, body, hwm=4)
    assert model.seqs == list(range(300)) and not model.resyncs, (model.resyncs, sub.snapshot())
    assert sub.stats.frames < 300  # some were dropped; a gap or, if the drops ran to the
    assert sub.tracker.counters.gaps + sub.tracker.counters.probes >= 1  # end, a probe


async def test_an_ingester_killed_mid_stream_resumes_without_loss_or_double_apply():
    """A subscriber cancelled mid-stream (its process died) and a new one from the cluster's
    watermark: every batch once, in order (the new one rebuilds from seq 0, still buffered)."""
    with publisher() as (pub, settings):
        model = Model()

        async def first() -> None:
            for i in range(50):
                pub.publish(store(i))
            await until(lambda: model.watermark >= 20)

        await follow(settings, model, first)  # killed here, maybe mid-batch
        for i in range(50, 100):  # published while no ingester runs
            pub.publish(store(i))
        pub.sync()

        async def second() -> None:
            await until(lambda: model.watermark == 99)

        await follow(settings, model, second)
    assert model.seqs == list(range(100))
    assert model.hashes == [1000 + i for i in range(100)]

"""Engine KV-event streams into the replicated state, run by the cluster's leader (the shell).

Every member runs an `Ingester`; only the current leader (caught up, with a quorum lease)
subscribes. Once a second it compares the streams it runs with the ones registered nodes name
(`kv_events` in `POST /v1/nodes`: one stream per data-parallel rank) and starts or stops
`StreamSubscriber`s to match; a member that stops leading stops them all. A subscriber that
fails (the cluster refused a proposal, the leader changed) is started again on the next pass.

Each subscriber's decisions become `cp.kv_batches` commands: `Apply` batches with
``contiguous`` (split so one command stays well under the entry size limit), `Resync` with its
reason (gap, restart, rebuild). Exactly once holds whoever proposes: the replicated state keeps
each stream's watermark and skips what it already applied, so a new leader, or a proposal
retried after a lost answer, never applies a batch twice. A new leader's subscribers start
from the replicated watermark and replay from 0 (docs/kv_events.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import structlog
import zmq.asyncio

from veristore_py.errors import VeristoreError

from .. import commands
from ..errors import CachePlaneError
from ..model import KVSource
from . import wire
from .stream import Action, Replay, Resync
from .subscriber import StreamSource, StreamSubscriber

if TYPE_CHECKING:
    from ..service import CachePlaneService

log = structlog.get_logger(__name__)

# One command's share of a long replay: far below the group committer's entry size limit.
MAX_BATCHES_PER_COMMAND = 512
MAX_HASHES_PER_COMMAND = 32_768
_TCP = re.compile(r"^(tcp://.*:)(\d+)$")


def rank_endpoint(endpoint: str, rank: int) -> str:
    """Rank `rank`'s address: vLLM binds rank r on the port + r (other transports: ``_dp<r>``)."""
    if rank == 0:
        return endpoint
    match = _TCP.match(endpoint)
    if match:
        return f"{match.group(1)}{int(match.group(2)) + rank}"
    return f"{endpoint}_dp{rank}"


def sources(node_id: str, source: KVSource) -> Iterator[StreamSource]:
    for rank in range(source.ranks):
        yield StreamSource(node_id, rank, rank_endpoint(source.endpoint, rank),
                           rank_endpoint(source.replay_endpoint, rank)
                           if source.replay_endpoint else None,
                           source.topic, source.hash_form)


def event_body(event: wire.Event) -> dict[str, Any]:
    """A decoded event as `cp.kv_batches` takes it."""
    if isinstance(event, wire.Stored):
        return {"type": "stored", "block_hashes": list(event.block_hashes), "tier": event.tier}
    if isinstance(event, wire.Removed):
        return {"type": "removed", "block_hashes": list(event.block_hashes),
                "tier": event.tier}
    return {"type": "cleared"}


def chunks(batches: tuple[wire.Batch, ...]) -> Iterator[list[list[Any]]]:
    """`batches` as `cp.kv_batches` bodies, in commands of bounded size."""
    chunk: list[list[Any]] = []
    hashes = 0
    for batch in batches:
        size = sum(len(getattr(e, "block_hashes", ())) for e in batch.events)
        if chunk and (len(chunk) >= MAX_BATCHES_PER_COMMAND
                      or hashes + size > MAX_HASHES_PER_COMMAND):
            yield chunk
            chunk, hashes = [], 0
        chunk.append([batch.seq, max(int(batch.ts * 1000), 0),
                      [event_body(e) for e in batch.events]])
        hashes += size
    yield chunk


class Ingester:
    """Subscribes to the registered engines' KV-event streams while this member leads."""

    def __init__(self, service: CachePlaneService, interval_s: float = 1.0,
                 **subscriber_options: Any) -> None:
        self.service = service
        self.interval_s = interval_s
        self.options = subscriber_options
        self.running: dict[tuple[str, int], tuple[StreamSource, StreamSubscriber,
                                                  asyncio.Task[None]]] = {}
        self.reported: dict[tuple[str, int], tuple[int, int]] = {}
        self.context: zmq.asyncio.Context | None = None

    async def run(self) -> None:
        self.context = zmq.asyncio.Context()
        try:
            while True:
                try:
                    self.reconcile()
                except Exception as exc:  # never let one bad pass end ingestion
                    log.error("kv_ingest_reconcile_failed", error=repr(exc))
                await asyncio.sleep(self.interval_s)
        finally:
            await self.stop_all()
            self.context.term()

    def wanted(self) -> dict[tuple[str, int], StreamSource]:
        node = self.service.node
        if not (node.is_leader() and node.has_quorum_lease() and node.leader_caught_up()):
            return {}
        registered = node.store.view(lambda m: [
            (rec.id, rec.kv_source) for rec in m.nodes.values()
            if rec.kv_source is not None and rec.state != "down"])
        return {(s.node_id, s.rank): s for node_id, kv in registered
                for s in sources(node_id, kv)}

    def reconcile(self) -> None:
        """Start and stop subscribers so they match `wanted` (restart the ones that ended)."""
        wanted = self.wanted()
        for key, (source, _, task) in list(self.running.items()):
            if wanted.get(key) != source or task.done():
                if task.done() and not task.cancelled() and task.exception() is not None:
                    log.warning("kv_stream_subscriber_ended", node=key[0], rank=key[1],
                                error=repr(task.exception()))
                task.cancel()
                del self.running[key]
        assert self.context is not None
        for key, source in wanted.items():
            if key not in self.running:
                subscriber = StreamSubscriber(self.context, source, self.sink,
                                              self._watermark(source), **self.options)
                self.reported[key] = (0, 0)
                task = asyncio.get_running_loop().create_task(subscriber.run())
                self.running[key] = (source, subscriber, task)

    async def stop_all(self) -> None:
        tasks = [task for _, _, task in self.running.values()]
        self.running.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _watermark(self, source: StreamSource) -> Any:
        async def watermark() -> int:
            def read(m: Any) -> int:
                rec = m.nodes.get(source.node_id)
                return -1 if rec is None else int(rec.watermark(source.rank))
            return int(self.service.node.store.view(read))
        return watermark

    async def sink(self, source: StreamSource, action: Action) -> int | None:
        """Propose `action` as `cp.kv_batches`; the watermark if the cluster's differs."""
        key = (source.node_id, source.rank)
        entry = self.running.get(key)
        gaps = replays = 0
        if entry is not None:  # what the subscriber saw since the last report
            counters = entry[1].tracker.counters
            before = self.reported.get(key, (0, 0))
            gaps, replays = counters.gaps - before[0], counters.replays - before[1]
            self.reported[key] = (counters.gaps, counters.replays)
        assert not isinstance(action, Replay)
        resync = action.reason if isinstance(action, Resync) else None
        for i, body in enumerate(chunks(action.batches)):
            try:
                out = await self.service.submit(commands.kv_batches(
                    source.node_id, source.rank, body, resync=resync if i == 0 else None,
                    contiguous=True, gaps=gaps if i == 0 else 0,
                    replays=replays if i == 0 else 0))
            except (VeristoreError, CachePlaneError) as exc:
                raise RuntimeError(f"cp.kv_batches for {source.node_id}/{source.rank} "
                                   f"refused: {getattr(exc, 'detail', exc)}") from exc
            if out.get("gap_at") is not None:
                return int(out["watermark"])
        return None

    def snapshots(self) -> list[dict[str, Any]]:
        """What this member's subscribers see (empty unless it leads)."""
        return [subscriber.snapshot() for _, subscriber, _ in self.running.values()]

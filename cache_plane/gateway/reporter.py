"""Completion reports to the cluster, batched (the gateway's `Reporter`)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import structlog

from veristore_py.errors import VeristoreError

if TYPE_CHECKING:
    from .app import Gateway

log = structlog.get_logger(__name__)


class Reporter:
    """Completion reports queued and sent together in `/v1/complete/batch` requests.

    A report waits at most `interval_s` (plus the batches before it); at most `MAX_BATCH` go
    in one request. A batch the cluster does not take (unavailable, no leader within the
    client's retries) is counted failed and dropped, like a single report was before: the
    route then ends by its TTL and the engine's KV events keep the index true.
    """

    MAX_BATCH = 256

    def __init__(self, gateway: Gateway, interval_s: float) -> None:
        self.gateway = gateway
        self.interval_s = interval_s
        self.queue: list[dict[str, Any]] = []
        self.sent = 0
        self.failed = 0
        self._task: asyncio.Task[None] | None = None

    def put(self, report: dict[str, Any]) -> None:
        self.queue.append(report)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        await asyncio.sleep(self.interval_s)
        while self.queue:
            batch = self.queue[:self.MAX_BATCH]
            del self.queue[:self.MAX_BATCH]
            await self._send(batch)

    async def _send(self, batch: list[dict[str, Any]]) -> None:
        cluster = self.gateway.cluster
        assert cluster is not None
        failed = 0
        try:
            results = await cluster.complete_batch(batch)
        except VeristoreError as exc:
            failed = len(batch)
            log.warning("completion_reports_failed", reports=len(batch), error=exc.detail)
        else:
            for report, result in zip(batch, results, strict=False):
                if "error" in result:
                    failed += 1
                    log.warning("completion_report_refused", request_id=report["request_id"],
                                error=result["error"])
        self.sent += len(batch) - failed
        self.failed += failed
        self.gateway.metrics.reports_sent.inc(len(batch) - failed)
        if failed:
            self.gateway.metrics.reports_failed.inc(failed)

    async def drain(self) -> None:
        """Send what is queued now (at shutdown)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self.queue:
            batch = self.queue[:self.MAX_BATCH]
            del self.queue[:self.MAX_BATCH]
            await self._send(batch)

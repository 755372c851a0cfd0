"""Run one veristore node process: Raft node + HTTP API until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import structlog
from aiohttp import web

from .api import create_app
from .config import NodeSettings
from .logs import configure_logging
from .node import VeristoreNode
from .state import Machine

log = structlog.get_logger(__name__)

AppFactory = Callable[[VeristoreNode, NodeSettings, "str | None"], web.Application]


async def run_node(settings: NodeSettings, node: VeristoreNode, app: web.Application) -> None:
    """Serve `app` on the settings' HTTP address until a stop signal, then stop cleanly."""
    host, _, port = settings.http_address.rpartition(":")
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host.strip("[]"), int(port), reuse_address=True)
    await site.start()
    log.info("node_started", raft=settings.raft_address, http=settings.http_address,
             peers=[p.raft for p in settings.peers])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("node_stopping")
    # Finish in-flight HTTP requests first (they may be waiting on commits), then stop Raft.
    await runner.shutdown()
    await runner.cleanup()
    await asyncio.to_thread(node.stop)
    log.info("node_stopped")


def serve(settings: NodeSettings, app_factory: AppFactory = create_app,
          machine: Machine | None = None) -> None:
    """Start a node with `settings` (and `machine`) and block until it is told to stop."""
    configure_logging(settings.log_format, settings.log_level, node=settings.raft_address)
    node = VeristoreNode(settings, machine)
    app = app_factory(node, settings, settings.resolved_api_token())
    try:
        asyncio.run(run_node(settings, node, app))
    finally:
        node.stop()

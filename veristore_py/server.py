"""Run one veristore node process: Raft node + HTTP API until SIGTERM/SIGINT.

A stop signal shuts the node down in an order that keeps the cluster answering:

1. stop accepting HTTP connections and let in-flight requests finish (they may be waiting
   for their commit; at most `commit_timeout_s` + `DRAIN_GRACE_S`, then they are cancelled);
2. if this node leads, hand leadership to a caught-up follower (PySyncObj's TimeoutNow, at
   most `HANDOVER_TIMEOUT_S`), so the others do not wait out an election timeout;
3. stop Raft, wait for a snapshot being written, close LMDB; the process exits 0.

All of it stays inside the systemd unit's `TimeoutStopSec` (30 s).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable

import structlog
from aiohttp import web

from .api import create_app
from .config import NodeSettings
from .errors import VeristoreError
from .logs import configure_logging
from .node import VeristoreNode
from .state import Machine
from .tick import run_on_tick
from .tls import server_context

log = structlog.get_logger(__name__)

DRAIN_GRACE_S = 2.0
# An idle kept-alive connection is closed after this long (aiohttp's own default is an hour);
# a request may carry at most this many headers, each line at most 8 KiB (aiohttp's limit).
KEEPALIVE_TIMEOUT_S = 75.0
MAX_HEADERS = 64
HANDOVER_TIMEOUT_S = 3.0

AppFactory = Callable[[VeristoreNode, NodeSettings], web.Application]


async def run_node(settings: NodeSettings, node: VeristoreNode, app: web.Application) -> None:
    """Serve `app` on the settings' HTTP address until a stop signal, then stop cleanly."""
    host, _, port = settings.http_address.rpartition(":")
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           shutdown_timeout=settings.commit_timeout_s + DRAIN_GRACE_S,
                           keepalive_timeout=KEEPALIVE_TIMEOUT_S, max_headers=MAX_HEADERS)
    await runner.setup()
    ssl_context = None
    if settings.tls_cert_file and settings.tls_key_file:
        ssl_context = server_context(settings.tls_cert_file, settings.tls_key_file,
                                     settings.tls_client_ca_file)
    site = web.TCPSite(runner, host.strip("[]"), int(port), reuse_address=True,
                       ssl_context=ssl_context)
    await site.start()
    warn_if_insecure(settings)
    warn_about_secret_files(settings)
    log.info("node_started", raft=settings.raft_address, http=settings.http_address,
             scheme=settings.http_scheme, mtls=bool(settings.tls_client_ca_file),
             token_roles=settings.resolved_tokens().roles(),
             peers=[p.raft for p in settings.peers])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("node_stopping", leader=node.is_leader())
    await runner.cleanup()  # stop accepting, finish in-flight requests, app cleanup
    await hand_over_leadership(node, HANDOVER_TIMEOUT_S)
    await asyncio.to_thread(node.stop)
    log.info("node_stopped")


def warn_about_secret_files(settings: NodeSettings) -> None:
    """Say so when a file holding a secret can be read by other users (install.sh makes them
    0400; this is a warning, not a refusal, so a development setup still starts)."""
    for name in ("password_file", "api_token_file", "tokens_file", "tls_key_file"):
        warn_if_readable_by_others(name, getattr(settings, name))


def warn_if_readable_by_others(setting: str, path: str | None) -> None:
    """Warn when the secret file `path` (named by `setting`) is open to group or others."""
    try:
        mode = os.stat(path).st_mode if path else 0
    except OSError:
        return
    if mode & 0o077:
        log.warning("secret_file_readable_by_others", setting=setting, path=path,
                    mode=oct(mode & 0o777), hint="chmod 0400 (docs/security.md)")


def warn_if_insecure(settings: NodeSettings) -> None:
    """Say loudly, at every start, what an `insecure` member leaves open."""
    if not settings.insecure:
        return
    open_parts = [part for part, missing in (
        ("plain HTTP (no TLS)", not settings.tls_cert_file),
        ("no bearer tokens: anyone who reaches it may read and change everything",
         not settings.resolved_tokens())) if missing]
    if open_parts:
        log.warning("INSECURE_MEMBER", http=settings.http_address, open=open_parts,
                    hint="insecure = true in the config; see docs/security.md")


async def hand_over_leadership(node: VeristoreNode, timeout: float) -> str | None:
    """If this node leads, make a caught-up follower leader; return its Raft address.

    Asks PySyncObj's TimeoutNow transfer (most caught-up connected follower) every 50 ms
    until another member leads or `timeout` passes. None when this node does not lead, has
    no connected follower, or nobody took over in time (then the others elect a leader
    after an election timeout, as after a crash).
    """
    if not node.is_leader():
        return None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    me = node.settings.raft_address
    while loop.time() < deadline:
        if not node.is_leader():
            leader = node.leader_address()
            if leader is not None and leader != me:
                log.info("leadership_handed_over", new_leader=leader, term=node.term)
                return leader
        elif not node.peers_connected():
            return None
        else:
            try:  # transferLeadership sends on the transport: only from the tick thread
                await run_on_tick(node, node.transfer_leadership,
                                  timeout=max(0.1, deadline - loop.time()))
            except VeristoreError:
                return None
        await asyncio.sleep(0.05)
    log.warning("leadership_handover_timed_out", timeout_s=timeout)
    return None


def serve(settings: NodeSettings, app_factory: AppFactory = create_app,
          machine: Machine | None = None) -> None:
    """Start a node with `settings` (and `machine`) and block until it is told to stop."""
    configure_logging(settings.log_format, settings.log_level, node=settings.raft_address)
    node = VeristoreNode(settings, machine)
    try:
        app = app_factory(node, settings)
        asyncio.run(run_node(settings, node, app))
    finally:
        node.stop()

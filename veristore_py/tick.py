"""Run a function in PySyncObj's tick thread and await its result from asyncio.

PySyncObj keeps its Raft state (log, applied index, match indexes, transport) in one thread,
the tick thread, and touches it without locks. Anything that must read that state as one
consistent picture (the applied index together with the log entries at it) or call a method
that sends on the transport (`transferLeadership`) runs there, through an on-tick callback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Future
from typing import Protocol, TypeVar

from .errors import NoLeaderError

T = TypeVar("T")


class TickThread(Protocol):
    """What owns a tick thread (the node: `VeristoreNode.add_tick_callback`)."""

    def add_tick_callback(self, callback: Callable[[], None]) -> None: ...

    def remove_tick_callback(self, callback: Callable[[], None]) -> None: ...


async def run_on_tick(node: TickThread, fn: Callable[[], T], timeout: float = 5.0) -> T:
    """Run `fn()` once in `node`'s tick thread and return what it returns (or raise it).

    Raises NoLeaderError (definite: `fn` did not run) if no tick ran it within `timeout`.
    `fn` must be quick: heartbeats wait while it runs.
    """
    future: Future[T] = Future()

    def callback() -> None:
        if future.running() or future.done() or not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed to the awaiting side
            future.set_exception(exc)

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    node.add_tick_callback(callback)
    try:
        while not future.done():
            if loop.time() > deadline and future.cancel():
                raise NoLeaderError("the Raft tick thread did not answer in time")
            await asyncio.sleep(0.005)
        return future.result()
    finally:
        # Not from inside the callback: PySyncObj holds its callback lock while calling it.
        node.remove_tick_callback(callback)

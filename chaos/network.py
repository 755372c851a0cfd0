"""Per-link TCP proxies for network partitions without root (no namespaces, no iptables).

`LocalCluster(proxy_links=True)` routes each Raft connection between two members through an
address of its own (`cluster.links`). `Network` listens on those addresses and forwards to
the members. `cut(links)` turns links into black holes: bytes already in flight and any sent
later are dropped silently, new connections are accepted and then ignored, as a partitioned
network would; the members notice only through their own timeouts. `heal()` closes whatever
the cut touched (those byte streams lost data, so they cannot resume) and forwards again;
PySyncObj reconnects on its own.

The proxies run on their own event loop in a daemon thread, so a busy client loop in the
harness cannot delay Raft traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Iterable

from veristore_py.localcluster import Link


class _Pipe:
    """One proxied connection (both directions) on a link."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.writers: list[asyncio.StreamWriter] = []
        self.tainted = False  # bytes were dropped: the stream cannot be resumed


class Network:
    """Start proxies for `links`; `cut`/`heal` them from any thread. Use as a context manager."""

    def __init__(self, links: Iterable[Link]) -> None:
        self.links = list(links)
        self._down: set[tuple[int, int]] = set()
        self._pipes: set[_Pipe] = set()
        self._loop = asyncio.new_event_loop()
        self._servers: list[asyncio.Server] = []
        self._thread = threading.Thread(target=self._loop.run_forever, name="chaos-network",
                                         daemon=True)

    def start(self) -> Network:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(timeout=10)
        return self

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> Network:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- faults (thread-safe) ----------------------------------------------------------------

    def isolate(self, member: int) -> list[Link]:
        """Cut every link of `member` (the others still reach each other); return them."""
        doomed = [link for link in self.links if member in (link.source, link.target)]
        self.cut(doomed)
        return doomed

    def cut(self, links: Iterable[Link]) -> None:
        keys = {(link.source, link.target) for link in links}
        self._loop.call_soon_threadsafe(self._down.update, keys)

    def heal(self) -> None:
        asyncio.run_coroutine_threadsafe(self._heal(), self._loop).result(timeout=10)

    # -- the proxies -------------------------------------------------------------------------

    async def _listen(self) -> None:
        for link in self.links:
            host, port = link.listen.rsplit(":", 1)
            server = await asyncio.start_server(
                functools.partial(self._accept, link), host, int(port))
            self._servers.append(server)

    def _is_down(self, link: Link) -> bool:
        return (link.source, link.target) in self._down

    async def _accept(self, link: Link, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        pipe = _Pipe(link)
        pipe.writers.append(writer)
        self._pipes.add(pipe)
        try:
            if self._is_down(link):  # a black hole: accept, then read and drop
                pipe.tainted = True
                while await reader.read(65536):
                    pass
                return
            host, port = link.upstream.rsplit(":", 1)
            try:
                up_reader, up_writer = await asyncio.open_connection(host, int(port))
            except OSError:
                return  # the member is down: the dialer sees the connection close
            pipe.writers.append(up_writer)
            await asyncio.gather(self._pump(pipe, reader, up_writer),
                                 self._pump(pipe, up_reader, writer))
        finally:
            self._pipes.discard(pipe)
            for w in pipe.writers:
                w.close()

    async def _pump(self, pipe: _Pipe, src: asyncio.StreamReader,
                    dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                if self._is_down(pipe.link):
                    pipe.tainted = True
                    continue
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            for w in pipe.writers:  # one side closed: close both, as TCP would end-to-end
                w.close()

    async def _heal(self) -> None:
        self._down.clear()
        for pipe in list(self._pipes):
            if pipe.tainted:
                for w in pipe.writers:
                    w.transport.abort()

    async def _shutdown(self) -> None:
        for server in self._servers:
            server.close()
        for pipe in list(self._pipes):
            for w in pipe.writers:
                with contextlib.suppress(Exception):
                    w.transport.abort()

"""The sim-node's KV-event publisher: vLLM's ZMQ wire (a PUB stream and a ROUTER replay).

On the wire, as vLLM's ``ZmqEventPublisher`` sends it (docs/simulation.md has the flags):

- **Live**: one 3-frame message per engine step that changed the KV pool:
  ``[topic (utf-8), seq (8 bytes, big-endian), payload]``. `seq` starts at 0 in each process
  and goes up by one per batch. The PUB socket drops what a slow subscriber cannot take (`hwm`).
- **Payload**: msgpack ``[ts (float), events, dp_rank]``. Events are tagged arrays (`layout`
  ``array``, vLLM <= 0.25: every field present, in declaration order) or tagged maps
  (``map``, vLLM 0.26: ``"type"`` first, then the fields in declaration order; a field whose
  default is None is left out when None, the fields without a default never are).
  ``BlockStored`` per run of consecutive blocks a request newly cached, ``BlockRemoved`` per
  evicted block. Block hashes are the 64-bit external hash (`hash_form` ``int``, vLLM's
  default) or the 32-byte ``sha256_cbor`` digest (``bytes``), whose last 8 bytes, big-endian,
  are the int.
- **Replay** (with `replay_endpoint`): the last `buffer_steps` batches are kept. A DEALER
  sends ``[b"", start_seq (8 bytes)]``; the ROUTER answers every kept batch with
  ``seq >= start_seq`` as ``[b"", seq, payload]`` (`replay_framing` ``v025``) or
  ``[b"", topic, seq, payload]`` (``v026``), then the end marker ``[b"", 2**64-1, b""]`` or
  ``[b"", b"", 2**64-1, b""]``. If `start_seq` was already evicted the answer silently starts
  later, as vLLM's does; the consumer must check. A malformed request is logged and ignored.

Payloads are plain `msgpack.packb` of lists and dicts built here from the documented field
lists (msgpack writes them byte-for-byte as vLLM's msgspec structs encode).

`EventBuilder` turns the engine's KV changes (`engine.BlocksStored`, `engine.BlockEvicted`)
into events (pure). `KVEventPublisher` owns the sockets on one background thread, so the
sim-node's event loop never waits on ZMQ: `publish` and the fault hooks only enqueue, and the
thread applies them in call order. Fault hooks (tests, chaos): `drop_live(n)` numbers and
buffers the next `n` batches but does not send them live (a subscriber sees a gap that replay
fills); `reorder_live(n)` holds the next `n` batches it would send live and sends them in
reverse order once the n-th is published (they enter the replay buffer in order, as
published); `restart()` sets seq back to 0 and empties the replay buffer, as a restarted
engine's publisher would (the engine's cache is left as it is), and discards batches held
for a reorder (a restarted process never sends them).
"""

from __future__ import annotations

import contextlib
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import structlog
import zmq

from veristore_py.errors import ConfigError

from ..hashing import MASK64
from .engine import BlockEvicted, BlocksStored

log = structlog.get_logger(__name__)

LAYOUTS = ("array", "map")
HASH_FORMS = ("int", "bytes")
REPLAY_FRAMINGS = ("v025", "v026")
DEFAULT_TOPIC = "kv-events"
END_SEQ = MASK64.to_bytes(8, "big")  # the replay's end marker (-1 as a signed int64)
MEDIUM = "GPU"
KV_CACHE_SPEC_KIND = "full_attention"

# Event fields in declaration order; the first `*_REQUIRED` have no default, so map events
# carry them even when None (the rest default to None and are left out when None).
BLOCK_STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids", "block_size",
                       "lora_id", "medium", "lora_name", "extra_keys", "group_idx",
                       "kv_cache_spec_kind", "kv_cache_spec_sliding_window")
BLOCK_STORED_REQUIRED = 7
BLOCK_REMOVED_FIELDS = ("block_hashes", "medium", "group_idx")
BLOCK_REMOVED_REQUIRED = 2

_ENDPOINT = re.compile(r"^(tcp://\S+:(\d{1,5}|\*)|ipc://\S+|inproc://\S+)$")
_POLL_S = 0.02  # how long the thread waits for a batch before it looks at the replay socket


@dataclass(frozen=True, slots=True)
class KVEventsSettings:
    """Where and how the sim-node publishes KV events (the `--kv-events-*` flags)."""

    endpoint: str                       # PUB, bound: tcp://127.0.0.1:5557, tcp://*:5557, ipc://
    replay_endpoint: str | None = None  # ROUTER, bound; None: no replay
    topic: str = DEFAULT_TOPIC
    layout: str = "array"               # LAYOUTS
    hash_form: str = "int"              # HASH_FORMS
    replay_framing: str = "v025"        # REPLAY_FRAMINGS
    buffer_steps: int = 10_000          # batches kept for replay
    hwm: int = 100_000                  # PUB high-water mark (messages kept per subscriber)
    max_queue_size: int = 100_000       # batches waiting for the thread; more are dropped
    dp_rank: int | None = 0             # the payload's data-parallel rank


def kv_events_problems(settings: KVEventsSettings) -> list[str]:
    """Return every problem with `settings` (empty if none)."""
    s, problems = settings, []
    if not _ENDPOINT.match(s.endpoint):
        problems.append(f"kv-events endpoint {s.endpoint!r} is not tcp://HOST:PORT, "
                        "ipc://PATH or inproc://NAME")
    if s.replay_endpoint is not None:
        if not _ENDPOINT.match(s.replay_endpoint):
            problems.append(f"kv-events replay endpoint {s.replay_endpoint!r} is not "
                            "tcp://HOST:PORT, ipc://PATH or inproc://NAME")
        elif s.replay_endpoint == s.endpoint:
            problems.append("kv-events replay endpoint must differ from the endpoint")
    for name, value, allowed in (("layout", s.layout, LAYOUTS),
                                 ("hash", s.hash_form, HASH_FORMS),
                                 ("replay framing", s.replay_framing, REPLAY_FRAMINGS)):
        if value not in allowed:
            problems.append(f"kv-events {name} must be one of {', '.join(allowed)}, "
                            f"not {value!r}")
    for name, number in (("buffer steps", s.buffer_steps), ("hwm", s.hwm),
                         ("max queue size", s.max_queue_size)):
        if number < 1:
            problems.append(f"kv-events {name} must be >= 1")
    if s.dp_rank is not None and s.dp_rank < 0:
        problems.append("kv-events dp rank must be >= 0")
    return problems


# -- events (pure) ----------------------------------------------------------------------------

def _event(layout: str, tag: str, fields: Sequence[str], required: int,
           values: Sequence[Any]) -> list[Any] | dict[str, Any]:
    if layout == "array":
        return [tag, *values]
    event: dict[str, Any] = {"type": tag}
    for i, (name, value) in enumerate(zip(fields, values, strict=True)):
        if value is not None or i < required:
            event[name] = value
    return event


def block_stored(layout: str, block_hashes: Sequence[int | bytes],
                 parent_block_hash: int | bytes | None, token_ids: Sequence[int],
                 block_size: int, *, lora_id: int | None = None, medium: str | None = MEDIUM,
                 lora_name: str | None = None, extra_keys: Sequence[Any] | None = None,
                 group_idx: int | None = 0,
                 kv_cache_spec_kind: str | None = KV_CACHE_SPEC_KIND,
                 kv_cache_spec_sliding_window: int | None = None) -> list[Any] | dict[str, Any]:
    """Return a ``BlockStored`` event in `layout`."""
    return _event(layout, "BlockStored", BLOCK_STORED_FIELDS, BLOCK_STORED_REQUIRED, (
        list(block_hashes), parent_block_hash, list(token_ids), block_size, lora_id, medium,
        lora_name, None if extra_keys is None else list(extra_keys), group_idx,
        kv_cache_spec_kind, kv_cache_spec_sliding_window))


def block_removed(layout: str, block_hashes: Sequence[int | bytes], *,
                  medium: str | None = MEDIUM,
                  group_idx: int | None = 0) -> list[Any] | dict[str, Any]:
    """Return a ``BlockRemoved`` event in `layout`."""
    return _event(layout, "BlockRemoved", BLOCK_REMOVED_FIELDS, BLOCK_REMOVED_REQUIRED,
                  (list(block_hashes), medium, group_idx))


def all_blocks_cleared(layout: str) -> list[Any] | dict[str, Any]:
    """Return an ``AllBlocksCleared`` event in `layout`."""
    return _event(layout, "AllBlocksCleared", (), 0, ())


def encode_batch(ts: float, events: Sequence[Any], dp_rank: int | None) -> bytes:
    """Return the msgpack payload ``[ts, events, dp_rank]`` of one batch."""
    return msgpack.packb([float(ts), list(events), dp_rank])


def padded_digest(block_hash: int) -> bytes:
    """A 32-byte stand-in for a block whose digest is unknown: its int in the last 8 bytes."""
    return bytes(24) + (block_hash & MASK64).to_bytes(8, "big")


class EventBuilder:
    """Turn an engine step's KV changes into events, in one layout and hash form.

    In the bytes form it remembers the digest of every block it announced stored, so the
    block's ``BlockRemoved`` carries the same bytes; a block with no known digest gets
    `padded_digest`. Not thread-safe; no I/O.
    """

    def __init__(self, settings: KVEventsSettings, block_size: int,
                 lora_modules: Sequence[str] = ()) -> None:
        self.layout = settings.layout
        self.as_bytes = settings.hash_form == "bytes"
        self.block_size = block_size
        self.lora_ids = {name: i + 1 for i, name in enumerate(lora_modules)}
        self.digests: dict[int, bytes] = {}

    def build(self, changes: Sequence[BlocksStored | BlockEvicted]) -> list[Any]:
        """Return the events for `changes`, in order."""
        events = []
        for change in changes:
            if isinstance(change, BlockEvicted):
                removed: int | bytes = change.block_hash
                if self.as_bytes:
                    removed = self.digests.pop(change.block_hash, None) or \
                        padded_digest(change.block_hash)
                events.append(block_removed(self.layout, [removed]))
            else:
                events.append(self._stored(change))
        return events

    def _stored(self, change: BlocksStored) -> list[Any] | dict[str, Any]:
        request, start, n = change.request, change.start, len(change.block_hashes)
        size = self.block_size
        tokens: Sequence[int] = ()
        extra: list[Any] | None = None
        if start is not None:
            if len(request.token_ids) >= (start + n) * size:
                tokens = request.token_ids[start * size:(start + n) * size]
            keys = request.extra_keys
            extra = [keys[i] if keys is not None and i < len(keys) else None
                     for i in range(start, start + n)]
        hashes: list[int | bytes] = list(change.block_hashes)
        parent: int | bytes | None = change.parent
        if self.as_bytes:
            hashes = [self._digest(request.digests, i, h, start)
                      for i, h in enumerate(change.block_hashes)]
            if change.parent is not None:
                parent = request.digests[start - 1] if start and len(request.digests) >= start \
                    else self.digests.get(change.parent) or padded_digest(change.parent)
        lora = request.lora_name
        return block_stored(self.layout, hashes, parent, tokens, size,
                            lora_id=self.lora_ids.get(lora) if lora else None,
                            lora_name=lora, extra_keys=extra)

    def _digest(self, digests: Sequence[bytes], i: int, block_hash: int,
                start: int | None) -> bytes:
        at = None if start is None else start + i
        digest = digests[at] if at is not None and at < len(digests) \
            else padded_digest(block_hash)
        self.digests[block_hash] = digest
        return digest


# -- sockets (the shell) ------------------------------------------------------------------------

class KVEventPublisher:
    """vLLM's ZMQ KV-event publisher: PUB stream, ROUTER replay, on a background thread.

    `start` binds both sockets (raising `ConfigError` if the settings are invalid or an
    endpoint cannot be bound) and starts the thread; `close` stops it and closes them. Every
    other method only enqueues, never blocks, and may be called from one thread at a time.
    """

    def __init__(self, settings: KVEventsSettings) -> None:
        problems = kv_events_problems(settings)
        if problems:
            raise ConfigError(problems)
        self.settings = settings
        self._topic = settings.topic.encode()
        self._queue: queue.Queue[tuple[Any, ...]] = queue.Queue(settings.max_queue_size)
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=settings.buffer_steps)
        self._seq = 0
        self._drop = 0
        self._reorder = 0                            # batches still to hold for a reorder
        self._held: list[tuple[int, bytes]] = []     # held for a reorder, in seq order
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._pub: zmq.Socket[bytes] | None = None
        self._router: zmq.Socket[bytes] | None = None
        self._thread: threading.Thread | None = None
        self.endpoints: tuple[str, str | None] = (settings.endpoint, settings.replay_endpoint)
        self.stats = {"published": 0, "sent_live": 0, "dropped_live": 0, "reordered_live": 0,
                      "queue_full": 0, "replays": 0, "invalid_replays": 0}

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> KVEventPublisher:
        """Bind the sockets and start the thread; raise `ConfigError` if a bind fails."""
        s = self.settings
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        try:
            pub = ctx.socket(zmq.PUB)
            pub.setsockopt(zmq.LINGER, 0)
            pub.setsockopt(zmq.SNDHWM, s.hwm)
            self._bind(pub, s.endpoint, "endpoint")
            router = None
            if s.replay_endpoint is not None:
                router = ctx.socket(zmq.ROUTER)
                router.setsockopt(zmq.LINGER, 0)
                # A replay answer is at most `buffer_steps` messages: queue them all rather
                # than let the ROUTER drop part of one past its high-water mark.
                router.setsockopt(zmq.SNDHWM, 0)
                self._bind(router, s.replay_endpoint, "replay endpoint")
        except BaseException:
            ctx.destroy(linger=0)
            raise
        self._ctx, self._pub, self._router = ctx, pub, router
        self.endpoints = (pub.getsockopt_string(zmq.LAST_ENDPOINT),
                          router.getsockopt_string(zmq.LAST_ENDPOINT) if router else None)
        self._thread = threading.Thread(target=self._run, name="kv-event-publisher",
                                        daemon=True)
        self._thread.start()
        log.info("kv_events_publishing", endpoint=self.endpoints[0],
                 replay_endpoint=self.endpoints[1], topic=s.topic, layout=s.layout,
                 hash_form=s.hash_form, replay_framing=s.replay_framing)
        return self

    @staticmethod
    def _bind(sock: zmq.Socket[bytes], endpoint: str, what: str) -> None:
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            raise ConfigError([f"cannot bind the kv-events {what} {endpoint}: {exc}"]) from exc

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread (batches already queued are sent first) and close the sockets."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        with contextlib.suppress(queue.Full):  # full and not draining: the thread is gone
            self._queue.put(("stop",), timeout=timeout)
        thread.join(timeout)
        if thread.is_alive():
            log.warning("kv_events_publisher_stuck")
            return
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    def __enter__(self) -> KVEventPublisher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what the node calls --------------------------------------------------------------------

    def publish(self, events: Sequence[Any], ts: float | None = None) -> None:
        """Queue one batch (nothing if `events` is empty); drop it, counted, if the queue is full."""
        if events:
            self._put(("batch", time.time() if ts is None else ts, list(events)))

    def drop_live(self, count: int) -> None:
        """Fault: do not send the next `count` batches live (they still enter the buffer)."""
        self._put(("drop", count))

    def reorder_live(self, count: int) -> None:
        """Fault: send the next `count` live batches in reverse order (the replay buffer keeps
        them in order). They go out together when the last of them is published; until then a
        subscriber sees nothing of them."""
        self._put(("reorder", count))

    def restart(self) -> None:
        """Fault: start again as a new process would, at seq 0 with an empty replay buffer."""
        self._put(("restart",))

    def sync(self, timeout: float = 5.0) -> bool:
        """Block until the thread has handled everything queued before; False on timeout."""
        done = threading.Event()
        self._put(("sync", done))
        return done.wait(timeout)

    def view(self) -> dict[str, Any]:
        """The stream's state, as the thread last left it (JSON-ready)."""
        oldest = self._buffer[0][0] if self._buffer else None
        return {"endpoint": self.endpoints[0], "replay_endpoint": self.endpoints[1],
                "topic": self.settings.topic, "layout": self.settings.layout,
                "hash_form": self.settings.hash_form,
                "replay_framing": self.settings.replay_framing, "next_seq": self._seq,
                "buffered": len(self._buffer), "oldest_buffered_seq": oldest,
                "drop_live_pending": self._drop, "reorder_live_pending": self._reorder,
                "reorder_held": len(self._held), **self.stats}

    def _put(self, item: tuple[Any, ...]) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.stats["queue_full"] += 1
            log.warning("kv_events_queue_full", dropped=item[0])

    # -- the thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with contextlib.suppress(queue.Empty):
                    item = self._queue.get(timeout=_POLL_S)
                    if item[0] == "stop":
                        return
                    self._handle(item)
                self._serve_replays()
        except Exception as exc:  # a bug or a closed context: say so rather than die silently
            log.error("kv_events_publisher_failed", error=repr(exc))
        finally:
            for sock in (self._pub, self._router):
                if sock is not None:
                    sock.close(linger=0)

    def _handle(self, item: tuple[Any, ...]) -> None:
        kind = item[0]
        if kind == "batch":
            payload = encode_batch(item[1], item[2], self.settings.dp_rank)
            seq, self._seq = self._seq, self._seq + 1
            self._buffer.append((seq, payload))
            self.stats["published"] += 1
            if self._drop > 0:
                self._drop -= 1
                self.stats["dropped_live"] += 1
                return
            if self._reorder > 0:
                self._reorder -= 1
                self._held.append((seq, payload))
                if self._reorder == 0:
                    held, self._held = self._held, []
                    for held_seq, held_payload in reversed(held):
                        self._send_live(held_seq, held_payload)
                    self.stats["reordered_live"] += len(held)
                return
            self._send_live(seq, payload)
        elif kind == "drop":
            self._drop += item[1]
        elif kind == "reorder":
            self._reorder += item[1]
        elif kind == "restart":
            self._seq = 0
            self._buffer.clear()
            self._held.clear()
        elif kind == "sync":
            item[1].set()

    def _send_live(self, seq: int, payload: bytes) -> None:
        assert self._pub is not None
        try:
            self._pub.send_multipart([self._topic, seq.to_bytes(8, "big"), payload],
                                     flags=zmq.NOBLOCK)
            self.stats["sent_live"] += 1
        except zmq.Again:  # PUB drops past its high-water mark rather than block
            pass

    def _serve_replays(self) -> None:
        router = self._router
        while router is not None and router.poll(0):
            frames = router.recv_multipart()
            if len(frames) != 3 or frames[1] != b"" or len(frames[2]) != 8:
                self.stats["invalid_replays"] += 1
                log.warning("kv_events_invalid_replay_request", frames=len(frames))
                continue
            identity, start = frames[0], int.from_bytes(frames[2], "big")
            head = [identity, b""] if self.settings.replay_framing == "v025" \
                else [identity, b"", self._topic]
            sent = 0
            for seq, payload in self._buffer:
                if seq >= start:
                    router.send_multipart([*head, seq.to_bytes(8, "big"), payload])
                    sent += 1
            end = [identity, b""] if self.settings.replay_framing == "v025" \
                else [identity, b"", b""]
            router.send_multipart([*end, END_SEQ, b""])
            self.stats["replays"] += 1
            log.info("kv_events_replayed", start_seq=start, batches=sent)

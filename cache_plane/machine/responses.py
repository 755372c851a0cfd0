"""The replicated response cache: entries, their LRU order, expiry and the change feed. PURE.

An entry is a whole answer stored under its exact key (`cache_plane.responses.keys`). Its
metadata (tenant, model and epoch, namespace, bucket, the question, times, usage, embedding)
is kept in memory and in ``cp/rc/e/<key>``; its body, compressed by the leader, only in LMDB
(``cp/rc/b/<key>``), read by `GET /v1/cache/entries/{key}`. ``cp/rc/meta`` holds the revision,
the LRU sequence and the counters.

Commands (the leader stamps ``now_ms``, the TTL's expiry and the byte budget):

- ``cp.cache_put``: store or replace an entry; refused if its model's epoch moved on (the
  answer came from an older model version). Then least-recently-used entries are evicted
  until the entries fit in ``max_bytes`` (every replica picks the same victims: the order is
  replicated).
- ``cp.cache_touch``: entries a gateway served, moved to the recent end (one command per
  batch of hits, never one per hit).
- ``cp.cache_delete`` (one key), ``cp.cache_purge`` (by tenant, model and/or namespace).
- `expire_entries` runs inside ``cp.expire``; `drop_model_entries` inside
  ``cp.invalidate_model``, so a model's old entries go in the command that bumps its epoch.

Every change of an entry bumps the revision; members keep the last `FEED_LENGTH` changed keys
in memory (not replicated: after a restart a gateway asking for older ones is told to reload),
which is the change feed gateways follow.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from veristore_py.codec import pack
from veristore_py.state import ApplyContext, Result

from ..limits import MAX_COUNT, MAX_ID_BYTES, MAX_TIME_MS
from .fields import Invalid, Rejected, int_field, str_field

RC_PREFIX = b"cp/rc/"
ENTRY_PREFIX = b"cp/rc/e/"
BODY_PREFIX = b"cp/rc/b/"
RC_META_KEY = b"cp/rc/meta"
FEED_LENGTH = 65_536
KEY_CHARS = 64
MAX_BODY_BYTES = 1 << 20           # one compressed answer
MAX_EMBEDDING_BYTES = 8192
MAX_QUESTION_BYTES = 16_384
MAX_TOUCH_KEYS = 4096
ENTRY_OVERHEAD = 256               # bytes counted per entry besides body, question, embedding
COUNTERS = ("stored", "replaced", "evicted", "expired", "invalidated", "purged", "deleted",
            "touched", "refused_stale")


@dataclass(slots=True)
class Entry:
    tenant: str
    model: str
    epoch: int
    namespace: str
    bucket: str | None
    question: str | None
    created_ms: int
    expires_ms: int
    used_ms: int
    seq: int
    body_bytes: int
    prompt_tokens: int
    completion_tokens: int
    latency_ms: int
    embedding: bytes

    @property
    def size(self) -> int:
        return (self.body_bytes + len(self.embedding) + ENTRY_OVERHEAD
                + len((self.question or "").encode()))

    def wire(self) -> list[Any]:
        return [self.tenant, self.model, self.epoch, self.namespace, self.bucket, self.question,
                self.created_ms, self.expires_ms, self.used_ms, self.seq, self.body_bytes,
                self.prompt_tokens, self.completion_tokens, self.latency_ms, self.embedding]

    def view(self, key: str) -> dict[str, Any]:
        """The entry's metadata as the API shows it (the embedding as bytes)."""
        return {"key": key, "tenant": self.tenant, "model": self.model, "epoch": self.epoch,
                "namespace": self.namespace, "bucket": self.bucket, "question": self.question,
                "created_ms": self.created_ms, "expires_ms": self.expires_ms,
                "used_ms": self.used_ms, "size": self.size, "body_bytes": self.body_bytes,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "latency_ms": self.latency_ms,
                "embedding": self.embedding}


class ResponseTable:
    """The entries in memory, in LRU order, with their counters and the change feed."""

    def __init__(self) -> None:
        self.entries: OrderedDict[str, Entry] = OrderedDict()  # least recently used first
        self.bytes = 0
        self.rev = 0
        self.seq = 0
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.expiry: list[tuple[int, str]] = []  # (expires_ms, key) heap; stale items skipped
        self.feed: deque[tuple[int, str]] = deque(maxlen=FEED_LENGTH)
        self.feed_base = 0  # changes at or below this revision are not in `feed`

    def meta_wire(self) -> list[Any]:
        return [self.rev, self.seq, [self.counters[c] for c in COUNTERS]]

    def load(self, key: str, wire: list[Any]) -> None:
        """Add a stored entry (rebuild); `finish_load` then restores the LRU order."""
        entry = Entry(*wire)
        self.entries[key] = entry
        self.bytes += entry.size

    def load_meta(self, wire: list[Any]) -> None:
        self.rev, self.seq = wire[0], wire[1]
        self.counters.update(zip(COUNTERS, wire[2], strict=False))

    def finish_load(self) -> None:
        ordered = sorted(self.entries.items(), key=lambda kv: kv[1].seq)
        self.entries = OrderedDict(ordered)
        self.expiry = [(e.expires_ms, k) for k, e in ordered]
        heapq.heapify(self.expiry)
        self.feed.clear()
        self.feed_base = self.rev

    # -- changes (each appends its LMDB mutations to `m`) -----------------------------------

    def changed(self, key: str) -> None:
        self.rev += 1
        if len(self.feed) == self.feed.maxlen:
            self.feed_base = self.feed[0][0]
        self.feed.append((self.rev, key))

    def save(self, key: str, entry: Entry, m: list[Any]) -> None:
        m.append((ENTRY_PREFIX + key.encode(), pack(entry.wire())))

    def remove(self, key: str, counter: str, m: list[Any]) -> None:
        entry = self.entries.pop(key)
        self.bytes -= entry.size
        self.counters[counter] += 1
        m.append((ENTRY_PREFIX + key.encode(), None))
        m.append((BODY_PREFIX + key.encode(), None))
        self.changed(key)

    def changes_since(self, rev: int, limit: int) -> tuple[bool, list[str], int]:
        """(reset, keys changed after `rev` in order of change, revision reached)."""
        if rev < self.feed_base:
            return True, [], self.rev
        keys: list[str] = []
        reached = rev
        for r, key in reversed(self.feed):
            if r <= rev:
                break
            keys.append(key)
        keys.reverse()
        if len(keys) > limit:
            keys = keys[:limit]
            reached = rev + limit  # revisions are consecutive
        else:
            reached = max(rev, self.rev)
        return False, keys, reached


def _key(cmd: Mapping[str, Any]) -> str:
    key = cmd.get("key")
    if not isinstance(key, str) or len(key) != KEY_CHARS or not all(
            c in "0123456789abcdef" for c in key):
        raise Invalid(f"field 'key' must be {KEY_CHARS} lowercase hex characters")
    return key


def _bytes(cmd: Mapping[str, Any], name: str, limit: int) -> bytes:
    value = cmd.get(name, b"")
    if not isinstance(value, bytes) or len(value) > limit:
        raise Invalid(f"field '{name}' must be bytes, at most {limit}")
    return value


def _text(cmd: Mapping[str, Any], name: str, limit: int) -> str | None:
    value = cmd.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value.encode()) > limit:
        raise Invalid(f"field '{name}' must be a string of at most {limit} bytes")
    return value


def put(st: Any, cmd: Mapping[str, Any], ctx: ApplyContext) -> Result:
    table: ResponseTable = st.responses
    key = _key(cmd)
    tenant = str_field(cmd, "tenant")
    model_id = str_field(cmd, "model")
    assert tenant is not None and model_id is not None
    epoch = int_field(cmd, "epoch", 0, MAX_COUNT)
    namespace = _text(cmd, "namespace", MAX_ID_BYTES) or ""
    bucket = cmd.get("bucket")
    if bucket is not None and (not isinstance(bucket, str) or len(bucket) != KEY_CHARS):
        raise Invalid(f"field 'bucket' must be null or {KEY_CHARS} hex characters")
    question = _text(cmd, "question", MAX_QUESTION_BYTES)
    body = _bytes(cmd, "body", MAX_BODY_BYTES)
    if not body:
        raise Invalid("field 'body' must not be empty")
    embedding = _bytes(cmd, "embedding", MAX_EMBEDDING_BYTES)
    now = int_field(cmd, "now_ms", 0, MAX_TIME_MS)
    expires = int_field(cmd, "expires_ms", now + 1, MAX_TIME_MS)
    max_bytes = int_field(cmd, "max_bytes", 1, MAX_COUNT)
    prompt_tokens, completion_tokens, latency_ms = (
        int_field(cmd, n, 0, MAX_COUNT, 0)
        for n in ("prompt_tokens", "completion_tokens", "latency_ms"))
    model = st.models.get(model_id)
    if model is None:
        raise Rejected("unknown_model", f"model {model_id!r} is not registered")
    if epoch != model.epoch:
        table.counters["refused_stale"] += 1
        st.m.append((RC_META_KEY, pack(table.meta_wire())))
        return {"ok": True, "stored": False, "reason": "stale_epoch", "epoch": model.epoch}
    table.seq += 1
    entry = Entry(tenant, model_id, epoch, namespace, bucket, question, now, expires, now,
                  table.seq, len(body), prompt_tokens, completion_tokens, latency_ms, embedding)
    if entry.size > max_bytes:
        raise Rejected("entry_too_large",
                       f"the entry takes {entry.size} bytes, more than the cache's {max_bytes}")
    if key in table.entries:
        table.remove(key, "replaced", st.m)
    table.entries[key] = entry
    table.bytes += entry.size
    table.counters["stored"] += 1
    heapq.heappush(table.expiry, (expires, key))
    if len(table.expiry) > 2 * len(table.entries) + 1024:  # drop the stale items
        table.expiry = [(e.expires_ms, k) for k, e in table.entries.items()]
        heapq.heapify(table.expiry)
    table.save(key, entry, st.m)
    st.m.append((BODY_PREFIX + key.encode(), body))
    table.changed(key)
    evicted = 0
    while table.bytes > max_bytes:
        victim = next(iter(table.entries))
        table.remove(victim, "evicted", st.m)
        evicted += 1
    st.m.append((RC_META_KEY, pack(table.meta_wire())))
    return {"ok": True, "stored": True, "key": key, "rev": table.rev, "created_ms": now,
            "expires_ms": expires, "evicted": evicted}


def touch(st: Any, cmd: Mapping[str, Any], ctx: ApplyContext) -> Result:
    table: ResponseTable = st.responses
    keys = cmd.get("keys")
    if not isinstance(keys, list) or len(keys) > MAX_TOUCH_KEYS or not all(
            isinstance(k, str) for k in keys):
        raise Invalid(f"field 'keys' must be a list of at most {MAX_TOUCH_KEYS} keys")
    now = int_field(cmd, "now_ms", 0, MAX_TIME_MS)
    touched = 0
    for key in keys:
        entry = table.entries.get(key)
        if entry is None:
            continue  # gone since (evicted, expired, purged): nothing to do
        table.seq += 1
        entry.used_ms, entry.seq = now, table.seq
        table.entries.move_to_end(key)
        table.save(key, entry, st.m)
        touched += 1
    table.counters["touched"] += touched
    st.m.append((RC_META_KEY, pack(table.meta_wire())))
    return {"ok": True, "touched": touched}


def delete(st: Any, cmd: Mapping[str, Any], ctx: ApplyContext) -> Result:
    table: ResponseTable = st.responses
    key = _key(cmd)
    if key not in table.entries:
        return {"ok": True, "deleted": 0}
    table.remove(key, "deleted", st.m)
    st.m.append((RC_META_KEY, pack(table.meta_wire())))
    return {"ok": True, "deleted": 1, "rev": table.rev}


def purge(st: Any, cmd: Mapping[str, Any], ctx: ApplyContext) -> Result:
    table: ResponseTable = st.responses
    want = {n: _text(cmd, n, MAX_ID_BYTES) for n in ("tenant", "model", "namespace")}
    want = {n: v for n, v in want.items() if v is not None}
    if not want and not cmd.get("all"):
        raise Invalid("give at least one of 'tenant', 'model', 'namespace' (or 'all': true)")
    victims = [k for k, e in table.entries.items()
               if all(getattr(e, n) == v for n, v in want.items())]
    for key in victims:
        table.remove(key, "purged", st.m)
    st.m.append((RC_META_KEY, pack(table.meta_wire())))
    return {"ok": True, "purged": len(victims), "rev": table.rev}


def expire_entries(st: Any, now: int) -> int:
    """Drop entries whose leader-stamped expiry is at or before `now` (inside ``cp.expire``)."""
    table: ResponseTable = st.responses
    expired = 0
    while table.expiry and table.expiry[0][0] <= now:
        expires, key = heapq.heappop(table.expiry)
        entry = table.entries.get(key)
        if entry is not None and entry.expires_ms == expires:
            table.remove(key, "expired", st.m)
            expired += 1
    if expired:
        st.m.append((RC_META_KEY, pack(table.meta_wire())))
    return expired


def drop_model_entries(st: Any, model_id: str) -> int:
    """Drop every entry of `model_id` (its epoch was just bumped: they are all older)."""
    table: ResponseTable = st.responses
    victims = [k for k, e in table.entries.items() if e.model == model_id]
    for key in victims:
        table.remove(key, "invalidated", st.m)
    if victims:
        st.m.append((RC_META_KEY, pack(table.meta_wire())))
    return len(victims)

"""The pure, deterministic key-value state machine (the VeriStore core).

`KVMachine.apply(command, reader, ctx)` reads current state through `reader` and returns an
`Outcome`: the mutations to write and the result to hand back. It never raises for bad input:
a malformed command yields ``{"ok": False, "error": code, "detail": ...}`` and no mutations.
It reads no clock and no randomness; everything non-deterministic (the leader's stamp, the log
index) arrives in `ctx`. This module does no I/O.

Key space (bytes):
  ``kv/<key>``    user records, value = msgpack ``[value, create_revision, mod_revision]``
  ``idem/<id>``   idempotency records, value = msgpack ``[stamp_ms, op, key, result]``
  ``idemt/<stamp_ms:8 bytes big-endian><id>``  the same records ordered by age, for pruning
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from .codec import pack, unpack

MAX_KEY_BYTES = 400
MAX_VALUE_BYTES = 1 << 20
MAX_IDEM_BYTES = 64
MAX_SCAN_LIMIT = 1000
DEFAULT_SCAN_LIMIT = 100
# A revision is index * REVISION_STRIDE + position of the command in its batch.
REVISION_STRIDE = 1 << 16

KV_PREFIX = b"kv/"
IDEM_PREFIX = b"idem/"
IDEM_AGE_PREFIX = b"idemt/"

Mutation = tuple[bytes, bytes | None]
Result = dict[str, Any]


class Reader(Protocol):
    """Read access to the state as of the command being applied (earlier commands included)."""

    def get(self, key: bytes) -> bytes | None: ...

    def scan(self, prefix: bytes, start: bytes, limit: int) -> list[tuple[bytes, bytes]]:
        """Return up to `limit` (key, value) pairs with `prefix`, keys >= `start`, in order."""
        ...


@dataclass(frozen=True, slots=True)
class ApplyContext:
    """What the log tells a command: where it sits and when the leader proposed it."""

    index: int
    position: int
    stamp_ms: int

    @property
    def revision(self) -> int:
        return self.index * REVISION_STRIDE + self.position


@dataclass(frozen=True, slots=True)
class Outcome:
    """Mutations to write (value None = delete) and the command's result."""

    mutations: tuple[Mutation, ...]
    result: Result


class Machine(Protocol):
    """A deterministic, total state machine over a byte-keyed store.

    A machine may also keep a working copy of the state in memory (for fast queries). It then
    defines ``rebuild(items)``, which the store calls with every stored (key, value) pair at
    open, after a snapshot install and after a write it had to abort, so the memory copy
    always equals what the store holds.
    """

    def apply(self, command: Any, reader: Reader, ctx: ApplyContext) -> Outcome: ...


def error(code: str, detail: str) -> Outcome:
    """Return an Outcome that changes nothing and reports `code`."""
    return Outcome((), {"ok": False, "error": code, "detail": detail})


class _Invalid(Exception):
    """Internal: a field failed validation (never escapes `apply`)."""


def _bytes_field(cmd: Mapping[str, Any], name: str, limit: int, *, optional: bool = False,
                 nullable: bool = False, allow_empty: bool = False) -> bytes | None:
    if name not in cmd:
        if optional:
            return None
        raise _Invalid(f"missing field '{name}'")
    value = cmd[name]
    if value is None and nullable:
        return None
    if isinstance(value, str):
        value = value.encode()
    if not isinstance(value, bytes):
        raise _Invalid(f"field '{name}' must be bytes or a string")
    if not value and not allow_empty:
        raise _Invalid(f"field '{name}' must not be empty")
    if len(value) > limit:
        raise _Invalid(f"field '{name}' is {len(value)} bytes; the limit is {limit}")
    return value


def _int_field(cmd: Mapping[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    value = cmd.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _Invalid(f"field '{name}' must be an integer in [{lo}, {hi}]")
    return value


def decode_record(raw: bytes) -> tuple[bytes, int, int]:
    """Split a stored user record into (value, create_revision, mod_revision)."""
    value, created, modified = unpack(raw)
    return value, created, modified


class KVMachine:
    """put / get / delete / compare-and-set / prefix scan with idempotency keys."""

    def apply(self, command: Any, reader: Reader, ctx: ApplyContext) -> Outcome:
        """Apply one command; never raises, whatever `command` holds."""
        if not isinstance(command, Mapping):
            return error("invalid_command", "command must be a map")
        op = command.get("op")
        handler = _HANDLERS.get(op) if isinstance(op, str) else None
        if handler is None:
            return error("unknown_op", f"unknown op {op!r}")
        try:
            idem = _bytes_field(command, "idem", MAX_IDEM_BYTES, optional=True)
            key = _bytes_field(command, "key", MAX_KEY_BYTES, optional=True)
            if idem is not None:
                replay = _replay(reader, idem, op, key)
                if replay is not None:
                    return replay
            outcome = handler(command, reader, ctx)
        except _Invalid as exc:
            return error("invalid_command", str(exc))
        if idem is not None and op not in READ_ONLY_OPS and outcome.result.get("ok"):
            record = pack([ctx.stamp_ms, op, key, outcome.result])
            age_key = IDEM_AGE_PREFIX + ctx.stamp_ms.to_bytes(8, "big") + idem
            outcome = Outcome(
                outcome.mutations + ((IDEM_PREFIX + idem, record), (age_key, b"")),
                outcome.result,
            )
        return outcome


def _replay(reader: Reader, idem: bytes, op: Any, key: bytes | None) -> Outcome | None:
    raw = reader.get(IDEM_PREFIX + idem)
    if raw is None:
        return None
    _stamp, old_op, old_key, result = unpack(raw)
    if old_op != op or old_key != key:
        return error("idempotency_key_reused",
                     f"idempotency key was used for {old_op} on another key or op")
    return Outcome((), {**result, "replayed": True})


def _get(cmd: Mapping[str, Any], reader: Reader, ctx: ApplyContext) -> Outcome:
    key = _bytes_field(cmd, "key", MAX_KEY_BYTES)
    assert key is not None
    raw = reader.get(KV_PREFIX + key)
    if raw is None:
        return Outcome((), {"ok": True, "found": False, "value": None, "revision": 0})
    value, _created, modified = decode_record(raw)
    return Outcome((), {"ok": True, "found": True, "value": value, "revision": modified})


def _put(cmd: Mapping[str, Any], reader: Reader, ctx: ApplyContext) -> Outcome:
    key = _bytes_field(cmd, "key", MAX_KEY_BYTES)
    value = _bytes_field(cmd, "value", MAX_VALUE_BYTES, allow_empty=True)
    assert key is not None and value is not None
    return _write(reader, key, value, ctx, {})


def _write(reader: Reader, key: bytes, value: bytes | None, ctx: ApplyContext,
           extra: Result) -> Outcome:
    raw = reader.get(KV_PREFIX + key)
    prev_revision = 0 if raw is None else decode_record(raw)[2]
    if value is None:
        if raw is None:
            return Outcome((), {"ok": True, "deleted": False, "revision": 0, **extra})
        return Outcome(((KV_PREFIX + key, None),),
                       {"ok": True, "deleted": True, "revision": ctx.revision, **extra})
    created = ctx.revision if raw is None else decode_record(raw)[1]
    record = pack([value, created, ctx.revision])
    return Outcome(((KV_PREFIX + key, record),),
                   {"ok": True, "revision": ctx.revision, "prev_revision": prev_revision, **extra})


def _delete(cmd: Mapping[str, Any], reader: Reader, ctx: ApplyContext) -> Outcome:
    key = _bytes_field(cmd, "key", MAX_KEY_BYTES)
    assert key is not None
    return _write(reader, key, None, ctx, {})


def _cas(cmd: Mapping[str, Any], reader: Reader, ctx: ApplyContext) -> Outcome:
    """Set `key` to `value` (None deletes) only if it currently holds `expected` (None: absent)."""
    key = _bytes_field(cmd, "key", MAX_KEY_BYTES)
    assert key is not None
    if "expected" not in cmd:
        raise _Invalid("missing field 'expected' (null means 'key must be absent')")
    expected = _bytes_field(cmd, "expected", MAX_VALUE_BYTES, nullable=True, allow_empty=True)
    if "value" not in cmd:
        raise _Invalid("missing field 'value' (null means 'delete')")
    value = _bytes_field(cmd, "value", MAX_VALUE_BYTES, nullable=True, allow_empty=True)
    raw = reader.get(KV_PREFIX + key)
    current = None if raw is None else decode_record(raw)[0]
    if current != expected:
        revision = 0 if raw is None else decode_record(raw)[2]
        return Outcome((), {"ok": True, "succeeded": False, "current": current,
                            "revision": revision})
    return _write(reader, key, value, ctx, {"succeeded": True, "current": value})


def _scan(cmd: Mapping[str, Any], reader: Reader, ctx: ApplyContext) -> Outcome:
    prefix = _bytes_field(cmd, "prefix", MAX_KEY_BYTES, optional=True, allow_empty=True) or b""
    after = _bytes_field(cmd, "after", MAX_KEY_BYTES, optional=True, allow_empty=True)
    limit = _int_field(cmd, "limit", DEFAULT_SCAN_LIMIT, 1, MAX_SCAN_LIMIT)
    start = KV_PREFIX + (after + b"\x00" if after else prefix)
    if after and not after.startswith(prefix):
        raise _Invalid("field 'after' must start with 'prefix'")
    rows = reader.scan(KV_PREFIX + prefix, start, limit + 1)
    items = []
    for raw_key, raw in rows[:limit]:
        value, _created, modified = decode_record(raw)
        items.append([raw_key[len(KV_PREFIX):], value, modified])
    return Outcome((), {"ok": True, "items": items, "more": len(rows) > limit})


def _noop(cmd: Mapping[str, Any], reader: Reader, ctx: ApplyContext) -> Outcome:
    """A barrier: applying it proves everything before it in the log has been applied."""
    return Outcome((), {"ok": True, "index": ctx.index})


def _prune_idem(cmd: Mapping[str, Any], reader: Reader, ctx: ApplyContext) -> Outcome:
    """Drop idempotency records stamped before `before_ms` (the leader chooses the cut-off)."""
    before = _int_field(cmd, "before_ms", 0, 0, 1 << 62)
    limit = _int_field(cmd, "limit", MAX_SCAN_LIMIT, 1, 10 * MAX_SCAN_LIMIT)
    doomed: list[Mutation] = []
    for age_key, _ in reader.scan(IDEM_AGE_PREFIX, IDEM_AGE_PREFIX, limit):
        stamp = int.from_bytes(age_key[len(IDEM_AGE_PREFIX):len(IDEM_AGE_PREFIX) + 8], "big")
        if stamp >= before:
            break
        doomed.append((age_key, None))
        doomed.append((IDEM_PREFIX + age_key[len(IDEM_AGE_PREFIX) + 8:], None))
    return Outcome(tuple(doomed), {"ok": True, "pruned": len(doomed) // 2})


_HANDLERS = {
    "get": _get,
    "put": _put,
    "delete": _delete,
    "cas": _cas,
    "scan": _scan,
    "noop": _noop,
    "prune_idem": _prune_idem,
}

READ_ONLY_OPS = frozenset({"get", "scan", "noop"})

"""LMDB state store: applies decoded entries through a pure machine, one write txn per entry.

Contract:
- `apply_entry(index, ...)` writes every mutation of the entry *and* the applied index in one
  LMDB write transaction, so after any crash the store reflects a whole prefix of the log.
  Entries at or below the recorded applied index are skipped: replay is idempotent.
- `MapFullError` grows the map and retries the entry (the pure machine recomputes the same
  mutations); nothing half-applied is ever visible.
- The environment is opened with ``sync=False``: commits reach the page cache and survive
  kill -9, and `sync()` makes them durable. The Raft journal (not this store) is the source of
  durability for acknowledged writes; the snapshot builder syncs the store before it reports
  success, i.e. before PySyncObj compacts the journal behind it.
- Power loss: LMDB without sync may leave a *corrupt* file after an OS crash, not just an old
  one, so the store is only trusted across a restart of the process, never across a restart
  of the machine. At open it durably records the kernel's boot id and "not closed cleanly";
  a clean `close()` records "clean". A store last opened in another boot and not closed
  cleanly (or unreadable) is discarded and rebuilt from what is durable: the snapshot file
  and the journal, which PySyncObj replays into the empty store.
- Snapshots: `open_snapshot()` pins a consistent read view; `write_snapshot()` streams a
  compacted copy of that view; `install_snapshot()` atomically swaps in a received copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any, TypeVar

import lmdb
import structlog

from .codec import pack, unpack
from .errors import StorageError
from .journal import lmdb_truncation
from .state import ApplyContext, Machine, Result, error

T = TypeVar("T")

log = structlog.get_logger(__name__)

DEFAULT_MAP_SIZE = 1 << 30
MAX_MAP_SIZE = 1 << 40
_APPLIED_KEY = b"applied_index"
_BOOT_KEY = b"boot"  # [kernel boot id, closed cleanly]


def current_boot_id() -> str:
    """The kernel's id of this boot ("" where unknown); it changes when the machine restarts."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


class _TxnReader:
    """`state.Reader` over one LMDB transaction (a write txn sees its own earlier writes)."""

    __slots__ = ("_txn", "_db")

    def __init__(self, txn: lmdb.Transaction, db: Any) -> None:
        self._txn = txn
        self._db = db

    def get(self, key: bytes) -> bytes | None:
        value = self._txn.get(key, db=self._db)
        return None if value is None else bytes(value)

    def scan(self, prefix: bytes, start: bytes, limit: int) -> list[tuple[bytes, bytes]]:
        rows: list[tuple[bytes, bytes]] = []
        cursor = self._txn.cursor(db=self._db)
        if not cursor.set_range(max(start, prefix)):
            return rows
        for key, value in cursor:
            key = bytes(key)
            if not key.startswith(prefix) or len(rows) >= limit:
                break
            rows.append((key, bytes(value)))
        return rows


@dataclass(slots=True)
class SnapshotView:
    """A pinned, consistent read view of the store at `applied_index`."""

    txn: lmdb.Transaction
    applied_index: int


class StateStore:
    """The replicated state of one node, kept in an LMDB environment at `path`."""

    def __init__(self, path: str, machine: Machine, map_size: int = DEFAULT_MAP_SIZE,
                 boot_id: str | None = None) -> None:
        self.path = path
        self._boot = current_boot_id() if boot_id is None else boot_id
        self.discarded = False  # set when the open found an untrustworthy store
        self.machine = machine
        self._map_size = map_size
        # Readers (HTTP threads, snapshot copies) hold this shared; a map resize needs it alone.
        self._gate = threading.Condition()
        self._readers = 0
        # Held while a command is applied or the machine rebuilt: readers of a machine's memory
        # copy (e.g. an HTTP thread computing a decision) take it and see the state between
        # two commands. That state may be part-way through an entry whose LMDB transaction is
        # not committed yet (and is recomputed if it aborts), so such reads are advisory: a
        # decision made from them is checked again when its own command is applied.
        self.lock = threading.RLock()
        _recover_swap(path)
        if not self._trustworthy():
            log.warning("state_store_discarded", path=path, reason="not closed cleanly in an "
                        "earlier boot of this machine, or unreadable; rebuilding from the "
                        "snapshot file and the journal")
            shutil.rmtree(path, ignore_errors=True)
            self.discarded = True
        self._open()

    def _trustworthy(self) -> bool:
        """False if the store may be torn by a power loss (see module docstring)."""
        if not os.path.exists(os.path.join(self.path, "data.mdb")):
            return True
        try:
            env = lmdb.open(self.path, max_dbs=4, readonly=True, lock=False, readahead=False)
            try:
                if lmdb_truncation(env, self.path):
                    return False
                meta = env.open_db(b"meta", create=False)
                with env.begin(db=meta) as txn:
                    raw = txn.get(_BOOT_KEY, db=meta)
            finally:
                env.close()
        except lmdb.Error:
            return False
        if raw is None:
            return True  # written before boot records existed
        boot, clean = unpack(raw)
        return bool(clean) or (boot == self._boot and self._boot != "")

    # -- lifecycle -------------------------------------------------------------------------

    def _open(self) -> None:
        os.makedirs(self.path, exist_ok=True)
        try:
            self._env = lmdb.open(
                self.path, map_size=self._map_size, max_dbs=4, sync=False, metasync=True,
                readahead=False, writemap=False,
            )
            self._data = self._env.open_db(b"data")
            self._meta = self._env.open_db(b"meta")
        except lmdb.Error as exc:
            raise StorageError(f"cannot open state store at {self.path}: {exc}") from exc
        info = self._env.info()
        self._map_size = max(self._map_size, info["map_size"])
        with self._env.begin(db=self._meta) as txn:
            raw = txn.get(_APPLIED_KEY, db=self._meta)
        self._applied = 0 if raw is None else unpack(raw)
        self._mark_boot(clean=False)
        self._rebuild_machine()

    def _mark_boot(self, clean: bool) -> None:
        """Durably record this boot's id and whether the store was closed cleanly."""
        with self._env.begin(write=True, db=self._meta) as txn:
            txn.put(_BOOT_KEY, pack([self._boot, clean]), db=self._meta)
        self._env.sync(True)

    def _rebuild_machine(self) -> None:
        """Give a machine with a memory copy of the state everything the store holds."""
        rebuild = getattr(self.machine, "rebuild", None)
        if rebuild is not None:
            with self.lock, self._env.begin(db=self._data) as txn:
                rebuild((bytes(k), bytes(v)) for k, v in txn.cursor(db=self._data))

    def close(self) -> None:
        """Flush and close the environment."""
        with self._exclusive():
            self._env.sync(True)
            self._mark_boot(clean=True)
            self._env.close()

    def view(self, read: Callable[[Any], T]) -> T:
        """Run `read(machine)` under the store's lock: it sees no apply half done.

        Views read the machine's memory state; they must not change it.
        """
        with self.lock:
            return read(self.machine)

    @property
    def applied_index(self) -> int:
        """The Raft index of the last entry applied to this store."""
        return self._applied

    def sync(self) -> None:
        """Make every committed transaction durable (fsync)."""
        self._env.sync(True)

    # -- applying --------------------------------------------------------------------------

    def apply_entry(self, index: int, stamp_ms: int, commands: list[Any]) -> list[Result] | None:
        """Apply `commands` of log entry `index` atomically; None if already applied.

        Never raises for bad commands (they yield error results). Raises StorageError only if
        LMDB itself fails, in which case nothing of the entry was written.
        """
        if index <= self._applied:
            return None
        return self._apply_locked(index, stamp_ms, commands)

    def _apply_locked(self, index: int, stamp_ms: int, commands: list[Any]) -> list[Result]:
        while True:
            try:
                results = self._apply_once(index, stamp_ms, commands)
            except lmdb.MapFullError:
                self._grow()
                self._rebuild_machine()  # the aborted txn's changes are in its memory copy
                continue
            except lmdb.Error as exc:
                self._rebuild_machine()
                raise StorageError(f"applying entry {index} failed: {exc}") from exc
            self._applied = index
            return results

    def _apply_once(self, index: int, stamp_ms: int, commands: list[Any]) -> list[Result]:
        results: list[Result] = []
        with self._env.begin(write=True, db=self._data) as txn:
            reader = _TxnReader(txn, self._data)
            for position, command in enumerate(commands):
                ctx = ApplyContext(index=index, position=position, stamp_ms=stamp_ms)
                try:
                    with self.lock:  # per command: readers wait for one command, not an entry
                        outcome = self.machine.apply(command, reader, ctx)
                except Exception as exc:  # a bug in a machine must not stall replication
                    log.error("machine_raised", index=index, position=position, error=repr(exc))
                    outcome = error("internal_error", f"machine raised {type(exc).__name__}")
                for key, value in outcome.mutations:
                    if value is None:
                        txn.delete(key, db=self._data)
                    else:
                        txn.put(key, value, db=self._data)
                results.append(outcome.result)
            txn.put(_APPLIED_KEY, pack(index), db=self._meta)
        return results

    def _grow(self) -> None:
        new_size = min(self._map_size * 2, MAX_MAP_SIZE)
        if new_size == self._map_size:
            raise StorageError(f"state store reached the maximum map size {MAX_MAP_SIZE}")
        with self._exclusive():
            self._env.set_mapsize(new_size)
        log.info("state_map_grown", path=self.path, old=self._map_size, new=new_size)
        self._map_size = new_size

    # -- reading ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _shared(self) -> Iterator[None]:
        with self._gate:
            self._readers += 1
        try:
            yield
        finally:
            with self._gate:
                self._readers -= 1
                self._gate.notify_all()

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        with self._gate:
            self._gate.wait_for(lambda: self._readers == 0)
            yield

    def read(self, command: Any) -> Result:
        """Run a read-only command against the current local state (no log involved)."""
        with self._shared(), self._env.begin(db=self._data) as txn:
            ctx = ApplyContext(index=self._applied, position=0, stamp_ms=0)
            return self.machine.apply(command, _TxnReader(txn, self._data), ctx).result

    def get(self, key: bytes) -> bytes | None:
        """One stored value as of the last committed entry (None if absent)."""
        with self._shared(), self._env.begin(db=self._data) as txn:
            value = txn.get(key, db=self._data)
            return None if value is None else bytes(value)

    def digest(self) -> str:
        """Return a SHA-256 over every (key, value) pair: equal state, equal digest."""
        return self.indexed_digest()[1]

    def indexed_digest(self) -> tuple[int, str]:
        """(applied index, digest) read from one transaction, so they describe the same state."""
        h = hashlib.sha256()
        with self._shared(), self._env.begin(db=self._data) as txn:
            raw = txn.get(_APPLIED_KEY, db=self._meta)
            applied = int(unpack(raw)) if raw is not None else 0
            for key, value in txn.cursor(db=self._data):
                h.update(len(key).to_bytes(4, "big") + key + len(value).to_bytes(4, "big") + value)
        return applied, h.hexdigest()

    def items(self) -> list[tuple[bytes, bytes]]:
        """Return every stored pair (tests and debugging; not for large stores)."""
        with self._shared(), self._env.begin(db=self._data) as txn:
            return list(txn.cursor(db=self._data))

    # -- snapshots -------------------------------------------------------------------------

    def open_snapshot(self) -> SnapshotView:
        """Pin a consistent read view of the current state (release with `close_snapshot`)."""
        with self._gate:
            self._readers += 1
        try:
            txn = self._env.begin(db=self._meta)
            raw = txn.get(_APPLIED_KEY, db=self._meta)
        except Exception:
            with self._gate:
                self._readers -= 1
                self._gate.notify_all()
            raise
        return SnapshotView(txn=txn, applied_index=0 if raw is None else unpack(raw))

    def close_snapshot(self, view: SnapshotView) -> None:
        """Release a view from `open_snapshot`."""
        view.txn.abort()
        with self._gate:
            self._readers -= 1
            self._gate.notify_all()

    def write_snapshot(self, view: SnapshotView, out: IO[bytes]) -> None:
        """Append a compacted LMDB copy of `view` to `out` at its current position."""
        out.flush()
        self._env.copyfd(out.fileno(), compact=True, txn=view.txn)

    def install_snapshot(self, src: IO[bytes]) -> None:
        """Replace the whole state with the LMDB copy that `src` holds from its position on.

        Crash-safe: the copy is written and fsynced beside the store, then swapped in by
        renames; `_recover_swap` finishes or undoes an interrupted swap on the next open.
        """
        incoming = self.path + ".incoming"
        shutil.rmtree(incoming, ignore_errors=True)
        os.makedirs(incoming)
        with open(os.path.join(incoming, "data.mdb"), "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        fsync_dir(incoming)
        with self._exclusive():
            self._env.close()
            old = self.path + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(self.path, old)
            os.rename(incoming, self.path)
            fsync_dir(os.path.dirname(os.path.abspath(self.path)))
            shutil.rmtree(old, ignore_errors=True)
            self._open()
        log.info("snapshot_installed", path=self.path, applied_index=self._applied)


def fsync_dir(path: str) -> None:
    """Make a rename or new file in directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _recover_swap(path: str) -> None:
    """Finish or undo a snapshot swap that a crash interrupted."""
    old, incoming = path + ".old", path + ".incoming"
    if not os.path.exists(path) and os.path.exists(old):
        os.rename(old, path)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(incoming, ignore_errors=True)

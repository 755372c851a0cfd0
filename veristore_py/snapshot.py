"""Log compaction and snapshot install through PySyncObj's custom serializer hooks.

PySyncObj 0.3.17 calls, from its tick thread:
- ``serializer(tmp_path, (last_entry, prev_entry, cluster))`` to compact the log;
- ``serializeChecker()`` every tick until it reports SUCCESS or FAILED, then drops journal
  entries before ``prev_entry``;
- ``deserializer(path) -> (last_entry, prev_entry, cluster)`` at start-up (if a dump exists)
  and when a leader has streamed its dump file to this follower.

`SnapshotManager.serialize` pins a consistent LMDB read view *in the tick thread* (so the view
matches the applied index exactly) and copies it on a background thread, so a large state never
stalls heartbeats. Because PySyncObj renames ``tmp_path`` right after the serializer returns and
we have not written it yet, that rename fails and PySyncObj marks its own state "failed"; it
then defers to `check()`, which is authoritative. The finished file is fsynced and renamed into
place before `check()` reports SUCCESS, so the journal is only compacted behind a durable
snapshot. No fork, no pickle, no LMDB handle crosses a process boundary.

File format: ``MAGIC`` | u32 header length | msgpack header | compacted LMDB data file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import struct
import threading
import time
from collections.abc import Callable
from typing import IO, Any

import structlog

from .codec import pack, unpack
from .errors import InvalidCommandError, StorageError
from .raft import SERIALIZER_STATE, TCPNode
from .storage import StateStore, fsync_dir

log = structlog.get_logger(__name__)

MAGIC = b"VERISNAP\x00\x01"
RETRY_AFTER_FAILURE_S = 2.0  # a failed snapshot is not tried again sooner
_LEN = struct.Struct(">I")


def read_header(f: IO[bytes]) -> dict[str, Any]:
    """Read and check a snapshot header; leave `f` at the start of the LMDB copy.

    Raises StorageError for anything that is not a whole, well-formed header.
    """
    if f.read(len(MAGIC)) != MAGIC:
        raise StorageError("not a veristore snapshot (bad magic)")
    raw_len = f.read(_LEN.size)
    if len(raw_len) != _LEN.size:
        raise StorageError("truncated snapshot header")
    (length,) = _LEN.unpack(raw_len)
    try:
        header = unpack(f.read(length))
    except InvalidCommandError as exc:
        raise StorageError(f"snapshot header is torn ({exc})") from exc
    if not (isinstance(header, dict) and {"applied", "prev", "last", "cluster"} <= set(header)):
        raise StorageError("snapshot header is malformed")
    return header


def _header_of(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        return read_header(f)


def prepare_journal(journal: Any, dump_path: str) -> None:
    """Make the dump file and the journal agree before PySyncObj starts (call before it does).

    - Leftovers of an interrupted replace or build are removed.
    - The dump is the newer of `snapshot.bin` and the node's own copy (`snapshot.bin.own`,
      see `SnapshotManager.deserialize`): a crash can leave a leader's older dump, renamed
      into place by PySyncObj, or a torn one. It is fsynced before the journal is touched.
    - A crash after a snapshot was renamed into place but before PySyncObj compacted the
      journal leaves a journal that starts before the snapshot's ``prev`` entry; PySyncObj's
      start-up would then *clear* it down to ``[prev, last]``, dropping entries after
      ``last`` this node may have acknowledged. Finishing the compaction here (drop the
      entries before ``prev``, fsync) keeps them.

    Raises StorageError, and the node refuses to start, when no readable dump exists or the
    journal starts after the dump's last entry (PySyncObj would clear it, and the entries in
    between exist nowhere here): starting would lose acknowledged entries silently.
    """
    for leftover in (dump_path + _REPLACING, dump_path + _BUILDING,
                     dump_path + OWN_SUFFIX + _REPLACING, dump_path + OWN_SUFFIX + _BUILDING,
                     dump_path + OWN_SUFFIX + ".tmp"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(leftover)
    if not os.path.exists(dump_path):
        return
    try:
        header: dict[str, Any] | None = _header_of(dump_path)
    except (OSError, StorageError) as exc:
        if not os.path.exists(dump_path + OWN_SUFFIX):
            raise StorageError(
                f"snapshot {dump_path} is unreadable ({exc}); restore it from a backup or "
                f"remove the node's data dir and let it catch up") from exc
        log.warning("snapshot_unreadable", path=dump_path, error=repr(exc))
        header = None
    header = _own_if_newer(dump_path, header) or header
    if header is None:
        raise StorageError(f"snapshot {dump_path} and its own copy are unreadable; restore "
                           f"one from a backup or remove the node's data dir and let it catch up")
    with open(dump_path, "rb") as f:
        os.fsync(f.fileno())
    fsync_dir(os.path.dirname(os.path.abspath(dump_path)))
    prev, last = _entry(header["prev"]), _entry(header["last"])
    if len(journal) and journal[0][1] > last[1]:
        raise StorageError(
            f"the journal starts at entry {journal[0][1]}, after the snapshot's last entry "
            f"{last[1]} ({dump_path}): the entries in between are not on this member. Replace "
            f"it: stop it, move its data dir away and start it empty while the other members "
            f"are healthy (docs/operations.md)")
    for position in range(len(journal) - 1):
        if journal[position][1:] == prev[1:] and journal[position + 1][1:] == last[1:]:
            if position:
                journal.deleteEntriesTo(position)
                journal.sync()
                log.warning("journal_compaction_finished", dropped_before=prev[1])
            return


OWN_SUFFIX = ".own"
_REPLACING = ".replacing"  # (not ".tmp": PySyncObj writes `<dump>.tmp` itself)
_BUILDING = ".building"  # a build's files (its thread runs beside the tick thread)

# link() errors that mean "no hard links here", not "something is wrong"
_NO_HARD_LINKS = {errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK}


def _stage(src: str, dst: str, suffix: str = _REPLACING) -> str:
    """Prepare `dst` to hold the snapshot at `src`: a hard link (or, on a file system without
    them, a fsynced copy) at `dst + suffix`, returned for `os.replace(it, dst)`. Callers that
    may run at once (a build's thread, the tick thread) use different suffixes."""
    staged = dst + suffix
    with contextlib.suppress(FileNotFoundError):
        os.remove(staged)
    try:
        os.link(src, staged)
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        shutil.copyfile(src, staged)
        with open(staged, "rb") as f:
            os.fsync(f.fileno())
    return staged


def _replace_with(src: str, dst: str) -> None:
    """Make `dst` hold the snapshot at `src`, atomically; the caller fsyncs the directory."""
    os.replace(_stage(src, dst), dst)


def _own_if_newer(path: str, header: dict[str, Any] | None) -> dict[str, Any] | None:
    """This node's own copy's header if it is newer than the dump at `path` (`header`; None
    if unreadable), after putting it back at `path` (the caller fsyncs the directory); else
    None. A leader's older dump must not cut a log that follows our own."""
    own = _own_header(path)
    if own is None or (header is not None and own["last"][1] <= header["last"][1]):
        return None
    if header is not None:
        log.info("snapshot_older_than_own_kept_own", received_last=header["last"][1],
                 own_last=own["last"][1])
    _replace_with(path + OWN_SUFFIX, path)
    return own


def _own_header(path: str) -> dict[str, Any] | None:
    """The header of this node's own latest snapshot beside `path`, or None (none kept yet,
    or unreadable: then the dump at `path` is taken as it is)."""
    try:
        return _header_of(path + OWN_SUFFIX)
    except FileNotFoundError:
        return None
    except (OSError, StorageError) as exc:
        log.warning("own_snapshot_unreadable", path=path + OWN_SUFFIX, error=repr(exc))
        return None


def _entry(raw: Any) -> tuple[bytes, int, int]:
    command, index, term = raw
    return bytes(command), int(index), int(term)


class SnapshotManager:
    """Serializer, checker and deserializer for `SyncObjConf` (see module docstring)."""

    def __init__(self, store: StateStore) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._state = SERIALIZER_STATE.NOT_SERIALIZING
        self._generation = 0
        self._thread: threading.Thread | None = None
        self.built = 0
        self.installed = 0
        self._retry_at = 0.0  # (monotonic) no new attempt before this, after a failure
        self.on_fatal: Callable[[int], Any] = os._exit  # (tests replace it)

    def serialize(self, tmp_path: str, data: Any) -> None:
        """Start writing a snapshot of the current state (PySyncObj `serializer`)."""
        last, prev, cluster = data
        final = tmp_path[: -len(".tmp")] if tmp_path.endswith(".tmp") else tmp_path
        with contextlib.suppress(OSError):  # PySyncObj renames it over `final` on return
            os.remove(tmp_path)
        if time.monotonic() < self._retry_at:
            # PySyncObj asks again soon after a failure; on a full disk that would be
            # hundreds of failed attempts (and error lines) a second.
            with self._lock:
                self._state = SERIALIZER_STATE.FAILED
            return
        try:
            view = self._store.open_snapshot()
        except Exception as exc:  # report FAILED instead of leaving PySyncObj "serializing"
            self._failed(exc)
            with self._lock:
                self._state = SERIALIZER_STATE.FAILED
            return
        header = {
            "applied": view.applied_index,
            "last": list(last),
            "prev": list(prev),
            "cluster": sorted(getattr(n, "address", str(n)) for n in cluster),
        }
        with self._lock:
            self._state = SERIALIZER_STATE.SERIALIZING
            generation = self._generation
        self._thread = threading.Thread(
            target=self._build, args=(final, header, view, generation), name="snapshot",
            daemon=True)
        self._thread.start()

    def _build(self, final: str, header: dict[str, Any], view: Any, generation: int) -> None:
        building = final + _BUILDING
        done = False
        try:
            with open(building, "wb") as f:
                raw = pack(header)
                f.write(MAGIC + _LEN.pack(len(raw)) + raw)
                self._store.write_snapshot(view, f)
                f.flush()
                os.fsync(f.fileno())
            # The live state becomes the base the compacted journal builds on: make it durable.
            self._store.sync()
            own = _stage(building, final + OWN_SUFFIX, _BUILDING)  # (outside the lock)
            with self._lock:  # (one hold: `deserialize` sees the build done or not, not half)
                if generation == self._generation:  # else a leader's snapshot came in between
                    os.replace(building, final)
                    os.replace(own, final + OWN_SUFFIX)
                    fsync_dir(os.path.dirname(os.path.abspath(final)))
                    done = True
                    self._state = SERIALIZER_STATE.SUCCESS
                    self.built += 1
            if done:
                log.info("snapshot_built", applied=header["applied"],
                         last_index=header["last"][1], bytes=os.path.getsize(final))
        except Exception as exc:
            self._failed(exc)
        finally:
            self._store.close_snapshot(view)
            if not done:
                for leftover in (building, final + OWN_SUFFIX + _BUILDING):
                    with contextlib.suppress(OSError):  # a partial file would keep a disk full
                        os.remove(leftover)
                with self._lock:
                    self._state = SERIALIZER_STATE.FAILED

    def _failed(self, exc: Exception) -> None:
        log.error("snapshot_failed", error=repr(exc), retry_in_s=RETRY_AFTER_FAILURE_S)
        self._retry_at = time.monotonic() + RETRY_AFTER_FAILURE_S

    def check(self) -> int:
        """Report the background build's state (PySyncObj `serializeChecker`)."""
        with self._lock:
            state = self._state
            if state in (SERIALIZER_STATE.SUCCESS, SERIALIZER_STATE.FAILED):
                self._state = SERIALIZER_STATE.NOT_SERIALIZING
            return state

    def deserialize(self, path: str) -> tuple[Any, Any, list[TCPNode]]:
        """`_deserialize`, or stop the process if it fails.

        PySyncObj catches any error of its deserializer, logs it and carries on: at start-up
        the member would then never apply an entry, and after a leader's snapshot it would
        acknowledge the install as done with its log unchanged, so the leader could count it
        for entries it does not hold. Exiting instead lets the supervisor (systemd) restart
        it; a restart is always safe and redoes the load.
        """
        try:
            return self._deserialize(path)
        except Exception as exc:
            log.critical("snapshot_load_failed_exiting", path=path, error=repr(exc))
            self.on_fatal(70)  # EX_SOFTWARE
            raise

    def _deserialize(self, path: str) -> tuple[Any, Any, list[TCPNode]]:
        """Load the dump at `path`, installing its state if it is ahead of ours.

        At start-up `path` is this node's own snapshot, or one a leader sent just before a
        crash; otherwise a leader has just streamed its dump to `path`, replacing ours. A dump
        older than this node's own (`<path>.own`, kept as a hard link) is refused: ours is put
        back and returned, so PySyncObj keeps the log that follows it. Without that, a
        follower that had compacted past the leader's snapshot would have its log cut to the
        older snapshot's two entries, entries it has acknowledged among those dropped.
        """
        with self._lock:
            self._generation += 1
            # A build of ours that finished but is not reported yet: PySyncObj would compact
            # the journal behind it, but `path` no longer holds it. It builds again later.
            if self._state == SERIALIZER_STATE.SUCCESS:
                self._state = SERIALIZER_STATE.FAILED
            # PySyncObj renames a received dump into place without fsync; make it durable
            # before this node acknowledges the install (the acknowledgement follows this).
            with open(path, "rb") as f:
                os.fsync(f.fileno())
                header = read_header(f)
            own = _own_if_newer(path, header)
            if own is not None:
                header = own
            elif (kept := _own_header(path)) is None or _entry(kept["last"]) != _entry(
                    header["last"]):  # taken: it becomes the own copy, unless it already is
                _replace_with(path, path + OWN_SUFFIX)
            fsync_dir(os.path.dirname(os.path.abspath(path)))
        if header["applied"] > self._store.applied_index:
            with open(path, "rb") as f:
                read_header(f)
                log.info("snapshot_installing", applied=header["applied"],
                         local_applied=self._store.applied_index)
                self._store.install_snapshot(f)
                self.installed += 1
        cluster = [TCPNode(address) for address in header["cluster"]]
        return _entry(header["last"]), _entry(header["prev"]), cluster

    def wait(self) -> None:
        """Wait for a background build to finish (shutdown, tests)."""
        thread = self._thread
        if thread is not None:
            thread.join()

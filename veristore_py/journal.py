"""LMDB-backed Raft journal for PySyncObj: log entries, current term, voted-for, commit index.

PySyncObj (0.3.17) talks to its journal through the small interface of
`pysyncobj.journal.Journal`: `add`, `clear`, `deleteEntriesFrom`, `deleteEntriesTo`,
indexing, `len`, term/vote and commit-index accessors. `LmdbJournal` implements it.

Durability contract (Raft's "persist before you respond"):
- `setCurrentTerm` (term + vote) commits and fsyncs before it returns, so a vote is durable
  before the vote response is sent.
- `add` / deletions change the in-memory log and queue the LMDB writes; `sync()` writes the
  whole queue in one LMDB transaction committed with fsync. `raft.DurableTransport` calls
  `sync()` before *any* message leaves this node, so no follower acknowledges, and no leader
  replicates (and so counts toward a commit), an entry that is not on disk. Many entries
  written in one tick share one transaction and one fsync: group commit at the journal level.
- Every LMDB commit here is a synced one (the environment is opened with ``sync=True``). LMDB
  without sync may *corrupt* a database on power loss (pages freed by unsynced commits get
  reused under the last synced root), so the journal never commits without syncing; after a
  power loss or kill -9 the file holds exactly the last `sync()`, and what is lost was never
  acknowledged.
- The commit index is a hint (Raft keeps it volatile); it is queued once a second.

The log is mirrored in memory as a list (PySyncObj slices it on every tick); compaction keeps it
bounded at about `logCompactionMinEntries`.

Plugging in: PySyncObj builds its journal with `pysyncobj.syncobj.createJournal(conf.journalFile)`.
`install_journal_factory()` wraps that function so that a `LmdbJournal` instance passed as
``SyncObjConf(journalFile=...)`` is used as is (see `node.py`).
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable
from typing import Any

import lmdb
import structlog

from .codec import pack, unpack
from .errors import StorageError
from .raft import Journal, journal_factory, set_journal_factory

log = structlog.get_logger(__name__)

_KEY = struct.Struct(">Q")
_TERM = struct.Struct(">Q")
_META_TERM = b"term"
_META_COMMIT = b"commit_index"
_MEMBERSHIP = b"\x02"  # first byte of PySyncObj's membership-change commands (_COMMAND_TYPE)

Entry = tuple[bytes, int, int]  # (command, index, term), PySyncObj's shape


class LmdbJournal(Journal):
    """A PySyncObj journal kept in an LMDB environment at `path`."""

    def __init__(self, path: str, map_size: int = 1 << 30) -> None:
        os.makedirs(path, exist_ok=True)
        self.path = path
        self._map_size = map_size
        try:
            self._env = lmdb.open(path, map_size=map_size, max_dbs=2, sync=True, metasync=True,
                                  readahead=False)
        except lmdb.Error as exc:
            raise StorageError(f"cannot open journal at {path}: {exc}") from exc
        problem = lmdb_truncation(self._env, path)
        if problem:
            self._env.close()
            raise StorageError(
                f"journal at {path} is damaged ({problem}): this member cannot vouch for the "
                f"entries it acknowledged. Replace it: stop it, move its data dir away and start "
                f"it empty while the other members are healthy (docs/operations.md)")
        self._log = self._env.open_db(b"log")
        self._meta = self._env.open_db(b"meta")
        self._entries: list[Entry] = []
        # Applies membership-change commands again; set by the node so that PySyncObj's
        # member set stays what the log says (see deleteEntriesFrom).
        self.on_membership: Callable[[list[bytes]], None] = lambda commands: None
        self._rewound_from: int | None = None  # first index of a kept tail, until `settle`
        self._before_clear: list[Entry] | None = None  # the log `clear` dropped, until `add`s
        self._last_added = 0  # index of the last `add` since the rewind began
        # LMDB writes queued since the last sync: ("put", key, value) | ("del", key) | ("drop",)
        self._pending: list[tuple[Any, ...]] = []
        self._lock = threading.Lock()
        self.syncs = 0
        with self._env.begin() as txn:
            for key, value in txn.cursor(db=self._log):
                (index,) = _KEY.unpack(key)
                (term,) = _TERM.unpack_from(value)
                self._entries.append((bytes(value[_TERM.size:]), index, term))
            raw_term = txn.get(_META_TERM, db=self._meta)
            raw_commit = txn.get(_META_COMMIT, db=self._meta)
        self._term: int = 0
        self._voted_for: str | None = None
        if raw_term is not None:
            self._term, self._voted_for = unpack(raw_term)
        self._commit_index = 1 if raw_commit is None else unpack(raw_commit)
        self._commit_saved = True

    # -- writes ----------------------------------------------------------------------------

    def _write(self, fn: Any) -> None:
        """Run `fn(txn)` in one write transaction, committed with fsync."""
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    fn(txn)
                return
            except lmdb.MapFullError:
                self._map_size *= 2
                self._env.set_mapsize(self._map_size)
            except lmdb.Error as exc:
                raise StorageError(f"journal write failed: {exc}") from exc

    def _apply_pending(self, txn: lmdb.Transaction, pending: list[tuple[Any, ...]]) -> None:
        for op in pending:
            if op[0] == "put":
                txn.put(op[1], op[2], db=self._log)
            elif op[0] == "del":
                txn.delete(op[1], db=self._log)
            else:
                txn.drop(self._log, delete=False)

    def add(self, command: bytes, idx: int, term: int) -> None:
        """Append one entry (on disk after the next `sync()`).

        An index the log already holds means PySyncObj is resending after it rewound this
        follower (see `deleteEntriesFrom`). Raft's rule then applies: the same entry is kept
        as it is; a different one is a conflict, and the log is truncated from there (in the
        same sync) before it is appended.
        """
        command = bytes(command)
        entry = (command, idx, term)
        self._last_added = idx
        if self._entries and idx <= self._entries[-1][1]:
            position = idx - self._entries[0][1]
            if position < 0 or self._entries[position] == entry:
                return  # (below the first entry: compacted, so committed and the same)
            self._truncate(position)
        self._pending.append(("put", _KEY.pack(idx), _TERM.pack(term) + command))
        self._entries.append(entry)
        if self._before_clear is not None and len(self._entries) == 2:
            self._installed()

    def _installed(self) -> None:
        """After `clear`, `add(prev)`, `add(last)`: keep the old entries after `last` if the
        old log held `last` itself (Raft's snapshot-install rule), in the same sync."""
        before, self._before_clear = self._before_clear, None
        last = self._entries[-1]
        if not before or not before[0][1] <= last[1] <= before[-1][1]:
            return
        position = last[1] - before[0][1]
        if before[position] != last:
            return
        tail = before[position + 1:]
        log.info("snapshot_install_kept_log", last_index=last[1], kept_entries=len(tail))
        # On disk, instead of dropping everything: delete only what precedes `prev` (`prev`
        # and `last` are written again, unchanged), so the kept tail is not rewritten.
        drop = len(self._pending) - 1 - self._pending[::-1].index(("drop",))
        prev_index = self._entries[0][1]
        self._pending[drop:drop + 1] = [("del", _KEY.pack(index)) for _, index, _ in before
                                        if index < prev_index]
        self._entries.extend(tail)
        if tail:
            # PySyncObj has just set its member set from the snapshot; `settle` applies the
            # membership changes of the kept tail again, in log order.
            self._rewound_from, self._last_added = last[1] + 1, last[1]

    def clear(self) -> None:
        """Drop every entry, unless a snapshot install keeps a tail (see `_installed`).

        PySyncObj installs a snapshot sent by the leader as `clear()`, `add(prev)`,
        `add(last)`. Raft's rule for that install: if the log holds the snapshot's last entry
        (same index and term), the entries after it stay. They can be entries this follower
        has acknowledged, which the leader counts as held here; dropping them could lose a
        committed entry if the leader then failed. The old entries are kept aside until the
        second `add` says which case this is.
        """
        self._pending.append(("drop",))
        self._before_clear = self._entries
        self._entries = []
        self._rewound_from = None

    def deleteEntriesFrom(self, entryFrom: int) -> None:  # noqa: N802 (PySyncObj's name)
        """PySyncObj's truncation of a follower's log at list position `entryFrom`: deferred.

        PySyncObj 0.3.17 calls this whenever a follower holds entries past the leader's
        `prevLogIdx`, even ones that match; Raft truncates only from the first conflicting
        entry. It happens in normal operation, after a stale acknowledgement rewinds the
        leader's next index for this follower. Truncating then would drop entries the leader
        already counts on this follower, from its disk and from the log its votes are judged
        by; if the resend stops short and the leader fails, a committed entry could be lost.
        So the tail stays, and `add` truncates from the first entry that conflicts.

        PySyncObj has already reversed the tail's membership changes in memory, and after
        the resent entries are added it applies theirs again; `settle` (called once the
        message is handled) applies those of the tail past the last resent entry, in log
        order, so PySyncObj's member set matches the log.
        """
        self._before_clear = None
        if entryFrom < len(self._entries):
            self._rewound_from = self._entries[entryFrom][1]
            self._last_added = 0

    def settle(self) -> None:
        """Finish a rewind once PySyncObj has handled its message (see deleteEntriesFrom)."""
        rewound_from, self._rewound_from = self._rewound_from, None
        if rewound_from is None or not self._entries:
            return
        start = self._last_added + 1 if self._last_added >= rewound_from else rewound_from
        position = max(start - self._entries[0][1], 0)
        changes = [command for command, _, _ in self._entries[position:]
                   if command[:1] == _MEMBERSHIP]
        if changes:
            self.on_membership(changes)

    def _truncate(self, position: int) -> None:
        doomed = self._entries[position:]
        self._pending.extend(("del", _KEY.pack(index)) for _, index, _ in doomed)
        del self._entries[position:]

    def deleteEntriesTo(self, entryTo: int) -> None:  # noqa: N802
        """Drop entries at list positions < entryTo (compaction after a snapshot)."""
        self._before_clear = None
        doomed = self._entries[:entryTo]
        self._pending.extend(("del", _KEY.pack(index)) for _, index, _ in doomed)
        self._entries = self._entries[entryTo:]

    def sync(self, extra: tuple[bytes, bytes] | None = None) -> None:
        """Write everything queued since the last sync in one fsynced transaction.

        `extra` is a (key, value) for the meta table written in the same transaction.
        """
        self._before_clear = None  # (a `clear` not followed by two `add`s: a plain one)
        with self._lock:
            if not self._pending and extra is None:
                return
            pending, self._pending = self._pending, []

            def write(txn: lmdb.Transaction) -> None:
                self._apply_pending(txn, pending)
                if extra is not None:
                    txn.put(extra[0], extra[1], db=self._meta)

            try:
                self._write(write)
            except BaseException:
                self._pending = pending + self._pending
                raise
            self.syncs += 1

    # -- reads -----------------------------------------------------------------------------

    def __getitem__(self, item: Any) -> Any:
        return self._entries[item]

    def __len__(self) -> int:
        return len(self._entries)

    # -- Raft persistent state -------------------------------------------------------------

    def setCurrentTerm(self, term: int, votedForNodeId: Any) -> None:  # noqa: N802, N803
        """Persist term and vote durably before returning."""
        voted = None if votedForNodeId is None else str(votedForNodeId)
        self.sync(extra=(_META_TERM, pack([term, voted])))
        self._term, self._voted_for = term, voted

    def getCurrentTerm(self) -> int:  # noqa: N802
        return self._term

    def getVotedForNodeId(self) -> Any:  # noqa: N802
        return self._voted_for

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:  # noqa: N802, N803
        if raftCommitIndex != self._commit_index:
            self._commit_index = raftCommitIndex
            self._commit_saved = False

    def getRaftCommitIndex(self) -> int:  # noqa: N802
        return self._commit_index

    def onOneSecondTimer(self) -> None:  # noqa: N802
        if not self._commit_saved:
            self.sync(extra=(_META_COMMIT, pack(self._commit_index)))
            self._commit_saved = True

    def _destroy(self) -> None:
        self.close()

    def close(self) -> None:
        """Flush and close (idempotent).

        A flush that fails (full disk) only loses writes nobody was told about: entries are
        acknowledged, and counted by a leader, only after a sync that succeeded.
        """
        if self._env is None:
            return
        try:
            self.onOneSecondTimer()
            self.sync()
        except StorageError as exc:
            log.warning("journal_flush_failed_at_close", error=str(exc))
        finally:
            self._env.close()
            self._env = None  # type: ignore[assignment]


def lmdb_truncation(env: lmdb.Environment, path: str) -> str | None:
    """Why the data file of `env` (at `path`) is shorter than its last commit says, or None.

    LMDB maps the file into memory, so a page past the end would kill the process with
    SIGBUS on first read instead of raising: check the length before reading anything.
    """
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    size = os.path.getsize(os.path.join(path, "data.mdb"))
    if size < needed:
        return f"data.mdb has {size} bytes, its last commit needs {needed}: truncated"
    return None


def install_journal_factory() -> None:
    """Make PySyncObj use a `LmdbJournal` passed as ``SyncObjConf(journalFile=...)``.

    Idempotent. Any other `journalFile` value still gets PySyncObj's own journal.
    """
    current = journal_factory()
    if getattr(current, "_veristore", False):
        return

    def create_journal(journal_file: Any = None) -> Journal:
        if isinstance(journal_file, LmdbJournal):
            return journal_file
        return current(journal_file)

    create_journal._veristore = True  # type: ignore[attr-defined]
    set_journal_factory(create_journal)

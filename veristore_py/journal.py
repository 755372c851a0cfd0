"""LMDB-backed Raft journal for PySyncObj: log entries, current term, voted-for, commit index.

PySyncObj (0.3.17) talks to its journal through the small interface of
`pysyncobj.journal.Journal`: `add`, `clear`, `deleteEntriesFrom`, `deleteEntriesTo`,
indexing, `len`, term/vote and commit-index accessors. `LmdbJournal` implements it.

Durability contract (Raft's "persist before you respond"):
- `setCurrentTerm` (term + vote) commits and fsyncs before it returns, so a vote is durable
  before the vote response is sent.
- `add` / deletions commit to LMDB without fsync and mark the journal dirty; `sync()` fsyncs
  once for everything written since the last sync. `node.DurableTransport` calls `sync()`
  before *any* message leaves this node, so no follower acknowledges, and no leader replicates
  (and so counts toward a commit), an entry that is not on disk. Many entries written in one
  tick share one fsync: group commit at the journal level.
- The commit index is a hint (Raft keeps it volatile); it is written lazily once a second.

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
from typing import Any

import lmdb
import pysyncobj.syncobj as _syncobj_module
from pysyncobj.journal import Journal

from .codec import pack, unpack
from .errors import StorageError

_KEY = struct.Struct(">Q")
_TERM = struct.Struct(">Q")
_META_TERM = b"term"
_META_COMMIT = b"commit_index"

Entry = tuple[bytes, int, int]  # (command, index, term), PySyncObj's shape


class LmdbJournal(Journal):
    """A PySyncObj journal kept in an LMDB environment at `path`."""

    def __init__(self, path: str, map_size: int = 1 << 30) -> None:
        os.makedirs(path, exist_ok=True)
        self.path = path
        self._map_size = map_size
        try:
            self._env = lmdb.open(path, map_size=map_size, max_dbs=2, sync=False, metasync=True,
                                  readahead=False)
        except lmdb.Error as exc:
            raise StorageError(f"cannot open journal at {path}: {exc}") from exc
        self._log = self._env.open_db(b"log")
        self._meta = self._env.open_db(b"meta")
        self._entries: list[Entry] = []
        self._dirty = False
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

    def add(self, command: bytes, idx: int, term: int) -> None:
        """Append one entry (durable at the next `sync()`)."""
        command = bytes(command)
        self._write(lambda txn: txn.put(_KEY.pack(idx), _TERM.pack(term) + command, db=self._log))
        self._entries.append((command, idx, term))
        self._dirty = True

    def clear(self) -> None:
        """Drop every entry."""
        self._write(lambda txn: txn.drop(self._log, delete=False))
        self._entries = []
        self._dirty = True

    def deleteEntriesFrom(self, entryFrom: int) -> None:  # noqa: N802 (PySyncObj's name)
        """Drop entries at list positions >= entryFrom (a follower truncating a conflict)."""
        doomed = self._entries[entryFrom:]
        if not doomed:
            return

        def delete(txn: lmdb.Transaction) -> None:
            for _, index, _ in doomed:
                txn.delete(_KEY.pack(index), db=self._log)

        self._write(delete)
        del self._entries[entryFrom:]
        self._dirty = True

    def deleteEntriesTo(self, entryTo: int) -> None:  # noqa: N802
        """Drop entries at list positions < entryTo (compaction after a snapshot)."""
        doomed = self._entries[:entryTo]
        if not doomed:
            return

        def delete(txn: lmdb.Transaction) -> None:
            for _, index, _ in doomed:
                txn.delete(_KEY.pack(index), db=self._log)

        self._write(delete)
        self._entries = self._entries[entryTo:]
        self._dirty = True

    def sync(self) -> None:
        """fsync everything written since the last sync (no-op when clean)."""
        if not self._dirty:
            return
        with self._lock:
            self._env.sync(True)
            self._dirty = False
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
        self._write(lambda txn: txn.put(_META_TERM, pack([term, voted]), db=self._meta))
        self._env.sync(True)
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
            index = self._commit_index
            self._write(lambda txn: txn.put(_META_COMMIT, pack(index), db=self._meta))
            self._commit_saved = True

    def _destroy(self) -> None:
        self.close()

    def close(self) -> None:
        """Flush and close (idempotent)."""
        if self._env is None:
            return
        self.onOneSecondTimer()
        self._env.sync(True)
        self._env.close()
        self._env = None  # type: ignore[assignment]


def install_journal_factory() -> None:
    """Make PySyncObj use a `LmdbJournal` passed as ``SyncObjConf(journalFile=...)``.

    Idempotent. Any other `journalFile` value still gets PySyncObj's own journal.
    """
    current = _syncobj_module.createJournal
    if getattr(current, "_veristore", False):
        return

    def create_journal(journal_file: Any = None) -> Journal:
        if isinstance(journal_file, LmdbJournal):
            return journal_file
        return current(journal_file)

    create_journal._veristore = True  # type: ignore[attr-defined]
    _syncobj_module.createJournal = create_journal

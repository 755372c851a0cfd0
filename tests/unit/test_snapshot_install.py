"""Snapshots: a follower sent one keeps the acknowledged entries after it (real PySyncObj,
LMDB and the node's snapshot manager); a failed build cleans up and backs off.

Three PySyncObj members on `LmdbJournal`, a `StateStore` and `SnapshotManager` (the node's
snapshot path), ticked by hand, with an in-memory transport that follows
`raft.DurableTransport`'s rules (sync before any message but a leader's append,
acknowledgements stamped with the term and stale ones dropped, `settle` after each message).

The scenarios (found in reviews): a slow follower F acknowledges entries in order; its first,
old acknowledgement makes PySyncObj's leader lower F's next index below the leader's
compacted log start, so the leader sends F a snapshot, while F's later acknowledgements make
the leader commit entries F holds. F installs the snapshot after that. If the install drops
F's log after the snapshot, and the leader then dies, those committed entries are gone: the
third member never got them. F's log may still hold the snapshot's last entry, or F may have
compacted past it already (its own snapshot is newer).
"""

from __future__ import annotations

import os
import pickle
import threading
from collections.abc import Callable
from typing import Any

import pytest
from pysyncobj import SERIALIZER_STATE, SyncObj, SyncObjConf, replicated
from pysyncobj.transport import Transport

from veristore_py import snapshot
from veristore_py.codec import pack
from veristore_py.errors import StorageError
from veristore_py.journal import LmdbJournal, install_journal_factory
from veristore_py.raft import ACK_TERM, stale_ack
from veristore_py.snapshot import SnapshotManager
from veristore_py.state import KVMachine
from veristore_py.storage import StateStore

Message = tuple[str, str, dict[str, Any]]


class MemoryTransport(Transport):
    """Queues messages in `queue`; the test delivers them. The sender's own rules apply."""

    queue: list[Message]

    def __init__(self, syncObj: Any, selfNode: Any, otherNodes: Any) -> None:  # noqa: N803
        super().__init__(syncObj, selfNode, otherNodes)
        self.owner = syncObj
        self.address = selfNode.address
        self.others = {n.address: n for n in otherNodes}

    def connect_all(self) -> None:
        for node in self.others.values():
            self._onNodeConnected(node)

    def send(self, node: Any, message: Any) -> bool:
        if message.get("type") == "next_node_idx":
            message = {**message, ACK_TERM: self.owner.raftCurrentTerm}
        if message.get("type") != "append_entries":
            self.owner.journal.sync()
        self.queue.append((self.address, node.address, pickle.loads(pickle.dumps(message))))
        return True

    def deliver(self, source: str, message: dict[str, Any]) -> None:
        if stale_ack(message, self.owner.raftCurrentTerm):
            return
        try:
            self._onMessageReceived(self.others[source], message)
        finally:
            self.owner.journal.settle()


class Member(SyncObj):
    def __init__(self, address: str, others: list[str], directory: str) -> None:
        name = address.replace(":", "_")
        self.journal = LmdbJournal(os.path.join(directory, name))
        self.store = StateStore(os.path.join(directory, name + "-state"), KVMachine(),
                                map_size=1 << 22)
        self.snapshots = SnapshotManager(self.store)
        conf = SyncObjConf(autoTick=False, appendEntriesUseBatch=False,
                           journalFile=self.journal,
                           fullDumpFile=os.path.join(directory, name + ".dump"), useFork=False,
                           serializer=self.snapshots.serialize,
                           deserializer=self.snapshots.deserialize,
                           serializeChecker=self.snapshots.check,
                           logCompactionMinEntries=10**9, logCompactionMinTime=10**9,
                           raftMinTimeout=1000, raftMaxTimeout=1001,
                           leaderFallbackTimeout=10**6, appendEntriesPeriod=100,
                           connectionTimeout=2000)
        super().__init__(address, others, conf, transportClass=MemoryTransport)

    @replicated
    def put(self, value: int) -> int:
        self.store.apply_entry(self.raftLastApplied + 1, 0,
                               [{"op": "put", "key": b"k%d" % value, "value": b"v"}])
        return value

    @property
    def transport(self) -> MemoryTransport:
        return self._SyncObj__transport  # type: ignore[attr-defined,no-any-return]

    def tick(self) -> None:
        self.doTick(0)
        self.journal.sync()  # as the node's poll wrapper does before handling messages

    def compact(self) -> None:
        """Snapshot now and compact the journal behind it (PySyncObj log compaction)."""
        self.forceLogCompaction()
        self.tick()
        self.snapshots.wait()
        self.tick()
        self.tick()

    def close(self) -> None:
        self.snapshots.wait()
        self.journal.close()
        if not getattr(self, "_closed", False):
            self._closed = True
            self.store.close()


class Cluster:
    """Three hand-ticked members; `deliver` hands queued messages over, in order."""

    def __init__(self, directory: str) -> None:
        install_journal_factory()
        self.queue: list[Message] = []
        MemoryTransport.queue = self.queue
        addresses = ["a:1", "b:2", "c:3"]
        self.members = {a: Member(a, [x for x in addresses if x != a], directory)
                        for a in addresses}
        for member in self.members.values():
            member.transport.connect_all()
        self.answers: dict[int, int] = {}

    def deliver(self, matches: Callable[[str, str, dict[str, Any]], bool],
                limit: int | None = None) -> None:
        done = i = 0
        while i < len(self.queue) and (limit is None or done < limit):
            source, target, message = self.queue[i]
            if matches(source, target, message):
                self.queue.pop(i)
                self.members[target].transport.deliver(source, message)
                done += 1
            else:
                i += 1

    def cut(self, address: str) -> None:
        self.queue[:] = [q for q in self.queue if address not in (q[0], q[1])]

    def elect(self) -> Member:
        leader = self.members["a:1"]
        leader._SyncObj__raftElectionDeadline = 0  # type: ignore[attr-defined]
        leader.tick()
        self.deliver(lambda s, t, m: True)
        self.deliver(lambda s, t, m: True)
        assert leader._isLeader()
        for _ in range(5):
            leader.tick()
            self.deliver(lambda s, t, m: True)
        return leader

    def put(self, leader: Member, values: range) -> None:
        for value in values:
            leader.put(value, callback=lambda _r, error, v=value: self.answers.__setitem__(
                v, error))
        leader.tick()

    def acknowledged(self) -> list[int]:
        return sorted(v for v, error in self.answers.items() if error == 0)

    def close(self) -> None:
        for member in self.members.values():
            member.close()


def test_a_snapshot_sent_after_acknowledgements_keeps_committed_entries(tmp_path):
    cluster = Cluster(str(tmp_path))
    try:
        leader, slow = cluster.elect(), cluster.members["b:2"]
        cluster.put(leader, range(10))  # to both followers, one append each
        cluster.deliver(lambda s, t, m: t == "c:3")
        cluster.deliver(lambda s, t, m: s == "c:3")
        leader.tick()
        leader.tick()
        cluster.put(leader, range(10, 20))  # to both; the third member is cut off from here
        cluster.cut("c:3")
        leader.compact()
        cluster.deliver(lambda s, t, m: t == "b:2")  # the slow follower handles everything
        held = slow.journal[-1][1]
        cluster.deliver(lambda s, t, m: s == "b:2", limit=1)  # its oldest acknowledgement
        leader._SyncObj__newAppendEntriesTime = 0  # type: ignore[attr-defined]
        leader.tick()
        assert any("serialized" in m for s, t, m in cluster.queue if t == "b:2"), "no snapshot"
        cluster.deliver(lambda s, t, m: s == "b:2")  # the rest: the leader commits them
        leader.tick()
        leader.tick()
        committed = leader.raftCommitIndex
        assert committed == held and cluster.acknowledged() == list(range(20))
        cluster.deliver(lambda s, t, m: t == "b:2" and "serialized" in m)  # F installs it
        cluster.queue.clear()  # the leader dies before anything else arrives
        slow.close()
        reopened = LmdbJournal(slow.journal.path)
        assert reopened[-1][1] == committed, "an acknowledged, committed entry was dropped"
        reopened.close()
    finally:
        cluster.close()


def test_a_snapshot_older_than_the_followers_own_keeps_its_log(tmp_path):
    """F has compacted past the leader's snapshot (F's own is newer): the install must keep
    F's own snapshot and its whole log, now and after a restart (second review)."""
    cluster = Cluster(str(tmp_path))
    try:
        leader, slow = cluster.elect(), cluster.members["b:2"]
        cluster.put(leader, range(10))
        cluster.deliver(lambda s, t, m: t in ("b:2", "c:3"))
        cluster.deliver(lambda s, t, m: s == "c:3")  # F's acknowledgements are held back
        leader.tick()
        leader.tick()
        leader.compact()  # the leader's snapshot
        leader_last = leader.journal[1][1]
        cluster.put(leader, range(10, 20))  # committed with the third member
        cluster.deliver(lambda s, t, m: t in ("b:2", "c:3"))
        cluster.deliver(lambda s, t, m: s == "c:3")
        leader.tick()
        leader._SyncObj__newAppendEntriesTime = 0  # type: ignore[attr-defined]
        leader.tick()
        cluster.deliver(lambda s, t, m: t in ("b:2", "c:3"))
        cluster.deliver(lambda s, t, m: s == "c:3")
        slow.tick()
        slow.compact()  # F's own snapshot, newer than the leader's
        assert slow.journal[0][1] > leader_last
        cluster.cut("c:3")
        cluster.put(leader, range(20, 30))  # F only from here
        cluster.cut("c:3")
        cluster.deliver(lambda s, t, m: t == "b:2")
        cluster.deliver(lambda s, t, m: s == "b:2", limit=1)  # F's oldest acknowledgement
        leader._SyncObj__newAppendEntriesTime = 0  # type: ignore[attr-defined]
        leader.tick()
        cluster.cut("c:3")
        assert any("serialized" in m for s, t, m in cluster.queue if t == "b:2"), "no snapshot"
        cluster.deliver(lambda s, t, m: s == "b:2")
        leader.tick()
        leader.tick()
        committed = leader.raftCommitIndex
        assert cluster.acknowledged() == list(range(30))
        cluster.deliver(lambda s, t, m: t == "b:2" and "serialized" in m)  # F "installs" it
        cluster.queue.clear()  # the leader dies
        assert slow.journal[-1][1] == committed
        assert slow.raftLastApplied <= slow.store.applied_index
        slow.close()
        reopened = LmdbJournal(slow.journal.path)
        assert reopened[-1][1] == committed, "an acknowledged, committed entry was dropped"
        dump = os.path.join(str(tmp_path), "b_2.dump")
        with open(dump, "rb") as f:  # the dump on disk is F's own, matching its journal
            header = snapshot.read_header(f)
        assert [header["prev"][1], header["last"][1]] == [e[1] for e in reopened[:2]]
        reopened.close()
    finally:
        cluster.close()


def test_a_restart_with_an_older_received_dump_keeps_the_own_one(tmp_path):
    """A crash right after PySyncObj renamed a leader's older dump over ours: at start-up the
    node's own snapshot is put back, so the journal behind it is kept (second review)."""
    store = StateStore(str(tmp_path / "state"), KVMachine(), map_size=1 << 20)
    manager = SnapshotManager(store)
    dump = str(tmp_path / "snapshot.bin")

    try:
        _write_dump(dump, 30, 31)
        assert manager.deserialize(dump)[0][1] == 31  # accepted: becomes the node's own
        _write_dump(dump + ".1.tmp", 19, 20)
        os.replace(dump + ".1.tmp", dump)  # (PySyncObj's rename of a received dump)
        last, prev, _ = manager.deserialize(dump)
        assert (prev[1], last[1]) == (30, 31)
        with open(dump, "rb") as f:
            assert snapshot.read_header(f)["last"][1] == 31
        _write_dump(dump, 40, 41)  # a newer one is taken
        assert manager.deserialize(dump)[0][1] == 41
        with open(dump + snapshot.OWN_SUFFIX, "rb") as f:
            assert snapshot.read_header(f)["last"][1] == 41
    finally:
        store.close()


def test_a_failed_snapshot_build_leaves_no_partial_file_and_waits_before_retrying(
        tmp_path, monkeypatch):
    """On a full disk a build fails; its partial file would keep the disk full, and PySyncObj
    asks again every tick: the file is removed and the next attempt waits."""
    store = StateStore(str(tmp_path / "state"), KVMachine(), map_size=1 << 20)
    manager = snapshot.SnapshotManager(store)

    attempts = []

    def disk_full(view: Any, out: Any) -> None:
        attempts.append(1)
        out.write(b"x" * 4096)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "write_snapshot", disk_full)
    entry = (b"", 1, 1)
    dump = str(tmp_path / "snapshot.bin")
    try:
        manager.serialize(dump + ".tmp", (entry, entry, []))
        manager.wait()
        assert manager.check() == SERIALIZER_STATE.FAILED
        assert os.listdir(tmp_path) == ["state"]
        manager.serialize(dump + ".tmp", (entry, entry, []))  # too soon: not even started
        manager.wait()
        assert manager.check() == SERIALIZER_STATE.FAILED and len(attempts) == 1
        monkeypatch.undo()
        monkeypatch.setattr(snapshot, "RETRY_AFTER_FAILURE_S", 0.0)
        manager._retry_at = 0.0
        manager.serialize(dump + ".tmp", (entry, entry, []))
        manager.wait()
        assert manager.check() == SERIALIZER_STATE.SUCCESS and os.path.exists(dump)
    finally:
        store.close()


def _write_dump(path: str, prev: int, last: int) -> None:
    raw = pack({"applied": 0, "prev": [b"x", prev, 1], "last": [b"x", last, 1], "cluster": []})
    with open(path, "wb") as f:
        f.write(snapshot.MAGIC + snapshot._LEN.pack(len(raw)) + raw)


def test_a_failed_load_stops_the_process_instead_of_acknowledging(tmp_path, monkeypatch):
    """PySyncObj swallows a deserializer's error and acknowledges the install anyway (third
    review): the manager stops the process instead (here: a recorded exit code)."""
    store = StateStore(str(tmp_path / "state"), KVMachine(), map_size=1 << 20)
    manager = SnapshotManager(store)
    exits: list[int] = []
    manager.on_fatal = exits.append
    dump = str(tmp_path / "snapshot.bin")
    raw = pack({"applied": 5, "prev": [b"x", 4, 1], "last": [b"x", 5, 1], "cluster": []})
    with open(dump, "wb") as f:
        f.write(snapshot.MAGIC + snapshot._LEN.pack(len(raw)) + raw + b"not an LMDB copy")

    def no_space(src: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "install_snapshot", no_space)
    try:
        with pytest.raises(OSError):
            manager.deserialize(dump)
        assert exits == [70]
    finally:
        store.close()


def test_without_hard_links_the_own_snapshot_is_a_copy(tmp_path, monkeypatch):
    def no_links(src: str, dst: str) -> None:
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    store = StateStore(str(tmp_path / "state"), KVMachine(), map_size=1 << 20)
    manager = SnapshotManager(store)
    dump = str(tmp_path / "snapshot.bin")
    try:
        _write_dump(dump, 30, 31)
        manager.deserialize(dump)
        _write_dump(dump, 19, 20)  # an older one arrives: the own copy is put back
        assert manager.deserialize(dump)[0][1] == 31
        assert sorted(os.listdir(tmp_path)) == ["snapshot.bin", "snapshot.bin.own", "state"]
        manager.serialize(dump + ".tmp", ((b"x", 50, 1), (b"x", 49, 1), []))  # a build
        manager.wait()
        assert manager.check() == SERIALIZER_STATE.SUCCESS
        with open(dump + snapshot.OWN_SUFFIX, "rb") as own, open(dump, "rb") as current:
            assert own.read() == current.read()
        assert sorted(os.listdir(tmp_path)) == ["snapshot.bin", "snapshot.bin.own", "state"]
    finally:
        store.close()


def test_an_unreadable_dump_is_replaced_by_the_own_copy_at_start_up(tmp_path):
    journal = LmdbJournal(str(tmp_path / "journal"))
    dump = str(tmp_path / "snapshot.bin")
    try:
        for index in range(28, 36):
            journal.add(b"x", index, 1)
        _write_dump(dump + snapshot.OWN_SUFFIX, 30, 31)
        with open(dump, "wb") as f:
            f.write(b"torn")
        snapshot.prepare_journal(journal, dump)
        with open(dump, "rb") as f:
            assert snapshot.read_header(f)["last"][1] == 31
        assert [e[1] for e in journal][:2] == [30, 31]  # and the compaction was finished
        os.remove(dump + snapshot.OWN_SUFFIX)
        with open(dump, "wb") as f:
            f.write(b"torn")
        with pytest.raises(StorageError, match="unreadable"):
            snapshot.prepare_journal(journal, dump)
    finally:
        journal.close()


def test_start_up_refuses_a_journal_that_starts_after_the_newest_dump(tmp_path):
    """PySyncObj would clear such a journal down to the dump's two entries; the entries in
    between exist nowhere on this member (fourth review: a torn dump after a power loss)."""
    journal = LmdbJournal(str(tmp_path / "journal"))
    dump = str(tmp_path / "snapshot.bin")
    try:
        for index in range(40, 46):
            journal.add(b"x", index, 1)
        journal.sync()
        _write_dump(dump + snapshot.OWN_SUFFIX, 30, 31)
        raw = pack({"applied": 0, "prev": [b"x", 39, 1], "last": [b"x", 40, 1], "cluster": []})
        with open(dump, "wb") as f:  # torn inside its msgpack header
            f.write(snapshot.MAGIC + snapshot._LEN.pack(len(raw)) + raw[:7])
        with pytest.raises(StorageError, match="journal starts at entry 40"):
            snapshot.prepare_journal(journal, dump)
        assert [e[1] for e in journal] == list(range(40, 46))  # untouched
    finally:
        journal.close()


def test_a_build_staging_during_an_install_cannot_become_the_own_copy(tmp_path, monkeypatch):
    """A build's thread and an install on the tick thread both stage a new own copy; with one
    staging name the build's (cancelled, older) file could be renamed into place as the own
    copy (fifth review). The build stages right inside the install's replace here."""
    store = StateStore(str(tmp_path / "state"), KVMachine(), map_size=1 << 20)
    manager = SnapshotManager(store)
    dump = str(tmp_path / "snapshot.bin")
    release, build_staged = threading.Event(), threading.Event()
    real_write, real_stage = store.write_snapshot, snapshot._stage

    def slow_write(view: Any, out: Any) -> None:
        release.wait(10)
        real_write(view, out)

    def stage(src: str, dst: str, suffix: str = snapshot._REPLACING) -> str:
        staged = real_stage(src, dst, suffix)
        if suffix == snapshot._REPLACING:  # the install: let the build stage its copy now
            release.set()
            assert build_staged.wait(10)
        else:
            build_staged.set()
        return staged

    monkeypatch.setattr(store, "write_snapshot", slow_write)
    monkeypatch.setattr(snapshot, "_stage", stage)
    exits: list[int] = []
    manager.on_fatal = exits.append
    try:
        manager.serialize(dump + ".tmp", ((b"x", 40, 1), (b"x", 39, 1), []))  # our build
        _write_dump(dump, 59, 60)  # a leader's newer snapshot arrives meanwhile
        assert manager.deserialize(dump)[0][1] == 60
        manager.wait()
        assert manager.check() == SERIALIZER_STATE.FAILED  # the build was superseded
        with open(dump + snapshot.OWN_SUFFIX, "rb") as f:
            assert snapshot.read_header(f)["last"][1] == 60
        assert sorted(os.listdir(tmp_path)) == ["snapshot.bin", "snapshot.bin.own", "state"]
    finally:
        store.close()

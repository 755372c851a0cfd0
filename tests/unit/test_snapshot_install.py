"""Snapshots: a follower sent one keeps the acknowledged entries after it (real PySyncObj
and LMDB); a failed build cleans up and backs off.

Three PySyncObj members on `LmdbJournal`, ticked by hand, with an in-memory transport that
follows `node.DurableTransport`'s rules (sync before any message but a leader's append,
acknowledgements stamped with the term and stale ones dropped, `settle` after each message).

The scenario (found in review): a slow follower F acknowledges entries in order; its first,
old acknowledgement makes PySyncObj's leader lower F's next index below the leader's
compacted log start, so the leader sends F a snapshot, while F's later acknowledgements make
the leader commit entries F holds. F installs the snapshot after that. If the install drops
F's log after the snapshot, and the leader then dies, those committed entries are gone: the
third member never got them.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

from pysyncobj import SyncObj, SyncObjConf, replicated
from pysyncobj.transport import Transport

from veristore_py.journal import LmdbJournal, install_journal_factory
from veristore_py.node import ACK_TERM, stale_ack

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
        conf = SyncObjConf(autoTick=False, appendEntriesUseBatch=False,
                           journalFile=self.journal,
                           fullDumpFile=os.path.join(directory, name + ".dump"), useFork=False,
                           logCompactionMinEntries=10**9, logCompactionMinTime=10**9,
                           raftMinTimeout=1000, raftMaxTimeout=1001,
                           leaderFallbackTimeout=10**6, appendEntriesPeriod=100,
                           connectionTimeout=2000)
        super().__init__(address, others, conf, transportClass=MemoryTransport)

    @replicated
    def put(self, value: int) -> int:
        return value

    @property
    def transport(self) -> MemoryTransport:
        return self._SyncObj__transport  # type: ignore[attr-defined,no-any-return]

    def tick(self) -> None:
        self.doTick(0)
        self.journal.sync()  # as the node's poll wrapper does before handling messages


def test_a_snapshot_sent_after_acknowledgements_keeps_committed_entries(tmp_path):
    install_journal_factory()
    queue: list[Message] = []
    MemoryTransport.queue = queue
    addresses = ["a:1", "b:2", "c:3"]
    members = {a: Member(a, [x for x in addresses if x != a], str(tmp_path))
               for a in addresses}

    def deliver(matches: Any, limit: int | None = None) -> None:
        done = i = 0
        while i < len(queue) and (limit is None or done < limit):
            source, target, message = queue[i]
            if matches(source, target, message):
                queue.pop(i)
                members[target].transport.deliver(source, message)
                done += 1
            else:
                i += 1

    try:
        for member in members.values():
            member.transport.connect_all()
        leader, slow, lagging = members["a:1"], members["b:2"], members["c:3"]
        leader._SyncObj__raftElectionDeadline = 0  # type: ignore[attr-defined]
        leader.tick()
        deliver(lambda s, t, m: True)
        deliver(lambda s, t, m: True)
        assert leader._isLeader()
        for _ in range(5):
            leader.tick()
            deliver(lambda s, t, m: True)
        answers: dict[int, int] = {}

        def answer(value: int) -> Any:
            return lambda _result, error: answers.__setitem__(value, error)

        for value in range(10):  # to both followers, one append each
            leader.put(value, callback=answer(value))
        leader.tick()
        deliver(lambda s, t, m: t == "c:3")
        deliver(lambda s, t, m: s == "c:3")
        leader.tick()
        leader.tick()
        for value in range(10, 20):  # to both; the lagging follower is cut off from here on
            leader.put(value, callback=answer(value))
        leader.tick()
        queue[:] = [q for q in queue if "c:3" not in (q[0], q[1])]
        leader.forceLogCompaction()
        leader.tick()
        leader.tick()
        deliver(lambda s, t, m: t == "b:2")  # the slow follower handles everything sent
        held = slow.journal[-1][1]
        deliver(lambda s, t, m: s == "b:2", limit=1)  # its oldest acknowledgement first
        leader._SyncObj__newAppendEntriesTime = 0  # type: ignore[attr-defined]
        leader.tick()
        assert any("serialized" in m for s, t, m in queue if t == "b:2"), "no snapshot sent"
        deliver(lambda s, t, m: s == "b:2")  # the rest: the leader commits what F holds
        leader.tick()
        leader.tick()
        committed = leader.raftCommitIndex
        assert committed == held and sorted(v for v, e in answers.items() if e == 0) == list(
            range(20))
        deliver(lambda s, t, m: t == "b:2" and "serialized" in m)  # F installs the snapshot
        queue.clear()  # the leader dies before anything else arrives
        for follower in (slow, lagging):
            follower.journal.close()
        reopened = LmdbJournal(slow.journal.path)
        assert reopened[-1][1] == committed, "an acknowledged, committed entry was dropped"
        reopened.close()
    finally:
        for member in members.values():
            member.journal.close()


def test_a_failed_snapshot_build_leaves_no_partial_file_and_waits_before_retrying(
        tmp_path, monkeypatch):
    """On a full disk a build fails; its partial file would keep the disk full, and PySyncObj
    asks again every tick: the file is removed and the next attempt waits."""
    from pysyncobj import SERIALIZER_STATE

    from veristore_py import snapshot
    from veristore_py.state import KVMachine
    from veristore_py.storage import StateStore

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

"""The leader sends entries before its own fsync, but never counts an unsynced copy.

Three in-process members on loopback (real TCP, real LMDB). The leader's journal is made to
fail every sync; a command it proposes reaches the followers (which sync and acknowledge it),
yet the leader must not commit it: its commit index stays at what it had made durable. The
followers then elect a new leader, which commits the entry (it is on a majority of disks).
"""

from __future__ import annotations

import time

from veristore_py.config import NodeSettings, Peer
from veristore_py.errors import StorageError
from veristore_py.localcluster import free_ports
from veristore_py.node import VeristoreNode


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_a_leader_that_cannot_sync_commits_nothing(tmp_path):
    ports = free_ports(6)
    raft = [f"127.0.0.1:{p}" for p in ports[:3]]
    http = [f"127.0.0.1:{p}" for p in ports[3:]]
    nodes = []
    try:
        for i in range(3):
            settings = NodeSettings(
                raft_address=raft[i], http_address=http[i], data_dir=str(tmp_path / f"n{i}"),
                password="leader-sync-test",
                peers=tuple(Peer(raft[j], http[j]) for j in range(3) if j != i)).validate()
            nodes.append(VeristoreNode(settings))
        wait_for(lambda: any(n.is_leader() and n.leader_caught_up() for n in nodes), 20,
                 "no leader")
        leader = next(n for n in nodes if n.is_leader())
        leader.submit({"op": "put", "key": b"before", "value": b"1"}).result(10)
        durable = leader.commit_index
        last_index = leader._journal[-1][1]
        last_synced = leader._journal.syncs

        journal, sync = leader._journal, leader._journal.sync

        def broken_sync(extra=None):  # fails whenever there is something to write
            if journal._pending:
                raise StorageError("injected: journal sync failed")
            sync(extra)

        journal.sync = broken_sync
        pending = leader.submit({"op": "put", "key": b"unsynced", "value": b"2"})
        followers = [n for n in nodes if n is not leader]
        # The entry reaches the followers' disks (they acknowledge after their own fsync) ...
        wait_for(lambda: all(f._journal[-1][1] > last_index and not f._journal._pending
                             for f in followers), 10, "the entry did not reach the followers")
        # ... but the leader, unable to sync its copy, never counts it toward a commit.
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            assert leader.commit_index == durable
            assert not (pending.done() and pending.exception() is None)
            time.sleep(0.01)
        assert leader._journal.syncs == last_synced
        # The followers elect a leader of their own, which has the entry and commits it.
        wait_for(lambda: any(f.is_leader() and f.leader_caught_up() for f in followers), 20,
                 "the followers did not elect a new leader")
        new_leader = next(f for f in followers if f.is_leader())
        wait_for(lambda: new_leader.store.read({"op": "get", "key": b"unsynced"})["value"] == b"2",
                 10,
                 "the entry on a majority of disks was not committed")
    finally:
        for n in nodes:
            n.stop()

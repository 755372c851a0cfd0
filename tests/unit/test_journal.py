"""LmdbJournal: PySyncObj's journal interface on real LMDB, surviving reopen."""

from __future__ import annotations

import pysyncobj.syncobj as syncobj_module

from veristore_py.journal import LmdbJournal, install_journal_factory


def test_entries_term_and_vote_survive_reopen(tmp_path):
    """Entries, term and vote are read back after close and reopen."""
    j = LmdbJournal(str(tmp_path / "j"))
    for i in range(1, 6):
        j.add(b"cmd%d" % i, i, 1)
    j.setCurrentTerm(3, "127.0.0.1:7000")
    j.setRaftCommitIndex(4)
    j.sync()
    j.close()
    j = LmdbJournal(str(tmp_path / "j"))
    assert [e[1] for e in j] == [1, 2, 3, 4, 5] and j[-1] == (b"cmd5", 5, 1)
    assert (j.getCurrentTerm(), j.getVotedForNodeId(), j.getRaftCommitIndex()) == (3, "127.0.0.1:7000", 4)


def test_truncation_from_and_to_persist(tmp_path):
    """deleteEntriesFrom / deleteEntriesTo remove by list position, durably."""
    j = LmdbJournal(str(tmp_path / "j"))
    for i in range(1, 11):
        j.add(b"x", i, 1)
    j.deleteEntriesFrom(7)   # keep indexes 1..7
    j.deleteEntriesTo(2)     # drop indexes 1..2
    j.add(b"y", 8, 2)
    j.sync()
    j.close()
    j = LmdbJournal(str(tmp_path / "j"))
    assert [e[1] for e in j] == [3, 4, 5, 6, 7, 8] and j[-1][2] == 2


def test_sync_only_when_dirty(tmp_path):
    """sync() fsyncs once per burst of writes and not at all when clean."""
    j = LmdbJournal(str(tmp_path / "j"))
    j.sync()
    assert j.syncs == 0
    for i in range(1, 50):
        j.add(b"x", i, 1)
    j.sync()
    j.sync()
    assert j.syncs == 1


def test_clear_then_add(tmp_path):
    """clear() empties the journal (snapshot install), new entries follow."""
    j = LmdbJournal(str(tmp_path / "j"))
    for i in range(1, 4):
        j.add(b"x", i, 1)
    j.clear()
    j.add(b"s1", 100, 4)
    j.add(b"s2", 101, 4)
    j.close()
    assert [e[1] for e in LmdbJournal(str(tmp_path / "j"))] == [100, 101]


def test_a_snapshot_install_keeps_the_entries_after_a_held_last_entry(tmp_path):
    """Raft's install rule: if the log holds the snapshot's last entry (same index and term),
    the entries after it stay, on disk too; they may be acknowledged ones (review: PySyncObj
    installs as clear, add(prev), add(last), and dropping them lost a committed entry)."""
    j = LmdbJournal(str(tmp_path / "j"))
    calls = []
    j.on_membership = calls.append
    for i, command in enumerate([b"a", b"b", b"c", b"d", b"\x02add-x", b"f"], start=1):
        j.add(command, i, 1)
    j.sync()
    j.clear()
    j.add(b"b", 2, 1)
    j.add(b"c", 3, 1)
    assert [e[1] for e in j] == [2, 3, 4, 5, 6]
    j.settle()  # the snapshot reset PySyncObj's member set: the kept tail's changes again
    assert calls == [[b"\x02add-x"]]
    j.sync()
    j.close()
    j = LmdbJournal(str(tmp_path / "j"))
    assert [(e[1], e[0]) for e in j] == [(2, b"b"), (3, b"c"), (4, b"d"), (5, b"\x02add-x"),
                                         (6, b"f")]
    j.close()


def test_a_snapshot_install_drops_a_log_that_does_not_hold_its_last_entry(tmp_path):
    """A log whose entry at the snapshot's last index has another term, or that ends before
    it, is dropped whole; a clear not followed by two adds is a plain clear."""
    for old_terms, last in (([1, 1, 1, 1], (3, 2)), ([1, 1], (3, 1))):
        path = str(tmp_path / f"j{len(old_terms)}")
        j = LmdbJournal(path)
        for i, term in enumerate(old_terms, start=1):
            j.add(b"x", i, term)
        j.clear()
        j.add(b"x", last[0] - 1, 1)
        j.add(b"x", last[0], last[1])
        j.close()
        assert [e[1] for e in LmdbJournal(path)] == [last[0] - 1, last[0]]
    j = LmdbJournal(str(tmp_path / "plain"))
    for i in range(1, 5):
        j.add(b"x", i, 1)
    j.clear()
    j.sync()
    j.add(b"x", 1, 1)
    j.add(b"x", 2, 1)
    assert [e[1] for e in j] == [1, 2]
    j.close()


def test_factory_passes_lmdb_journal_through(tmp_path):
    """The installed factory returns our journal and leaves other values to PySyncObj."""
    install_journal_factory()
    install_journal_factory()  # idempotent
    j = LmdbJournal(str(tmp_path / "j"))
    assert syncobj_module.createJournal(j) is j
    assert type(syncobj_module.createJournal(None)).__name__ == "MemoryJournal"


def test_map_growth_does_not_fail_writes(tmp_path):
    """A journal that outgrows its map is resized transparently."""
    j = LmdbJournal(str(tmp_path / "j"), map_size=1 << 20)
    for i in range(1, 200):
        j.add(b"z" * 20_000, i, 1)
    j.close()
    assert len(LmdbJournal(str(tmp_path / "j"))) == 199


def test_disk_holds_exactly_the_last_sync(tmp_path):
    """Nothing reaches the file between syncs, so a crash (here: os._exit without close) leaves
    exactly what the last fsynced transaction wrote; what it loses was never acknowledged."""
    import subprocess
    import sys
    import textwrap

    path = str(tmp_path / "j")
    script = textwrap.dedent(f"""
        import os
        from veristore_py.journal import LmdbJournal
        j = LmdbJournal({path!r})
        for i in range(1, 4):
            j.add(b"synced", i, 1)
        j.setCurrentTerm(2, "a:1")   # syncs the queued entries with the vote
        j.add(b"synced", 4, 2)
        j.sync()
        j.deleteEntriesFrom(3)       # queued, never synced: the crash forgets it
        j.add(b"unsynced", 5, 2)
        os._exit(0)
    """)
    subprocess.run([sys.executable, "-c", script], check=True)
    j = LmdbJournal(path)
    assert [(e[0], e[1]) for e in j] == [(b"synced", 1), (b"synced", 2), (b"synced", 3),
                                         (b"synced", 4)]
    assert (j.getCurrentTerm(), j.getVotedForNodeId()) == (2, "a:1")
    j.close()


def test_truncated_journal_refuses_to_open_with_a_clear_error(tmp_path):
    """A cut-off data file would SIGBUS on read (LMDB maps it); it is refused up front."""
    import os

    import pytest

    from veristore_py.errors import StorageError

    j = LmdbJournal(str(tmp_path / "j"))
    for i in range(1, 200):
        j.add(b"x" * 500, i, 1)
    j.sync()
    j.close()
    data = tmp_path / "j" / "data.mdb"
    os.truncate(data, os.path.getsize(data) // 2)
    with pytest.raises(StorageError, match="truncated.*Replace it"):
        LmdbJournal(str(tmp_path / "j"))


def test_a_rewound_follower_keeps_matching_entries_and_truncates_at_a_conflict(tmp_path):
    """PySyncObj asks a follower to truncate past prevLogIdx even when its entries match:
    the log keeps them (in memory, so votes see them, and on disk); resent entries are
    no-ops; the first conflicting entry truncates from there, durably."""
    j = LmdbJournal(str(tmp_path / "j"))
    for i in range(1, 7):
        j.add(b"c%d" % i, i, 1)
    j.sync()
    j.deleteEntriesFrom(2)  # PySyncObj: truncate after index 2
    j.add(b"c3", 3, 1)      # the resend stops short
    j.sync()
    assert [e[1] for e in j] == [1, 2, 3, 4, 5, 6] and j[-1] == (b"c6", 6, 1)
    j.close()
    j = LmdbJournal(str(tmp_path / "j"))
    assert [e[1] for e in j] == [1, 2, 3, 4, 5, 6]
    j.deleteEntriesFrom(1)
    j.add(b"c2", 2, 1)
    j.add(b"c3", 3, 1)
    j.add(b"new4", 4, 2)  # a conflict: 4..6 of term 1 go
    j.add(b"new5", 5, 2)
    j.sync()
    j.close()
    j = LmdbJournal(str(tmp_path / "j"))
    assert [(e[1], e[2]) for e in j] == [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2)]
    assert j[-1][0] == b"new5"
    j.close()


def test_a_rewound_tail_has_its_membership_changes_applied_again_past_the_resend(tmp_path):
    """PySyncObj reverses the tail's membership changes before asking to truncate and applies
    those of the resent entries again itself; once the message is handled, the journal has
    the rest of the kept tail's applied again, in log order (review: re-applying the whole
    tail first let a resent `rem X` undo a later `add X`)."""
    j = LmdbJournal(str(tmp_path / "j"))
    calls = []
    j.on_membership = calls.append
    for i, command in enumerate([b"\x00a", b"\x02rem-x", b"\x00c", b"\x02add-x"], start=1):
        j.add(command, i, 1)
    j.settle()  # (a message without a rewind: nothing to do)
    j.deleteEntriesFrom(1)  # the resend covers 2..3 only
    j.add(b"\x02rem-x", 2, 1)
    j.add(b"\x00c", 3, 1)
    j.settle()
    assert [e[1] for e in j] == [1, 2, 3, 4] and calls == [[b"\x02add-x"]]
    j.deleteEntriesFrom(1)  # a heartbeat-like resend with no entries: the whole tail again
    j.settle()
    assert calls[-1] == [b"\x02rem-x", b"\x02add-x"]
    j.deleteEntriesFrom(2)
    j.add(b"\x00other", 3, 2)  # a conflict from 3: add-x is gone, nothing to apply
    j.settle()
    assert len(calls) == 2 and [(e[1], e[2]) for e in j] == [(1, 1), (2, 1), (3, 2)]
    j.sync()
    j.close()


def test_acknowledgements_from_another_term_are_stale():
    """The transport stamps PySyncObj's next_node_idx with the sender's term; a leader drops
    one from another term (Raft ignores responses of other terms); unstamped ones pass."""
    from veristore_py.raft import ACK_TERM, stale_ack

    ack = {"type": "next_node_idx", "next_node_idx": 7, "reset": True, "success": False}
    assert not stale_ack({**ack, ACK_TERM: 5}, 5)
    assert stale_ack({**ack, ACK_TERM: 4}, 5) and stale_ack({**ack, ACK_TERM: 6}, 5)
    assert not stale_ack(ack, 5)
    assert not stale_ack({"type": "append_entries", ACK_TERM: 1}, 5)

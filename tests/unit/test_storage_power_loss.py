"""The state store is trusted across a process crash, never across a machine restart."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from veristore_py.state import KVMachine
from veristore_py.storage import StateStore


def crash_after_applying(path: str, entries: int, boot_id: str) -> None:
    """In a child process: open the store, apply entries, die without closing (kill -9)."""
    script = textwrap.dedent(f"""
        import os
        from veristore_py.state import KVMachine
        from veristore_py.storage import StateStore
        store = StateStore({path!r}, KVMachine(), map_size=1 << 20, boot_id={boot_id!r})
        for i in range(1, {entries} + 1):
            store.apply_entry(i, 0, [{{"op": "put", "key": b"k%d" % i, "value": b"v"}}])
        os._exit(0)
    """)
    subprocess.run([sys.executable, "-c", script], check=True)


def test_unclean_end_in_this_boot_is_kept(tmp_path):
    """kill -9: the page cache survived, so the store is whole; it is used as is."""
    path = str(tmp_path / "s")
    crash_after_applying(path, 5, "boot-a")
    store = StateStore(path, KVMachine(), map_size=1 << 20, boot_id="boot-a")
    assert (store.applied_index, store.discarded) == (5, False)
    store.close()


def test_unclean_end_in_an_earlier_boot_is_discarded(tmp_path):
    """Power loss: unsynced LMDB pages may be torn; the store starts empty and is rebuilt
    from the snapshot file and the journal."""
    path = str(tmp_path / "s")
    crash_after_applying(path, 5, "boot-a")
    store = StateStore(path, KVMachine(), map_size=1 << 20, boot_id="boot-b")
    assert (store.applied_index, store.discarded, store.items()) == (0, True, [])
    store.close()


def test_clean_close_survives_a_reboot(tmp_path):
    path = str(tmp_path / "s")
    store = StateStore(path, KVMachine(), map_size=1 << 20, boot_id="boot-a")
    store.apply_entry(1, 0, [{"op": "put", "key": b"k", "value": b"v"}])
    store.close()
    store = StateStore(path, KVMachine(), map_size=1 << 20, boot_id="boot-b")
    assert (store.applied_index, store.discarded) == (1, False)
    store.close()


def test_unreadable_store_is_discarded(tmp_path):
    path = tmp_path / "s"
    path.mkdir()
    (path / "data.mdb").write_bytes(b"\0" * 8192 + b"garbage" * 1000)
    store = StateStore(str(path), KVMachine(), map_size=1 << 20, boot_id="boot-a")
    assert (store.applied_index, store.discarded) == (0, True)
    store.close()


def test_truncated_store_is_discarded(tmp_path):
    import os

    path = str(tmp_path / "s")
    store = StateStore(path, KVMachine(), map_size=1 << 20, boot_id="boot-a")
    for i in range(1, 100):
        store.apply_entry(i, 0, [{"op": "put", "key": b"k%d" % i, "value": b"v" * 500}])
    store.close()
    os.truncate(os.path.join(path, "data.mdb"), 3 * 4096)
    store = StateStore(path, KVMachine(), map_size=1 << 20, boot_id="boot-a")
    assert (store.applied_index, store.discarded) == (0, True)
    store.close()

"""A member's data dir written by earlier code still opens to the same state (compatibility).

`tests/fixtures/store-v1/` was written by `tests/fixtures/make_store_fixture.py` (a real
member applying a fixed command sequence, with a snapshot half-way); `store-v1.json` records
what that code said about it. Refactors of the machine, its codecs or the storage engine must
keep every assertion here true: the stored bytes, the snapshot and the commands' encodings are
the contract between versions of a cluster.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

from cache_plane.machine import CachePlaneMachine
from tests.fixtures.make_store_fixture import (
    FIXTURE,
    RAFT_ADDRESS,
    RECORD,
    commands,
    completions,
    decision_record,
    snapshot_digest,
)
from veristore_py.codec import pack
from veristore_py.config import NodeSettings
from veristore_py.localcluster import free_ports
from veristore_py.node import VeristoreNode
from veristore_py.storage import StateStore

with open(RECORD, encoding="utf-8") as _f:
    EXPECTED = json.load(_f)


def _copy(tmp_path) -> str:
    data = str(tmp_path / "data")
    shutil.copytree(FIXTURE, data)
    return data


def test_the_state_store_opens_to_the_same_digest_and_next_decision(tmp_path):
    """The fixture's LMDB state rebuilds into the same machine: digest and decision agree."""
    store = StateStore(os.path.join(_copy(tmp_path), "state"), CachePlaneMachine(),
                       map_size=1 << 22)
    try:
        assert list(store.indexed_digest()) == [EXPECTED["applied_index"], EXPECTED["digest"]]
        machine = store.machine
        assert isinstance(machine, CachePlaneMachine)
        assert decision_record(machine) == EXPECTED["next_decision"]
    finally:
        store.close()


def test_the_snapshot_installs_to_the_same_digest(tmp_path):
    """The fixture's snapshot.bin (header + LMDB copy) installs to the recorded state."""
    got = snapshot_digest(os.path.join(_copy(tmp_path), "snapshot.bin"), str(tmp_path))
    assert got == EXPECTED["snapshot"]


def test_commands_encode_to_the_same_bytes():
    """Every command of the sequence packs to the bytes the earlier code proposed."""
    sequence = commands() + completions(EXPECTED["routed"], 20_000)
    assert [hashlib.sha256(pack(c)).hexdigest() for c in sequence] == \
        EXPECTED["command_sha256"]


def test_a_member_restarts_on_the_fixture_and_keeps_its_state(tmp_path):
    """A real member starts on the fixture (journal, state, snapshot) and serves the same state."""
    (http,) = free_ports(1)
    # (its Raft address is recorded in its own state: the fixture's, not a fresh port)
    settings = NodeSettings(raft_address=RAFT_ADDRESS, http_address=f"127.0.0.1:{http}",
                            data_dir=_copy(tmp_path), map_size_bytes=1 << 22,
                            password="fixture-password").validate()
    node = VeristoreNode(settings, CachePlaneMachine())
    try:
        deadline = time.monotonic() + 20
        while not (node.is_leader() and node.leader_caught_up()):
            assert time.monotonic() < deadline, "the member did not lead its one-member cluster"
            time.sleep(0.02)
        applied, digest = node.store.indexed_digest()
        assert digest == EXPECTED["digest"] and applied >= EXPECTED["applied_index"]
        machine = node.store.machine
        assert isinstance(machine, CachePlaneMachine)
        assert decision_record(machine) == EXPECTED["next_decision"]
    finally:
        node.stop()

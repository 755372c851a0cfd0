"""A Raft peer without the password is refused before anything it sends is unpickled.

The frame is PySyncObj's own (4-byte length, zlib-compressed pickle). Its pickle creates a
marker directory when loaded. Sent to plain PySyncObj without a password (the control) the
marker appears: the attack is real. Sent to a member, which always has a password, it does
not, and the member goes on serving.
"""

from __future__ import annotations

import os
import pickle
import socket
import struct
import time
import zlib

import pytest
from pysyncobj import SyncObj, SyncObjConf
from pysyncobj.encryptor import getEncryptor

from tests.members import single_member, wait_listening
from veristore_py.config import NodeSettings
from veristore_py.localcluster import free_ports

pytestmark = pytest.mark.integration


class _MakesDirectory:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # what an attacker's pickle does when loaded
        return (os.mkdir, (self.path,))


def _frame(payload: object) -> bytes:
    """PySyncObj's frame of an unencrypted message: 4-byte length, zlib-compressed pickle."""
    data = zlib.compress(pickle.dumps(payload), 3)
    return struct.pack("i", len(data)) + data


def _send_until_dropped(port: int, frame: bytes) -> None:
    """Send `frame` and read until the member closes the connection: it has then parsed the
    frame and refused it (PySyncObj disconnects on a message it cannot decrypt)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(frame)
        while s.recv(4096):
            pass


def test_plain_pysyncobj_unpickles_a_strangers_frame(tmp_path):
    """The control: without a password the frame's pickle runs."""
    (port,) = free_ports(1)
    raw = SyncObj(f"127.0.0.1:{port}", [f"127.0.0.1:{free_ports(1)[0]}"], SyncObjConf())
    try:
        wait_listening(port)
        marker = str(tmp_path / "unpickled-by-plain-pysyncobj")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(_frame(_MakesDirectory(marker)))
            deadline = time.monotonic() + 5
            while not os.path.isdir(marker) and time.monotonic() < deadline:
                time.sleep(0.05)
        assert os.path.isdir(marker)
    finally:
        raw.destroy_synchronous()


def test_a_member_drops_a_frame_from_a_peer_without_the_password(tmp_path):
    raft, http = free_ports(2)
    settings = NodeSettings(raft_address=f"127.0.0.1:{raft}", http_address=f"127.0.0.1:{http}",
                            data_dir=str(tmp_path / "data"),
                            password="the-right-password").validate()
    with single_member(settings) as node:
        marker = str(tmp_path / "unpickled-by-the-member")
        _send_until_dropped(raft, _frame(_MakesDirectory(marker)))
        # ... and one encrypted with the wrong password (a peer that guessed)
        wrong = getEncryptor("a-wrong-password").encrypt(
            zlib.compress(pickle.dumps(_MakesDirectory(marker)), 3))
        _send_until_dropped(raft, struct.pack("i", len(wrong)) + wrong)
        assert not os.path.exists(marker)
        assert node.submit({"op": "put", "key": b"k", "value": b"v"}).result(5)["ok"]

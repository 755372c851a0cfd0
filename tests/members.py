"""Helpers for tests that run a real member in-process (real Raft, LMDB; loopback ports)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from veristore_py.config import NodeSettings
from veristore_py.localcluster import wait_listening  # noqa: F401 (the tests' import path)
from veristore_py.node import VeristoreNode
from veristore_py.state import Machine


@contextmanager
def single_member(settings: NodeSettings, machine: Machine | None = None,
                  timeout: float = 10.0) -> Iterator[VeristoreNode]:
    """A one-member cluster that leads and has applied its own term; stopped on exit."""
    node = VeristoreNode(settings, machine)
    try:
        deadline = time.monotonic() + timeout
        while not (node.is_leader() and node.leader_caught_up()):
            assert time.monotonic() < deadline, "the single member did not elect itself"
            time.sleep(0.02)
        yield node
    finally:
        node.stop()

"""Shared fixtures: real LMDB in tmp dirs, real node processes on free loopback ports."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from cache_plane.sim.inprocess import MemoryStore
from veristore_py.localcluster import LocalCluster

# A `state.Reader` over a plain dict that absorbs each command's mutations (pure unit tests
# of the machine): the one the in-process simulator applies commands with.
DictReader = MemoryStore


def until(check: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    """Poll `check` until it returns something truthy; that value (fails after `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def dict_reader() -> DictReader:
    return DictReader()


@pytest.fixture
def cluster_factory(tmp_path) -> Iterator:
    """Build LocalClusters that are always killed and reaped at teardown."""
    made: list[LocalCluster] = []

    def make(**kwargs) -> LocalCluster:
        cluster = LocalCluster(str(tmp_path / f"cluster{len(made)}"), **kwargs)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.close()

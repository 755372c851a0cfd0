"""Shared fixtures: real LMDB in tmp dirs, real node processes on free loopback ports."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cache_plane.sim.inprocess import MemoryStore
from veristore_py.localcluster import LocalCluster

# A `state.Reader` over a plain dict that absorbs each command's mutations (pure unit tests
# of the machine): the one the in-process simulator applies commands with.
DictReader = MemoryStore


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

"""Shared fixtures: real LMDB in tmp dirs, real node processes on free loopback ports."""

from __future__ import annotations

import bisect
from collections.abc import Iterator

import pytest

from veristore_py.localcluster import LocalCluster


class DictReader:
    """A `state.Reader` over a plain dict (pure unit tests of the machine only)."""

    def __init__(self, data: dict[bytes, bytes] | None = None) -> None:
        self.data = data if data is not None else {}

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def scan(self, prefix: bytes, start: bytes, limit: int) -> list[tuple[bytes, bytes]]:
        keys = sorted(self.data)
        i = bisect.bisect_left(keys, max(start, prefix))
        out = []
        for key in keys[i:]:
            if not key.startswith(prefix) or len(out) >= limit:
                break
            out.append((key, self.data[key]))
        return out

    def write(self, mutations) -> None:
        for key, value in mutations:
            if value is None:
                self.data.pop(key, None)
            else:
                self.data[key] = value


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

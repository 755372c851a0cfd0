"""cache_plane settings: the [cache_plane] table, CACHE_PLANE_* env, every problem at once."""

from __future__ import annotations

import pytest

from cache_plane.settings import load
from veristore_py.errors import ConfigError

BASE = ('raft_address = "127.0.0.1:7000"\nhttp_address = "127.0.0.1:8000"\n'
        'data_dir = "/tmp/cp"\npassword = "pw"\n')


def test_table_and_env_layering(tmp_path):
    """The file's [cache_plane] table is read; CACHE_PLANE_* env overrides it."""
    path = tmp_path / "n.toml"
    path.write_text(BASE + "[cache_plane]\nnode_lease_ms = 5000\nload_weight = 0.25\n")
    node, service = load(str(path), env={"CACHE_PLANE_NODE_LEASE_MS": "7000",
                                         "CACHE_PLANE_DATA_DIR": "/tmp/env"})
    assert service.node_lease_ms == 7000 and service.load_weight == 0.25
    assert node.data_dir == "/tmp/env"


def test_problems_from_both_layers_reported_together(tmp_path):
    """Node and domain problems come back in one ConfigError."""
    path = tmp_path / "n.toml"
    path.write_text('raft_address = "nope"\n[cache_plane]\nnode_lease_ms = 0\nbogus = 1\n')
    with pytest.raises(ConfigError) as err:
        load(str(path), env={})
    text = " | ".join(err.value.problems)
    assert "raft_address" in text and "unknown setting cache_plane.bogus" in text
    assert "http_address is required" in text

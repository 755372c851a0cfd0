"""Settings: layering file -> env -> flags, and every problem reported at once."""

from __future__ import annotations

import socket
import time

import pytest

from veristore_py.config import ConfigError, load_settings


def write(tmp_path, text):
    path = tmp_path / "node.toml"
    path.write_text(text)
    return str(path)


def test_layering_file_env_flags(tmp_path):
    """Env overrides the file and flags override env."""
    path = write(tmp_path, 'raft_address = "127.0.0.1:7000"\nhttp_address = "127.0.0.1:8000"\n'
                           'data_dir = "/tmp/x"\nheartbeat_s = 0.1\n'
                           '[[peers]]\nraft = "127.0.0.1:7001"\nhttp = "127.0.0.1:8001"\n')
    s = load_settings(path, env={"VERISTORE_DATA_DIR": "/tmp/env", "VERISTORE_MAX_INFLIGHT_ENTRIES": "8"},
                      overrides={"data_dir": "/tmp/flag"})
    assert s.data_dir == "/tmp/flag" and s.max_inflight_entries == 8
    assert s.peer_http("127.0.0.1:7001") == "127.0.0.1:8001"


def test_all_problems_reported_together(tmp_path):
    """A bad config lists each problem, not just the first."""
    with pytest.raises(ConfigError) as err:
        load_settings(None, env={"VERISTORE_HEARTBEAT_S": "fast"},
                      overrides={"raft_address": "nope", "election_min_s": 5.0})
    text = " | ".join(err.value.problems)
    assert "heartbeat_s" in text and "raft_address" in text and "http_address" in text
    assert "data_dir is required" in text and len(err.value.problems) >= 4


def test_non_loopback_bind_requires_password(tmp_path):
    """Binding beyond loopback without a Raft password is refused."""
    with pytest.raises(ConfigError, match="password is required"):
        load_settings(None, env={}, overrides={"raft_address": "10.1.2.3:7000",
                                               "http_address": "10.1.2.3:8000", "data_dir": "/d"})
    s = load_settings(None, env={}, overrides={"raft_address": "10.1.2.3:7000", "password": "pw",
                                               "http_address": "10.1.2.3:8000", "data_dir": "/d"})
    assert s.resolved_password() == "pw"
    # a loopback Raft address bound on every interface needs the password too
    with pytest.raises(ConfigError, match="password is required"):
        load_settings(None, env={}, overrides={"raft_address": "127.0.0.1:7000",
                                               "raft_bind_address": "0.0.0.0:7000",
                                               "http_address": "127.0.0.1:8000", "data_dir": "/d"})


def test_raft_listener_binds_only_its_address(tmp_path):
    """PySyncObj binds every interface unless told otherwise; a node binds raft_address."""
    from veristore_py.localcluster import free_ports
    from veristore_py.node import VeristoreNode

    raft, http = free_ports(2)
    settings = load_settings(None, env={}, overrides={
        "raft_address": f"127.0.0.1:{raft}", "http_address": f"127.0.0.1:{http}",
        "data_dir": str(tmp_path / "data")})
    node = VeristoreNode(settings)
    try:
        deadline = time.monotonic() + 10
        while True:  # the listener is bound by the tick thread, soon after start
            try:
                socket.create_connection(("127.0.0.1", raft), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the Raft port never listened"
                time.sleep(0.05)
        with pytest.raises(ConnectionRefusedError):  # another loopback address: not bound
            socket.create_connection(("127.0.0.2", raft), timeout=1)
    finally:
        node.stop()


def test_bad_toml_is_a_config_error(tmp_path):
    """An unparsable file is reported as such."""
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(write(tmp_path, "raft_address = "), env={})


def test_unknown_keys_and_sections_are_errors_even_when_the_rest_is_valid(tmp_path):
    """A typo in the file is reported, not ignored; so is a value that does not parse."""
    path = write(tmp_path, 'raft_address = "127.0.0.1:7000"\nhttp_address = "127.0.0.1:8000"\n'
                           'data_dir = "/tmp/x"\nheartbeat_ms = 50\n[cache_plane]\nx = 1\n')
    with pytest.raises(ConfigError) as err:
        load_settings(path, env={"VERISTORE_ELECTION_MIN_S": "soon"})
    text = " | ".join(err.value.problems)
    assert "unknown setting 'heartbeat_ms'" in text and "unknown section [cache_plane]" in text
    assert "election_min_s (from env VERISTORE_ELECTION_MIN_S)" in text
    # an application names the tables it reads itself; they are handed over untouched
    path = write(tmp_path, 'raft_address = "127.0.0.1:7000"\nhttp_address = "127.0.0.1:8000"\n'
                           'data_dir = "/tmp/x"\n[cache_plane]\nx = 1\n')
    s = load_settings(path, env={"VERISTORE_NOT_A_SETTING": "1"},
                      sections=frozenset({"cache_plane"}))
    assert s.extra == {"cache_plane": {"x": 1}}

"""Settings: layering file -> env -> flags, and every problem reported at once."""

from __future__ import annotations

import socket

import pytest

from tests.members import wait_listening
from veristore_py.config import ConfigError, load_settings
from veristore_py.localcluster import throwaway_pki


def write(tmp_path, text):
    path = tmp_path / "node.toml"
    path.write_text(text)
    return str(path)


def test_layering_file_env_flags(tmp_path):
    """Env overrides the file and flags override env."""
    path = write(tmp_path, 'raft_address = "127.0.0.1:7000"\nhttp_address = "127.0.0.1:8000"\n'
                           'data_dir = "/tmp/x"\nheartbeat_s = 0.1\npassword = "pw"\n'
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


def test_a_raft_password_is_always_required(tmp_path):
    """Without one PySyncObj would unpickle whatever reaches the Raft port, loopback or not."""
    for raft in ("10.1.2.3:7000", "127.0.0.1:7000"):
        with pytest.raises(ConfigError, match="password is required"):
            load_settings(None, env={}, overrides={"raft_address": raft, "insecure": True,
                                                   "http_address": "127.0.0.1:8000",
                                                   "data_dir": "/d"})
    s = load_settings(None, env={}, overrides={"raft_address": "10.1.2.3:7000", "password": "pw",
                                               "http_address": "127.0.0.1:8000", "data_dir": "/d"})
    assert s.resolved_password() == "pw"


def test_beyond_loopback_needs_tls_and_tokens_unless_insecure(tmp_path):
    """A member serving HTTP beyond loopback refuses to start without TLS and tokens."""
    base = {"raft_address": "10.1.2.3:7000", "http_address": "10.1.2.3:8000", "data_dir": "/d",
            "password": "pw"}
    with pytest.raises(ConfigError) as err:
        load_settings(None, env={}, overrides=base)
    text = " | ".join(err.value.problems)
    assert "set tls_cert_file and tls_key_file" in text and "set tokens_file" in text
    assert load_settings(None, env={}, overrides={**base, "insecure": "true"}).insecure
    cert, key, tokens = (tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "tokens")
    cert.write_text("not a certificate")
    key.write_text("x")
    tokens.write_text("# role token\nadmin " + "a" * 32 + "\nread " + "r" * 32 + "\n")
    tls = {"tls_cert_file": str(cert), "tls_key_file": str(key), "tokens_file": str(tokens)}
    with pytest.raises(ConfigError, match="TLS files do not load"):
        load_settings(None, env={}, overrides={**base, **tls})
    pki = throwaway_pki(str(tmp_path / "pki"), host="10.1.2.3")
    s = load_settings(None, env={}, overrides={**base, **tls, "tls_cert_file": pki["cert"],
                                               "tls_key_file": pki["key"]})
    assert s.http_scheme == "https" and s.resolved_tokens().roles() == ["read", "admin"]


def test_bad_tokens_files_name_the_line_not_the_token(tmp_path):
    """A malformed tokens file is a config error that never shows a token."""
    base = {"raft_address": "127.0.0.1:7000", "http_address": "127.0.0.1:8000",
            "data_dir": "/d", "password": "pw"}
    for text, expected in (("s" * 32 + " admin", "line 1: unknown role"),
                           ("\nadmin short-secret", "line 2: a admin token is shorter"),
                           ("admin " + "a" * 20 + " extra", "line 1: expected")):
        path = tmp_path / "tokens"
        path.write_text(text)
        with pytest.raises(ConfigError) as err:
            load_settings(None, env={}, overrides={**base, "tokens_file": str(path)})
        problems = " | ".join(err.value.problems)
        assert expected in problems and "short-secret" not in problems and "s" * 32 not in problems
    # a `#` inside a token is part of it; a field starting with `#` starts a comment
    path.write_text("admin abcdefghijklmnop#qrstuvwxyz  # the on-call token\n")
    s = load_settings(None, env={}, overrides={**base, "tokens_file": str(path)})
    assert s.resolved_tokens().role_of("Bearer abcdefghijklmnop#qrstuvwxyz") == "admin"
    assert s.resolved_tokens().role_of("Bearer abcdefghijklmnop") is None


def test_an_empty_password_file_is_refused(tmp_path):
    """An empty password would run Raft unencrypted: refused, never silently accepted."""
    empty = tmp_path / "pw"
    empty.write_text("  \n")
    with pytest.raises(ConfigError, match="the Raft password is empty"):
        load_settings(None, env={}, overrides={"raft_address": "127.0.0.1:7000",
                                               "http_address": "127.0.0.1:8000",
                                               "data_dir": "/d", "password_file": str(empty)})


def test_settings_reprs_hide_secrets():
    s = load_settings(None, env={}, overrides={"raft_address": "127.0.0.1:7000",
                                               "http_address": "127.0.0.1:8000", "data_dir": "/d",
                                               "password": "raft-secret-value",
                                               "api_token": "admin-secret-value-123"})
    assert "raft-secret-value" not in repr(s) and "admin-secret-value-123" not in repr(s)


def test_raft_listener_binds_only_its_address(tmp_path):
    """PySyncObj binds every interface unless told otherwise; a node binds raft_address."""
    from veristore_py.localcluster import free_ports
    from veristore_py.node import VeristoreNode

    raft, http = free_ports(2)
    settings = load_settings(None, env={}, overrides={
        "raft_address": f"127.0.0.1:{raft}", "http_address": f"127.0.0.1:{http}",
        "data_dir": str(tmp_path / "data"), "password": "test-password"})
    node = VeristoreNode(settings)
    try:
        wait_listening(raft)  # the listener is bound by the tick thread, soon after start
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
                           'data_dir = "/tmp/x"\nheartbeat_ms = 50\npassword = "pw"\n[cache_plane]\nx = 1\n')
    with pytest.raises(ConfigError) as err:
        load_settings(path, env={"VERISTORE_ELECTION_MIN_S": "soon"})
    text = " | ".join(err.value.problems)
    assert "unknown setting 'heartbeat_ms'" in text and "unknown section [cache_plane]" in text
    assert "election_min_s (from env VERISTORE_ELECTION_MIN_S)" in text
    # an application names the tables it reads itself; they are handed over untouched
    path = write(tmp_path, 'raft_address = "127.0.0.1:7000"\nhttp_address = "127.0.0.1:8000"\n'
                           'data_dir = "/tmp/x"\npassword = "pw"\n[cache_plane]\nx = 1\n')
    s = load_settings(path, env={"VERISTORE_NOT_A_SETTING": "1"},
                      sections=frozenset({"cache_plane"}))
    assert s.extra == {"cache_plane": {"x": 1}}


def test_an_insecure_member_says_so_at_every_start(tmp_path):
    """`insecure = true` is logged loudly with what it leaves open, and only then."""
    from structlog.testing import capture_logs

    from veristore_py.server import warn_if_insecure

    base = {"raft_address": "10.1.2.3:7000", "http_address": "10.1.2.3:8000", "data_dir": "/d",
            "password": "pw"}
    with capture_logs() as logs:
        warn_if_insecure(load_settings(None, env={}, overrides={**base, "insecure": True}))
        warn_if_insecure(load_settings(None, env={}, overrides={
            **base, "http_address": "127.0.0.1:8000"}))
    assert [entry["event"] for entry in logs] == ["INSECURE_MEMBER"]
    assert logs[0]["log_level"] == "warning" and len(logs[0]["open"]) == 2


def test_secret_files_readable_by_others_are_flagged(tmp_path):
    """A password or tokens file other users can read is logged at start (install.sh makes
    them 0400); one only its owner can read is not."""
    from structlog.testing import capture_logs

    from veristore_py.server import warn_about_secret_files

    loose, tight = tmp_path / "loose", tmp_path / "tight"
    for path, mode in ((loose, 0o644), (tight, 0o400)):
        path.write_text("a-raft-password")
        path.chmod(mode)
    base = {"raft_address": "127.0.0.1:7000", "http_address": "127.0.0.1:8000", "data_dir": "/d"}
    with capture_logs() as logs:
        warn_about_secret_files(load_settings(None, env={}, overrides={
            **base, "password_file": str(loose)}))
        warn_about_secret_files(load_settings(None, env={}, overrides={
            **base, "password_file": str(tight)}))
    assert [(e["event"], e["path"]) for e in logs] == [
        ("secret_file_readable_by_others", str(loose))]
    assert "a-raft-password" not in str(logs)

"""Settings of one veristore node, layered file -> environment -> command-line flags.

All defaults live in `NodeSettings`. `load_settings()` merges a TOML file, ``VERISTORE_*``
environment variables and explicit overrides, then `validate()` reports every problem at once
(`ConfigError.problems`).

TOML layout (all keys optional except the addresses and data dir)::

    raft_address = "10.0.0.1:7000"       # this node's Raft address (host:port)
    raft_bind_address = "0.0.0.0:7000"   # optional; default: bind raft_address only
    http_address = "10.0.0.1:8000"       # this node's HTTP API address
    data_dir = "/var/lib/veristore"
    password_file = "/etc/veristore/raft-password"   # or password = "..." (always required)
    tokens_file = "/etc/veristore/tokens"   # lines "<role> <token>", roles read|route|admin
    tls_cert_file = "/etc/veristore/tls/member.crt"  # HTTPS (with tls_key_file)
    tls_key_file = "/etc/veristore/tls/member.key"
    tls_client_ca_file = "/etc/veristore/tls/ca.crt" # optional: require client certs (mTLS)
    insecure = false  # true: allow plain HTTP / no tokens beyond loopback (logged at start)
    [[peers]]
    raft = "10.0.0.2:7000"
    http = "10.0.0.2:8000"
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import ssl
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .auth import Tokens, parse_tokens
from .errors import ConfigError
from .tls import server_context

ENV_PREFIX = "VERISTORE_"


@dataclass(frozen=True, slots=True)
class Peer:
    """Another member: its Raft address and the HTTP address clients are redirected to."""

    raft: str
    http: str


@dataclass(frozen=True, slots=True)
class NodeSettings:
    """Everything one node needs; see the module docstring for the file format."""

    raft_address: str = ""
    # Where the Raft listener binds; empty = raft_address itself (PySyncObj's own default
    # would be every interface). Set it when peers reach this node through NAT or a proxy.
    raft_bind_address: str = ""
    http_address: str = ""
    data_dir: str = ""
    peers: tuple[Peer, ...] = ()
    password: str | None = field(default=None, repr=False)
    password_file: str | None = None
    api_token: str | None = field(default=None, repr=False)  # one admin token (kept for older configs; see tokens_file)
    api_token_file: str | None = None
    tokens_file: str | None = None  # "<role> <token>" per line (veristore_py/auth.py)
    # HTTPS for the HTTP API: certificate chain and key (PEM); with a client CA, clients must
    # present a certificate it signed (mTLS).
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None
    # Serve plain HTTP or without tokens on a non-loopback address (refused unless set).
    insecure: bool = False
    # Raft timing (seconds). A leader that hears from no majority for `leader_lease_s` stops
    # deciding; after `leader_fallback_s` PySyncObj demotes it.
    heartbeat_s: float = 0.1
    election_min_s: float = 0.6
    election_max_s: float = 1.2
    leader_lease_s: float = 0.6
    leader_fallback_s: float = 1.2
    connection_timeout_s: float = 2.0
    connection_retry_s: float = 0.5
    # Log compaction: snapshot after this many entries (or this many seconds).
    compaction_min_entries: int = 5000
    compaction_min_time_s: float = 300.0
    # Group commit.
    max_batch_commands: int = 512
    max_batch_bytes: int = 1 << 20
    max_inflight_entries: int = 1
    batch_window_ms: float = 0.0
    commit_timeout_s: float = 5.0
    max_queued_commands: int = 100_000
    # Idempotency records let clients retry writes safely; they are kept this long.
    idempotency_retention_s: float = 3600.0
    idempotency_prune_interval_s: float = 60.0
    # Storage.
    map_size_bytes: int = 1 << 30
    dynamic_membership: bool = True
    log_format: str = "auto"  # auto | json | console
    log_level: str = "info"
    extra: Mapping[str, Any] = field(default_factory=dict)

    def peer_http(self, raft_address: str | None) -> str | None:
        """Return the HTTP address of the member with Raft address `raft_address`."""
        if raft_address == self.raft_address:
            return self.http_address
        for peer in self.peers:
            if peer.raft == raft_address:
                return peer.http
        return None

    def _password_or_none(self) -> str | None:
        try:
            return self.resolved_password()
        except OSError:
            return None

    def resolved_password(self) -> str | None:
        """The Raft password, read from `password_file` when one is given."""
        if self.password_file:
            with open(self.password_file, encoding="utf-8") as f:
                return f.read().strip() or None
        return self.password

    def resolved_api_token(self) -> str | None:
        """The HTTP bearer token, read from `api_token_file` when one is given."""
        if self.api_token_file:
            with open(self.api_token_file, encoding="utf-8") as f:
                return f.read().strip() or None
        return self.api_token

    def resolved_tokens(self) -> Tokens:
        """Every bearer token and its role: `tokens_file`, plus `api_token(_file)` as admin."""
        pairs: list[tuple[str, str]] = []
        if self.tokens_file:
            try:
                with open(self.tokens_file, encoding="utf-8") as f:
                    pairs.extend(parse_tokens(f.read()))
            except OSError as exc:
                raise ConfigError([f"tokens_file {self.tokens_file!r}: {exc.strerror}"]) from None
            except ValueError as exc:
                raise ConfigError([f"tokens_file {self.tokens_file!r}: {exc}"]) from None
        admin = self.resolved_api_token()
        if admin:
            pairs.append(("admin", admin))
        try:
            return Tokens(pairs)
        except ValueError as exc:
            raise ConfigError([f"api token: {exc}"]) from None

    @property
    def tokens_required(self) -> bool:
        """Beyond loopback and not `insecure`: the member must have TLS and tokens."""
        return (_split_address(self.http_address) is not None
                and not _is_loopback(self.http_address) and not self.insecure)

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_file)

    @property
    def http_scheme(self) -> str:
        return "https" if self.tls else "http"

    def validate(self) -> NodeSettings:
        """Return self, or raise ConfigError listing every problem."""
        problems: list[str] = []
        for name in ("raft_address", "http_address"):
            value = getattr(self, name)
            if not value:
                problems.append(f"{name} is required (host:port)")
            elif _split_address(value) is None:
                problems.append(f"{name} {value!r} is not host:port with a port in 1..65535")
        if self.raft_bind_address and _split_address(self.raft_bind_address) is None:
            problems.append(f"raft_bind_address {self.raft_bind_address!r} is not host:port")
        if not self.data_dir:
            problems.append("data_dir is required")
        seen = {self.raft_address}
        for peer in self.peers:
            for label, value in (("raft", peer.raft), ("http", peer.http)):
                if _split_address(value) is None:
                    problems.append(f"peer {label} address {value!r} is not host:port")
            if peer.raft in seen:
                problems.append(f"peer {peer.raft} is listed twice (or is this node)")
            seen.add(peer.raft)
        missing_files = False
        for file_field in ("password_file", "api_token_file", "tokens_file", "tls_cert_file",
                           "tls_key_file", "tls_client_ca_file"):
            path = getattr(self, file_field)
            if path and not os.path.isfile(path):
                problems.append(f"{file_field} {path!r} does not exist")
                missing_files = True
        if self.password and self.password_file:
            problems.append("give password or password_file, not both")
        if not (self.password or self.password_file):
            # Without one PySyncObj unpickles whatever reaches the Raft port (docs/security.md).
            problems.append("a Raft password is required (set password_file; "
                            "'cache-plane cluster up' writes one)")
        elif not missing_files and not self._password_or_none():
            problems.append("the Raft password is empty (an empty password_file would turn "
                            "Raft encryption off)")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            problems.append("give tls_cert_file and tls_key_file together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            problems.append("tls_client_ca_file (mTLS) needs tls_cert_file and tls_key_file")
        tokens = None
        if not missing_files:
            try:
                tokens = self.resolved_tokens()
            except ConfigError as exc:
                problems.extend(exc.problems)
            if self.tls_cert_file and self.tls_key_file:
                try:  # a certificate that does not load is a config error, not a traceback
                    server_context(self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file)
                except (OSError, ssl.SSLError) as exc:
                    problems.append(f"TLS files do not load ({self.tls_cert_file}, "
                                    f"{self.tls_key_file}): {exc}")
        if self.tokens_required:
            if not self.tls_cert_file:
                problems.append(f"http_address {self.http_address} is beyond loopback: set "
                                "tls_cert_file and tls_key_file (or insecure = true)")
            if tokens is not None and not tokens:
                problems.append(f"http_address {self.http_address} is beyond loopback: set "
                                "tokens_file (or insecure = true)")
        if not 0 < self.heartbeat_s * 3 < self.election_min_s < self.election_max_s:
            problems.append("need 0 < 3 * heartbeat_s < election_min_s < election_max_s")
        if not self.heartbeat_s < self.leader_lease_s <= self.election_min_s:
            problems.append("need heartbeat_s < leader_lease_s <= election_min_s")
        if self.leader_fallback_s < self.leader_lease_s:
            problems.append("leader_fallback_s must be >= leader_lease_s")
        if self.connection_timeout_s < self.election_max_s:
            problems.append("connection_timeout_s must be >= election_max_s")
        for name in ("compaction_min_entries", "max_batch_commands", "max_batch_bytes",
                     "max_queued_commands"):
            if getattr(self, name) < 2:
                problems.append(f"{name} must be >= 2")
        if self.max_inflight_entries < 1:
            problems.append("max_inflight_entries must be >= 1")
        if self.max_batch_commands >= 1 << 16:
            problems.append("max_batch_commands must be < 65536")
        if self.commit_timeout_s <= 0 or self.batch_window_ms < 0:
            problems.append("commit_timeout_s must be > 0 and batch_window_ms >= 0")
        if self.idempotency_retention_s < self.commit_timeout_s * 2:
            problems.append("idempotency_retention_s must be at least twice commit_timeout_s")
        if self.idempotency_prune_interval_s <= 0:
            problems.append("idempotency_prune_interval_s must be > 0")
        if self.map_size_bytes < 1 << 20:
            problems.append("map_size_bytes must be at least 1 MiB")
        if self.log_format not in ("auto", "json", "console"):
            problems.append("log_format must be auto, json or console")
        if problems:
            raise ConfigError(problems)
        return self


def _split_address(address: str) -> tuple[str, int] | None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host.strip("[]"), int(port)


def _is_loopback(address: str) -> bool:
    split = _split_address(address)
    return split is not None and is_loopback_host(split[0])


def is_loopback_host(host: str) -> bool:
    """`localhost` or a loopback IP literal (brackets allowed); names are not resolved."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


_FIELDS = {f.name: f for f in dataclasses.fields(NodeSettings)}


def _coerce(name: str, raw: Any) -> Any:
    """Turn a file/env/flag value into the field's type; raise ValueError if impossible."""
    if name == "peers":
        return tuple(_parse_peer(p) for p in (raw.split(",") if isinstance(raw, str) else raw) if p)
    default = _FIELDS[name].default
    if isinstance(default, bool):
        if isinstance(raw, bool):
            return raw
        if str(raw).lower() in ("1", "true", "yes", "on"):
            return True
        if str(raw).lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected a boolean")
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(raw, bool):
            raise ValueError("expected an integer")
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    return None if raw is None else str(raw)


def _parse_peer(raw: Any) -> Peer:
    if isinstance(raw, Peer):
        return raw
    if isinstance(raw, Mapping):
        return Peer(raft=str(raw.get("raft", "")), http=str(raw.get("http", "")))
    raft, sep, http = str(raw).strip().partition("=")
    if not sep:
        raise ValueError(f"peer {raw!r} must be RAFT_HOST:PORT=HTTP_HOST:PORT")
    return Peer(raft=raft, http=http)


def load_settings(path: str | None = None, env: Mapping[str, str] | None = None,
                  overrides: Mapping[str, Any] | None = None,
                  env_prefix: str = ENV_PREFIX,
                  sections: frozenset[str] = frozenset()) -> NodeSettings:
    """Build validated settings from a TOML file, then environment, then `overrides`.

    A top-level key of the file that is no setting is an error (a typo must not be ignored),
    and so is a table other than `sections` (the tables an application built on veristore
    reads itself; they are handed over in `extra`). Environment variables with the prefix
    that name no setting are ignored: the prefix is shared with client-side variables.
    """
    problems: list[str] = []
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError([f"cannot read config file {path}: {exc}"]) from exc
        for key, raw in data.items():
            if key in _FIELDS and key != "extra":
                values[key] = ("file", raw)
            elif key in sections:
                extra[key] = raw
            elif isinstance(raw, Mapping):
                problems.append(f"unknown section [{key}] in {path}"
                                + (f" (known: {', '.join(sorted(sections))})" if sections else ""))
            else:
                problems.append(f"unknown setting {key!r} in {path}")
    for key, raw in (env if env is not None else os.environ).items():
        if key.startswith(env_prefix):
            name = key[len(env_prefix):].lower()
            if name in _FIELDS and name != "extra":
                values[name] = ("env " + key, raw)
    for key, raw in (overrides or {}).items():
        if raw is not None:
            values[key] = ("flag", raw)
    coerced: dict[str, Any] = {}
    for name, (source, raw) in values.items():
        try:
            coerced[name] = _coerce(name, raw)
        except (ValueError, TypeError) as exc:
            problems.append(f"{name} (from {source}): {exc}")
    try:
        settings = NodeSettings(**coerced, extra=extra).validate()
    except ConfigError as exc:
        raise ConfigError(problems + exc.problems) from None
    if problems:
        raise ConfigError(problems)
    return settings

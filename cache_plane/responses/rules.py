"""Whether a request may be answered from the cache or stored in it, and for how long. PURE.

`directives` reads the per-request controls: the ``Cache-Control`` header (``no-cache``: do
not read; ``no-store``: do not write; ``max-age=N``: accept only an answer at most N seconds
old) and the body's ``cache`` object, compatible with LiteLLM's (``no-cache``, ``no-store``,
``ttl`` seconds to keep what is stored, ``s-maxage`` as ``max-age``, ``namespace``).

`bypass_reason` applies the rules from "when not to cache": one choice only (``n`` 1), no
``logprobs``, the effective temperature (the body's, else the model's configured default,
else OpenAI's 1.0) at most `max_temperature`, no time-dependent wording in the user's
messages (`skip_patterns`), and a ``user`` field (a personalised request) only for tenants
that opted in. A request it names a reason for goes to the backend and is not stored.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Time-dependent wording: the answer changes with the clock (seed document, "when not to cache").
DEFAULT_SKIP_PATTERNS = (
    r"\b(today|tonight|tomorrow|yesterday|now|currently|right now|at the moment)\b",
    r"\b(current|latest|recent)\s+(date|time|day|week|month|year|news|price|version|weather|"
    r"events?|score)\b",
    r"\bwhat\s+(time|day|date)\s+is\s+it\b",
    r"\bthis\s+(morning|afternoon|evening|week|month|year)\b",
)
MAX_TTL_S = 30 * 86400
MAX_NAMESPACE = 128


class DirectiveError(ValueError):
    """A cache directive that cannot be understood (the gateway answers 400, naming it)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class Directives:
    """What one request allows: read, write, how long to keep, how old is acceptable."""

    read: bool = True
    write: bool = True
    ttl_s: int | None = None        # None: the default TTL
    max_age_s: int | None = None    # None: any age
    namespace: str = ""


@dataclass(frozen=True, slots=True)
class CacheRules:
    """The cacheability rules (gateway settings, ``[cache]``)."""

    max_temperature: float = 0.8
    default_temperature: float = 1.0
    model_temperature: Mapping[str, float] = field(default_factory=dict)
    skip_patterns: tuple[str, ...] = DEFAULT_SKIP_PATTERNS


@functools.lru_cache(maxsize=16)
def _skip_regex(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    return re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE) if patterns \
        else None


def _int(value: Any, param: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value) \
            or not low <= value <= high:
        raise DirectiveError(param, f"'{param}' must be a whole number of seconds in "
                                    f"[{low}, {high}]")
    return int(value)


def directives(cache_control: str | None, body_cache: Any) -> Directives:
    """The request's cache directives; `DirectiveError` for one it cannot read."""
    read = write = True
    ttl: int | None = None
    max_age: int | None = None
    namespace = ""
    for part in (cache_control or "").split(","):
        name, _, value = part.strip().partition("=")
        name = name.strip().lower()
        if name == "no-cache":
            read = False
        elif name == "no-store":
            write = False
        elif name in ("max-age", "s-maxage"):
            seconds = value.strip().strip('"')
            if not seconds.isascii() or not seconds.isdigit():
                raise DirectiveError("Cache-Control", f"Cache-Control {name} needs a whole "
                                     f"number of seconds, got {value!r}")
            max_age = min(int(seconds), MAX_TTL_S)  # larger: "very large" (RFC 9111)
        # other directives (private, no-transform, ...) say nothing to this cache
    if body_cache is not None:
        if not isinstance(body_cache, Mapping):
            raise DirectiveError("cache", "'cache' must be an object")
        unknown = set(body_cache) - {"no-cache", "no-store", "ttl", "s-maxage", "namespace"}
        if unknown:
            raise DirectiveError("cache", f"'cache' has unknown fields {sorted(unknown)}; "
                                 "known: no-cache, no-store, ttl, s-maxage, namespace")
        for name in ("no-cache", "no-store"):
            if name in body_cache and not isinstance(body_cache[name], bool):
                raise DirectiveError(f"cache.{name}", f"'cache.{name}' must be a boolean")
        read = read and not body_cache.get("no-cache", False)
        write = write and not body_cache.get("no-store", False)
        if body_cache.get("ttl") is not None:
            ttl = _int(body_cache["ttl"], "cache.ttl", 1, MAX_TTL_S)
        if body_cache.get("s-maxage") is not None:
            age = _int(body_cache["s-maxage"], "cache.s-maxage", 0, MAX_TTL_S)
            max_age = age if max_age is None else min(max_age, age)
        ns = body_cache.get("namespace")
        if ns is not None:
            if not isinstance(ns, str) or len(ns) > MAX_NAMESPACE:
                raise DirectiveError("cache.namespace", "'cache.namespace' must be a string "
                                     f"of at most {MAX_NAMESPACE} characters")
            namespace = ns
    if max_age == 0:
        read = False  # nothing cached is zero seconds old
    return Directives(read, write, ttl, max_age, namespace)


def _user_texts(body: Mapping[str, Any]) -> list[str]:
    messages = body.get("messages")
    if not isinstance(messages, list):
        prompt = body.get("prompt")
        return [prompt] if isinstance(prompt, str) else []
    texts = []
    for m in messages:
        if isinstance(m, Mapping) and m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, str):
                texts.append(content)
            elif isinstance(content, list):
                texts.extend(p["text"] for p in content
                             if isinstance(p, Mapping) and isinstance(p.get("text"), str))
    return texts


def effective_temperature(body: Mapping[str, Any], model: str, rules: CacheRules) -> float:
    value = body.get("temperature")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return float(rules.model_temperature.get(model, rules.default_temperature))


def bypass_reason(body: Mapping[str, Any], model: str, rules: CacheRules,
                  personal_ok: bool) -> str | None:
    """Why `body` must not be cached (a metric label), or None if it may be."""
    n = body.get("n")
    if n is not None and n != 1:
        return "n"
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") is not None:
        return "logprobs"
    if effective_temperature(body, model, rules) > rules.max_temperature:
        return "temperature"
    if body.get("user") is not None and not personal_ok:
        return "personalised"
    skip = _skip_regex(rules.skip_patterns)
    if skip is not None and any(skip.search(t) for t in _user_texts(body)):
        return "time_dependent"
    return None

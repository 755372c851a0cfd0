"""Exact and bucket keys of a request. PURE.

The exact key is a SHA-256 over the tenant, the model's fingerprint (base model id and its
epoch, which `POST /v1/models/{id}/invalidate` bumps), the namespace, and the canonical body:
the whole request body minus `DENY_LIST` (fields that do not change the answer), serialised
with sorted keys at every depth and integral floats written as integers (``0.0`` is ``0``).
An allow-list would silently drop fields that change answers (LiteLLM's bugs: provider
params, ``reasoning_effort``); a deny-list can only cost hits.

The bucket key is the same with the content of the last message (a user message) left out:
requests in one bucket differ only in their last question, so a semantic match compares that
question and nothing else, and a multi-turn conversation never matches another one's context.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

# Fields that never change an answer (scheduling, transport, bookkeeping, our own directive).
DENY_LIST = frozenset({"stream", "stream_options", "user", "metadata", "store", "cache",
                       "priority", "request_id", "service_tier"})
KEY_VERSION = 1


@dataclass(frozen=True, slots=True)
class Scope:
    """Whose entry it is and under which model version: part of every key."""

    tenant: str
    model: str      # the base model the cluster knows (the epoch's owner)
    epoch: int
    namespace: str = ""


def canonical(value: Any) -> Any:
    """`value` with integral floats as ints, at every depth (key order is the encoder's job)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, Mapping):
        return {str(k): canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [canonical(v) for v in value]
    return value


def _digest(scope: Scope, body: Mapping[str, Any], kind: str) -> str:
    shown = {k: v for k, v in body.items() if k not in DENY_LIST}
    data = orjson.dumps([KEY_VERSION, kind, scope.tenant, scope.model, scope.epoch,
                         scope.namespace, canonical(shown)], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(data).hexdigest()


def exact_key(scope: Scope, body: Mapping[str, Any]) -> str:
    """The exact key of `body` under `scope` (64 hex characters)."""
    return _digest(scope, body, "exact")


def last_question(body: Mapping[str, Any]) -> str | None:
    """The last message's text if it is a user message with text only, else None."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    last = messages[-1]
    if not isinstance(last, Mapping) or last.get("role") != "user":
        return None
    content = last.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(
            isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in content):
        return "\n".join(p["text"] for p in content)
    return None  # images, audio, tool results: exact matches only


def bucket_key(scope: Scope, body: Mapping[str, Any]) -> str | None:
    """The key of everything but the last user message's text; None if there is none."""
    if last_question(body) is None:
        return None
    messages = list(body["messages"])
    messages[-1] = {k: v for k, v in messages[-1].items() if k != "content"}
    return _digest(scope, {**body, "messages": messages}, "bucket")

"""A gateway's view of the cluster's entries: exact lookup and semantic matching. PURE.

`Catalog` mirrors the entries' metadata (never bodies) as the change feed reports them. An
exact lookup is a dict read. A semantic lookup compares the question's embedding with those of
the entries in its bucket (same tenant, model version, namespace, parameters and earlier
messages) by one matrix product, then walks the candidates above the threshold from the most
similar, skipping stale ones and those a lexical guard rejects (`guards.guard`: numbers,
negation, named entities, language), so a near-miss that embeddings score high is not served.

`answers_agree` is the check the false-hit estimate uses when a sampled semantic hit is also
sent to the backend: the same text up to case, spacing and punctuation, or at least
`AGREE_OVERLAP` of their words shared (Jaccard). It errs towards "disagree" for long free-text
answers, so the estimate is an upper bound.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .guards import guard

AGREE_OVERLAP = 0.8


@dataclass(frozen=True, slots=True)
class EntryInfo:
    key: str
    tenant: str
    model: str
    epoch: int
    namespace: str
    bucket: str | None
    question: str | None
    created_ms: int
    expires_ms: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: int = 0
    vector: np.ndarray | None = None
    local: bool = False     # stored by this gateway, not confirmed by the feed yet

    @classmethod
    def from_view(cls, view: Mapping[str, Any]) -> EntryInfo:
        """From the cluster's entry view (`GET /v1/cache/entries`, the change feed)."""
        raw = view.get("embedding")
        vector = None
        if raw:
            vector = np.frombuffer(base64.b64decode(raw), dtype="<f2").astype(np.float32)
        return cls(view["key"], view["tenant"], view["model"], view["epoch"],
                   view["namespace"], view["bucket"], view["question"], view["created_ms"],
                   view["expires_ms"], view["prompt_tokens"], view["completion_tokens"],
                   view["latency_ms"], vector)

    def fresh(self, now_ms: int, max_age_s: int | None) -> bool:
        if self.expires_ms <= now_ms:
            return False
        return max_age_s is None or now_ms - self.created_ms <= max_age_s * 1000


@dataclass(frozen=True, slots=True)
class Match:
    entry: EntryInfo | None
    similarity: float                 # the best candidate's, served or not
    rejected: tuple[str, ...] = ()    # why candidates above the threshold were passed over


class _Stack:
    """One bucket's embeddings as rows of a matrix that grows by doubling: a store adds a row
    and a removal zeroes one (compacted once half are dead), so a lookup after a store does
    not rebuild the matrix (O(1) amortised instead of O(bucket))."""

    __slots__ = ("keys", "rows", "matrix", "dead")

    def __init__(self, dim: int) -> None:
        self.keys: list[str | None] = []
        self.rows: dict[str, int] = {}
        self.matrix = np.zeros((8, dim), dtype=np.float32)
        self.dead = 0

    def add(self, key: str, vector: np.ndarray) -> None:
        if len(self.keys) == len(self.matrix):
            grown = np.zeros((2 * len(self.matrix), self.matrix.shape[1]), dtype=np.float32)
            grown[:len(self.keys)] = self.matrix
            self.matrix = grown
        self.rows[key] = len(self.keys)
        self.matrix[len(self.keys)] = vector
        self.keys.append(key)

    def remove(self, key: str) -> None:
        row = self.rows.pop(key, None)
        if row is None:
            return
        self.keys[row] = None
        self.matrix[row] = 0.0  # (scores 0: below any threshold)
        self.dead += 1
        if self.dead * 2 > len(self.keys):
            live = [(k, self.matrix[r]) for r, k in enumerate(self.keys) if k is not None]
            self.keys, self.rows, self.dead = [], {}, 0
            self.matrix = np.zeros((max(8, 2 * len(live)), self.matrix.shape[1]),
                                   dtype=np.float32)
            for k, v in live:
                self.add(k, v)


class Catalog:
    """Entry metadata by key and by bucket (see module docstring)."""

    def __init__(self) -> None:
        self.entries: dict[str, EntryInfo] = {}
        self.buckets: dict[str, dict[str, None]] = {}
        self._stacks: dict[str, _Stack] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: str) -> EntryInfo | None:
        return self.entries.get(key)

    def put(self, info: EntryInfo) -> EntryInfo | None:
        """Add or replace an entry; the one it replaced."""
        old = self.entries.get(info.key)
        self.drop(info.key)
        self.entries[info.key] = info
        if info.bucket is not None:
            self.buckets.setdefault(info.bucket, {})[info.key] = None
            if info.vector is not None:
                stack = self._stacks.get(info.bucket)
                if stack is None or stack.matrix.shape[1] != info.vector.shape[0]:
                    stack = self._stacks[info.bucket] = _Stack(info.vector.shape[0])
                    for key in self.buckets[info.bucket]:  # (a new dimension: start over)
                        other = self.entries[key].vector
                        if key != info.key and other is not None \
                                and other.shape == info.vector.shape:
                            stack.add(key, other)
                stack.add(info.key, info.vector)
        return old

    def drop(self, key: str) -> EntryInfo | None:
        info = self.entries.pop(key, None)
        if info is not None and info.bucket is not None:
            members = self.buckets.get(info.bucket, {})
            members.pop(key, None)
            stack = self._stacks.get(info.bucket)
            if stack is not None:
                stack.remove(key)
            if not members:
                self.buckets.pop(info.bucket, None)
                self._stacks.pop(info.bucket, None)
        return info

    def clear(self) -> None:
        self.entries.clear()
        self.buckets.clear()
        self._stacks.clear()

    def has_neighbours(self, bucket: str | None, key: str) -> bool:
        """True if the bucket holds an entry other than `key` (worth an embedding)."""
        members = self.buckets.get(bucket or "", {})
        return len(members) > (1 if key in members else 0)

    def similar(self, bucket: str, vector: np.ndarray, question: str, threshold: float,
                now_ms: int, max_age_s: int | None) -> Match:
        """The most similar fresh entry of `bucket` at or above `threshold` that the guards
        let through (see module docstring)."""
        stack = self._stacks.get(bucket)
        if stack is None or not stack.rows or stack.matrix.shape[1] != vector.shape[0]:
            return Match(None, 0.0)
        scores = stack.matrix[:len(stack.keys)] @ vector
        above = np.flatnonzero(scores >= threshold)
        best = float(scores.max())
        rejected: list[str] = []
        for i in above[np.argsort(-scores[above])]:  # (only the few above the threshold)
            key = stack.keys[i]
            if key is None:
                continue
            info = self.entries[key]
            if not info.fresh(now_ms, max_age_s):
                continue
            why = guard(question, info.question or "")
            if why is not None:
                rejected.append(why)
                continue
            return Match(info, float(scores[i]), tuple(rejected))
        return Match(None, best, tuple(rejected) or (("threshold",) if best > 0 else ()))


_WORDS = re.compile(r"\w+")


def answers_agree(a: str, b: str) -> bool:
    """Whether two answers say the same (see module docstring)."""
    wa, wb = _WORDS.findall(a.lower()), _WORDS.findall(b.lower())
    if wa == wb:
        return True
    sa, sb = set(wa), set(wb)
    return bool(sa | sb) and len(sa & sb) / len(sa | sb) >= AGREE_OVERLAP


def answer_text(response: Mapping[str, Any]) -> str:
    """The text of a stored answer (chat message content and tool calls, or completion)."""
    choice = (response.get("choices") or [{}])[0]
    message = choice.get("message")
    if isinstance(message, Mapping):
        calls = message.get("tool_calls") or ()
        return str(message.get("content") or "") + "".join(
            str(c.get("function", {})) for c in calls if isinstance(c, Mapping))
    return str(choice.get("text") or "")

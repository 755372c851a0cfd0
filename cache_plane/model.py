"""Values of the cache_plane domain (frozen, slotted dataclasses; no behaviour beyond views)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A served model: KV block size in tokens and the hash seed its engines use."""

    id: str
    code: int
    block_size: int = 16
    hash_seed: str = "vllm-none-hash"
    epoch: int = 0


@dataclass(slots=True)
class Node:
    """An inference node as the replicated state holds it (the machine mutates it in apply)."""

    id: str
    slot: int
    address: str
    models: tuple[str, ...]
    capacity_blocks: int
    max_active: int
    labels: tuple[tuple[str, str], ...] = ()
    state: str = "up"
    active: int = 0
    queue: int = 0
    lease_until_ms: int = 0
    last_event_seq: int = -1
    prefill_until_ms: int = 0  # when the prefill work routed here should be done (estimate)
    instance: str = ""         # the engine process's id as it registered (restart detection)
    reported_used: int = -1    # KV blocks in use by the engine's own count (-1: never reported)

    @property
    def load(self) -> float:
        """Active plus queued requests per allowed active request."""
        return (self.active + self.queue) / max(self.max_active, 1)


class Candidate(NamedTuple):
    """One node's line in a decision's score breakdown (a tuple: built 16x per decision)."""

    node_id: str
    overlap_blocks: int
    weighted_overlap: float
    load: float
    free_blocks: int
    evict_blocks: int
    score: float
    eligible: bool
    reason: str = ""
    backlog_blocks: int = 0


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """Where a request goes and why (or why it was rejected)."""

    node_id: str | None
    route_type: str | None
    matched_blocks: int
    total_blocks: int
    evict: tuple[int, ...] = ()          # model_code << 64 | block to evict, LRU first
    candidates: tuple[Candidate, ...] = field(default=())
    rejected: str | None = None          # reason code when node_id is None
    detail: str = ""

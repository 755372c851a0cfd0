"""Values of the cache_plane domain (frozen, slotted dataclasses; no behaviour beyond views)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .calibration import NOTHING_LEARNED, Learned


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A served model: KV block size in tokens and the hash seed its engines use."""

    id: str
    code: int
    block_size: int = 16
    hash_seed: str = "vllm-none-hash"
    epoch: int = 0


@dataclass(slots=True)
class StreamState:
    """One engine KV-event stream (a data-parallel rank) as the replicated state follows it.

    `last_seq` is the watermark: batches at or below it are duplicates. The counters say what
    the ingesters reported (resyncs, restarts, rebuilds, gaps, replays) and what was applied.
    """

    last_seq: int = -1
    stale: bool = False         # its history was lost: the node's blocks were cleared
    batches: int = 0
    events: int = 0
    stored: int = 0
    removed: int = 0
    duplicates: int = 0         # batches at or below the watermark
    gaps: int = 0               # batches missing before one that came (replayed, or lost)
    replays: int = 0
    resyncs: int = 0
    restarts: int = 0
    rebuilds: int = 0
    last_ts_ms: int = 0         # the engine's timestamp of the last batch applied
    last_lag_ms: int | None = None  # the leader's clock minus that timestamp, at its apply

    def wire(self) -> list[int | None]:
        return [self.last_seq, int(self.stale), self.batches, self.events, self.stored,
                self.removed, self.duplicates, self.gaps, self.replays, self.resyncs,
                self.restarts, self.rebuilds, self.last_ts_ms, self.last_lag_ms]

    @classmethod
    def from_wire(cls, w: list[Any]) -> StreamState:
        return cls(w[0], bool(w[1]), *w[2:14])


@dataclass(frozen=True, slots=True)
class KVSource:
    """Where a node's engine publishes its KV events (vLLM ``--kv-events-config``).

    Rank ``r`` of a data-parallel engine publishes on `endpoint`'s port + r (and its replay
    socket likewise), as vLLM binds them.
    """

    endpoint: str
    replay_endpoint: str | None = None
    topic: str = ""
    hash_form: str = "vllm"
    ranks: int = 1

    def wire(self) -> list[Any]:
        return [self.endpoint, self.replay_endpoint, self.topic, self.hash_form, self.ranks]


@dataclass(slots=True)
class Node:
    """An inference node as the replicated state holds it (the machine mutates it in apply)."""

    id: str
    slot: int
    address: str
    models: tuple[str, ...]
    capacity_blocks: int
    max_active: int            # the most requests (running + waiting) the router sends it
    labels: tuple[tuple[str, str], ...] = ()
    state: str = "up"
    active: int = 0            # running requests (engine-reported, then the router's count)
    queue: int = 0             # requests waiting for a running slot (likewise)
    lease_until_ms: int = 0
    last_event_seq: int = -1
    prefill_until_ms: int = 0  # when the prefill of requests holding a slot should be done
    instance: str = ""         # the engine process's id as it registered (restart detection)
    reported_used: int = -1    # KV blocks in use by the engine's own count (-1: never reported)
    max_running: int = 0       # the engine's running slots (vLLM max_num_seqs; 0: max_active)
    learned: Learned = NOTHING_LEARNED  # speeds learned from its completion reports
    streams: dict[int, StreamState] = field(default_factory=dict)  # KV-event streams by rank
    kv_source: KVSource | None = None  # the engine's ZMQ KV-event stream, if it has one

    def watermark(self, rank: int) -> int:
        """The last seq applied of stream `rank` (-1: none). Rank 0 without a stream record
        continues the seq the node reported before streams existed (`last_event_seq`)."""
        stream = self.streams.get(rank)
        if stream is not None:
            return stream.last_seq
        return self.last_event_seq if rank == 0 else -1

    @property
    def slots(self) -> int:
        """Requests the engine may run at once (its KV cache may hold fewer)."""
        return self.max_running or self.max_active


class Candidate(NamedTuple):
    """One node's line in a decision's breakdown (a tuple: built 16x per decision).

    Times are the load model's expectations in milliseconds (see `policy`): `ttft_ms` is
    `fixed + backlog_ms + queue_ms + prefill_ms`; `saved_ms` is the prefill the cached
    prefix saves (already left out of `prefill_ms`); `score` is minus the cost the router
    minimises (`ttft_ms` plus the balance and load penalties).
    """

    node_id: str
    overlap_blocks: int
    weighted_overlap: float
    load: float
    free_blocks: int
    evict_blocks: int
    score: float
    eligible: bool
    reason: str = ""
    ttft_ms: float = 0.0
    queue_ms: float = 0.0
    backlog_ms: float = 0.0
    prefill_ms: float = 0.0
    saved_ms: float = 0.0
    penalty_ms: float = 0.0
    prefill_tokens_per_s: float = 0.0  # the speeds it was priced with (learned or prior)
    decode_ms_per_token: float = 0.0


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

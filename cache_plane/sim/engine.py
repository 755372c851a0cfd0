"""A simulated inference engine in virtual time: KV block pool, continuous batching, latency.

What it models (each part after vLLM's v1 engine, simplified where noted):

- **KV pool**: `capacity_blocks` blocks of `block_size` tokens. A request's prompt is a list of
  chained block hashes; the blocks the pool already holds from block 0 on are reused (no
  prefill for them), the rest are allocated. Blocks are reference counted; a block no running
  request uses stays cached and is evictable, least recently used first. When a request
  finishes its blocks are released tail first (the chain's last block becomes the least
  recently used), as vLLM's free-block queue does; if the request names the hashes of its
  output blocks (multi-turn workloads do), those are cached too, so the next turn reuses them.
  A request waits when the pool cannot free enough unreferenced blocks for its prompt and its
  output (which it reserves on admission).
- **Continuous batching**: at most `max_num_seqs` requests run; the scheduler admits waiting
  requests first-come-first-served at every step while there is room (no preemption).
- **Latency**: one engine step = the prefill of the uncached prompt tokens of the requests
  admitted at that step (`prefill_ms_per_token` each, plus `prefill_base_ms` if any) + one
  decode iteration for every running request (`decode_base_ms + decode_ms_per_seq * running`).
  A request's first token comes at the end of its admission step (TTFT includes queueing), and
  one more token at each following step until `output_tokens`. Chunked prefill is not modelled
  (a long prefill delays that whole step, as with chunking off).

With `EngineConfig.kv_changes`, each `StepResult` also lists the step's KV changes in order, as
vLLM's block pool reports them in KV events: `BlocksStored` (one per run of consecutive blocks a
request newly cached: a ``BlockStored``) and `BlockEvicted` (a ``BlockRemoved``); the
sim-node's ZMQ publisher (`kv_publisher.py`) encodes them.

`Engine` is pure (no clock, no I/O): the caller advances it (`step()`) and feeds it requests;
`Fleet` in `fleet.py` runs several of them against a trace, and `server.py` drives one in
scaled real time behind a vLLM-compatible HTTP API.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class LatencyModel:
    """Engine step cost (milliseconds); the named models below, see docs/simulation.md."""

    prefill_ms_per_token: float
    prefill_base_ms: float
    decode_base_ms: float
    decode_ms_per_seq: float

    def step_ms(self, prefill_tokens: int, running: int) -> float:
        prefill = self.prefill_base_ms + self.prefill_ms_per_token * prefill_tokens \
            if prefill_tokens else 0.0
        decode = self.decode_base_ms + self.decode_ms_per_seq * running if running else 0.0
        return prefill + decode


# Llama-3-8B (BF16) on one H100-80GB with vLLM, fitted to published measurements
# (docs/simulation.md cites them): ~28k prefill tokens/s, ~7 ms per decode step at a few
# sequences, ~0.02 ms more per running sequence. Prefill-bound: a request's prefill costs
# more than its share of the decode steps.
DEFAULT_LATENCY = LatencyModel(prefill_ms_per_token=0.035, prefill_base_ms=10.0,
                               decode_base_ms=7.0, decode_ms_per_seq=0.02)
PREFILL_BOUND_LATENCY = DEFAULT_LATENCY
# The other regime (an assumption, not a fit): prefill ~3x faster (~80k tokens/s) and decode
# ~2x slower (~12 ms per token, 0.1 ms more per running sequence), as with a larger model's
# memory-bound decode; a full batch's decode steps then dominate a request's time.
DECODE_BOUND_LATENCY = LatencyModel(prefill_ms_per_token=0.0125, prefill_base_ms=10.0,
                                    decode_base_ms=12.0, decode_ms_per_seq=0.1)
# KV cache of that setup: ~440k tokens (57 GB of free HBM at 128 KiB per token).
DEFAULT_KV_TOKENS = 440_000


@dataclass(frozen=True, slots=True)
class EngineConfig:
    capacity_blocks: int
    block_size: int = 16
    max_num_seqs: int = 128
    latency: LatencyModel = DEFAULT_LATENCY
    kv_changes: bool = False  # list each step's KV changes in order (StepResult.changes)


@dataclass(slots=True)
class Request:
    """One request as an engine sees it. Times are virtual milliseconds."""

    request_id: str
    blocks: Sequence[int]          # chained block hashes of the prompt
    prompt_tokens: int
    output_tokens: int
    arrival_ms: float
    session: str | None = None
    output_blocks: Sequence[int] = ()  # hashes of the output's full blocks, if known
    # What KV events say about the prompt's blocks (the sim-node fills them in; optional):
    token_ids: Sequence[int] = ()             # the prompt's token ids
    lora_name: str | None = None
    extra_keys: Sequence[Any] | None = None   # per block, as hashed (vllm_extra_keys)
    digests: Sequence[bytes] = ()             # the 32-byte digests behind `blocks`
    # filled in by the engine
    node: str = ""
    reused_blocks: int = 0
    reused_tokens: int = 0
    admitted_ms: float = -1.0
    first_token_ms: float = -1.0
    finished_ms: float = -1.0
    rejected: bool = False
    held: list[int] = field(default_factory=list)   # blocks it references
    reserved: int = 0                                # output blocks reserved

    @property
    def ttft_ms(self) -> float:
        return self.first_token_ms - self.arrival_ms

    @property
    def e2e_ms(self) -> float:
        return self.finished_ms - self.arrival_ms


@dataclass(frozen=True, slots=True)
class BlocksStored:
    """Blocks one request newly cached, consecutive in its chain: one vLLM ``BlockStored``.

    `parent` is the chain's block before the first one (None at block 0). `start` is the
    first block's index in ``request.blocks`` (its tokens start at
    ``request.token_ids[start * block_size]``); None for output blocks, whose tokens the
    engine does not know.
    """

    request: Request
    block_hashes: list[int]
    parent: int | None
    start: int | None


@dataclass(frozen=True, slots=True)
class BlockEvicted:
    """One cached block evicted to make room: one vLLM ``BlockRemoved``."""

    block_hash: int


@dataclass(slots=True)
class StepResult:
    """What one engine step did: when it ends, and the KV changes (for KV events).

    `changes` is filled only with `EngineConfig.kv_changes`: `stored` and `removed` in the
    order they happened, grouped as a real engine's KV events group them.
    """

    ends_ms: float
    started: list[Request]
    finished: list[Request]
    stored: list[int]
    removed: list[int]
    changes: list[BlocksStored | BlockEvicted] = field(default_factory=list)


class Engine:
    """One simulated engine (see module docstring)."""

    def __init__(self, node_id: str, config: EngineConfig) -> None:
        self.node_id = node_id
        self.config = config
        self.pool: OrderedDict[int, None] = OrderedDict()  # unreferenced cached blocks, LRU first
        self.refs: dict[int, int] = {}                     # referenced blocks -> running users
        self.reserved = 0                                  # output blocks of running requests
        self.waiting: deque[Request] = deque()
        self.running: dict[str, Request] = {}
        self._finish_at: list[tuple[int, str]] = []        # (step number, request id) heap
        self._step_no = 0
        self.busy_until_ms = 0.0
        self.stats = {"prefill_tokens": 0, "reused_tokens": 0, "evicted_blocks": 0, "steps": 0}

    def drop_cached(self) -> int:
        """Forget every cached block no running request uses (a restarted engine's empty
        prefix cache, for fault injection); the number dropped. No KV event is emitted."""
        dropped = len(self.pool)
        self.pool.clear()
        return dropped

    # -- views -----------------------------------------------------------------------------

    @property
    def used_blocks(self) -> int:
        return len(self.pool) + len(self.refs) + self.reserved

    @property
    def held_blocks(self) -> int:
        """Blocks holding KV (cached or in use), not counting reservations for output."""
        return len(self.pool) + len(self.refs)

    @property
    def load(self) -> int:
        """Requests on this engine (running + waiting)."""
        return len(self.running) + len(self.waiting)

    def cached_prefix(self, blocks: Sequence[int]) -> int:
        """How many of `blocks`, from block 0, this engine holds (the true cache)."""
        n = 0
        for block in blocks:
            if block not in self.refs and block not in self.pool:
                break
            n += 1
        return n

    def holds(self, block: int) -> bool:
        return block in self.refs or block in self.pool

    # -- driving ---------------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        request.node = self.node_id
        self.waiting.append(request)

    def idle(self) -> bool:
        return not self.running and not self.waiting

    def step(self, now_ms: float) -> StepResult | None:
        """Run one step starting at `now_ms`; None if there is nothing to do."""
        if self.idle():
            return None
        stored: list[int] = []
        removed: list[int] = []
        changes: list[BlocksStored | BlockEvicted] = []
        track = changes if self.config.kv_changes else None
        started: list[Request] = []
        prefill = 0
        cfg = self.config
        while self.waiting and len(self.running) < cfg.max_num_seqs:
            request = self.waiting[0]
            if not self._allocate(request, stored, removed, track):
                break  # FCFS: the head waits for room, and so does everyone behind it
            self.waiting.popleft()
            request.admitted_ms = now_ms
            request.reused_tokens = min(request.reused_blocks * cfg.block_size,
                                        request.prompt_tokens)
            uncached = request.prompt_tokens - request.reused_tokens
            prefill += uncached
            self.stats["prefill_tokens"] += uncached
            self.stats["reused_tokens"] += request.prompt_tokens - uncached
            self.running[request.request_id] = request
            heapq.heappush(self._finish_at, (self._step_no + max(request.output_tokens, 1),
                                             request.request_id))
            started.append(request)
        if not self.running:
            # Nothing fits even in an empty batch (a prompt larger than the pool): refuse it.
            request = self.waiting.popleft()
            request.rejected = True
            request.first_token_ms = request.finished_ms = now_ms
            return StepResult(now_ms, [], [request], stored, removed, changes)
        ends = now_ms + cfg.latency.step_ms(prefill, len(self.running))
        self._step_no += 1
        self.stats["steps"] += 1
        for request in started:
            request.first_token_ms = ends
        finished = []
        while self._finish_at and self._finish_at[0][0] <= self._step_no:
            _, request_id = heapq.heappop(self._finish_at)
            request = self.running.pop(request_id)
            request.finished_ms = ends
            self._release(request, stored, track)
            finished.append(request)
        self.busy_until_ms = ends
        return StepResult(ends, started, finished, stored, removed, changes)

    # -- KV pool ---------------------------------------------------------------------------

    def _allocate(self, request: Request, stored: list[int], removed: list[int],
                  changes: list[BlocksStored | BlockEvicted] | None) -> bool:
        """Reference the request's prompt blocks (reusing its cached prefix) if room allows."""
        blocks = request.blocks
        reused = self.cached_prefix(blocks)
        new = [b for b in dict.fromkeys(blocks[reused:]) if not self.holds(b)]
        output_blocks = max(len(request.output_blocks),
                            -(-request.output_tokens // self.config.block_size))
        need = len(new) + output_blocks
        free = self.config.capacity_blocks - self.used_blocks
        # Evictable: unreferenced cached blocks, minus the ones this prompt is about to reuse.
        reuse_cached = sum(1 for b in dict.fromkeys(blocks) if b in self.pool)
        if need > free + len(self.pool) - reuse_cached:
            return False
        for block in dict.fromkeys(blocks):
            if block in self.pool:
                del self.pool[block]
                self.refs[block] = 1
            elif block in self.refs:
                self.refs[block] += 1
        while self.config.capacity_blocks - self.used_blocks < need:
            victim, _ = self.pool.popitem(last=False)
            removed.append(victim)
            self.stats["evicted_blocks"] += 1
            if changes is not None:
                changes.append(BlockEvicted(victim))
        for block in new:
            self.refs[block] = 1
            stored.append(block)
        if changes is not None and new:
            changes.extend(_stored_runs(request, reused, set(new)))
        self.reserved += output_blocks
        request.reserved = output_blocks
        request.reused_blocks = reused
        request.held = list(dict.fromkeys(blocks))
        return True

    def _release(self, request: Request, stored: list[int],
                 changes: list[BlocksStored | BlockEvicted] | None) -> None:
        """Drop the request's references; its blocks stay cached, the chain's tail first.

        Output blocks named by the request are cached in the room its reservation held.
        """
        self.reserved -= request.reserved
        outputs = [b for b in dict.fromkeys(request.output_blocks)
                   if not self.holds(b)][:request.reserved]
        for block in reversed(outputs):
            self.pool[block] = None
            stored.append(block)
        if changes is not None and outputs:
            changes.append(BlocksStored(request, outputs,
                                        request.blocks[-1] if request.blocks else None, None))
        for block in reversed(request.held):
            count = self.refs.get(block, 0) - 1
            if count > 0:
                self.refs[block] = count
            elif block in self.refs:
                del self.refs[block]
                self.pool[block] = None
        request.held = []
        request.reserved = 0


def _stored_runs(request: Request, first: int, new: set[int]) -> Iterator[BlocksStored]:
    """Split the request's newly cached blocks (`new`, from index `first` on) into runs of
    consecutive chain blocks; a hash repeated in the chain is stored once, where it first is."""
    blocks = request.blocks
    start: int | None = None
    for i in range(first, len(blocks) + 1):
        is_new = i < len(blocks) and blocks[i] in new
        if is_new:
            new.discard(blocks[i])
            if start is None:
                start = i
        elif start is not None:
            yield BlocksStored(request, list(blocks[start:i]),
                               blocks[start - 1] if start else None, start)
            start = None


def fresh(requests: Sequence[Request], time_scale: float = 1.0) -> list[Request]:
    """Unrun copies of `requests` (a workload is replayed once per policy).

    `time_scale` multiplies every arrival time (see `workloads.at_rate`).
    """
    return [Request(r.request_id, r.blocks, r.prompt_tokens, r.output_tokens,
                    r.arrival_ms * time_scale, r.session, r.output_blocks) for r in requests]

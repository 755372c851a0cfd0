"""The simulated node's core: its settings, the engine loop and the cluster reporter.

`SimNode` drives one `Engine` in scaled real time (`time_scale` virtual milliseconds per real
millisecond), hands each request's tokens to whoever awaits them, and, with `cluster_urls`,
registers with a cache_plane cluster, heartbeats its load and reports its KV events (over HTTP
unless `kv_events_http` is off). With `kv_events` it also publishes them as a vLLM engine does,
over ZMQ (`kv_publisher.py`). The HTTP API in front of it is `server.py`.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
import zlib
from array import array
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import structlog

from ..client import CachePlaneClient
from ..hashing import DEFAULT_SEED, to_external
from ..tokenization import (
    WORD_VOCAB,
    Tokenizer,
    WordTokenizer,
    load_tokenizer,
    request_block_digests,
    request_block_hashes,
    vllm_extra_keys,
)
from .engine import DEFAULT_KV_TOKENS, DEFAULT_LATENCY, Engine, EngineConfig, LatencyModel, Request
from .faults import FaultPlan, Faults
from .kv_publisher import EventBuilder, KVEventPublisher, KVEventsSettings

log = structlog.get_logger(__name__)
VOCAB = WORD_VOCAB
tokenize = WordTokenizer.tokenize  # the stand-in, for callers that route without a tokenizer


@dataclass(frozen=True)
class SimNodeSettings:
    """A simulated node's configuration (the CLI's `sim-node` flags)."""

    node_id: str = "sim-0"
    model: str = "sim-llm"
    address: str = "127.0.0.1:9000"       # what the cluster tells routers
    block_size: int = 16
    capacity_blocks: int = DEFAULT_KV_TOKENS // 16
    max_num_seqs: int = 128
    time_scale: float = 1.0
    latency: LatencyModel = DEFAULT_LATENCY
    hash_seed: str = DEFAULT_SEED
    cluster_urls: tuple[str, ...] = ()
    api_token: str | None = None           # for the cluster
    lease_ms: int = 10_000
    # How it verifies the cluster's members over HTTPS (a private CA; a client cert for mTLS).
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tokenizer: str | None = None           # HF tokenizer dir (or "tiny-chat"); None: words
    lora_modules: tuple[str, ...] = ()     # adapter names served besides `model`
    api_key: str | None = None             # required of this node's clients, as vLLM's
    faults: FaultPlan = FaultPlan()
    kv_events: KVEventsSettings | None = None  # publish KV events over ZMQ, as vLLM does
    kv_events_http: bool = True            # report them to the cluster's /v1/kv-events
    # The text it answers: the same for every prompt ("fixed"), or one that depends on the
    # prompt's tokens ("prompt": two different questions get different answers, as from a
    # real model, which is what the response cache's verification needs to see a false hit).
    answers: str = "fixed"


@dataclass(frozen=True, slots=True)
class Prompt:
    """A generation request, parsed: what the engine runs and how to answer."""

    model: str
    token_ids: list[int]
    lora_name: str | None
    cache_salt: str | None
    max_tokens: int
    stream: bool
    include_usage: bool


class SimNode:
    """The engine loop, in-flight requests, counters and the cluster reporter."""

    def __init__(self, settings: SimNodeSettings) -> None:
        self.settings = settings
        self.engine = Engine(settings.node_id, EngineConfig(
            settings.capacity_blocks, settings.block_size, settings.max_num_seqs,
            settings.latency, kv_changes=settings.kv_events is not None))
        self.tokenizer: Tokenizer = (load_tokenizer(settings.tokenizer) if settings.tokenizer
                                     else WordTokenizer())
        self.faults = Faults(settings.faults)
        self.tokens: dict[str, asyncio.Queue[int | None]] = {}
        self.wake = asyncio.Event()
        self.epoch = time.monotonic()
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "prefix_hit_tokens": 0,
                         "requests_finished": 0}
        self.reports: asyncio.Queue[tuple[list[int], list[int]]] = asyncio.Queue()
        self.client: CachePlaneClient | None = None
        self.seq = 0
        self.instance = uuid.uuid4().hex  # this process: a restart is a new instance
        self._unsent: tuple[int, list[int], list[int]] | None = None
        # The ZMQ publisher is started (and `publisher` set) by the app's background context.
        self.publisher: KVEventPublisher | None = None
        self.event_builder = (EventBuilder(settings.kv_events, settings.block_size,
                                           settings.lora_modules)
                              if settings.kv_events is not None else None)

    def kv_events_registration(self) -> dict[str, str] | None:
        """Where the cluster subscribes to this node's ZMQ events (None: it is not told).

        Only without HTTP reports: a node reports through one path. A wildcard bind address
        (``*``, ``0.0.0.0``) is given as the host of the node's own address.
        """
        kv = self.settings.kv_events
        if kv is None or self.settings.kv_events_http:
            return None
        host = self.settings.address.rpartition(":")[0]

        def reachable(endpoint: str) -> str:
            return re.sub(r"^tcp://(\*|0\.0\.0\.0|\[::\]):", f"tcp://{host}:", endpoint)

        out = {"endpoint": reachable(kv.endpoint), "topic": kv.topic}
        if kv.replay_endpoint:
            out["replay_endpoint"] = reachable(kv.replay_endpoint)
        return out

    @property
    def max_model_len(self) -> int:
        return self.settings.capacity_blocks * self.settings.block_size

    def served(self, model: str) -> bool:
        return model == self.settings.model or model in self.settings.lora_modules

    def now_ms(self) -> float:
        return (time.monotonic() - self.epoch) * 1000 * self.settings.time_scale

    async def run_engine(self) -> None:
        """Step the engine while it has work, sleeping each step's (scaled) duration."""
        while True:
            if self.engine.idle():
                self.wake.clear()
                await self.wake.wait()
            result = self.engine.step(self.now_ms())
            if result is None:
                continue
            delay = (result.ends_ms - self.now_ms()) / self.settings.time_scale / 1000
            if delay > 0:
                await asyncio.sleep(delay)
            for request in result.started:
                self.counters["prompt_tokens"] += request.prompt_tokens
                self.counters["prefix_hit_tokens"] += request.reused_tokens
            finished = {r.request_id for r in result.finished}
            for request_id in list(self.engine.running) + list(finished):
                queue = self.tokens.get(request_id)
                if queue is not None:
                    queue.put_nowait(0)  # one token per running request per step
                    self.counters["generation_tokens"] += 1
            for request in result.finished:
                self.counters["requests_finished"] += 1
                queue = self.tokens.get(request.request_id)
                if queue is not None:
                    queue.put_nowait(None)
            if self.settings.kv_events_http and (result.stored or result.removed):
                self.reports.put_nowait((result.stored, result.removed))
            if self.publisher is not None and self.event_builder is not None and result.changes:
                self.publisher.publish(self.event_builder.build(result.changes))

    def new_request(self, prompt: Prompt) -> Request:
        """The engine request for `prompt`: its blocks hashed as vLLM would hash them.

        With a KV-event publisher the request also carries what a ``BlockStored`` reports:
        its token ids, LoRA name, per-block extra keys and (bytes hash form) digests.
        """
        s = self.settings
        if s.kv_events is None:
            blocks = request_block_hashes(prompt.token_ids, s.block_size, s.hash_seed,
                                          prompt.lora_name, prompt.cache_salt)
            return Request(uuid.uuid4().hex, blocks, len(prompt.token_ids),
                           max(prompt.max_tokens, 1), self.now_ms(),
                           token_ids=prompt.token_ids if s.answers == "prompt" else ())
        digests = request_block_digests(prompt.token_ids, s.block_size, s.hash_seed,
                                        prompt.lora_name, prompt.cache_salt)
        return Request(uuid.uuid4().hex, [to_external(d) for d in digests],
                       len(prompt.token_ids), max(prompt.max_tokens, 1), self.now_ms(),
                       token_ids=prompt.token_ids, lora_name=prompt.lora_name,
                       extra_keys=vllm_extra_keys(len(digests), prompt.lora_name,
                                                  prompt.cache_salt),
                       digests=digests if s.kv_events.hash_form == "bytes" else ())

    async def generate(self, request: Request, max_tokens: int) -> AsyncGenerator[int, None]:
        """Run `request`; yield one (synthetic) token id per decode step, up to `max_tokens`.

        Once the first token is out, ``request.reused_tokens`` holds the cached prefix.
        """
        queue: asyncio.Queue[int | None] = asyncio.Queue()
        self.tokens[request.request_id] = queue
        self.engine.submit(request)
        self.wake.set()
        # (crc32: a stable function of the prompt, unlike hash(); 0 keeps the fixed answers)
        salt = zlib.crc32(array("I", request.token_ids).tobytes()) \
            if self.settings.answers == "prompt" else 0
        try:
            sent = 0
            while sent < max_tokens:
                token = await queue.get()
                if token is None:
                    break
                sent += 1
                yield (sent * 7919 + salt) % VOCAB
        finally:
            self.tokens.pop(request.request_id, None)

    # -- cluster ---------------------------------------------------------------------------

    async def run_reporter(self) -> None:
        """Keep reporting to the cluster; on any failure, log, wait a second, start over."""
        # KV-event sequence numbers start from the wall clock (microseconds), so a restarted
        # node's events are never taken for replays of the previous run's.
        self.seq = time.time_ns() // 1000
        while True:
            try:
                await self._report()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # cluster unreachable, no leader, ...: retry
                log.warning("sim_node_report_failed", error=repr(exc))
                await asyncio.sleep(1.0)

    async def _report(self) -> None:
        """Register, then heartbeat and publish KV events to the cluster (ordered seqs)."""
        s = self.settings
        assert self.client is not None
        await self.client.register_model(s.model, block_size=s.block_size, hash_seed=s.hash_seed)
        # It runs max_num_seqs requests at once and queues the rest (as vLLM does); the
        # router may send it up to ADMISSION_FACTOR times that many.
        await self.client.register_node(s.node_id, s.address, [s.model], s.capacity_blocks,
                                        max_active=s.max_num_seqs * ADMISSION_FACTOR,
                                        max_running=s.max_num_seqs, instance_id=self.instance,
                                        kv_events=self.kv_events_registration())
        beat = asyncio.get_running_loop().time()
        while True:
            if self._unsent is not None:  # a batch whose send failed: the same batch, same seq
                seq, stored, removed = self._unsent
            else:
                try:
                    stored, removed = await asyncio.wait_for(self.reports.get(), timeout=0.2)
                except TimeoutError:
                    stored, removed = [], []
                if stored or removed:
                    self.seq += 1
                seq = self.seq
                self._unsent = (seq, stored, removed)
            events = []
            if removed:
                events.append({"type": "removed", "block_hashes": removed})
            if stored:
                events.append({"type": "stored", "block_hashes": stored})
            if events:  # a retry of an applied batch is a duplicate (same node, same seq)
                await self.client.kv_events(s.node_id, seq, events, model=s.model)
            self._unsent = None
            now = asyncio.get_running_loop().time()
            if now - beat >= s.lease_ms / 3000:
                beat = now
                await self.client.heartbeat(s.node_id, active_requests=len(self.engine.running),
                                            queue_depth=len(self.engine.waiting),
                                            used_blocks=self.engine.held_blocks)


ADMISSION_FACTOR = 8

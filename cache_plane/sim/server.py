"""A simulated inference node behind a vLLM-compatible HTTP API (aiohttp).

`/v1/completions` and `/v1/chat/completions` (streamed as server-sent events, or not),
`/v1/models`, `/health`, `/metrics` (Prometheus text with vLLM's metric names). Requests run
on an `Engine` (see `engine.py`: KV pool, continuous batching, latency model) driven in scaled
real time: `time_scale` virtual milliseconds pass per real millisecond, so a long workload
replays in minutes. Prompts are tokenized by a stand-in tokenizer (one token per
whitespace-separated word, id from a hash of the word) and cut into blocks hashed with vLLM's
`sha256_cbor` chain, so a router that tokenizes the same way sees the same block hashes.

With `cluster_urls`, the node registers with a cache_plane cluster, heartbeats its load every
`lease_ms / 3`, and reports every batch of stored and removed blocks to `/v1/kv-events` with
increasing sequence numbers, as a real engine's KV-event publisher would.

Run: `cache-plane sim-node --node-id gpu0 --port 9000 --cluster http://127.0.0.1:8000`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from aiohttp import web

from ..client import CachePlaneClient
from ..hashing import DEFAULT_SEED, block_hashes
from .engine import DEFAULT_KV_TOKENS, DEFAULT_LATENCY, Engine, EngineConfig, LatencyModel, Request

log = structlog.get_logger(__name__)
VOCAB = 32_000


@dataclass(frozen=True)
class SimNodeSettings:
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
    api_token: str | None = None
    lease_ms: int = 10_000
    # How it verifies the cluster's members over HTTPS (a private CA; a client cert for mTLS).
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


def tokenize(text: str) -> list[int]:
    """The stand-in tokenizer: one token per word, its id a stable hash of the word."""
    return [int.from_bytes(hashlib.blake2b(w.encode(), digest_size=4).digest(), "big") % VOCAB
            for w in text.split()]


class SimNode:
    """The engine loop, in-flight requests, counters and the cluster reporter."""

    def __init__(self, settings: SimNodeSettings) -> None:
        self.settings = settings
        self.engine = Engine(settings.node_id, EngineConfig(
            settings.capacity_blocks, settings.block_size, settings.max_num_seqs,
            settings.latency))
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
            if result.stored or result.removed:
                self.reports.put_nowait((result.stored, result.removed))

    async def generate(self, prompt: str, max_tokens: int) -> AsyncIterator[int]:
        """Yield one (synthetic) token id per decode step until `max_tokens` or the end."""
        token_ids = tokenize(prompt)
        request_id = uuid.uuid4().hex
        queue: asyncio.Queue[int | None] = asyncio.Queue()
        self.tokens[request_id] = queue
        blocks = block_hashes(token_ids, self.settings.block_size, self.settings.hash_seed)
        self.engine.submit(Request(request_id, blocks, len(token_ids), max(max_tokens, 1),
                                   self.now_ms()))
        self.wake.set()
        try:
            sent = 0
            while sent < max_tokens:
                token = await queue.get()
                if token is None:
                    break
                sent += 1
                yield (sent * 7919) % VOCAB
        finally:
            self.tokens.pop(request_id, None)

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
                                        max_running=s.max_num_seqs, instance_id=self.instance)
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

SIM_NODE: web.AppKey[SimNode] = web.AppKey("sim_node", SimNode)


def create_app(settings: SimNodeSettings) -> web.Application:
    app = web.Application(client_max_size=64 << 20)
    app[SIM_NODE] = SimNode(settings)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.cleanup_ctx.append(_background)
    return app


async def _background(app: web.Application) -> AsyncIterator[None]:
    node = app[SIM_NODE]
    tasks = [asyncio.create_task(node.run_engine())]
    if node.settings.cluster_urls:
        node.client = CachePlaneClient(list(node.settings.cluster_urls),
                                       token=node.settings.api_token, timeout=10,
                                       ca_file=node.settings.ca_file,
                                       cert_file=node.settings.cert_file,
                                       key_file=node.settings.key_file)
        await node.client.__aenter__()
        tasks.append(asyncio.create_task(node.run_reporter()))
    yield
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    if node.client is not None:
        await node.client.__aexit__(None, None, None)


def _error(status: int, message: str) -> web.Response:
    body = {"object": "error", "message": message, "type": "BadRequestError", "code": status}
    return web.json_response(body, status=status)


async def _json(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = await request.json(loads=orjson.loads)
    except (ValueError, orjson.JSONDecodeError):
        return _error(400, "body is not valid JSON")
    if not isinstance(body, dict):
        return _error(400, "body must be a JSON object")
    max_tokens = body.get("max_tokens", 16)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or \
            not 1 <= max_tokens <= 1 << 16:
        return _error(400, "max_tokens must be an integer in [1, 65536]")
    return body


async def health(request: web.Request) -> web.Response:
    return web.Response(text="")


async def models(request: web.Request) -> web.Response:
    s = request.app[SIM_NODE].settings
    return web.json_response({"object": "list", "data": [
        {"id": s.model, "object": "model", "owned_by": "cache-plane-sim",
         "max_model_len": s.capacity_blocks * s.block_size}]})


async def metrics(request: web.Request) -> web.Response:
    node = request.app[SIM_NODE]
    e, c, s = node.engine, node.counters, node.settings
    lines = [
        f'vllm:num_requests_running{{model_name="{s.model}"}} {len(e.running)}',
        f'vllm:num_requests_waiting{{model_name="{s.model}"}} {len(e.waiting)}',
        f'vllm:kv_cache_usage_perc{{model_name="{s.model}"}} '
        f'{e.used_blocks / s.capacity_blocks:.6f}',
        f'vllm:prompt_tokens_total{{model_name="{s.model}"}} {c["prompt_tokens"]}',
        f'vllm:generation_tokens_total{{model_name="{s.model}"}} {c["generation_tokens"]}',
        f'vllm:prefix_cache_queries_total{{model_name="{s.model}"}} {c["prompt_tokens"]}',
        f'vllm:prefix_cache_hits_total{{model_name="{s.model}"}} {c["prefix_hit_tokens"]}',
        f'vllm:request_success_total{{model_name="{s.model}"}} {c["requests_finished"]}',
    ]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


def _prompt_text(body: dict[str, Any], chat: bool) -> str | None:
    if not chat:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
            return " ".join(prompt)
        return prompt if isinstance(prompt, str) else None
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
        return None
    return " ".join(f"<{m.get('role', 'user')}> {m['content']}" for m in messages)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, chat=True)


async def _serve(request: web.Request, chat: bool) -> web.StreamResponse:
    node = request.app[SIM_NODE]
    body = await _json(request)
    if isinstance(body, web.Response):
        return body
    text = _prompt_text(body, chat)
    if text is None:
        return _error(400, "'messages' must be a non-empty list of {role, content}" if chat
                      else "'prompt' must be a string or a list of strings")
    if body.get("model", node.settings.model) != node.settings.model:
        return _error(404, f"model {body.get('model')!r} is not served here")
    max_tokens = int(body.get("max_tokens", 16))
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    kind = "chat.completion" if chat else "text_completion"
    if not body.get("stream"):
        tokens = [t async for t in node.generate(text, max_tokens)]
        out = " ".join(f"t{t}" for t in tokens)
        choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant", "content": out},
                                   "finish_reason": "length"} if chat else
                                  {"index": 0, "text": out, "finish_reason": "length"})
        prompt_tokens = len(tokenize(text))
        return web.json_response({
            "id": rid, "object": kind, "created": created, "model": node.settings.model,
            "choices": [choice], "usage": {"prompt_tokens": prompt_tokens,
                                           "completion_tokens": len(tokens),
                                           "total_tokens": prompt_tokens + len(tokens)}})
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    chunk_kind = "chat.completion.chunk" if chat else "text_completion"
    async for token in node.generate(text, max_tokens):
        delta: dict[str, Any] = ({"index": 0, "delta": {"content": f"t{token} "},
                                  "finish_reason": None} if chat else
                                 {"index": 0, "text": f"t{token} ", "finish_reason": None})
        chunk = {"id": rid, "object": chunk_kind, "created": created,
                 "model": node.settings.model, "choices": [delta]}
        await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response

"""A simulated inference node behind a vLLM-compatible HTTP API (aiohttp).

`/v1/completions` and `/v1/chat/completions` (streamed as server-sent events, or not),
`/v1/models`, `/tokenize`, `/health`, `/metrics` (Prometheus text with vLLM's metric names).
Requests run on an `Engine` (see `engine.py`: KV pool, continuous batching, latency model)
driven in scaled real time: `time_scale` virtual milliseconds pass per real millisecond, so a
long workload replays in minutes.

Prompts are tokenized as vLLM tokenizes them (see `cache_plane.tokenization`): with
`tokenizer` (a local Hugging Face model directory, e.g. the packaged ``tiny-chat``) chat is
rendered with its chat template and encoded without special tokens, completions with them;
without one, a stand-in splits on whitespace (one token per word, id a hash of the word). The
token ids are cut into blocks hashed with vLLM's `sha256_cbor` chain, extra keys included: a
request naming one of `lora_modules` as its model hashes under that adapter's name, and a
``cache_salt`` salts the first block. A router that tokenizes the same way sees the same hashes.

What a client sees, as from vLLM:

- ``usage``: ``prompt_tokens``, ``completion_tokens``, ``total_tokens`` and
  ``prompt_tokens_details.cached_tokens`` (the prompt tokens the engine found in its prefix
  cache; vLLM sends this only with ``--enable-prompt-tokens-details``, the simulator always).
- Streams: a chat stream opens with ``delta: {"role": "assistant", "content": ""}``; the last
  content chunk carries ``finish_reason`` (``length``, or ``stop`` if the engine ended early);
  with ``stream_options: {"include_usage": true}`` a chunk with ``choices: []`` and the usage
  comes before ``data: [DONE]``.
- ``POST /tokenize``: ``{model?, prompt, add_special_tokens?}`` or ``{model?, messages,
  add_generation_prompt?, continue_final_message?, add_special_tokens?, chat_template_kwargs?,
  tools?}``, plus ``return_token_strs?``; answers ``{count, max_model_len, tokens,
  token_strs}`` (``token_strs`` null unless asked for, and always null for the stand-in).
- With `api_key`, ``/v1/*``, ``/tokenize`` and ``/sim/*`` need ``Authorization: Bearer <key>``
  (401 otherwise), like ``vllm serve --api-key`` (which guards ``/v1`` only).
- Errors are vLLM's shape: ``{"object": "error", "message", "type", "param", "code"}``.

Failure injection (for gateway tests; see `faults.py`): ``POST /sim/faults`` with
``{"mode": "none" | "refuse_5xx" | "hang" | "break_midstream", "status"?, "hang_s"?,
"after_chunks"?, "count"?}`` sets what the next generation requests suffer: a 5xx before the
first byte, no byte for `hang_s` seconds (then normal service; changing the plan releases
them), or a stream cut after `after_chunks` events with the connection closed. ``GET
/sim/faults`` shows the plan; `SimNodeSettings.faults` is the initial one.

With `cluster_urls`, the node registers with a cache_plane cluster, heartbeats its load every
`lease_ms / 3`, and reports every batch of stored and removed blocks to `/v1/kv-events` with
increasing sequence numbers, as a real engine's KV-event publisher would (unless
`kv_events_http` is off).

With `kv_events`, it publishes the same changes on vLLM's own wire: ZMQ PUB frames and a
ROUTER replay socket (see `kv_publisher.py`). ``GET /sim/kv-events`` shows the stream (next
seq, buffered batches, counters); ``POST /sim/kv-events`` with ``{"drop_live"?: n,
"reorder_live"?: n, "restart"?: bool}`` injects its faults: the next `n` batches are not sent
live (replay still has them), the next `n` live batches go out in reverse order, and a
restart sets seq back to 0 with an empty replay buffer. Both answer 404 without a publisher.

Run: `cache-plane sim-node --node-id gpu0 --port 9000 --cluster http://127.0.0.1:8000`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import structlog
from aiohttp import web

from ..client import CachePlaneClient
from ..tokenization import (
    HFTokenizer,
    TokenizerError,
    chat_request_token_ids,
    completion_request_token_ids,
    request_flag,
)
from .engine import Request
from .faults import FaultPlan, parse_fault_plan
from .kv_publisher import KVEventPublisher
from .node import ADMISSION_FACTOR, Prompt, SimNode, SimNodeSettings, tokenize

__all__ = ["ADMISSION_FACTOR", "SIM_NODE", "SimNode", "SimNodeSettings", "create_app", "tokenize"]

log = structlog.get_logger(__name__)

SIM_NODE: web.AppKey[SimNode] = web.AppKey("sim_node", SimNode)
ERROR_TYPES = {400: "BadRequestError", 401: "Unauthorized", 404: "NotFoundError",
               500: "InternalServerError", 503: "ServiceUnavailableError"}
PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/sim/")


def create_app(settings: SimNodeSettings) -> web.Application:
    """Build the node's app; raise `TokenizerError` if `settings.tokenizer` cannot load."""
    app = web.Application(client_max_size=64 << 20,
                          middlewares=[_authenticate] if settings.api_key else [])
    app[SIM_NODE] = SimNode(settings)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/tokenize", tokenize_prompt)
    app.router.add_get("/sim/faults", get_faults)
    app.router.add_post("/sim/faults", set_faults)
    app.router.add_get("/sim/kv-events", get_kv_events)
    app.router.add_get("/sim/blocks", get_blocks)
    app.router.add_post("/sim/kv-events", set_kv_events)
    app.cleanup_ctx.append(_background)
    app.on_shutdown.append(_release_hung)
    return app


async def _background(app: web.Application) -> AsyncIterator[None]:
    node = app[SIM_NODE]
    if node.settings.kv_events is not None:  # bind first: a bad endpoint fails the start-up
        node.publisher = KVEventPublisher(node.settings.kv_events).start()
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
    if node.publisher is not None:
        await asyncio.to_thread(node.publisher.close)
        node.publisher = None


async def _release_hung(app: web.Application) -> None:
    """On shutdown, let hung requests finish, so the server need not wait them out."""
    app[SIM_NODE].faults.release()


@web.middleware
async def _authenticate(request: web.Request,
                        handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                        ) -> web.StreamResponse:
    key = request.app[SIM_NODE].settings.api_key
    if key and request.path.startswith(PROTECTED_PREFIXES):
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            return _error(401, "Unauthorized: this node needs 'Authorization: Bearer <api "
                               "key>'", headers={"WWW-Authenticate": "Bearer"})
    return await handler(request)


def _error(status: int, message: str, param: str | None = None,
           headers: dict[str, str] | None = None) -> web.Response:
    body = {"object": "error", "message": message,
            "type": ERROR_TYPES.get(status, "BadRequestError" if status < 500
                                    else "InternalServerError"),
            "param": param, "code": status}
    return web.json_response(body, status=status, headers=headers)


async def _json(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = await request.json(loads=orjson.loads)
    except (ValueError, orjson.JSONDecodeError):
        return _error(400, "body is not valid JSON")
    if not isinstance(body, dict):
        return _error(400, "body must be a JSON object")
    return body


def _model(node: SimNode, body: dict[str, Any]) -> str | web.Response:
    model = body.get("model") or node.settings.model
    if not isinstance(model, str) or not node.served(model):
        return _error(404, f"The model `{model}` does not exist.", param="model")
    return model


def _parse(node: SimNode, body: dict[str, Any], chat: bool) -> Prompt | web.Response:
    """The generation request `body` asks for, or the vLLM-shaped error that refuses it."""
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens", 16) if chat else 16)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or \
            not 1 <= max_tokens <= 1 << 16:
        return _error(400, "max_tokens must be an integer in [1, 65536]", param="max_tokens")
    if chat and not (isinstance(body.get("messages"), list) and body["messages"]):
        return _error(400, "'messages' must be a non-empty list of {role, content}",
                      param="messages")
    model = _model(node, body)
    if isinstance(model, web.Response):
        return model
    cache_salt = body.get("cache_salt")
    if cache_salt is not None and not (isinstance(cache_salt, str) and cache_salt):
        return _error(400, "Parameter 'cache_salt' must be a non-empty string if provided.",
                      param="cache_salt")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        return _error(400, "'stream_options' must be an object", param="stream_options")
    try:
        token_ids = (chat_request_token_ids(node.tokenizer, body) if chat
                     else completion_request_token_ids(node.tokenizer, body))
    except TokenizerError as exc:
        return _error(400, str(exc))
    lora = model if model != node.settings.model else None
    return Prompt(model, token_ids, lora, cache_salt, max_tokens, bool(body.get("stream")),
                  bool(body.get("stream") and options and options.get("include_usage")))


async def health(request: web.Request) -> web.Response:
    return web.Response(text="")


async def models(request: web.Request) -> web.Response:
    node = request.app[SIM_NODE]
    s = node.settings
    data = [{"id": s.model, "object": "model", "owned_by": "cache-plane-sim", "root": s.model,
             "parent": None, "max_model_len": node.max_model_len}]
    data += [{"id": name, "object": "model", "owned_by": "cache-plane-sim", "root": name,
              "parent": s.model, "max_model_len": node.max_model_len}
             for name in s.lora_modules]
    return web.json_response({"object": "list", "data": data})


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


async def tokenize_prompt(request: web.Request) -> web.Response:
    """vLLM's ``POST /tokenize``: the token ids the node would run for a prompt or a chat."""
    node = request.app[SIM_NODE]
    body = await _json(request)
    if isinstance(body, web.Response):
        return body
    model = _model(node, body)
    if isinstance(model, web.Response):
        return model
    try:
        if "messages" in body:
            token_ids = chat_request_token_ids(node.tokenizer, body)
        elif "prompt" in body:
            token_ids = completion_request_token_ids(node.tokenizer, body, lists=False)
        else:
            raise TokenizerError("either 'prompt' or 'messages' is required")
        strs = (node.tokenizer.token_strs(token_ids)
                if request_flag(body, "return_token_strs", False)
                and isinstance(node.tokenizer, HFTokenizer) else None)
    except TokenizerError as exc:
        return _error(400, str(exc))
    return web.json_response({"count": len(token_ids), "max_model_len": node.max_model_len,
                              "tokens": token_ids, "token_strs": strs})


async def get_faults(request: web.Request) -> web.Response:
    return web.json_response(request.app[SIM_NODE].faults.view())


async def set_faults(request: web.Request) -> web.Response:
    """Install the fault plan in the body (see the module docstring); releases hung requests."""
    node = request.app[SIM_NODE]
    body = await _json(request)
    if isinstance(body, web.Response):
        return body
    try:
        plan = parse_fault_plan(body)
    except ValueError as exc:
        return _error(400, str(exc))
    node.faults.set(plan)
    log.info("sim_node_faults_set", node_id=node.settings.node_id, **plan.as_json())
    return web.json_response(node.faults.view())


async def get_blocks(request: web.Request) -> web.Response:
    """The block hashes the engine holds (cached or in use), sorted: to check an index."""
    engine = request.app[SIM_NODE].engine
    return web.json_response({"blocks": sorted({*engine.pool, *engine.refs})})


async def get_kv_events(request: web.Request) -> web.Response:
    publisher = request.app[SIM_NODE].publisher
    if publisher is None:
        return _error(404, "this node publishes no KV events (no --kv-events-endpoint)")
    return web.json_response(publisher.view())


async def set_kv_events(request: web.Request) -> web.Response:
    """Inject KV-event faults: ``{"drop_live"?: n >= 0, "reorder_live"?: n >= 0,
    "restart"?: bool}``; the stream's view."""
    node = request.app[SIM_NODE]
    if node.publisher is None:
        return _error(404, "this node publishes no KV events (no --kv-events-endpoint)")
    body = await _json(request)
    if isinstance(body, web.Response):
        return body
    problems = []
    unknown = sorted(set(body) - {"drop_live", "reorder_live", "restart"})
    if unknown:
        problems.append(f"unknown fields: {', '.join(unknown)}")
    drop = body.get("drop_live", 0)
    if isinstance(drop, bool) or not isinstance(drop, int) or drop < 0:
        problems.append("drop_live must be an integer >= 0")
    reorder = body.get("reorder_live", 0)
    if isinstance(reorder, bool) or not isinstance(reorder, int) or reorder < 0:
        problems.append("reorder_live must be an integer >= 0")
    restart = body.get("restart", False)
    if not isinstance(restart, bool):
        problems.append("restart must be a boolean")
    if problems:
        return _error(400, "; ".join(problems))
    if restart:  # as a restarted engine: its stream starts over and its prefix cache is empty
        node.publisher.restart()
        node.engine.drop_cached()
    if drop:
        node.publisher.drop_live(drop)
    if reorder:
        node.publisher.reorder_live(reorder)
    await asyncio.to_thread(node.publisher.sync, 5.0)
    log.info("sim_node_kv_event_faults", node_id=node.settings.node_id, drop_live=drop,
             reorder_live=reorder, restart=restart)
    return web.json_response(node.publisher.view())


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, chat=True)


def _usage(prompt: Prompt, engine_request: Request, completion_tokens: int) -> dict[str, Any]:
    prompt_tokens = len(prompt.token_ids)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": engine_request.reused_tokens}}


def _drop_connection(request: web.Request) -> None:
    """Close the client's connection at once: no more bytes, no end of the chunked body."""
    if request.transport is not None:
        request.transport.close()


async def _serve(request: web.Request, chat: bool) -> web.StreamResponse:
    node = request.app[SIM_NODE]
    body = await _json(request)
    if isinstance(body, web.Response):
        return body
    prompt = _parse(node, body, chat)
    if isinstance(prompt, web.Response):
        return prompt
    fault = node.faults.take()
    if fault.mode == "refuse_5xx":
        return _error(fault.status, "injected fault: the engine refused the request")
    if fault.mode == "hang":
        await node.faults.hang(fault)
    elif fault.mode == "break_midstream" and not prompt.stream:
        _drop_connection(request)
        return web.Response(status=500)  # never sent: the connection is gone
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    engine_request = node.new_request(prompt)
    if not prompt.stream:
        async with contextlib.aclosing(node.generate(engine_request, prompt.max_tokens)) as gen:
            tokens = [t async for t in gen]
        out = " ".join(f"t{t}" for t in tokens)
        reason = "length" if len(tokens) == prompt.max_tokens else "stop"
        choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant", "content": out},
                                   "logprobs": None, "finish_reason": reason} if chat else
                                  {"index": 0, "text": out, "logprobs": None,
                                   "finish_reason": reason})
        return web.json_response({
            "id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": prompt.model, "choices": [choice],
            "usage": _usage(prompt, engine_request, len(tokens))})
    return await _stream(request, node, prompt, engine_request, rid, created, chat, fault)


async def _stream(request: web.Request, node: SimNode, prompt: Prompt, engine_request: Request,
                  rid: str, created: int, chat: bool, fault: FaultPlan) -> web.StreamResponse:
    """Send the completion as server-sent events, as vLLM streams it."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    kind = "chat.completion.chunk" if chat else "text_completion"
    sent_events = 0
    breaks_after = fault.after_chunks if fault.mode == "break_midstream" else None

    async def send(choices: list[dict[str, Any]], **extra: Any) -> bool:
        """Send one event; False once the injected break has cut the connection."""
        nonlocal sent_events
        if breaks_after is not None and sent_events >= breaks_after:
            _drop_connection(request)
            return False
        chunk = {"id": rid, "object": kind, "created": created, "model": prompt.model,
                 "choices": choices, **extra}
        await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        sent_events += 1
        return True

    def choice(text: str, reason: str | None) -> dict[str, Any]:
        if chat:
            return {"index": 0, "delta": {"content": text}, "logprobs": None,
                    "finish_reason": reason}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}

    if chat and not await send([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                 "logprobs": None, "finish_reason": None}]):
        return response
    count = 0
    async with contextlib.aclosing(node.generate(engine_request, prompt.max_tokens)) as gen:
        async for token in gen:
            count += 1
            last = count == prompt.max_tokens
            if not await send([choice(f"t{token} ", "length" if last else None)]):
                return response
    if count < prompt.max_tokens and not await send([choice("", "stop")]):
        return response
    if prompt.include_usage and not await send([], usage=_usage(prompt, engine_request, count)):
        return response
    if breaks_after is not None and sent_events >= breaks_after:
        _drop_connection(request)
        return response
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response

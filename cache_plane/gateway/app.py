"""The gateway's aiohttp application: authenticate, tokenize, route, proxy, report (the shell).

For each `POST /v1/chat/completions` or `/v1/completions`:

1. the API key names the tenant (401 otherwise; 429 + Retry-After past the key's rate);
2. the body is checked (`core.check_request`), the model looked up in the cluster's models
   (404), and the prompt tokenized as the engine will and hashed into its block hashes, with
   the LoRA name and ``cache_salt`` as extra keys (`cache_plane.tokenization`);
3. the cluster routes it (`route_ack`: ``committed`` waits for the decision's commit,
   ``decided`` only for the leader's decision) with the session from ``x-session-id`` or the
   body's ``user``; a refusal is a 429/503 with Retry-After;
4. the body goes as sent to the chosen node. A failure before the first byte (refused, reset,
   5xx, timeout) is reported (`failed`, and the node `unreachable`) and the request re-routed,
   at most `max_retries` times; after the first byte, a broken backend ends the stream with an
   SSE error event. Streams pass through event by event; the usage chunk is always asked
   for (and dropped again if the client did not ask);
5. the outcome is reported to the cluster in the background, and the engine's
   ``cached_tokens`` compared with the cluster's ``matched_tokens``. Reports wait up to
   `report_interval_ms` to travel together (`Reporter`: one `/v1/complete/batch` request,
   one Raft entry), which halves the cluster's requests per routed request.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import structlog
from aiohttp import web
from prometheus_client import generate_latest

from veristore_py.errors import VeristoreError
from veristore_py.tls import client_context

from ..client import CachePlaneClient
from ..hashing import DigestMemo
from ..responses import replay
from ..responses.rules import DirectiveError
from ..tokenization import (
    HFTokenizer,
    TokenizeLater,
    TokenizerError,
    chat_request_token_ids,
    completion_request_token_ids,
    load_tokenizer,
    request_block_hashes,
)
from . import core
from .cache import Plan, ResponseCache
from .core import GatewayError
from .hits import answer_hit
from .metrics import GatewayMetrics
from .reporter import Reporter
from .settings import ApiKey, GatewaySettings, load_api_keys

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class Attempt:
    """One backend call's outcome before its answer is passed on."""

    node_id: str
    request_id: str
    route: dict[str, Any]
    response: aiohttp.ClientResponse | None = None
    error: GatewayError | None = None


class Gateway:
    """Shared state of one gateway process: cluster client, backend session, caches."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        assert settings.api_keys_file
        self.keys: dict[str, ApiKey] = load_api_keys(settings.api_keys_file)
        self.buckets: dict[str, core.TokenBucket] = {}
        self.metrics = GatewayMetrics()
        self.models: dict[str, dict[str, Any]] = {}
        self.models_at = 0.0
        self.tokenizers: dict[str, HFTokenizer | str] = {}
        self.digests = DigestMemo()  # shared prefixes' block digests, computed once
        self.cluster: CachePlaneClient | None = None
        self.backend: aiohttp.ClientSession | None = None
        self.reporter = Reporter(self, settings.report_interval_ms / 1000)
        self.cache = ResponseCache(settings, self.metrics.cache)
        # Tokenizers load now, so a bad directory stops the start with a clear message.
        for model, spec in settings.tokenizers.items():
            self.tokenizers[model] = spec if spec in ("engine", "text") else load_tokenizer(spec)
        if settings.default_tokenizer not in ("engine", "text"):
            load_tokenizer(settings.default_tokenizer)
        # Secrets are read once (a restart picks up a rotated key).
        self.backend_keys = {node: settings.backend_key(node)
                             for node in settings.backend_api_key_files}
        self.backend_default_key = settings.backend_key("")
        self.backend_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=settings.connect_timeout_s, sock_read=settings.read_timeout_s)

    async def start(self) -> None:
        s = self.settings
        self.cluster = CachePlaneClient(list(s.cluster), token=s.cluster_token(),
                                        timeout=s.cluster_timeout_s, ca_file=s.cluster_ca_file,
                                        cert_file=s.cluster_cert_file,
                                        key_file=s.cluster_key_file)
        await self.cluster.__aenter__()
        await self.cache.start(self.cluster)
        ssl_context = (client_context(s.backend_ca_file) if s.backend_scheme == "https"
                       else None)
        self.backend = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ssl=ssl_context if ssl_context else True),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=s.connect_timeout_s),
            auto_decompress=False)

    async def stop(self) -> None:
        if self.cluster is not None:
            await self.cache.stop()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.reporter.drain(), timeout=5)
        if self.backend is not None:
            await self.backend.close()
        if self.cluster is not None:
            await self.cluster.__aexit__(None, None, None)

    # -- models and tokenizers -------------------------------------------------------------

    async def refresh_models(self) -> None:
        """Fetch the cluster's models; raise a 503 `GatewayError` if it does not answer."""
        assert self.cluster is not None
        try:
            listed = (await self.cluster.request("GET", "/v1/models"))["models"]
        except VeristoreError as exc:
            raise GatewayError(503, f"the cluster is unavailable: {exc}",
                               code="cluster_unavailable", retry_after=1) from exc
        self.models = {m["model_id"]: m for m in listed}
        self.models_at = time.monotonic()

    async def model(self, model_id: str) -> dict[str, Any]:
        """The cluster's spec of `model_id` (cached `models_refresh_s`); 404 if unknown."""
        base = self.settings.lora.get(model_id, model_id)
        if base not in self.models or \
                time.monotonic() - self.models_at > self.settings.models_refresh_s:
            try:
                await self.refresh_models()
            except GatewayError:
                if base not in self.models:  # a stale spec beats none
                    raise
        spec = self.models.get(base)
        if spec is None:
            raise GatewayError(404, f"The model '{model_id}' does not exist", param="model",
                               code="model_not_found")
        return spec

    def tokenizer(self, model_id: str) -> HFTokenizer | str:
        found = self.tokenizers.get(model_id)
        if found is None:
            spec = self.settings.default_tokenizer
            found = spec if spec in ("engine", "text") else load_tokenizer(spec)
            self.tokenizers[model_id] = found
        return found

    async def block_hashes(self, request: core.ChatRequest, body: dict[str, Any],
                           spec: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """The route's prompt form (block hashes, or text for the fallback) and token count."""
        try:
            tokenizer = self.tokenizer(spec["model_id"])
        except TokenizerError as exc:
            raise GatewayError(503, f"no tokenizer for {spec['model_id']!r}: {exc.detail}",
                               code="tokenizer_unavailable") from exc
        if tokenizer == "text":
            text = (request.prompt if request.prompt is not None else "\n".join(
                f"{m.get('role')}: {m.get('content')}" for m in request.messages))
            return {"prompt": text}, 0
        if tokenizer == "engine":
            token_ids = await self.engine_tokenize(request, body)
        else:
            assert isinstance(tokenizer, HFTokenizer)
            encode = chat_request_token_ids if request.chat else completion_request_token_ids
            try:
                try:  # inline when the prompt's long pieces are cached (a shared prefix)
                    with tokenizer.quick():
                        token_ids = encode(tokenizer, body)
                except TokenizeLater:  # else off the event loop: that takes milliseconds
                    token_ids = await asyncio.to_thread(encode, tokenizer, body)
            except TokenizerError as exc:
                raise GatewayError(400, str(exc), param="messages" if request.chat
                                   else "prompt", code="invalid_request") from exc
        lora = request.model if request.model in self.settings.lora else None
        hashes = request_block_hashes(token_ids, spec["block_size"], spec["hash_seed"],
                                      lora, request.cache_salt, self.digests)
        return {"block_hashes": hashes}, len(token_ids)

    async def engine_tokenize(self, request: core.ChatRequest,
                              body: dict[str, Any]) -> list[int]:
        """Ask a node serving the model for the token ids (vLLM's `POST /tokenize`)."""
        assert self.cluster is not None and self.backend is not None
        base = self.settings.lora.get(request.model, request.model)
        nodes = [n for n in await self.cluster.nodes()
                 if base in n.get("models", ()) and n.get("state") == "up"]
        if not nodes:
            raise GatewayError(503, f"no node serving {request.model!r} is up to tokenize",
                               code="no_node_up", retry_after=2)
        node = nodes[0]
        keys = ("model", "messages", "add_generation_prompt", "continue_final_message",
                "add_special_tokens", "chat_template_kwargs", "tools") if request.chat \
            else ("model", "prompt", "add_special_tokens")
        ask = {k: body[k] for k in keys if k in body}
        try:
            async with self.backend.post(
                    self.url(node["address"], "/tokenize"), json=ask,
                    headers=self.backend_headers(node["node_id"], "tok"),
                    timeout=aiohttp.ClientTimeout(total=self.settings.first_byte_timeout_s)) \
                    as resp:
                payload = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise GatewayError(502, f"tokenizing on {node['node_id']} failed: {exc!r}",
                               code="backend_error") from exc
        if resp.status >= 400 or not isinstance(payload, dict) \
                or not isinstance(payload.get("tokens"), list):
            raise GatewayError(400 if resp.status < 500 else 502,
                               f"the engine refused to tokenize: {str(payload)[:500]}",
                               code="invalid_request" if resp.status < 500 else "backend_error")
        return list(payload["tokens"])

    # -- backends --------------------------------------------------------------------------

    def url(self, address: str, path: str) -> str:
        return f"{self.settings.backend_scheme}://{address}{path}"

    def backend_headers(self, node_id: str, request_id: str) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
        key = self.backend_keys.get(node_id, self.backend_default_key)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    async def route(self, request: core.ChatRequest, form: dict[str, Any],
                    session: str | None, request_id: str) -> dict[str, Any]:
        assert self.cluster is not None
        started = time.perf_counter()
        try:
            return await self.cluster.route(self.settings.lora.get(request.model,
                                                                   request.model),
                                            session_id=session,
                                            request_id=request_id, ack=self.settings.route_ack,
                                            **form)
        except VeristoreError as exc:
            code = getattr(exc, "code", "")
            if code in core.ROUTE_ERRORS:
                raise core.route_error(code, exc.detail, request.model) from exc
            raise GatewayError(503, f"the cluster could not route the request: {exc.detail}",
                               code="cluster_unavailable", retry_after=1) from exc
        finally:
            self.metrics.route.labels(self.settings.route_ack).observe(
                time.perf_counter() - started)

    def report(self, route: dict[str, Any], status: str, **usage: int | None) -> None:
        """Queue the cluster's report of how the routed request ended (see `Reporter`)."""
        body: dict[str, Any] = {"request_id": route["request_id"], "node_id": route["node_id"],
                                "status": status}
        body.update((k, v) for k, v in usage.items() if v is not None)
        self.reporter.put(body)

    async def mark_unreachable(self, node_id: str) -> None:
        assert self.cluster is not None
        try:
            await self.cluster.node_unreachable(node_id)
        except VeristoreError as exc:
            log.warning("node_unreachable_not_reported", node=node_id, error=exc.detail)

    async def call(self, path: str, body: bytes, route: dict[str, Any],
                   request_id: str, stream: bool) -> Attempt:
        """Send the request to the routed node; the answer's status and headers, or why not.

        A stream's headers come with its first token, so `first_byte_timeout_s` bounds them;
        a whole answer's come when generation ends, so `read_timeout_s` does.
        """
        assert self.backend is not None
        attempt = Attempt(route["node_id"], request_id, route)
        limit = self.settings.first_byte_timeout_s if stream else self.settings.read_timeout_s
        try:
            async with asyncio.timeout(limit):
                attempt.response = await self.backend.post(
                    self.url(route["address"], path), data=body,
                    headers=self.backend_headers(route["node_id"], request_id),
                    timeout=self.backend_timeout)
        except TimeoutError:
            attempt.error = GatewayError(504, f"node {route['node_id']} sent nothing within "
                                         f"{limit}s", code="backend_timeout")
        except aiohttp.ClientError as exc:
            attempt.error = GatewayError(502, f"node {route['node_id']} failed: {exc!r}",
                                         code="backend_unreachable")
        else:
            if core.retryable_status(attempt.response.status):
                text = (await attempt.response.read())[:300].decode(errors="replace")
                attempt.response.release()
                attempt.error = GatewayError(
                    502, f"node {route['node_id']} answered {attempt.response.status}: {text}",
                    code="backend_error" if attempt.response.status == 500
                    else "backend_unavailable")
                attempt.response = None
        return attempt


GATEWAY = web.AppKey("gateway", Gateway)


class _ClientGone(ConnectionError):
    """Writing to the client failed: it disconnected (not the backend's fault)."""


def _error_response(error: GatewayError) -> web.Response:
    return web.json_response(error.body(), status=error.status, headers=error.headers(),
                             dumps=lambda o: orjson.dumps(o).decode())


@web.middleware
async def errors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as exc:
        return _error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error_response(GatewayError(exc.status, exc.reason,
                                            code=exc.reason.lower().replace(" ", "_")))


@web.middleware
async def auth_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    if not request.path.startswith("/v1/"):
        return await handler(request)
    gateway = request.app[GATEWAY]
    header = request.headers.get("Authorization", "")
    key = header[7:].strip() if header[:7].lower() == "bearer " else ""
    entry = gateway.keys.get(key) if key else None
    if entry is None:
        raise GatewayError(401, "Incorrect API key provided" if key else
                           "Missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
    if entry.requests_per_s is not None:
        bucket = gateway.buckets.get(key)
        if bucket is None:
            bucket = gateway.buckets[key] = core.TokenBucket(entry.requests_per_s)
        wait = bucket.take(time.monotonic())
        if wait > 0:
            raise GatewayError(429, f"rate limit of {entry.requests_per_s:g} requests/s "
                               f"reached for this key", code="rate_limit_exceeded",
                               retry_after=max(1, round(wait + 0.5)))
    request["tenant"] = entry.tenant
    request["cache_personal"] = entry.cache_personal
    return await handler(request)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, "/v1/chat/completions", chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, "/v1/completions", chat=False)


async def _read_body(request: web.Request) -> Any:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise GatewayError(413, "the request body is too large", code="request_too_large") \
            from exc
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise core.invalid("body", f"the request body is not valid JSON: {exc}") from exc


async def _serve(request: web.Request, path: str, chat: bool) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    s = gateway.settings
    arrived = time.perf_counter()
    endpoint = "chat" if chat else "completions"
    model = "?"
    status = 500
    unreported: dict[str, Any] | None = None  # a route whose outcome is not reported yet
    plan = Plan()
    try:
        body = await _read_body(request)
        parsed = core.check_request(body, chat, s.max_prompt_chars)
        model = parsed.model
        spec = await gateway.model(parsed.model)
        try:
            plan = gateway.cache.plan(body, chat, request["tenant"], request["cache_personal"],
                                      spec, request.headers.get("Cache-Control"))
        except DirectiveError as exc:
            raise core.invalid(exc.param, str(exc)) from exc
        hit = await gateway.cache.lookup(plan) or await gateway.cache.join(plan,
                                                                          s.read_timeout_s)
        if hit is not None:
            status = 200
            return await answer_hit(request, gateway, parsed, plan, hit, path, body)
        gateway.cache.missed(plan)
        form, prompt_tokens = await gateway.block_hashes(parsed, body, spec)
        session = core.session_of(parsed, request.headers.get(s.session_header),
                                  s.session_from_user)
        upstream = {k: v for k, v in body.items() if k != "cache"} if "cache" in body else body
        if parsed.stream and not parsed.include_usage:
            upstream = {**upstream, "stream_options": {**(body.get("stream_options") or {}),
                                                   "include_usage": True}}
        payload = orjson.dumps(upstream)
        client_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        attempt = None
        for n in range(s.max_retries + 1):
            request_id = f"{client_id}-{n}" if n else client_id
            route = unreported = await gateway.route(parsed, form, session, request_id)
            gateway.metrics.route_types.labels(route["route_type"] or "miss").inc()
            if n == 0:
                gateway.metrics.overhead.labels(model).observe(time.perf_counter() - arrived)
            attempt = await gateway.call(path, payload, route, request_id, parsed.stream)
            if attempt.error is None:
                break
            gateway.metrics.backend_errors.labels(route["node_id"], attempt.error.code
                                                  or "error").inc()
            log.warning("backend_failed", node=route["node_id"], request_id=request_id,
                        error=attempt.error.message, attempt=n)
            gateway.report(route, "failed")
            unreported = None
            if attempt.error.code != "backend_error":  # a 500 may be this request's own doing
                await gateway.mark_unreachable(route["node_id"])
            if n < s.max_retries:
                gateway.metrics.retries.labels(attempt.error.code or "error").inc()
        assert attempt is not None
        if attempt.error is not None:
            raise attempt.error
        assert attempt.response is not None
        unreported = None  # from here on, _stream and _whole report the outcome
        result = await (_stream if parsed.stream else _whole)(
            request, gateway, parsed, attempt, spec, arrived, plan)
        status = result.status
        if prompt_tokens:
            gateway.metrics.tokens.labels(model, "in").inc(prompt_tokens)
        return result
    except GatewayError as exc:
        status = exc.status
        raise
    except (asyncio.CancelledError, ConnectionError):
        status = 499  # the client went away (the backend call, if any, is dropped with it)
        if unreported is not None:
            gateway.report(unreported, "cancelled")
        raise
    finally:
        if plan.flight is not None:  # identical requests waiting for this one: not this way
            gateway.cache.finish(plan, None, 0)
        gateway.metrics.requests.labels(endpoint, model, str(status)).inc()
        gateway.metrics.e2e.labels(model).observe(time.perf_counter() - arrived)


def _headers(attempt: Attempt, plan: Plan) -> dict[str, str]:
    route = attempt.route
    headers = {"X-Request-Id": attempt.request_id, "X-Cache-Plane-Node": attempt.node_id,
               "X-Cache-Plane-Route": str(route.get("route_type") or "miss"),
               "X-Cache-Plane-Matched-Tokens": str(route.get("matched_tokens", 0)),
               "x-cache": plan.header}
    if plan.key:
        headers["x-cache-key"] = plan.key
    return headers


def _account(gateway: Gateway, parsed: core.ChatRequest, attempt: Attempt,
             usage: core.Usage | None, spec: dict[str, Any], ttft: float | None,
             elapsed: float, status: str) -> None:
    """Record usage and prediction accuracy, and report the outcome to the cluster."""
    m = gateway.metrics
    if usage is not None and usage.completion_tokens is not None:
        m.tokens.labels(parsed.model, "out").inc(usage.completion_tokens)
    if usage is not None and usage.cached_tokens is not None and status == "ok":
        predicted = int(attempt.route.get("matched_tokens", 0))
        m.predicted_tokens.inc(predicted)
        m.engine_cached_tokens.inc(usage.cached_tokens)
        m.prediction.labels(core.prediction(predicted, usage.cached_tokens,
                                            spec["block_size"])).inc()
    gateway.report(
        attempt.route, status,
        prompt_tokens=usage.prompt_tokens if usage else None,
        output_tokens=usage.completion_tokens if usage else None,
        cached_tokens=usage.cached_tokens if usage else None,
        ttft_ms=round(ttft * 1000) if ttft is not None else None,
        latency_ms=round(elapsed * 1000))


async def _whole(request: web.Request, gateway: Gateway, parsed: core.ChatRequest,
                 attempt: Attempt, spec: dict[str, Any], arrived: float,
                 plan: Plan) -> web.StreamResponse:
    response = attempt.response
    assert response is not None
    outcome = "cancelled"
    try:
        try:
            data = await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            outcome = "failed"
            raise GatewayError(502, f"node {attempt.node_id} broke off its answer: {exc!r}",
                               code="backend_error") from exc
        outcome = "ok" if response.status < 400 else "failed"
        usage = None
        answer = None
        if outcome == "ok":
            with contextlib.suppress(orjson.JSONDecodeError):
                answer = orjson.loads(data)
                usage = core.usage_from(answer)
        elapsed = time.perf_counter() - arrived
        gateway.cache.finish(plan, answer if isinstance(answer, dict) else None, elapsed)
        gateway.metrics.ttft.labels(parsed.model).observe(elapsed)
        _account(gateway, parsed, attempt, usage, spec, elapsed, elapsed, outcome)
        outcome = "reported"
        if response.status >= 400:
            return _error_response(_engine_error(response.status, data))
        return web.Response(body=data, status=response.status,
                            content_type="application/json", headers=_headers(attempt, plan))
    finally:
        response.release()
        if outcome != "reported":
            gateway.report(attempt.route, outcome)


def _engine_error(status: int, data: bytes) -> GatewayError:
    """An engine's 4xx, in OpenAI's shape whatever shape the engine used."""
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        payload = None
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        return GatewayError(status, str(error.get("message", "")),
                            param=error.get("param"), code=error.get("code") and
                            str(error.get("code")))
    message = (payload.get("message") if isinstance(payload, dict) else None) or \
        data[:500].decode(errors="replace")
    return GatewayError(status, str(message), code="engine_error")


async def _stream(request: web.Request, gateway: Gateway, parsed: core.ChatRequest,
                  attempt: Attempt, spec: dict[str, Any], arrived: float,
                  plan: Plan) -> web.StreamResponse:
    backend = attempt.response
    assert backend is not None
    if backend.status >= 400:
        try:
            data = await backend.read()
        finally:
            backend.release()
        gateway.report(attempt.route, "failed")
        return _error_response(_engine_error(backend.status, data))
    out = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                      "Cache-Control": "no-cache",
                                      **_headers(attempt, plan)})
    assembler = replay.Assembler() if plan.write else None
    m = gateway.metrics
    itl = m.itl.labels(parsed.model)
    splitter = core.SSESplitter()
    usage: core.Usage | None = None
    ttft: float | None = None
    last = arrived
    outcome = "cancelled"
    try:
        await out.prepare(request)
        try:
            async for data in backend.content.iter_any():
                for event in splitter.feed(data):
                    if assembler is not None:
                        assembler.add(core.event_data(event))
                    found, usage_only = core.scan_event(event)
                    if found is not None:
                        usage = found
                        if usage_only and not parsed.include_usage:
                            continue
                    now = time.perf_counter()
                    if ttft is None:  # (only events before the first output are parsed)
                        if core.carries_output(event):
                            ttft = now - arrived
                            m.ttft.labels(parsed.model).observe(ttft)
                    else:
                        itl.observe(now - last)
                    last = now
                    try:
                        await out.write(event)
                    except ConnectionError as exc:  # the client went away
                        raise _ClientGone from exc
            outcome = "ok"
        except (aiohttp.ClientError, TimeoutError) as exc:
            outcome = "failed"
            m.backend_errors.labels(attempt.node_id, "midstream").inc()
            log.warning("backend_broke_midstream", node=attempt.node_id,
                        request_id=attempt.request_id, error=repr(exc))
            await out.write(core.error_event(GatewayError(
                502, f"node {attempt.node_id} broke off the stream: {exc!r}",
                code="backend_error")))
        await out.write_eof()
        return out
    except (_ClientGone, ConnectionError, asyncio.CancelledError):
        outcome = "cancelled"  # the client went away: stop the backend too
        raise
    finally:
        backend.close() if outcome != "ok" else backend.release()
        gateway.cache.finish(plan, assembler.result() if assembler is not None
                             and outcome == "ok" else None, time.perf_counter() - arrived)
        _account(gateway, parsed, attempt, usage, spec, ttft,
                 time.perf_counter() - arrived, outcome)


async def list_models(request: web.Request) -> web.Response:
    """The cluster's models (and configured LoRA adapters), in OpenAI's list shape."""
    gateway = request.app[GATEWAY]
    try:
        await gateway.refresh_models()
    except GatewayError:
        if not gateway.models_at:  # a list it had beats none
            raise
    data = [{"id": m, "object": "model", "created": 0, "owned_by": "cache-plane"}
            for m in sorted(gateway.models)]
    data += [{"id": a, "object": "model", "created": 0, "owned_by": "cache-plane",
              "parent": base} for a, base in sorted(gateway.settings.lora.items())
             if base in gateway.models]
    return web.json_response({"object": "list", "data": data})


async def cache_stats(request: web.Request) -> web.Response:
    """The response cache's KPIs in this gateway, and the cluster's entry counters."""
    return web.json_response(await request.app[GATEWAY].cache.stats(),
                             dumps=lambda o: orjson.dumps(o).decode())


async def health(request: web.Request) -> web.Response:
    """Ready once the cluster has answered (its models are known) and the response cache's
    catalog is loaded; 503 before."""
    gateway = request.app[GATEWAY]
    if not gateway.models_at:
        with contextlib.suppress(GatewayError):
            await gateway.refresh_models()
    if not gateway.models_at:
        return web.json_response({"status": "no_cluster"}, status=503)
    if gateway.settings.cache_enabled and not gateway.cache.ready.is_set():
        # (else a new gateway would miss, and store again, what the cluster holds)
        return web.json_response({"status": "loading_cache"}, status=503)
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[GATEWAY].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    gateway = app[GATEWAY]
    await gateway.start()
    yield
    await gateway.stop()


def create_app(settings: GatewaySettings) -> web.Application:
    """Build the gateway's aiohttp application (settings already validated)."""
    app = web.Application(client_max_size=max(settings.max_prompt_chars * 4, 1 << 20),
                          middlewares=[errors_middleware, auth_middleware])
    app[GATEWAY] = Gateway(settings)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/cache/stats", cache_stats)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.cleanup_ctx.append(_lifecycle)
    return app

"""aiohttp application of a cache_plane member: routes, metrics, docs, housekeeping.

Every member serves every endpoint. Mutations and routing go to the leader (followers answer
307 with the leader's URL; 503 + Retry-After while no leader is known). GET endpoints answer
from the member's own replica. Errors are JSON ``{"error", "detail", "definite"}``.
The generic KV API of veristore (``/v1/kv``) and ``/v1/status``, ``/v1/digest`` are mounted
too. See `openapi.py` for the schemas and `docs/api.md` for a walkthrough.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import time
from collections.abc import AsyncIterator
from itertools import accumulate
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from veristore_py import api as kv_api
from veristore_py.auth import PUBLIC
from veristore_py.config import NodeSettings
from veristore_py.group_commit import BATCH_BOUNDS
from veristore_py.node import VeristoreNode

from ..errors import CachePlaneError
from ..kvevents.ingest import Ingester
from ..responses.cluster import ResponseCacheService
from ..service import CachePlaneService
from ..settings import ServiceSettings
from . import cache
from .openapi import document
from .validation import VALIDATORS

SERVICE = web.AppKey("service", CachePlaneService)
INGESTER = web.AppKey("ingester", Ingester)
OPENAPI = web.AppKey("openapi", dict)


class Metrics:
    """Prometheus metrics of one app (own registry, so tests can build many apps)."""

    def __init__(self, service: CachePlaneService, ingester: Ingester | None = None) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "cache_plane_http_request_duration_seconds", "HTTP request latency",
            ["method", "route", "status"], registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.routes = Counter("cache_plane_routes", "Committed route decisions",
                              ["route_type"], registry=self.registry)
        self.rejections = Counter("cache_plane_route_rejections", "Rejected route requests",
                                  ["reason"], registry=self.registry)
        self.registry.register(_StateCollector(service))
        self.registry.register(_StreamCollector(service, ingester))


METRICS = web.AppKey("metrics", Metrics)


class _StateCollector:
    """Raft and cache state, read at scrape time."""

    def __init__(self, service: CachePlaneService) -> None:
        self.service = service

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        node = self.service.node
        status = node.status()
        for name, value, doc in (
            ("raft_term", status["term"], "Current Raft term"),
            ("raft_commit_index", status["commit_index"], "Raft commit index"),
            ("raft_applied_index", status["applied_index"], "Raft applied index"),
            ("raft_is_leader", int(status["state"] == "leader"), "1 on the leader"),
            ("raft_has_quorum", int(bool(status["has_quorum"])), "Leader heard from a majority"),
        ):
            yield GaugeMetricFamily(f"cache_plane_{name}", doc, value=value)
        gc = status["group_commit"] or {}
        counts = gc.get("batch_counts") or [0] * (len(BATCH_BOUNDS) + 1)
        cumulative = list(accumulate(counts))
        yield HistogramMetricFamily(
            "cache_plane_raft_entry_commands",
            "Commands per Raft entry this member proposed (group-commit batch size)",
            buckets=[*((str(b), c) for b, c in zip(BATCH_BOUNDS, cumulative, strict=False)),
                     ("+Inf", cumulative[-1])],
            sum_value=gc.get("commands", 0))
        yield CounterMetricFamily("cache_plane_group_commit_timeouts",
                                  "Proposals that timed out before commit",
                                  value=gc.get("timeouts", 0))
        stats = self.service.stats()
        yield GaugeMetricFamily("cache_plane_block_hit_ratio", "Reused / requested prompt blocks",
                                value=stats["block_hit_rate"])
        yield GaugeMetricFamily("cache_plane_indexed_blocks", "Indexed (node, block) entries",
                                value=stats["indexed_blocks"])
        yield CounterMetricFamily("cache_plane_evicted_blocks", "Blocks evicted",
                                  value=stats["evictions"])
        yield GaugeMetricFamily("cache_plane_block_log_records",
                                "Block-log records not yet replaced by a checkpoint",
                                value=self.service.block_log_records())
        cache = self.service.node.store.view(lambda m: (
            len(m.responses.entries), m.responses.bytes, dict(m.responses.counters)))
        yield GaugeMetricFamily("cache_plane_response_cache_entries",
                                "Response cache entries (replicated)", value=cache[0])
        yield GaugeMetricFamily("cache_plane_response_cache_bytes",
                                "Bytes the response cache entries take (the budget's measure)",
                                value=cache[1])
        changes = CounterMetricFamily("cache_plane_response_cache_changes",
                                      "Response cache entries stored, replaced, evicted, "
                                      "expired, invalidated, purged, deleted, touched, "
                                      "refused_stale", labels=["kind"])
        for kind, count in cache[2].items():
            changes.add_metric([kind], count)
        yield changes


# Per-stream counters of the replicated state (every member) and gauges; see docs/kv_events.md.
_STREAM_COUNTERS = (
    ("batches", "KV-event batches applied"), ("events", "KV events applied"),
    ("blocks_stored", "Blocks stored by KV events"),
    ("blocks_removed", "Blocks removed by KV events"),
    ("duplicates", "Batches at or below the stream's watermark (not applied)"),
    ("gaps", "Batches found missing (replayed, or lost)"), ("replays", "Replays asked"),
    ("resyncs", "History lost: the node's blocks cleared"),
    ("restarts", "Engine restarts detected: the node's blocks cleared"),
    ("rebuilds", "Streams rebuilt from the engine's whole history"))
# What the leader's subscribers see (only on the leader).
_INGEST_COUNTERS = (
    ("frames", "Live frames received"), ("decode_errors", "Frames refused by the decoder"),
    ("skipped_events", "Events the decoder skipped on purpose"),
    ("reconnects", "Publisher connections that came back"),
    ("idle_probes", "Replays asked because the stream was quiet"))


class _StreamCollector:
    """Engine KV-event streams, per node and data-parallel rank, read at scrape time."""

    def __init__(self, service: CachePlaneService, ingester: Ingester | None) -> None:
        self.service = service
        self.ingester = ingester

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        streams = self.service.kv_streams()
        labels = ["node", "rank"]
        for name, doc in _STREAM_COUNTERS:
            family = CounterMetricFamily(f"cache_plane_kv_stream_{name}", doc, labels=labels)
            for s in streams:
                family.add_metric([s["node_id"], str(s["rank"])], s[name])
            yield family
        for name, doc, pick in (
                ("last_seq", "The stream's watermark (last seq applied)",
                 lambda s: s["last_seq"]),
                ("stale", "1 while the stream's history is lost and nothing new came",
                 lambda s: int(s["stale"])),
                ("lag_ms", "Leader's clock at apply minus the engine's timestamp, last batch",
                 lambda s: s["last_lag_ms"])):
            gauge = GaugeMetricFamily(f"cache_plane_kv_stream_{name}", doc, labels=labels)
            for s in streams:
                if pick(s) is not None:
                    gauge.add_metric([s["node_id"], str(s["rank"])], pick(s))
            yield gauge
        snapshots = self.ingester.snapshots() if self.ingester is not None else []
        for name, doc in _INGEST_COUNTERS:
            family = CounterMetricFamily(f"cache_plane_kv_ingest_{name}", doc, labels=labels)
            for s in snapshots:
                family.add_metric([s["node_id"], str(s["rank"])], s[name])
            yield family
        lag = GaugeMetricFamily("cache_plane_kv_ingest_lag_ms",
                                "Engine timestamp to commit, recent batches",
                                labels=[*labels, "quantile"])
        for s in snapshots:
            for q in ("p50", "p99"):
                if s[f"lag_ms_{q}"] is not None:
                    lag.add_metric([s["node_id"], str(s["rank"]), q], s[f"lag_ms_{q}"])
        yield lag


@web.middleware
async def metrics_middleware(request: web.Request, handler: kv_api.Handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        request.app[METRICS].latency.labels(request.method, name, str(status)).observe(
            time.perf_counter() - started)


async def _body(request: web.Request, schema: str, *, optional: bool = False) -> dict[str, Any]:
    return VALIDATORS[schema](await kv_api.read_json(request, optional=optional))


def _svc(request: web.Request) -> CachePlaneService:
    return request.app[SERVICE]


async def register_node(request: web.Request) -> web.Response:
    return kv_api.json_response(await _svc(request).register_node(await _body(request, "RegisterNode")))


async def list_nodes(request: web.Request) -> web.Response:
    return kv_api.json_response({"nodes": _svc(request).nodes()})


async def get_node(request: web.Request) -> web.Response:
    node_id = request.match_info["node_id"]
    info = _svc(request).node_info(node_id)
    # what this member's subscribers see (only the leader runs them)
    info["kv_ingest"] = [s for s in request.app[INGESTER].snapshots() if s["node_id"] == node_id]
    return kv_api.json_response(info)


async def get_node_blocks(request: web.Request) -> web.Response:
    return kv_api.json_response(_svc(request).node_blocks(request.match_info["node_id"]))


async def heartbeat(request: web.Request) -> web.Response:
    body = await _body(request, "Heartbeat", optional=True)
    return kv_api.json_response(await _svc(request).heartbeat(request.match_info["node_id"], body))


async def node_unreachable(request: web.Request) -> web.Response:
    node_id = request.match_info["node_id"]
    return kv_api.json_response(await _svc(request).node_unreachable(node_id))


async def drain(request: web.Request) -> web.Response:
    return kv_api.json_response(await _svc(request).drain(request.match_info["node_id"]))


async def remove_node(request: web.Request) -> web.Response:
    return kv_api.json_response(await _svc(request).remove_node(request.match_info["node_id"]))


async def register_model(request: web.Request) -> web.Response:
    return kv_api.json_response(await _svc(request).register_model(await _body(request, "RegisterModel")))


async def list_models(request: web.Request) -> web.Response:
    return kv_api.json_response({"models": _svc(request).models()})


async def invalidate_model(request: web.Request) -> web.Response:
    return kv_api.json_response(await _svc(request).invalidate_model(request.match_info["model_id"]))


async def route(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    try:
        result = await _svc(request).route(await _body(request, "Route"))
    except CachePlaneError as exc:
        if "candidates" in exc.extra:  # an admission rejection, with its breakdown
            metrics.rejections.labels(exc.code).inc()
        raise
    if not result["dry_run"]:
        metrics.routes.labels(result["route_type"]).inc()
    return kv_api.json_response(result)


async def complete(request: web.Request) -> web.Response:
    return kv_api.json_response(await _svc(request).complete(await _body(request, "Complete")))


async def complete_batch(request: web.Request) -> web.Response:
    body = await _body(request, "CompleteBatch")
    return kv_api.json_response(await _svc(request).complete_batch(body["reports"]))


async def kv_events(request: web.Request) -> web.Response:
    return kv_api.json_response(await _svc(request).kv_events(await _body(request, "KVEvents")))


async def stats(request: web.Request) -> web.Response:
    return kv_api.json_response(_svc(request).stats())


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


async def openapi(request: web.Request) -> web.Response:
    return kv_api.json_response(request.app[OPENAPI])


async def docs(request: web.Request) -> web.Response:
    """A self-contained page listing the endpoints (no CDN, no scripts)."""
    rows = []
    for path, ops in request.app[OPENAPI]["paths"].items():
        for method, op in ops.items():
            if method == "parameters":
                continue
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            schema = body.get("schema", {}).get("$ref", "").rsplit("/", 1)[-1]
            rows.append(f"<tr><td><code>{method.upper()}</code></td><td><code>{html.escape(path)}"
                        f"</code></td><td>{html.escape(op['summary'])}</td><td>{schema}</td></tr>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>cache-plane API</title>"
            "<style>body{font-family:sans-serif;margin:2em}td{padding:4px 12px}</style></head>"
            "<body><h1>llm-serving-cache API</h1><p>Machine-readable spec: "
            "<a href='/openapi.json'>/openapi.json</a></p><table>"
            + "".join(rows) + "</table></body></html>")
    return web.Response(text=page, content_type="text/html")


async def _housekeeping(app: web.Application) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(app[SERVICE].housekeeping()),
             asyncio.create_task(app[INGESTER].run())]
    yield
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


# (method, path template) -> the role it needs (veristore_py/auth.py), with veristore's own.
ACCESS_TABLE: dict[tuple[str, str], str] = {
    **kv_api.ACCESS_TABLE,
    ("POST", "/v1/nodes"): "admin",
    ("GET", "/v1/nodes"): "read",
    ("GET", "/v1/nodes/{node_id}"): "read",
    ("GET", "/v1/nodes/{node_id}/blocks"): "read",
    ("DELETE", "/v1/nodes/{node_id}"): "admin",
    ("POST", "/v1/nodes/{node_id}/heartbeat"): "route",
    ("POST", "/v1/nodes/{node_id}/drain"): "admin",
    ("POST", "/v1/nodes/{node_id}/unreachable"): "route",
    ("POST", "/v1/models"): "admin",
    ("GET", "/v1/models"): "read",
    ("POST", "/v1/models/{model_id}/invalidate"): "admin",
    ("POST", "/v1/route"): "route",
    ("POST", "/v1/complete"): "route",
    ("POST", "/v1/complete/batch"): "route",
    ("POST", "/v1/kv-events"): "route",
    ("GET", "/v1/cluster"): "read",
    ("GET", "/v1/stats"): "read",
    ("GET", "/metrics"): "read",
    **cache.ACCESS_TABLE,
    ("GET", "/openapi.json"): PUBLIC,
    ("GET", "/docs"): PUBLIC,
}


def create_app(node: VeristoreNode, settings: NodeSettings,
               service_settings: ServiceSettings | None = None) -> web.Application:
    """Build the aiohttp application of one cache_plane member."""
    service = CachePlaneService(node, service_settings or ServiceSettings())
    app = web.Application(client_max_size=kv_api.MAX_BODY_BYTES * 8)
    app[kv_api.NODE] = node
    app[kv_api.SETTINGS] = settings
    kv_api.add_security(app, settings, ACCESS_TABLE)
    app[SERVICE] = service
    app[INGESTER] = Ingester(app[SERVICE])
    app[METRICS] = Metrics(service, app[INGESTER])
    app[OPENAPI] = document()
    app.middlewares.append(metrics_middleware)
    kv_api.add_error_middleware(app)
    r = app.router
    r.add_post("/v1/nodes", register_node)
    r.add_get("/v1/nodes", list_nodes)
    r.add_get("/v1/nodes/{node_id}", get_node)
    r.add_get("/v1/nodes/{node_id}/blocks", get_node_blocks)
    r.add_delete("/v1/nodes/{node_id}", remove_node)
    r.add_post("/v1/nodes/{node_id}/heartbeat", heartbeat)
    r.add_post("/v1/nodes/{node_id}/drain", drain)
    r.add_post("/v1/nodes/{node_id}/unreachable", node_unreachable)
    r.add_post("/v1/models", register_model)
    r.add_get("/v1/models", list_models)
    r.add_post("/v1/models/{model_id}/invalidate", invalidate_model)
    r.add_post("/v1/route", route)
    r.add_post("/v1/complete", complete)
    r.add_post("/v1/complete/batch", complete_batch)
    r.add_post("/v1/kv-events", kv_events)
    r.add_get("/v1/cluster", kv_api.status)  # same view as /v1/status
    r.add_get("/v1/stats", stats)
    r.add_get("/metrics", metrics)
    r.add_get("/openapi.json", openapi)
    r.add_get("/docs", docs)
    cache.add_routes(app, ResponseCacheService(service))
    kv_api.add_kv_routes(app)
    kv_api.add_status_routes(app)  # status, digest, health, backup, membership
    app.cleanup_ctx.append(_housekeeping)
    return app

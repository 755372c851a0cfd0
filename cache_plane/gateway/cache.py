"""The gateway's response cache (the shell): tiers, change feed, single flight, KPIs.

For each request `plan` decides what the cache may do (`responses.rules`, `responses.keys`).
`lookup` tries, in order: the exact key in this gateway's memory (L1, bounded bytes, LRU), the
exact key in the cluster (L2: `GET /v1/cache/entries/{key}`, known to exist from the catalog),
then, when its bucket holds other questions, the most similar one (`Catalog.similar`). A miss
that may be stored leads a *flight*: identical requests arriving meanwhile wait for its answer
instead of calling the backend. `finish` stores the answer in L1 at once and in the cluster in
the background (`POST /v1/cache/entries`, with the question's embedding).

The catalog follows the cluster: at start it reads every entry's metadata, then the change
feed (`GET /v1/cache/changes`, long-polled), so entries stored, evicted, expired, purged or
invalidated by any gateway or admin reach this one within a poll. Hits are touched in the
cluster's LRU in batches (`cache_touch_interval_ms`), never one Raft commit per hit. A
fraction of semantic hits (`cache_verify_fraction`) is also sent to the backend and the
answers compared: the estimated false-hit rate. When the cluster cannot be reached the cache
fails open: lookups miss, stores are dropped (counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import orjson
import structlog

from veristore_py.errors import VeristoreError

from ..client import CachePlaneClient
from ..responses import keys, rules
from ..responses.catalog import Catalog, EntryInfo, answer_text, answers_agree
from .embedders import Embedder, EmbedderError, create_embedder
from .metrics import CacheMetrics
from .settings import GatewaySettings

log = structlog.get_logger(__name__)
FEED_WAIT_MS = 2000
L2_TIMEOUT_S = 1.0
PAGE = 1000


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(slots=True)
class Plan:
    """What the cache may do for one request, decided before it is served."""

    key: str = ""
    bucket: str | None = None
    question: str | None = None
    scope: keys.Scope | None = None
    read: bool = False
    write: bool = False
    ttl_s: int | None = None
    max_age_s: int | None = None
    bypass: str | None = None        # why neither read nor write (a metric label)
    vector: np.ndarray | None = None
    flight: asyncio.Future[dict[str, Any] | None] | None = field(default=None, repr=False)
    started: float = 0.0

    @property
    def header(self) -> str:
        return "miss" if self.read else "bypass"


@dataclass(frozen=True, slots=True)
class Hit:
    kind: str                         # hit | semantic-hit
    tier: str                         # l1 | l2 | flight
    key: str
    response: dict[str, Any]
    info: EntryInfo | None
    similarity: float | None = None


class ResponseCache:
    """One gateway's response cache (see module docstring)."""

    def __init__(self, settings: GatewaySettings, metrics: CacheMetrics) -> None:
        s = self.settings = settings
        self.metrics = metrics
        self.rules = rules.CacheRules(
            s.cache_max_temperature, s.cache_default_temperature,
            dict(s.cache_model_temperature),
            skip_patterns=rules.DEFAULT_SKIP_PATTERNS if s.cache_skip_time_dependent else ())
        self.catalog = Catalog()
        self.l1: OrderedDict[str, tuple[dict[str, Any], int]] = OrderedDict()
        self.l1_bytes = 0
        self.flights: dict[str, asyncio.Future[dict[str, Any] | None]] = {}
        self.touched: set[str] = set()
        self.rev: int | None = None   # where the change feed continues; None: reload
        self.verified = {"agree": 0, "disagree": 0, "failed": 0}
        self.embedder: Embedder | None = None
        self.cluster: CachePlaneClient | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self.ready = asyncio.Event()
        self.kpi: dict[str, dict[str, float]] = {}
        self.saved_seconds = 0.0

    # -- life ------------------------------------------------------------------------------

    async def start(self, cluster: CachePlaneClient) -> None:
        self.cluster = cluster
        if self.settings.cache_semantic:
            self.embedder = create_embedder(self.settings.cache_embedder,
                                            self.settings.cache_embedder_model)
        self._loops = [asyncio.create_task(self._follow()), asyncio.create_task(self._touch())]

    async def stop(self) -> None:
        for task in self._loops:
            task.cancel()
        for task in self._loops:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._tasks:  # stores under way
            await asyncio.wait(self._tasks, timeout=5)
        with contextlib.suppress(VeristoreError):
            await self._flush_touches()
        if self.embedder is not None:
            await self.embedder.close()

    def spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- planning and lookup ---------------------------------------------------------------

    def plan(self, body: Mapping[str, Any], chat: bool, tenant: str, personal_ok: bool,
             spec: Mapping[str, Any], cache_control: str | None) -> Plan:
        """What the cache may do with this request; `rules.DirectiveError` for a bad directive."""
        plan = Plan(started=time.perf_counter())
        directives = rules.directives(cache_control, body.get("cache"))
        if not self.settings.cache_enabled:
            plan.bypass = "disabled"
        elif not (directives.read or directives.write):
            plan.bypass = "directives"
        else:
            plan.bypass = rules.bypass_reason(body, spec["model_id"], self.rules, personal_ok)
        if plan.bypass is not None:
            self.count("bypasses", plan.bypass)
            self.count("results", "bypass")
            return plan
        plan.scope = keys.Scope(tenant, spec["model_id"], int(spec.get("epoch", 0)),
                                directives.namespace)
        plan.key = keys.exact_key(plan.scope, body)
        if chat:
            plan.bucket = keys.bucket_key(plan.scope, body)
            plan.question = keys.last_question(body) if plan.bucket else None
        plan.read, plan.write = directives.read, directives.write
        plan.ttl_s = directives.ttl_s or self.settings.cache_ttl_s or None
        plan.max_age_s = directives.max_age_s
        if not plan.read:
            self.count("bypasses", "no_cache")
        return plan

    async def lookup(self, plan: Plan) -> Hit | None:
        """A stored answer for `plan`, exact then semantic; or None (see module docstring)."""
        if not plan.read:
            return None
        now = now_ms()
        info = self.catalog.get(plan.key)
        if info is not None and info.fresh(now, plan.max_age_s):
            found = await self._body(info)
            if found is not None:
                return Hit("hit", found[1], plan.key, found[0], info)
        if (self.embedder is not None and plan.bucket is not None and plan.question
                and self.catalog.has_neighbours(plan.bucket, plan.key)):
            vector = await self.embed(plan.question)
            if vector is None:
                return None
            plan.vector = vector
            match = self.catalog.similar(plan.bucket, vector, plan.question,
                                         self.settings.cache_threshold, now, plan.max_age_s)
            for why in match.rejected:
                self.count("semantic_rejected", why)
            if match.entry is not None:
                found = await self._body(match.entry)
                if found is not None:
                    return Hit("semantic-hit", found[1], match.entry.key, found[0],
                               match.entry, match.similarity)
        return None

    async def embed(self, text: str) -> np.ndarray | None:
        assert self.embedder is not None
        started = time.perf_counter()
        try:
            return await self.embedder.embed(text)
        except EmbedderError as exc:
            log.warning("embedding_failed", error=str(exc))
            return None
        finally:
            self.metrics.embed_seconds.observe(time.perf_counter() - started)

    async def _body(self, info: EntryInfo) -> tuple[dict[str, Any], str] | None:
        """The entry's answer from L1, else from the cluster (then kept in L1)."""
        held = self.l1.get(info.key)
        if held is not None:
            self.l1.move_to_end(info.key)
            return held[0], "l1"
        assert self.cluster is not None
        try:
            async with asyncio.timeout(L2_TIMEOUT_S):  # past it a miss is the faster answer
                got = await self.cluster.request("GET", f"/v1/cache/entries/{info.key}")
        except TimeoutError:
            log.info("cache_read_timed_out", key=info.key)
            return None
        except VeristoreError as exc:
            if getattr(exc, "code", "") == "unknown_entry":
                self.catalog.drop(info.key)  # gone since the feed said otherwise
            else:
                log.info("cache_read_failed", key=info.key, error=exc.detail)
            return None
        self._keep(info.key, got["response"])
        return got["response"], "l2"

    def _keep(self, key: str, response: dict[str, Any]) -> None:
        size = len(orjson.dumps(response)) + 200
        old = self.l1.pop(key, None)
        if old is not None:
            self.l1_bytes -= old[1]
        if size > self.settings.cache_l1_max_bytes:
            return
        self.l1[key] = (response, size)
        self.l1_bytes += size
        while self.l1_bytes > self.settings.cache_l1_max_bytes:
            _, (_, dropped) = self.l1.popitem(last=False)
            self.l1_bytes -= dropped
        self.metrics.l1_bytes.set(self.l1_bytes)
        self.metrics.l1_entries.set(len(self.l1))

    def _forget(self, key: str) -> None:
        old = self.l1.pop(key, None)
        if old is not None:
            self.l1_bytes -= old[1]

    def served(self, hit: Hit, plan: Plan) -> None:
        """Count a hit and queue its touch."""
        elapsed = time.perf_counter() - plan.started
        self.count("results", hit.kind)
        self.count("tiers", hit.tier)
        self.metrics.hit_seconds.labels(hit.tier).observe(elapsed)
        if hit.info is not None:
            saved = max(0.0, hit.info.latency_ms / 1000 - elapsed)
            self.saved_seconds += saved
            self.metrics.saved_seconds.inc(saved)
            self.count("saved_tokens", "prompt", hit.info.prompt_tokens)
            self.count("saved_tokens", "completion", hit.info.completion_tokens)
            self.touched.add(hit.key)

    def missed(self, plan: Plan) -> None:
        if plan.bypass is None:  # (a bypass was counted when planned)
            self.count("results", plan.header)

    # -- single flight ---------------------------------------------------------------------

    async def join(self, plan: Plan, timeout_s: float) -> Hit | None:
        """Wait for an identical request in flight here; lead one if there is none."""
        flight = self.flights.get(plan.key) if plan.key else None
        if flight is not None and plan.read:
            try:
                response = await asyncio.wait_for(asyncio.shield(flight), timeout_s)
            except TimeoutError:
                response = None
            if response is not None:
                return Hit("hit", "flight", plan.key, response, self.catalog.get(plan.key))
        elif flight is None and plan.write:
            plan.flight = self.flights[plan.key] = asyncio.get_running_loop().create_future()
        return None

    def finish(self, plan: Plan, response: dict[str, Any] | None, latency_s: float) -> None:
        """The miss's answer (None: none to store): release the flight, store it."""
        if plan.flight is not None:
            if not plan.flight.done():
                plan.flight.set_result(response)
            self.flights.pop(plan.key, None)
            plan.flight = None
        if response is None or not plan.write or plan.scope is None:
            return
        choice = (response.get("choices") or [{}])[0]
        if len(response.get("choices") or ()) != 1 or choice.get("finish_reason") not in (
                "stop", "length", "tool_calls"):
            self.count("stores", "not_stored")
            return
        now = now_ms()
        usage = response.get("usage") or {}
        info = EntryInfo(plan.key, plan.scope.tenant, plan.scope.model, plan.scope.epoch,
                         plan.scope.namespace, plan.bucket, plan.question, now,
                         now + (plan.ttl_s or 3600) * 1000,
                         int(usage.get("prompt_tokens") or 0),
                         int(usage.get("completion_tokens") or 0),
                         round(latency_s * 1000), plan.vector, local=True)
        self.catalog.put(info)
        self._keep(plan.key, response)
        self.spawn(self._store(info, response, plan.ttl_s))

    async def _store(self, info: EntryInfo, response: dict[str, Any],
                     ttl_s: int | None) -> None:
        assert self.cluster is not None
        vector = info.vector
        if vector is None and info.bucket is not None and info.question \
                and self.embedder is not None:
            vector = await self.embed(info.question)
            if vector is not None and self.catalog.get(info.key) is info:
                self.catalog.put(replace(info, vector=vector))
        body: dict[str, Any] = {
            "key": info.key, "tenant": info.tenant, "model": info.model, "epoch": info.epoch,
            "namespace": info.namespace, "bucket": info.bucket,
            "question": info.question[:4096] if info.question else None,
            "response": response, "prompt_tokens": info.prompt_tokens,
            "completion_tokens": info.completion_tokens, "latency_ms": info.latency_ms}
        if vector is not None:
            body["embedding"] = [round(float(x), 5) for x in vector]
        if ttl_s:
            body["ttl_s"] = ttl_s
        try:
            out = await self.cluster.request("POST", "/v1/cache/entries", json=body)
        except VeristoreError as exc:
            out = {"stored": False, "reason": getattr(exc, "code", "unavailable")}
            log.info("cache_store_failed", key=info.key, error=exc.detail)
        if out.get("stored"):
            self.count("stores", "stored")
            current = self.catalog.get(info.key)
            if current is not None and current.local:
                self.catalog.put(replace(current, created_ms=out["created_ms"],
                                         expires_ms=out["expires_ms"], local=False))
            return
        self.count("stores", str(out.get("reason", "refused")))
        if (current := self.catalog.get(info.key)) is not None and current.local:
            self.catalog.drop(info.key)
            self._forget(info.key)

    # -- verification ----------------------------------------------------------------------

    def maybe_verify(self, hit: Hit, ask: Callable[[], Awaitable[dict[str, Any] | None]]) -> None:
        """Send a sampled semantic hit's request to the backend too, and compare the answers."""
        if hit.kind != "semantic-hit" or random.random() >= self.settings.cache_verify_fraction:
            return

        async def verify() -> None:
            try:
                fresh = await ask()
            except Exception as exc:  # noqa: BLE001 - any failure is one failed verification
                log.info("cache_verification_failed", error=repr(exc))
                fresh = None
            if fresh is None:
                outcome = "failed"
            else:
                outcome = ("agree" if answers_agree(answer_text(fresh), answer_text(hit.response))
                           else "disagree")
            self.verified[outcome] += 1
            self.metrics.verifications.labels(outcome).inc()
            rate = self.false_hit_rate()
            if rate is not None:
                self.metrics.false_hit_rate.set(rate)
        self.spawn(verify())

    def false_hit_rate(self) -> float | None:
        done = self.verified["agree"] + self.verified["disagree"]
        return self.verified["disagree"] / done if done else None

    # -- following the cluster -------------------------------------------------------------

    async def _follow(self) -> None:
        """Load every entry's metadata, then apply the change feed (forever)."""
        assert self.cluster is not None
        while True:
            try:
                if self.rev is None:
                    await self._load()
                out = await self.cluster.request(
                    "GET", "/v1/cache/changes",
                    params={"since": self.rev, "wait_ms": FEED_WAIT_MS, "limit": PAGE})
                if out["reset"]:
                    self.rev = None
                    continue
                for change in out["changes"]:
                    self._apply(change["key"], change["entry"])
                self.rev = out["rev"]
                self.metrics.catalog_entries.set(len(self.catalog))
            except VeristoreError as exc:
                log.info("cache_feed_unavailable", error=exc.detail)
                await asyncio.sleep(1)
            except (KeyError, TypeError, ValueError) as exc:  # an answer it cannot read
                log.error("cache_feed_unreadable", error=repr(exc))
                self.rev = None
                await asyncio.sleep(1)

    async def _load(self) -> None:
        assert self.cluster is not None
        after: str | None = None
        seen: set[str] = set()
        rev = None
        while True:
            params: dict[str, Any] = {"limit": PAGE}
            if after:
                params["after"] = after
            page = await self.cluster.request("GET", "/v1/cache/entries", params=params)
            rev = page["rev"] if rev is None else rev
            for view in page["entries"]:
                seen.add(view["key"])
                self._apply(view["key"], view)
            after = page["next"]
            if after is None:
                break
        for key in [k for k, info in self.catalog.entries.items()
                    if k not in seen and not info.local]:
            self._apply(key, None)
        self.rev = rev
        self.ready.set()
        log.info("cache_catalog_loaded", entries=len(self.catalog), rev=rev)

    def _apply(self, key: str, view: Mapping[str, Any] | None) -> None:
        if view is None:
            self.catalog.drop(key)
            self._forget(key)
            return
        old = self.catalog.put(EntryInfo.from_view(view))
        if old is not None and not old.local and old.created_ms != view["created_ms"]:
            self._forget(key)  # replaced by another answer

    async def _touch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.cache_touch_interval_ms / 1000)
            try:
                await self._flush_touches()
            except VeristoreError as exc:
                log.info("cache_touch_failed", error=exc.detail)

    async def _flush_touches(self) -> None:
        if not self.touched or self.cluster is None:
            return
        batch, self.touched = sorted(self.touched), set()
        for i in range(0, len(batch), 4096):
            await self.cluster.request("POST", "/v1/cache/touch",
                                       json={"keys": batch[i:i + 4096]})

    # -- stats -----------------------------------------------------------------------------

    def count(self, group: str, label: str, n: float = 1) -> None:
        """Count in `kpi` (for `stats`) and in the Prometheus metric of the same name."""
        bucket = self.kpi.setdefault(group, {})
        bucket[label] = bucket.get(label, 0) + n
        getattr(self.metrics, group).labels(label).inc(n)

    async def stats(self) -> dict[str, Any]:
        """This gateway's KPIs and the cluster's entry counters (`GET /v1/cache/stats`)."""
        cluster: dict[str, Any] | None = None
        if self.cluster is not None:
            with contextlib.suppress(VeristoreError):
                cluster = await self.cluster.request("GET", "/v1/cache/stats")
        k = self.kpi
        results = k.get("results", {})
        hits = results.get("hit", 0) + results.get("semantic-hit", 0)
        misses = results.get("miss", 0)
        return {
            "results": results, "tiers": k.get("tiers", {}),
            "hit_rate": hits / (hits + misses) if hits + misses else None,
            "bypasses": k.get("bypasses", {}),
            "saved_seconds": round(self.saved_seconds, 3),
            "saved_tokens": k.get("saved_tokens", {}),
            "stores": k.get("stores", {}),
            "semantic_rejected": k.get("semantic_rejected", {}),
            "verifications": dict(self.verified),
            "estimated_false_hit_rate": self.false_hit_rate(),
            "l1": {"entries": len(self.l1), "bytes": self.l1_bytes,
                   "max_bytes": self.settings.cache_l1_max_bytes},
            "catalog": {"entries": len(self.catalog), "rev": self.rev},
            "cluster": cluster,
        }

"""Prometheus metrics of one gateway (its own registry, so tests can build many)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_SHORT = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1)


class GatewayMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "cache_plane_gateway_"
        self.requests = Counter(f"{p}requests", "Requests by endpoint, model and status",
                                ["endpoint", "model", "status"], registry=r)
        self.ttft = Histogram(f"{p}ttft_seconds", "Arrival to the first byte of the answer",
                              ["model"], buckets=_LATENCY, registry=r)
        self.itl = Histogram(f"{p}inter_token_seconds", "Time between streamed events",
                             ["model"], buckets=_SHORT, registry=r)
        self.e2e = Histogram(f"{p}request_seconds", "Arrival to the end of the answer",
                             ["model"], buckets=_LATENCY, registry=r)
        self.overhead = Histogram(f"{p}overhead_seconds",
                                  "Gateway time before the backend call: tokenize + route",
                                  ["model"], buckets=_SHORT, registry=r)
        self.route = Histogram(f"{p}route_seconds", "Cluster route call", ["ack"],
                               buckets=_SHORT, registry=r)
        self.tokens = Counter(f"{p}tokens", "Tokens in and out", ["model", "direction"],
                              registry=r)
        self.route_types = Counter(f"{p}route_types", "Route decisions by type",
                                   ["route_type"], registry=r)
        self.retries = Counter(f"{p}retries", "Requests re-sent to another node", ["reason"],
                               registry=r)
        self.backend_errors = Counter(f"{p}backend_errors", "Backend failures by kind",
                                      ["node", "kind"], registry=r)
        self.reports_sent = Counter(f"{p}reports_sent",
                                    "Completion reports the cluster took", registry=r)
        self.reports_failed = Counter(f"{p}reports_failed",
                                      "Completion reports the cluster did not take", registry=r)
        self.prediction = Counter(
            f"{p}prediction", "Predicted prefix reuse vs the engine's cached_tokens "
            "(exact: within one block)", ["outcome"], registry=r)
        self.predicted_tokens = Counter(f"{p}predicted_cached_tokens",
                                        "Prompt tokens the cluster predicted cached",
                                        registry=r)
        self.engine_cached_tokens = Counter(f"{p}engine_cached_tokens",
                                            "Prompt tokens the engines reported cached",
                                            registry=r)
        self.cache = CacheMetrics(r)


class CacheMetrics:
    """The response cache's KPIs (docs/response_cache.md), in the gateway's registry."""

    def __init__(self, r: CollectorRegistry) -> None:
        p = "cache_plane_gateway_cache_"
        self.results = Counter(f"{p}results", "Requests by cache outcome (hit, semantic-hit, "
                               "miss, bypass)", ["result"], registry=r)
        self.tiers = Counter(f"{p}hit_tiers", "Hits by tier (l1: gateway memory, l2: the "
                             "cluster, flight: joined an identical request in flight)",
                             ["tier"], registry=r)
        self.bypasses = Counter(f"{p}bypasses", "Requests the cache did not read, by reason",
                                ["reason"], registry=r)
        self.saved_seconds = Counter(f"{p}saved_seconds", "Backend time the hits saved "
                                     "(the stored answer's latency minus the hit's)",
                                     registry=r)
        self.saved_tokens = Counter(f"{p}saved_tokens", "Tokens the hits saved (cached usage)",
                                    ["kind"], registry=r)
        self.hit_seconds = Histogram(f"{p}hit_seconds", "Arrival to the answer of a hit",
                                     ["tier"], buckets=_SHORT, registry=r)
        self.stores = Counter(f"{p}stores", "Answers sent to the cluster to store, by result",
                              ["result"], registry=r)
        self.semantic_rejected = Counter(f"{p}semantic_rejected", "Semantic candidates passed "
                                         "over, by reason (a guard, or the threshold)",
                                         ["reason"], registry=r)
        self.verifications = Counter(f"{p}verifications", "Sampled semantic hits also asked "
                                     "of the backend, by outcome", ["outcome"], registry=r)
        self.false_hit_rate = Gauge(f"{p}estimated_false_hit_rate", "Disagreeing / verified "
                                    "semantic hits", registry=r)
        self.l1_bytes = Gauge(f"{p}l1_bytes", "Bytes of answers in this gateway's memory",
                              registry=r)
        self.l1_entries = Gauge(f"{p}l1_entries", "Answers in this gateway's memory",
                                registry=r)
        self.catalog_entries = Gauge(f"{p}catalog_entries", "Entries this gateway knows of "
                                     "(the cluster's, as its change feed reported them)",
                                     registry=r)
        self.embed_seconds = Histogram(f"{p}embed_seconds", "Embedding one question",
                                       buckets=_SHORT, registry=r)

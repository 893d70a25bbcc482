"""Prometheus metrics, all under `sellarec_`, in a registry per app (tests never collide).

Names are chosen once and documented in docs/api.md; the Helm HPA scales on
`sellarec_queue_depth`.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sellarec.service.backends.prefix_cache import PrefixCache

# The `*_created` timestamp series double the exposition for no use here.
disable_created_metrics()

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class Metrics:
    """Every metric the service exports."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        #: Seconds from request received to response sent, per endpoint and status.
        self.request_seconds = Histogram(
            "sellarec_request_duration_seconds",
            "HTTP request latency.",
            ["endpoint", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        #: Seconds a request waited in the queue before its batch started.
        self.queue_wait_seconds = Histogram(
            "sellarec_queue_wait_seconds",
            "Time spent queued before batching.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        #: Requests waiting for the model right now.
        self.queue_depth = Gauge("sellarec_queue_depth", "Requests waiting in the queue.", registry=r)
        #: Candidates per model batch.
        self.batch_candidates = Histogram(
            "sellarec_batch_size", "Candidates per model batch.", buckets=_SIZE_BUCKETS, registry=r
        )
        #: Requests per model batch.
        self.batch_requests = Histogram(
            "sellarec_batch_requests", "Requests per model batch.", buckets=_SIZE_BUCKETS, registry=r
        )
        #: Seconds the model spent on one batch.
        self.batch_seconds = Histogram(
            "sellarec_batch_duration_seconds", "Model time per batch.", buckets=_LATENCY_BUCKETS, registry=r
        )
        #: Candidates scored (duplicates in a request count once per occurrence).
        self.candidates = Counter("sellarec_candidates_scored", "Candidates scored.", registry=r)
        #: Seconds of one store lookup round trip.
        self.store_seconds = Histogram(
            "sellarec_store_lookup_duration_seconds",
            "Store lookup latency.",
            ["op"],
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        #: Scores computed with a cold user or a cold item.
        self.cold = Counter("sellarec_cold_scores", "Cold-start scores by kind.", ["kind"], registry=r)
        #: Collaborative vectors folded in for users the MF never saw, by where they came from.
        self.fold_ins = Counter(
            "sellarec_fold_ins", "Fold-in vectors of users without an MF row.", ["source"], registry=r
        )
        #: POST /events events by outcome: recorded (a new positive), duplicate (event id seen), negative.
        self.events = Counter("sellarec_events", "Interaction events received.", ["outcome"], registry=r)
        #: Error answers by error type.
        self.errors = Counter("sellarec_errors", "Error answers by type.", ["type"], registry=r)
        #: Store versions this server refused to switch to (incompatible with its model).
        self.refused_versions = Counter(
            "sellarec_version_refused", "Incompatible store versions refused.", ["version"], registry=r
        )
        #: 1 for the store version being served (label `version`), 0 for the ones served before.
        self.active_version = Gauge(
            "sellarec_model_version",
            "Store version being served (1) or served before (0).",
            ["version"],
            registry=r,
        )
        #: Predicted seconds a request arriving now would wait for the model (admission).
        self.predicted_wait = Gauge(
            "sellarec_predicted_wait_seconds",
            "Predicted queue wait of a new request (measured cost of the work ahead).",
            registry=r,
        )
        #: Learnt model seconds per token position, by kind (prefix, suffix).
        self.token_seconds = Gauge(
            "sellarec_token_cost_seconds", "Measured model seconds per token position.", ["kind"], registry=r
        )
        #: Queued requests dropped before their batch: the client went away or its deadline passed.
        self.dropped = Counter(
            "sellarec_dropped_requests", "Queued requests dropped before running.", ["reason"], registry=r
        )
        #: The model this process runs.
        self.model_info = Info("sellarec_model", "The model this process runs.", registry=r)
        for kind in ("user", "item"):
            self.cold.labels(kind=kind)
        for outcome in ("recorded", "duplicate", "negative"):
            self.events.labels(outcome=outcome)

    def watch_prefix_cache(self, cache: PrefixCache) -> None:
        """Export the torch backend's prefix cache: lookups by result, bytes and entries held."""
        self.registry.register(_PrefixCacheCollector(cache))

    def serve_version(self, version: str, previous: str | None) -> None:
        """Mark `version` as the one being served."""
        if previous is not None:
            self.active_version.labels(version=previous).set(0)
        self.active_version.labels(version=version).set(1)


class _PrefixCacheCollector(Collector):
    """Reads the cache's own counts at scrape time (the model thread keeps them)."""

    def __init__(self, cache: PrefixCache) -> None:
        self.cache = cache

    def collect(self) -> Iterator[Metric]:
        lookups = CounterMetricFamily(
            "sellarec_prefix_cache_lookups", "Users' prefixes looked up in the cache.", labels=["result"]
        )
        lookups.add_metric(["hit"], self.cache.hits)
        lookups.add_metric(["miss"], self.cache.misses)
        yield lookups
        yield GaugeMetricFamily("sellarec_prefix_cache_bytes", "Prefix keys/values kept.", self.cache.bytes)
        yield GaugeMetricFamily("sellarec_prefix_cache_entries", "Users' prefixes kept.", len(self.cache))

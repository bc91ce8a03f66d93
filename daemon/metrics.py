"""Prometheus metrics: counters in every process (multiprocess mode), queue state from the DB."""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def enable_multiprocess() -> Path:
    """Give this process tree one fresh metrics directory; call before prometheus is imported.

    Worker and receiver processes inherit the variable, so their counters add up on the
    one `/metrics` the service serves.
    """
    path = Path(tempfile.mkdtemp(prefix="pacs-ai-metrics-"))
    os.environ[MULTIPROC_ENV] = str(path)
    return path


def cleanup_multiprocess(path: Path) -> None:
    """Remove the metrics directory when the service stops."""
    shutil.rmtree(path, ignore_errors=True)


class Metrics:
    """The counters and histograms each process updates; one instance per process."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        # A private registry, so tests may build several; exposition reads the multiprocess
        # files (or this registry when multiprocess mode is off).
        self.registry = reg = CollectorRegistry(auto_describe=True)

        self.instances_received = Counter(
            "pacsai_instances_received",
            "C-STORE requests answered, by calling AE and status class",
            ["calling_ae", "status"],
            registry=reg,
        )
        self.bytes_received = Counter(
            "pacsai_received_bytes", "Bytes of instances stored", registry=reg
        )
        self.associations_active = Gauge(
            "pacsai_associations_active",
            "Associations in progress",
            multiprocess_mode="livesum",
            registry=reg,
        )
        self.associations_rejected = Counter(
            "pacsai_associations_rejected",
            "Associations rejected, by reason",
            ["reason"],
            registry=reg,
        )
        self.analysis_seconds = Histogram(
            "pacsai_analysis_seconds",
            "Wall time of one study analysis",
            buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600),
            registry=reg,
        )
        self.inference_seconds = Histogram(
            "pacsai_inference_seconds",
            "Wall time of one model on one series",
            ["model"],
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
            registry=reg,
        )
        self.dispatch_attempts = Counter(
            "pacsai_dispatch_attempts",
            "Report sends tried, by destination",
            ["destination"],
            registry=reg,
        )
        self.http_requests = Counter(
            "pacsai_http_requests",
            "HTTP requests answered, by first path segment and status",
            ["route", "status"],
            registry=reg,
        )
        self.dispatch_failures = Counter(
            "pacsai_dispatch_failures",
            "Report sends that failed, by destination",
            ["destination"],
            registry=reg,
        )


class QueueCollector:
    """Reads job and spool state at scrape time, so it is true across every host and process."""

    def __init__(
        self,
        counts: Callable[[], dict[str, dict[str, int]]],
        oldest_age: Callable[[], float | None],
        spool_free: Callable[[], int],
    ) -> None:
        self._counts = counts
        self._oldest = oldest_age
        self._free = spool_free

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        jobs = GaugeMetricFamily("pacsai_jobs", "Jobs by kind and state", labels=["kind", "state"])
        for kind, states in self._counts().items():
            for state, n in states.items():
                jobs.add_metric([kind, state], n)
        yield jobs
        age = self._oldest()
        yield GaugeMetricFamily(
            "pacsai_oldest_queued_seconds",
            "Age of the oldest due job (0 when none waits)",
            value=age or 0.0,
        )
        yield GaugeMetricFamily(
            "pacsai_spool_free_bytes", "Free bytes on the spool filesystem", value=self._free()
        )


def metrics_registry(collector: QueueCollector, local: Metrics) -> Any:
    """Every process's counters plus `collector`: what a /metrics page exposes."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    if os.environ.get(MULTIPROC_ENV):
        MultiProcessCollector(registry)
    else:
        registry = local.registry
    registry.register(collector)
    return registry


def serve_metrics(bind: str, port: int, registry: Any) -> Any:
    """Start the `[metrics]` /metrics HTTP server over `registry`."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=bind, registry=registry)
    return server


ASSOCIATIONS_METRIC = "pacsai_associations_active"


def associations_open(metrics: Metrics) -> int:
    """Associations in progress in every receiver process (the gauge's live sum).

    Reads only the live-sum gauge files of the multiprocess directory (or this process's
    gauge without one): cheap enough for a page view, unlike a whole /metrics scrape.
    """
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        from prometheus_client.multiprocess import MultiProcessCollector

        files = glob.glob(os.path.join(path, "gauge_livesum_*.db"))
        families = MultiProcessCollector.merge(files, accumulate=True)
    else:
        families = metrics.associations_active.collect()
    return int(
        sum(
            sample.value
            for family in families
            if family.name == ASSOCIATIONS_METRIC
            for sample in family.samples
        )
    )

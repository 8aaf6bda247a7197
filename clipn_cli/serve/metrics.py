"""Prometheus metrics of one server, in a registry of its own (README "Serve" lists them)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServeMetrics:
    """Requests by status, images by verdict (or error), latency and batch sizes, queue depth."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._requests = Counter("clipn_requests", "POST /v1/detect requests by HTTP status.", ["status"], registry=self.registry)
        self._images = Counter("clipn_images", "Images answered, by verdict (ID, OOD) or error.", ["verdict"], registry=self.registry)
        self._latency = Histogram("clipn_request_seconds", "POST /v1/detect time, from arrival to answer.", buckets=LATENCY_BUCKETS, registry=self.registry)
        self._batch = Histogram("clipn_batch_images", "Images per scoring batch.", buckets=BATCH_BUCKETS, registry=self.registry)
        self._queue = Gauge("clipn_queue_depth", "Requests admitted and not yet answered (at most --queue).", registry=self.registry)

    def watch_queue(self, depth: Callable[[], int]) -> None:
        self._queue.set_function(depth)

    def request(self, status: int, seconds: float) -> None:
        self._requests.labels(str(status)).inc()
        self._latency.observe(seconds)

    def images(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            self._images.labels("error" if "error" in record else str(record.get("verdict"))).inc()

    def batch(self, size: int) -> None:
        self._batch.observe(size)

    def render(self) -> bytes:
        return generate_latest(self.registry)

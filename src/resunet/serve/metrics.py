"""Prometheus metrics of one service (its own registry, so several apps in one process stay apart)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the /metrics route)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("resunet_requests", "HTTP requests answered, by route and status code",
                                ["path", "status"], registry=self.registry)
        self.latency = Histogram("resunet_request_duration_seconds", "Time from request to response, by route",
                                 ["path"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("resunet_batch_size", "Images per forward pass (micro-batching)",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.inference_seconds = Histogram("resunet_inference_duration_seconds", "Time of one forward pass",
                                           buckets=LATENCY_BUCKETS, registry=self.registry)
        self.in_flight = Gauge("resunet_images_in_flight", "Images queued or being segmented",
                               registry=self.registry)
        self.queue_depth = Gauge("resunet_queue_depth", "Images waiting for a forward pass", registry=self.registry)
        self.pending_pixels = Gauge("resunet_pending_pixels", "Pixels of the images being decoded, waiting or "
                                    "segmented (at most --max-pending-pixels)", registry=self.registry)
        self.pending_upload_bytes = Gauge("resunet_pending_upload_bytes", "Bytes of the uploads being received or "
                                          "decoded (at most --max-pending-bytes)", registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)

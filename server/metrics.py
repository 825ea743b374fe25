"""Prometheus metrics: one registry per server, served over HTTP on its own port.

Label values are bounded by construction: `model` is a configured name or "unknown", `method`
an RPC name, `code` a gRPC status name, `stage` one of STAGES. No node names, request ids or
image names ever become labels.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable, Iterable, Iterator
from importlib.metadata import PackageNotFoundError, version
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .thread_roles import ThreadCpuCollector

log = logging.getLogger(__name__)

STAGES = ("queue", "decode", "compute", "encode")
UNKNOWN = "unknown"
DROP_REASONS = ("cancelled", "deadline")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STREAM_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def layertap_version() -> str:
    try:
        return version("layertap")
    except PackageNotFoundError:
        return "0+unknown"


# device -> (bytes held by tensors, bytes reserved by the caching allocator); the runtime
# supplies it (server/worker.py), so this module never imports torch.
CudaMemory = Callable[[str], tuple[float, float]]


class _CudaCollector(Collector):
    """CUDA memory per device, read at scrape time (cheap, thread-safe in torch)."""

    def __init__(self, devices: Callable[[], list[str]], read: CudaMemory) -> None:
        self._devices = devices
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        allocated = GaugeMetricFamily(
            "layertap_cuda_memory_allocated_bytes", "CUDA memory held by tensors", labels=["device"]
        )
        reserved = GaugeMetricFamily(
            "layertap_cuda_memory_reserved_bytes",
            "CUDA memory reserved by the caching allocator",
            labels=["device"],
        )
        for device in self._devices():
            held, kept = self._read(device)
            allocated.add_metric([device], held)
            reserved.add_metric([device], kept)
        yield allocated
        yield reserved


class Metrics:
    """Every metric layertap exports; stages call the small methods below."""

    def __init__(self, models: Iterable[str]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(ThreadCpuCollector())  # layertap_thread_cpu_seconds_total{role}
        self._models = frozenset(models)
        r = self.registry
        self.build_info = Gauge(
            "layertap_build_info",
            "layertap build and runtime versions",
            ["version", "torch", "torchvision", "device"],
            registry=r,
        )
        self.requests = Counter(
            "layertap_requests", "Finished RPCs", ["method", "model", "code"], registry=r
        )
        self.request_seconds = Histogram(
            "layertap_request_duration_seconds",
            "Server time per RPC",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "layertap_stage_duration_seconds",
            "Time per Extract stage",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "layertap_batch_size",
            "Images per forward",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "layertap_queue_depth", "Images waiting for the worker", registry=r
        )
        self.in_flight = Gauge(
            "layertap_requests_in_flight", "RPCs being served", ["method"], registry=r
        )
        self.stream_items = Counter(
            "layertap_stream_items",
            "ExtractStream items answered (or cancelled with their stream), by outcome",
            ["model", "code"],
            registry=r,
        )
        self.stream_unanswered = Histogram(
            "layertap_stream_unanswered_items",
            "Unanswered items of a stream, counted as each item is admitted "
            "(never above max_stream_in_flight)",
            buckets=STREAM_BUCKETS,
            registry=r,
        )
        self.images = Counter("layertap_images", "Images extracted", ["model"], registry=r)
        self.dropped_images = Counter(
            "layertap_dropped_images",
            "Images dropped before compute: their client cancelled, or their deadline passed",
            ["reason"],
            registry=r,
        )
        self.output_bytes = Counter(
            "layertap_output_bytes", "Tensor bytes returned", ["model"], registry=r
        )
        self.cache_entries = Gauge(
            "layertap_extractor_cache_entries", "FX graph modules cached", ["model"], registry=r
        )
        self.cache_hits = Counter(
            "layertap_extractor_cache_hits", "Extractor cache hits", ["model"], registry=r
        )
        self.cache_misses = Counter(
            "layertap_extractor_cache_misses", "Extractor cache misses", ["model"], registry=r
        )
        self.cache_evictions = Counter(
            "layertap_extractor_cache_evictions",
            "Extractors evicted (the least used)",
            ["model"],
            registry=r,
        )
        self.result_cache_hits = Counter(
            "layertap_result_cache_hits",
            "Images answered from the result cache (no decode, no forward)",
            ["model"],
            registry=r,
        )
        self.result_cache_misses = Counter(
            "layertap_result_cache_misses",
            "Images looked up in the result cache and not found (computed, then stored)",
            ["model"],
            registry=r,
        )
        self.result_cache_evictions = Counter(
            "layertap_result_cache_evictions",
            "Results evicted from the result cache (the least recently used, past "
            "result_cache_bytes)",
            ["model"],
            registry=r,
        )
        self.result_cache_bytes = Gauge(
            "layertap_result_cache_bytes",
            "Bytes held by the result cache (of result_cache_bytes)",
            registry=r,
        )
        self.result_cache_entries = Gauge(
            "layertap_result_cache_entries", "Per-image results in the result cache", registry=r
        )
        self.memory_reserved = Gauge(
            "layertap_memory_reserved_bytes",
            "Estimated peak bytes reserved by the requests in progress (memory_budget_bytes)",
            registry=r,
        )
        self.builds_refused = Counter(
            "layertap_extractor_builds_refused",
            "Requests refused because their client used its extractor builds of the minute "
            "(max_builds_per_client_per_minute)",
            ["model"],
            registry=r,
        )
        self.compile_seconds = Counter(
            "layertap_compile_seconds",
            "Seconds spent compiling extractors at load (compile = 'auto'; 0 when they stay "
            "eager); node sets compiled later compile in the background",
            ["model"],
            registry=r,
        )
        self.compiles_pending = Gauge(
            "layertap_compiles_pending",
            "Node sets queued for or being compiled by the background compile thread",
            registry=r,
        )
        self.build_seconds = Histogram(
            "layertap_extractor_build_seconds",
            "Time to build an extractor",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_memory = Gauge(
            "layertap_model_memory_bytes",
            "Parameters and buffers of the base model",
            ["model"],
            registry=r,
        )
        self.model_ready = Gauge(
            "layertap_model_ready",
            "1 when the model is loaded and warmed up",
            ["model"],
            registry=r,
        )
        for name in self._models:
            self.model_ready.labels(name).set(0)
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def model(self, name: str) -> str:
        """The label for a model name: configured names only, anything else is 'unknown'."""
        return name if name in self._models else UNKNOWN

    def observe_batch(self, key: Hashable, size: int) -> None:
        """Batch sizes per model; the batch key's first item is the model name."""
        name = key[0] if isinstance(key, tuple) and key else UNKNOWN
        self.batch_size.labels(self.model(str(name))).observe(size)

    def observe_drop(self, key: Hashable, reason: str) -> None:
        """One image dropped before compute; reason is "cancelled" or "deadline"."""
        self.dropped_images.labels(reason if reason in DROP_REASONS else UNKNOWN).inc()

    def set_build_info(
        self, device: str, versions: tuple[str, str], cuda_memory: CudaMemory | None = None
    ) -> None:
        """Versions (torch, torchvision) and the serving device; on CUDA, memory gauges read
        through `cuda_memory` at scrape time."""
        self.build_info.labels(layertap_version(), *versions, device).set(1)
        if device.startswith("cuda") and cuda_memory is not None:
            self.registry.register(_CudaCollector(lambda: [device], cuda_memory))

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP server; returns the port bound (port 0 picks one)."""
        try:
            self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            from .settings import ConfigError

            raise ConfigError(
                f"cannot serve metrics on {host}:{port} ({exc.strerror}); set metrics_port "
                "(0 picks a free port) or metrics = false"
            ) from exc
        bound = int(self._http.server_port)
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

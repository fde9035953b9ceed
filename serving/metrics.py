"""Per-model serving statistics: Prometheus metrics and the ModelStatistics RPC.

One ``ModelMetrics`` records each event once and feeds both views, so the scrape
and the RPC can never disagree. The registry is injected (no global state): each
server, and each test, owns its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from serving.protocol import inference_pb2 as pb

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    """The metric families of one server process, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        labels = ["model"]
        self.requests = Counter(
            "inference_requests", "Inference requests by final gRPC status code.", [*labels, "code"], registry=registry
        )
        self.request_duration = Histogram(
            "inference_request_duration_seconds",
            "End-to-end server-side duration of inference requests (decode to reply).",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_duration = Histogram(
            "inference_queue_duration_seconds",
            "Time requests waited in the batcher's queue before their batch started.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.compute_duration = Histogram(
            "inference_compute_duration_seconds",
            "Duration of one model execution (forward pass of a whole batch).",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "inference_batch_size", "Rows per model execution.", labels, buckets=BATCH_BUCKETS, registry=registry
        )
        self.executions = Counter("inference_executions", "Model executions (batches).", labels, registry=registry)
        self.rows = Counter("inference_rows", "Rows inferred (sum of batch sizes).", labels, registry=registry)
        self.queue_depth = Gauge(
            "inference_queue_depth", "Requests waiting in the batcher's queue.", labels, registry=registry
        )
        self.inflight = Gauge(
            "inference_inflight_requests", "Inference requests being handled.", labels, registry=registry
        )
        ProcessCollector(registry=registry)

    def for_model(self, name: str, version: str = "1") -> ModelMetrics:
        return ModelMetrics(self, name, version)


@dataclass
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def proto(self) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=self.count, ns=self.ns)


@dataclass
class _BatchStats:
    compute_input: _Duration = field(default_factory=_Duration)
    compute_infer: _Duration = field(default_factory=_Duration)
    compute_output: _Duration = field(default_factory=_Duration)


class ModelMetrics:
    """Records one model's events into Prometheus and ModelStatistics totals."""

    def __init__(self, server: ServerMetrics, name: str, version: str) -> None:
        self.name = name
        self.version = version
        self._lock = threading.Lock()
        self._requests = server.requests
        self._request_duration = server.request_duration.labels(name)
        self._queue_duration = server.queue_duration.labels(name)
        self._compute_duration = server.compute_duration.labels(name)
        self._batch_size = server.batch_size.labels(name)
        self._executions = server.executions.labels(name)
        self._rows = server.rows.labels(name)
        self.queue_depth = server.queue_depth.labels(name)
        self.inflight = server.inflight.labels(name)
        self._success = _Duration()
        self._fail = _Duration()
        self._queue = _Duration()
        self._compute_input = _Duration()
        self._compute_infer = _Duration()
        self._compute_output = _Duration()
        self._batches: dict[int, _BatchStats] = {}
        self._inference_count = 0
        self._execution_count = 0
        self._last_inference_ms = 0

    def request_done(self, code: str, duration_ns: int) -> None:
        """One request finished with gRPC status ``code`` ("OK" on success)."""
        self._requests.labels(self.name, code).inc()
        self._request_duration.observe(duration_ns / 1e9)
        with self._lock:
            if code == "OK":
                self._success.add(duration_ns)
                self._last_inference_ms = time.time_ns() // 1_000_000
            else:
                self._fail.add(duration_ns)

    def queued(self, waited_ns: int) -> None:
        """One request left the queue for a batch after ``waited_ns``."""
        self._queue_duration.observe(waited_ns / 1e9)
        with self._lock:
            self._queue.add(waited_ns)

    def batch_done(self, rows: int, requests: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One execution of ``rows`` rows for ``requests`` requests finished."""
        self._batch_size.observe(rows)
        self._compute_duration.observe(infer_ns / 1e9)
        self._executions.inc()
        self._rows.inc(rows)
        with self._lock:
            self._inference_count += rows
            self._execution_count += 1
            # Per-request compute figures, as Triton reports them: each request of
            # the batch is charged the batch's durations.
            self._compute_input.add(input_ns * requests, requests)
            self._compute_infer.add(infer_ns * requests, requests)
            self._compute_output.add(output_ns * requests, requests)
            stats = self._batches.setdefault(rows, _BatchStats())
            stats.compute_input.add(input_ns)
            stats.compute_infer.add(infer_ns)
            stats.compute_output.add(output_ns)

    def statistics(self) -> pb.ModelStatistics:
        with self._lock:
            return pb.ModelStatistics(
                name=self.name,
                version=self.version,
                last_inference=self._last_inference_ms,
                inference_count=self._inference_count,
                execution_count=self._execution_count,
                inference_stats=pb.InferStatistics(
                    success=self._success.proto(),
                    fail=self._fail.proto(),
                    queue=self._queue.proto(),
                    compute_input=self._compute_input.proto(),
                    compute_infer=self._compute_infer.proto(),
                    compute_output=self._compute_output.proto(),
                ),
                batch_stats=[
                    pb.InferBatchStatistics(
                        batch_size=size,
                        compute_input=stats.compute_input.proto(),
                        compute_infer=stats.compute_infer.proto(),
                        compute_output=stats.compute_output.proto(),
                    )
                    for size, stats in sorted(self._batches.items())
                ],
            )


class GpuCollector(Collector):
    """GPU utilisation and memory per device through NVML; absent without a GPU."""

    def __init__(self, device_indices: list[int]) -> None:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handles = {index: pynvml.nvmlDeviceGetHandleByIndex(index) for index in device_indices}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        util = GaugeMetricFamily("gpu_utilization_ratio", "GPU busy fraction (NVML).", labels=["device"])
        used = GaugeMetricFamily("gpu_memory_used_bytes", "GPU memory in use (NVML).", labels=["device"])
        total = GaugeMetricFamily("gpu_memory_total_bytes", "GPU memory in all (NVML).", labels=["device"])
        for index, handle in self._handles.items():
            rates = self._nvml.nvmlDeviceGetUtilizationRates(handle)
            memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            util.add_metric([str(index)], rates.gpu / 100.0)
            used.add_metric([str(index)], float(memory.used))
            total.add_metric([str(index)], float(memory.total))
        yield from (util, used, total)


def register_gpu_collector(registry: CollectorRegistry, device: str) -> bool:
    """Add GPU metrics when ``device`` is a CUDA device and NVML answers."""
    if not device.startswith("cuda"):
        return False
    index = int(device.partition(":")[2] or 0)
    try:
        registry.register(GpuCollector([index]))
    except Exception as err:  # NVML missing or no driver: GPU metrics are optional
        log.warning("GPU metrics unavailable: %s", err)
        return False
    return True

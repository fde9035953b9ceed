"""Per-model serving statistics: Prometheus metrics and the ModelStatistics RPC.

One ``ModelMetrics`` records each event once and feeds both views, so the scrape and
the RPC can never disagree. Events are cheap on the request path: plain counters and
bucket counts updated under one lock per event (one per request, one per batch: a
batch's queue waits go in together), turned into Prometheus families only when
scraped. The registry is injected (no global state): each server, and each test, owns
its own.

Families (same names on both servers): ``inference_requests_total{model,code}``,
``inference_request_duration_seconds``, ``inference_queue_duration_seconds``,
``inference_compute_duration_seconds``, ``inference_batch_size`` (histograms by
model), ``inference_executions_total``, ``inference_rows_total``,
``inference_queue_depth``, ``inference_inflight_requests``.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from contract.protocol import inference_pb2 as pb

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _Histogram:
    """Bucket counts and a sum, updated under its owner's lock."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def add_to(self, family: HistogramMetricFamily, labels: list[str]) -> None:
        cumulative, buckets = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
        family.add_metric(labels, buckets, self.sum)


class _Duration:
    """A Triton StatisticDuration: a count and nanoseconds."""

    __slots__ = ("count", "ns")

    def __init__(self) -> None:
        self.count = 0
        self.ns = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def proto(self) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=self.count, ns=self.ns)


class _BatchStats:
    __slots__ = ("compute_infer", "compute_input", "compute_output")

    def __init__(self) -> None:
        self.compute_input = _Duration()
        self.compute_infer = _Duration()
        self.compute_output = _Duration()


class ModelMetrics:
    """Records one model's events into the counters behind Prometheus and ModelStatistics."""

    def __init__(self, name: str, version: str = "1") -> None:
        self.name = name
        self.version = version
        self._lock = threading.Lock()
        self._codes: dict[str, int] = {}
        self._inflight = 0
        self._request_duration = _Histogram(LATENCY_BUCKETS)
        self._queue_duration = _Histogram(LATENCY_BUCKETS)
        self._compute_duration = _Histogram(LATENCY_BUCKETS)
        self._batch_size = _Histogram(BATCH_BUCKETS)
        self._rows = 0
        self._executions = 0
        self._success = _Duration()
        self._fail = _Duration()
        self._queue = _Duration()
        self._compute_input = _Duration()
        self._compute_infer = _Duration()
        self._compute_output = _Duration()
        self._batches: dict[int, _BatchStats] = {}
        self._last_inference_ms = 0
        self._queue_depth: Callable[[], int] = lambda: 0

    def bind_queue_depth(self, read: Callable[[], int]) -> None:
        """Where the queue depth is read at scrape time (the model's batcher)."""
        self._queue_depth = read

    def request_started(self) -> None:
        with self._lock:
            self._inflight += 1

    def request_done(self, code: str, duration_ns: int) -> None:
        """One request finished with gRPC status ``code`` ("OK" on success)."""
        with self._lock:
            self._inflight -= 1
            self._codes[code] = self._codes.get(code, 0) + 1
            self._request_duration.observe(duration_ns / 1e9)
            if code == "OK":
                self._success.add(duration_ns)
                self._last_inference_ms = time.time_ns() // 1_000_000
            else:
                self._fail.add(duration_ns)

    def batch_done(self, rows: int, waits_s: Sequence[float], input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One execution of ``rows`` rows (padding included) for requests that waited ``waits_s`` in the queue."""
        requests = len(waits_s)
        with self._lock:
            for wait in waits_s:
                self._queue_duration.observe(wait)
            self._queue.add(int(sum(waits_s) * 1e9), requests)
            self._batch_size.observe(rows)
            self._compute_duration.observe(infer_ns / 1e9)
            self._executions += 1
            self._rows += rows
            # Per-request compute figures, as Triton reports them: each request of the
            # batch is charged the batch's durations.
            self._compute_input.add(input_ns * requests, requests)
            self._compute_infer.add(infer_ns * requests, requests)
            self._compute_output.add(output_ns * requests, requests)
            stats = self._batches.get(rows)
            if stats is None:
                stats = self._batches[rows] = _BatchStats()
            stats.compute_input.add(input_ns)
            stats.compute_infer.add(infer_ns)
            stats.compute_output.add(output_ns)

    def statistics(self) -> pb.ModelStatistics:
        with self._lock:
            return pb.ModelStatistics(
                name=self.name,
                version=self.version,
                last_inference=self._last_inference_ms,
                inference_count=self._rows,
                execution_count=self._executions,
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

    def _collect_into(self, families: _Families) -> None:
        labels = [self.name]
        with self._lock:
            for code, count in sorted(self._codes.items()):
                families.requests.add_metric([self.name, code], count)
            self._request_duration.add_to(families.request_duration, labels)
            self._queue_duration.add_to(families.queue_duration, labels)
            self._compute_duration.add_to(families.compute_duration, labels)
            self._batch_size.add_to(families.batch_size, labels)
            families.executions.add_metric(labels, self._executions)
            families.rows.add_metric(labels, self._rows)
            families.inflight.add_metric(labels, self._inflight)
        families.queue_depth.add_metric(labels, self._queue_depth())


class _Families:
    """The metric families of one scrape, filled by every model in turn."""

    def __init__(self) -> None:
        model = ["model"]
        self.requests = CounterMetricFamily(
            "inference_requests", "Inference requests by final gRPC status code.", labels=[*model, "code"]
        )
        self.request_duration = HistogramMetricFamily(
            "inference_request_duration_seconds",
            "End-to-end server-side duration of inference requests (decode to reply).",
            labels=model,
        )
        self.queue_duration = HistogramMetricFamily(
            "inference_queue_duration_seconds",
            "Time requests waited in the batcher's queue before their batch started.",
            labels=model,
        )
        self.compute_duration = HistogramMetricFamily(
            "inference_compute_duration_seconds",
            "Duration of one model execution (forward pass of a whole batch).",
            labels=model,
        )
        self.batch_size = HistogramMetricFamily("inference_batch_size", "Rows per model execution.", labels=model)
        self.executions = CounterMetricFamily("inference_executions", "Model executions (batches).", labels=model)
        self.rows = CounterMetricFamily("inference_rows", "Rows inferred (sum of batch sizes).", labels=model)
        self.queue_depth = GaugeMetricFamily(
            "inference_queue_depth", "Requests waiting in the batcher's queue.", labels=model
        )
        self.inflight = GaugeMetricFamily(
            "inference_inflight_requests", "Inference requests being handled.", labels=model
        )

    def __iter__(self) -> Iterator[Metric]:
        return iter(vars(self).values())


class ServerMetrics(Collector):
    """The metric families of one server process, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._models: dict[str, ModelMetrics] = {}
        registry.register(self)
        ProcessCollector(registry=registry)

    def for_model(self, name: str, version: str = "1") -> ModelMetrics:
        metrics = self._models[name] = ModelMetrics(name, version)
        return metrics

    def collect(self) -> Iterator[Metric]:
        families = _Families()
        for metrics in list(self._models.values()):
            metrics._collect_into(families)
        yield from families

    def describe(self) -> Iterator[Metric]:
        return iter(())


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

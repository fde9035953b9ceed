"""Per-model serving statistics: Prometheus metrics and the ModelStatistics RPC.

One ``ModelMetrics`` records each event once and feeds both views, so the scrape and
the RPC can never disagree. Events are cheap on the request path: plain counters and
bucket counts updated under one lock per event (one per request, one per batch: a
batch's queue waits go in together). Reading flattens them into one row of numbers
(``Layout``) in a ``MetricsTable``: a private one for a single server process, a file
in shared memory with one row per worker when ``--workers`` runs several (each worker
publishes its row every ``PUBLISH_INTERVAL_S`` and when read), so every worker answers
ModelStatistics with the totals of all, and the supervisor exposes them on the one
metrics port. The registry is injected (no global state): each server, and each test,
owns its own.

Families (same names on both servers): ``inference_requests_total{model,code}``,
``inference_request_duration_seconds``, ``inference_queue_duration_seconds``,
``inference_compute_duration_seconds``, ``inference_batch_size`` (histograms by
model), ``inference_executions_total``, ``inference_rows_total``,
``inference_queue_depth``, ``inference_queue_depth_at_batch`` (requests queued when the
latest batch was taken), ``inference_inflight_requests``,
``inference_refusals_total{model,reason}`` (RESOURCE_EXHAUSTED by the admission rules:
``queue_full``, ``deadline``, ``max_wait``, and grpcio's ``in_flight`` cap; see
docs/serving.md), and
``inference_worker_requests_total{model,worker}`` (with several workers: how the kernel
spread the load). On a GPU, once per server (a lone server, or the supervisor of several
workers): ``gpu_utilization_ratio``, ``gpu_memory_used_bytes``, ``gpu_memory_total_bytes``,
``gpu_info{device,uuid,name}`` and ``gpu_read_errors_total{device,field}`` (NVML, through
``serving.nvml``; ``device`` is the CUDA index the server uses).
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import grpc
import numpy as np
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from contract.protocol import inference_pb2 as pb
from serving import nvml
from serving.devices import cuda_index
from serving.nvml import Gpu

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CODES = tuple(code.name for code in grpc.StatusCode)
#: Why the admission rules refused a request (``serving.batcher.DynamicBatcher.refusal``).
REFUSAL_REASONS = ("queue_full", "deadline", "max_wait", "in_flight")
#: How often a worker of several writes its figures into the shared table.
PUBLISH_INTERVAL_S = 0.1
#: Largest batch size the standalone ModelMetrics (tests, tools) keeps per-size figures for.
STANDALONE_MAX_BATCH = 1024


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


class _Duration:
    """A Triton StatisticDuration: a count and nanoseconds."""

    __slots__ = ("count", "ns")

    def __init__(self) -> None:
        self.count = 0
        self.ns = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


class Layout:
    """Where each figure of one model sits in a row of numbers (float64)."""

    DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")

    def __init__(self, max_batch_size: int) -> None:
        self.max_batch_size = max_batch_size
        position = 0

        def take(size: int) -> slice:
            nonlocal position
            taken = slice(position, position + size)
            position += size
            return taken

        self.codes = take(len(CODES))
        self.inflight = take(1).start
        self.queue_depth = take(1).start
        self.queue_depth_at_batch = take(1).start
        self.refusals = take(len(REFUSAL_REASONS))
        self.request_hist = take(len(LATENCY_BUCKETS) + 2)  # counts, +Inf count, sum
        self.queue_hist = take(len(LATENCY_BUCKETS) + 2)
        self.compute_hist = take(len(LATENCY_BUCKETS) + 2)
        self.batch_hist = take(len(BATCH_BUCKETS) + 2)
        self.executions = take(1).start
        self.rows = take(1).start
        self.durations = {name: take(2) for name in self.DURATIONS}  # count, ns
        self.last_inference_ms = take(1).start
        self.batches = take(max_batch_size * 6)  # per batch size: (count, ns) of input, infer, output
        self.width = position

    def total(self, rows: np.ndarray) -> np.ndarray:
        """The figures of every worker together: sums, but the latest inference time."""
        total = rows.sum(axis=0)
        total[self.last_inference_ms] = rows[:, self.last_inference_ms].max()
        return total


class ModelMetrics:
    """Records one model's events; its figures, with other workers', feed both views."""

    def __init__(
        self,
        name: str,
        version: str = "1",
        layout: Layout | None = None,
        rows: np.ndarray | None = None,
        index: int = 0,
    ) -> None:
        self.name = name
        self.version = version
        self.layout = layout or Layout(STANDALONE_MAX_BATCH)
        #: Every worker's row of this model (``index`` is this process's); private when alone.
        self.rows = np.zeros((1, self.layout.width)) if rows is None else rows
        self.index = index
        self._lock = threading.Lock()
        self._codes = [0] * len(CODES)
        self._code_index = {code: i for i, code in enumerate(CODES)}
        self._inflight = 0
        self._request_duration = _Histogram(LATENCY_BUCKETS)
        self._queue_duration = _Histogram(LATENCY_BUCKETS)
        self._compute_duration = _Histogram(LATENCY_BUCKETS)
        self._batch_size = _Histogram(BATCH_BUCKETS)
        self._rows = 0
        self._executions = 0
        self._durations = {name: _Duration() for name in Layout.DURATIONS}
        self._batches = np.zeros((self.layout.max_batch_size, 6))
        self._last_inference_ms = 0
        self._refusals = [0] * len(REFUSAL_REASONS)
        self._refusal_index = {reason: i for i, reason in enumerate(REFUSAL_REASONS)}
        self._queue_depth: Callable[[], int] = lambda: 0
        self._queue_depth_at_batch: Callable[[], int] = lambda: 0

    def bind_queue_depth(self, read: Callable[[], int], at_batch: Callable[[], int] | None = None) -> None:
        """Where the queue depth is read (the model's batcher): now, and when the latest batch was taken."""
        self._queue_depth = read
        if at_batch is not None:
            self._queue_depth_at_batch = at_batch

    def refused(self, reason: str) -> None:
        """The admission rules refused a request (its status is counted by ``request_done``)."""
        with self._lock:
            self._refusals[self._refusal_index[reason]] += 1

    def refused_unseen(self, reason: str, duration_ns: int) -> None:
        """A request refused before it reached ``request_started`` (``serving.admission``): its
        status, duration and reason, counted at once."""
        with self._lock:
            self._refusals[self._refusal_index[reason]] += 1
            self._codes[self._code_index["RESOURCE_EXHAUSTED"]] += 1
            self._request_duration.observe(duration_ns / 1e9)
            self._durations["fail"].add(duration_ns)

    def request_started(self) -> None:
        with self._lock:
            self._inflight += 1

    def request_done(self, code: str, duration_ns: int) -> None:
        """One request finished with gRPC status ``code`` ("OK" on success)."""
        with self._lock:
            self._inflight -= 1
            self._codes[self._code_index[code]] += 1
            self._request_duration.observe(duration_ns / 1e9)
            if code == "OK":
                self._durations["success"].add(duration_ns)
                self._last_inference_ms = time.time_ns() // 1_000_000
            else:
                self._durations["fail"].add(duration_ns)

    def batch_done(self, rows: int, waits_s: Sequence[float], input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One execution of ``rows`` rows (padding included) for requests that waited ``waits_s`` in the queue."""
        requests = len(waits_s)
        durations = self._durations
        with self._lock:
            for wait in waits_s:
                self._queue_duration.observe(wait)
            durations["queue"].add(int(sum(waits_s) * 1e9), requests)
            self._batch_size.observe(rows)
            self._compute_duration.observe(infer_ns / 1e9)
            self._executions += 1
            self._rows += rows
            # Per-request compute figures, as Triton reports them: each request of the
            # batch is charged the batch's durations.
            durations["compute_input"].add(input_ns * requests, requests)
            durations["compute_infer"].add(infer_ns * requests, requests)
            durations["compute_output"].add(output_ns * requests, requests)
            if rows <= len(self._batches):
                self._batches[rows - 1] += (1, input_ns, 1, infer_ns, 1, output_ns)

    def publish(self) -> None:
        """Write this process's figures into its row of the table."""
        layout = self.layout
        with self._lock:
            row = np.zeros(layout.width)
            row[layout.codes] = self._codes
            row[layout.inflight] = self._inflight
            row[layout.request_hist] = [*self._request_duration.counts, self._request_duration.sum]
            row[layout.queue_hist] = [*self._queue_duration.counts, self._queue_duration.sum]
            row[layout.compute_hist] = [*self._compute_duration.counts, self._compute_duration.sum]
            row[layout.batch_hist] = [*self._batch_size.counts, self._batch_size.sum]
            row[layout.executions] = self._executions
            row[layout.rows] = self._rows
            for name, duration in self._durations.items():
                row[layout.durations[name]] = (duration.count, duration.ns)
            row[layout.last_inference_ms] = self._last_inference_ms
            row[layout.batches] = self._batches.ravel()
            row[layout.refusals] = self._refusals
        row[layout.queue_depth] = self._queue_depth()
        row[layout.queue_depth_at_batch] = self._queue_depth_at_batch()
        self.rows[self.index] = row

    def totals(self) -> np.ndarray:
        """Every worker's figures together, this process's fresh."""
        self.publish()
        return self.layout.total(self.rows)

    def statistics(self) -> pb.ModelStatistics:
        return statistics(self.name, self.version, self.layout, self.totals())


def statistics(name: str, version: str, layout: Layout, total: np.ndarray) -> pb.ModelStatistics:
    """The ModelStatistics message of a model's (totalled) figures."""

    def duration(place: slice) -> pb.StatisticDuration:
        count, ns = total[place]
        return pb.StatisticDuration(count=int(count), ns=int(ns))

    batches = total[layout.batches].reshape(-1, 6)
    return pb.ModelStatistics(
        name=name,
        version=version,
        last_inference=int(total[layout.last_inference_ms]),
        inference_count=int(total[layout.rows]),
        execution_count=int(total[layout.executions]),
        inference_stats=pb.InferStatistics(**{field: duration(place) for field, place in layout.durations.items()}),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=size + 1,
                compute_input=pb.StatisticDuration(count=int(figures[0]), ns=int(figures[1])),
                compute_infer=pb.StatisticDuration(count=int(figures[2]), ns=int(figures[3])),
                compute_output=pb.StatisticDuration(count=int(figures[4]), ns=int(figures[5])),
            )
            for size, figures in enumerate(batches)
            if figures[2]
        ],
    )


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
        self.queue_depth_at_batch = GaugeMetricFamily(
            "inference_queue_depth_at_batch",
            "Requests waiting in the batcher's queue when its latest batch was taken (before taking it).",
            labels=model,
        )
        self.inflight = GaugeMetricFamily(
            "inference_inflight_requests", "Inference requests being handled.", labels=model
        )
        self.refusals = CounterMetricFamily(
            "inference_refusals",
            "Requests refused (RESOURCE_EXHAUSTED) by the admission rules, by reason: queue_full, deadline "
            "(would wait past its deadline), max_wait (past --max-queue-wait-ms), in_flight (--grpc-threads calls "
            "in flight, refused by grpcio).",
            labels=[*model, "reason"],
        )
        self.worker_requests = CounterMetricFamily(
            "inference_worker_requests",
            "Inference requests answered by each worker process.",
            labels=[*model, "worker"],
        )

    def add(self, name: str, layout: Layout, rows: np.ndarray) -> None:
        """A model's figures: every worker's row (``rows``) totalled, and per worker."""
        total = layout.total(rows)
        labels = [name]
        for code, count in zip(CODES, total[layout.codes], strict=True):
            if count:
                self.requests.add_metric([name, code], count)
        for family, place, bounds in (
            (self.request_duration, layout.request_hist, LATENCY_BUCKETS),
            (self.queue_duration, layout.queue_hist, LATENCY_BUCKETS),
            (self.compute_duration, layout.compute_hist, LATENCY_BUCKETS),
            (self.batch_size, layout.batch_hist, BATCH_BUCKETS),
        ):
            figures = total[place]
            counts = np.cumsum(figures[:-1])
            edges = [repr(float(bound)) for bound in bounds] + ["+Inf"]
            family.add_metric(labels, list(zip(edges, counts.tolist(), strict=True)), float(figures[-1]))
        self.executions.add_metric(labels, total[layout.executions])
        self.rows.add_metric(labels, total[layout.rows])
        self.queue_depth.add_metric(labels, total[layout.queue_depth])
        self.queue_depth_at_batch.add_metric(labels, total[layout.queue_depth_at_batch])
        self.inflight.add_metric(labels, total[layout.inflight])
        for reason, count in zip(REFUSAL_REASONS, total[layout.refusals], strict=True):
            self.refusals.add_metric([name, reason], count)
        # One row per worker (a lone server: one), and with several one more, kept for the
        # workers that were replaced.
        workers = len(rows) - 1 if len(rows) > 1 else 1
        for worker, row in enumerate(rows[:workers]):
            self.worker_requests.add_metric([name, str(worker)], row[layout.codes].sum())
        if len(rows) > workers and rows[-1][layout.codes].sum():
            self.worker_requests.add_metric([name, "replaced"], rows[-1][layout.codes].sum())

    def __iter__(self) -> Iterator[Metric]:
        return iter(vars(self).values())


class MetricsTable:
    """Every model's figures, one row per worker: private memory for a lone server process,
    or a file in shared memory that the workers of one server map (``path``), beside it
    (``<path>.gpu``) the GPU memory each worker's framework reports holding (NaN: none)."""

    def __init__(self, models: Sequence[str], max_batch_size: int, workers: int = 1, path: Path | None = None) -> None:
        self.layout = Layout(max_batch_size)
        self.models = list(models)
        self.workers = workers
        shape = (workers, len(self.models), self.layout.width)
        if path is None:
            self.array: np.ndarray = np.zeros(shape)
            self.gpu_memory: np.ndarray = np.full(workers, np.nan)
        else:
            side = path.with_name(path.name + ".gpu")
            created = not side.exists()
            self.array = np.memmap(str(path), dtype=np.float64, mode="r+" if path.exists() else "w+", shape=shape)
            self.gpu_memory = np.memmap(str(side), dtype=np.float64, mode="w+" if created else "r+", shape=(workers,))
            if created:
                self.gpu_memory[:] = np.nan

    def rows(self, model: str) -> np.ndarray:
        """A model's rows, one per worker (a view: writes land in the table)."""
        return self.array[:, self.models.index(model), :]


class ServerMetrics(Collector):
    """The metric families of one server process, registered on ``registry``.

    ``table``: shared with the other workers of this server (row ``worker``); None: this
    process alone. Models not in the table (the zoo allows more) get their own rows.
    """

    def __init__(self, registry: CollectorRegistry, table: MetricsTable | None = None, worker: int = 0) -> None:
        self.registry = registry
        self.table = table
        self.worker = worker
        self._models: dict[str, ModelMetrics] = {}
        self._publisher: threading.Thread | None = None
        self._gpu_memory: Callable[[], int | None] | None = None
        registry.register(self)
        ProcessCollector(registry=registry)

    def bind_gpu_memory(self, read: Callable[[], int | None]) -> None:
        """Where this process's framework reports the GPU memory it holds (its allocator's own
        figure, bytes; None: nothing to report). A worker of several publishes it for the
        supervisor's ``worker_gpu_memory_framework_bytes``: the figure that holds in a
        container, where NVML's per-process list does not (``serving.nvml``)."""
        self._gpu_memory = read

    def for_model(self, name: str, version: str = "1", max_batch_size: int = STANDALONE_MAX_BATCH) -> ModelMetrics:
        table = self.table
        if table is not None and name in table.models:
            metrics = ModelMetrics(name, version, table.layout, table.rows(name), self.worker)
        else:
            metrics = ModelMetrics(name, version, Layout(max_batch_size))
        self._models[name] = metrics
        if table is not None and table.workers > 1 and self._publisher is None:
            self._publisher = threading.Thread(target=self._publish, name="metrics-publisher", daemon=True)
            self._publisher.start()
        return metrics

    def _publish(self) -> None:
        while True:
            time.sleep(PUBLISH_INTERVAL_S)
            self.publish()

    def publish(self) -> None:
        for metrics in list(self._models.values()):
            metrics.publish()
        if self.table is not None and self._gpu_memory is not None:
            try:
                held = self._gpu_memory()
            except Exception:  # the framework could not say: no figure, never a dead publisher
                log.exception("the framework's GPU memory figure failed; left out")
                self._gpu_memory, held = None, None
            self.table.gpu_memory[self.worker] = np.nan if held is None else float(held)

    def collect(self) -> Iterator[Metric]:
        families = _Families()
        for metrics in list(self._models.values()):
            metrics.publish()
            families.add(metrics.name, metrics.layout, metrics.rows)
        yield from families
        read = self._gpu_memory
        if read is not None and self.table is None:  # one process (workers: the supervisor exports it)
            try:
                held = read()
            except Exception:  # the framework could not say: no figure, the scrape goes on
                log.exception("the framework's GPU memory figure failed; left out")
                held = None
            if held is not None:
                gauge = GaugeMetricFamily(
                    "process_gpu_memory_framework_bytes",
                    "GPU memory this server's framework holds (its allocator's figure; holds in containers, where "
                    "NVML's per-process list does not).",
                )
                gauge.add_metric([], held)
                yield gauge

    def describe(self) -> Iterator[Metric]:
        return iter(())


class TableCollector(Collector):
    """The metric families of every worker of a server together, read from their shared
    table (for the supervisor's metrics port)."""

    def __init__(self, table: MetricsTable) -> None:
        self.table = table

    def collect(self) -> Iterator[Metric]:
        families = _Families()
        for name in self.table.models:
            families.add(name, self.table.layout, np.array(self.table.rows(name)))
        yield from families

    def describe(self) -> Iterator[Metric]:
        return iter(())


class GpuCollector(Collector):
    """Utilisation and memory of GPUs through NVML (``serving.nvml``), each device and each
    figure on its own: a figure NVML will not give a device (a MIG instance has no
    utilisation) is left out for it, counted in ``gpu_read_errors_total`` and logged once."""

    def __init__(self, gpus: Sequence[Gpu]) -> None:
        self.gpus = list(gpus)

    def collect(self) -> Iterator[Metric]:
        device = ["device"]
        info = GaugeMetricFamily(
            "gpu_info",
            "The NVML device behind each device label (its UUID and model); always 1.",
            labels=[*device, "uuid", "name"],
        )
        util = GaugeMetricFamily("gpu_utilization_ratio", "GPU busy fraction (NVML).", labels=device)
        used = GaugeMetricFamily("gpu_memory_used_bytes", "GPU memory in use (NVML).", labels=device)
        total = GaugeMetricFamily("gpu_memory_total_bytes", "GPU memory in all (NVML).", labels=device)
        errors = CounterMetricFamily(
            "gpu_read_errors", "NVML reads that failed, by figure (left out of that scrape).", labels=[*device, "field"]
        )
        for gpu in self.gpus:
            label = [gpu.label]
            info.add_metric([gpu.label, gpu.device.uuid, gpu.device.name], 1)
            busy = gpu.utilization()
            if busy is not None:
                util.add_metric(label, busy)
            memory = gpu.memory()
            if memory is not None:
                used.add_metric(label, float(memory[0]))
                total.add_metric(label, float(memory[1]))
            for field, count in gpu.errors().items():
                errors.add_metric([gpu.label, field], count)
        yield from (info, util, used, total, errors)

    def describe(self) -> Iterator[Metric]:
        return iter(())


def register_gpu_collector(
    registry: CollectorRegistry, device: str, environ: Mapping[str, str] | None = None, quiet: bool = False
) -> bool:
    """Add GPU metrics when ``device`` is a CUDA device (``cuda:N`` as this process's CUDA numbers
    it, under ``environ``: os.environ by default) and NVML finds it; else say why (``quiet``:
    at info level, for a device that was only a guess)."""
    index = cuda_index(device)
    if index is None:
        return False
    try:
        gpu = nvml.open_gpu(index, environ)
    except nvml.NvmlUnavailable as err:  # GPU metrics are optional
        (log.info if quiet else log.warning)("GPU metrics unavailable: %s", err)
        return False
    registry.register(GpuCollector([gpu]))
    return True

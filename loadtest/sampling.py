"""What the comparison samples besides requests: a server's CPU, memory and metrics, the host.

- ``Endpoint``: a server under test, a local process (psutil on its process tree) or a
  target found at an address (its own ``process_*`` metrics, or the local process that
  listens on its port); ``sample`` takes one ``Tick``, ``describe`` reads its ModelConfig.
- ``Sampler``: ticks an endpoint (and the load generator) every ``SAMPLE_INTERVAL_S`` on a
  background thread (``interval_for`` a shorter window: more often), each tick with the server's
  ModelStatistics when given a ``StatisticsReader``.
- ``environment``: the measuring host (Python, packages, CPU, memory, GPUs).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import psutil

import client.metrics
from contract.protocol import inference_pb2 as pb
from contract.protocol import inference_pb2_grpc as pb_grpc
from loadtest.breakdown import flatten
from loadtest.stats import Tick
from serving import nvml
from serving.devices import cpu_model

SAMPLE_INTERVAL_S = 0.5
PACKAGES = ("grpcio", "protobuf", "locust", "gevent", "numpy", "psutil", "prometheus-client", "matplotlib")


def interval_for(window_s: float) -> float:
    """Seconds between ticks for a measuring window of ``window_s``: ``SAMPLE_INTERVAL_S``, or a
    sixth of a shorter window, so that a tick or two lost to a busy host still leaves the samples
    covering more than half of it (a step's validity check)."""
    return min(SAMPLE_INTERVAL_S, window_s / 6)


def scrape(url: str | None, model: str, timeout: float = client.metrics.SCRAPE_TIMEOUT_S) -> dict[str, float]:
    """The server's metrics for ``model`` (``client.metrics.scrape``), empty when there is no
    endpoint or it does not answer within ``timeout``: a sample without them is a gap, never a
    failed run."""
    try:
        return client.metrics.scrape(url, model, timeout)
    except OSError:
        return {}


def tree_cpu_rss(process: psutil.Process) -> tuple[float, float]:
    """Cumulative CPU seconds and RSS of a process and its live children."""
    cpu, rss = 0.0, 0.0
    for proc in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            cpu += times.user + times.system + times.children_user + times.children_system
            rss += proc.memory_info().rss
    return cpu, rss


def listener_pid(target: str) -> int | None:
    """The local process listening on ``target``'s port when its host is this machine's loopback, else None."""
    host, _, port = target.rpartition(":")
    if host.strip("[]") not in ("127.0.0.1", "localhost", "::1", "0.0.0.0") or not port.isdigit():
        return None
    with contextlib.suppress(psutil.Error, OSError):
        for connection in psutil.net_connections(kind="tcp"):
            if connection.status == psutil.CONN_LISTEN and connection.laddr and connection.laddr.port == int(port):
                return connection.pid
    return None


@dataclass
class Endpoint:
    """A server under test: gRPC target, metrics URL, and its process id when it runs here."""

    name: str
    target: str
    metrics_url: str | None
    model: str
    pid: int | None = None

    def sample(self, generator: psutil.Process | None) -> Tick:
        metrics = scrape(self.metrics_url, self.model)
        cpu = metrics.get("process_cpu_seconds_total")
        rss = metrics.get("process_resident_memory_bytes")
        if self.pid is not None:
            with contextlib.suppress(psutil.Error):
                cpu, rss = tree_cpu_rss(psutil.Process(self.pid))
        generator_cpu = None
        if generator is not None:
            with contextlib.suppress(psutil.Error):
                generator_cpu = tree_cpu_rss(generator)[0]
        host = psutil.cpu_times()
        runner = psutil.Process().cpu_times()
        return Tick(
            time.time(),
            cpu,
            rss,
            generator_cpu,
            metrics,
            host_cpu_s=host.user + host.nice + host.system + host.irq + host.softirq + host.steal,
            runner_cpu_s=runner.user + runner.system,
        )

    def describe(self, timeout: float = 30.0) -> dict[str, Any]:
        """Server metadata and the model's config (framework version, device, batching...) over gRPC.

        A server without ModelConfig (UNIMPLEMENTED) gets ``None`` for the config's fields.
        """
        with grpc.insecure_channel(self.target) as channel:
            grpc.channel_ready_future(channel).result(timeout=timeout)
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            server = stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10)
            try:
                config = stub.ModelConfig(pb.ModelConfigRequest(name=self.model), timeout=10).config
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                return {"server": {"name": server.name, "version": server.version}, "parameters": {}}
        batching = config.dynamic_batching if config.HasField("dynamic_batching") else None
        return {
            "server": {"name": server.name, "version": server.version},
            "platform": config.platform,
            "parameters": {key: value.string_value for key, value in config.parameters.items()},
            "max_batch_size": config.max_batch_size,
            "instances": sum(group.count for group in config.instance_group),
            "dynamic_batching": None
            if batching is None
            else {
                "max_queue_delay_us": batching.max_queue_delay_microseconds,
                "max_queue_size": batching.default_queue_policy.max_queue_size,
                "preferred_batch_sizes": list(batching.preferred_batch_size),
            },
        }


class StatisticsReader:
    """The server's ModelStatistics for the endpoint's model (``loadtest.breakdown.flatten``), over one
    connection kept open: empty when the server does not answer within ``timeout`` (a busy server's
    tick stays on time), and from then on once it answers UNIMPLEMENTED."""

    def __init__(self, endpoint: Endpoint, timeout: float = SAMPLE_INTERVAL_S) -> None:
        self.model = endpoint.model
        self.timeout = timeout
        self._channel = grpc.insecure_channel(endpoint.target)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._implemented = True

    def read(self) -> dict[str, float]:
        if not self._implemented:
            return {}
        try:
            reply = self._stub.ModelStatistics(pb.ModelStatisticsRequest(name=self.model), timeout=self.timeout)
        except grpc.RpcError as error:
            self._implemented = error.code() != grpc.StatusCode.UNIMPLEMENTED
            return {}
        return flatten(reply.model_stats)

    def __enter__(self) -> StatisticsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._channel.close()


class Sampler:
    """Samples an endpoint (and the generator) every ``interval`` seconds on a background thread;
    ``statistics`` (a ``StatisticsReader.read``), when given, fills each tick's ``statistics``."""

    def __init__(
        self,
        endpoint: Endpoint,
        interval: float = SAMPLE_INTERVAL_S,
        statistics: Callable[[], dict[str, float]] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.interval = interval
        self.statistics = statistics
        self.ticks: list[Tick] = []
        self.generator: psutil.Process | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def _sample(self) -> Tick:
        tick = self.endpoint.sample(self.generator)
        if self.statistics is not None:
            tick.statistics = self.statistics()
        return tick

    def _run(self) -> None:
        # On a fixed schedule, not an interval after each sample: the time a sample takes (longer
        # on a busy host) would stretch every interval, and a window would hold a tick fewer.
        # A late sample is followed at once by the next.
        due = time.monotonic()
        while True:
            self.ticks.append(self._sample())
            due = max(due + self.interval, time.monotonic())
            if self._stop.wait(due - time.monotonic()):
                break
        self.ticks.append(self._sample())

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _nvml_gpus() -> list[str]:
    return [gpu.device.name for gpu in nvml.all_gpus()]


def environment() -> dict[str, Any]:
    """The measuring host: Python, package versions, CPU, memory, GPUs."""
    versions = {}
    for name in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_available": sorted(os.sched_getaffinity(0)),
        "memory_total_bytes": psutil.virtual_memory().total,
        "gpus": _nvml_gpus(),
    }

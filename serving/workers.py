"""Several server processes behind one port: ``--workers N``.

One server process answers gRPC on one core's worth of Python (the GIL). With
``--workers N`` a supervisor process starts N workers: each is a whole server (its own
handler threads, batcher and model copy, on the same device) bound to the same port with
SO_REUSEPORT, so the kernel spreads *connections* over them (a client with one channel
lands on one worker; open several to spread its load). The supervisor:

- reserves the port (a bound, never listening SO_REUSEPORT socket: the workers share it,
  nobody else can take it), starts the workers with the same command line, and answers
  for the whole server: its port file, and the one metrics port, which totals every
  worker's figures from a table they share in memory (serving.metrics.MetricsTable) and
  exports the GPU's figures once (workers have no metrics port of their own);
- marks in a shared readiness table which workers serve: each worker's health says
  SERVING only while every worker serves (and ServerReady says the same);
- restarts a worker that dies (logged; health NOT_SERVING until it is back; its figures
  are kept, so totals never go backwards); fails the start as a whole (one line, exit 1)
  if a worker cannot load; on SIGTERM/SIGINT drains every worker and exits 0 when all did.

A worker learns its place from the ``OIP_WORKER`` environment variable:
``index,count,table,readiness`` (paths of the shared files).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from serving import nvml
from serving.metrics import MetricsTable, TableCollector, register_gpu_collector
from serving.settings import ServerSettings, StartupError

log = logging.getLogger(__name__)

WORKER_ENV = "OIP_WORKER"
POLL_S = 0.1
#: How long a worker may take to reach SERVING after the others did (slow starts are not failures).
START_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class WorkerPlace:
    """This process's place among the workers of one server."""

    index: int
    count: int
    table: Path
    readiness: Path

    @classmethod
    def from_environment(cls) -> WorkerPlace | None:
        value = os.environ.get(WORKER_ENV)
        if not value:
            return None
        index, count, table, readiness = value.split(",", 3)
        return cls(int(index), int(count), Path(table), Path(readiness))

    def encode(self) -> str:
        return f"{self.index},{self.count},{self.table},{self.readiness}"


class Readiness:
    """One flag per worker in a small shared file: 1 while that worker serves."""

    def __init__(self, path: Path, count: int) -> None:
        self.flags = np.memmap(str(path), dtype=np.int8, mode="r+" if path.exists() else "w+", shape=(count,))

    def set(self, index: int, ready: bool) -> None:
        self.flags[index] = 1 if ready else 0

    def all(self) -> bool:
        return bool(np.all(self.flags == 1))


def _reserve_port(host: str, port: int) -> socket.socket:
    """A bound SO_REUSEPORT socket on ``port`` (0: a free one), never listening."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    reserved = socket.socket(family, socket.SOCK_STREAM)
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        reserved.bind((host, port))
    except OSError as err:
        reserved.close()
        raise StartupError(f"--port {port}: cannot listen on {host}:{port} ({err.strerror or err})") from None
    return reserved


class WorkerProcesses(Collector):
    """CPU and memory of a server's processes: totals (``process_*``, as one server), and per
    worker (each holds its own CUDA context and model copy): resident memory, and GPU memory
    from two sources, each under its own name:

    - ``worker_gpu_memory_used_bytes``: NVML's figure for the worker's process (the whole
      process: CUDA context, libraries and allocator), summed over the GPUs. Where NVML's
      pids are not ours (a container with its own PID namespace) it has none to give
      (``serving.nvml.process_memory``): the series is absent, never 0;
    - ``worker_gpu_memory_framework_bytes``: what the worker's framework reports holding (its
      allocator's figure, without the CUDA context), published by the worker itself into the
      shared ``table`` (``ServerMetrics.bind_gpu_memory``): the figure that holds in containers.
    """

    def __init__(self, workers: Callable[[], list[tuple[int, int]]], table: MetricsTable | None = None) -> None:
        #: (worker index, pid) of the running workers.
        self.workers = workers
        self.table = table
        self.gpus = nvml.all_gpus()

    def collect(self) -> Iterator[Metric]:
        cpu = CounterMetricFamily("process_cpu_seconds", "User and system CPU of the server's processes.")
        rss = GaugeMetricFamily("process_resident_memory_bytes", "Resident memory of the server's processes.")
        worker_rss = GaugeMetricFamily("worker_resident_memory_bytes", "Resident memory per worker.", labels=["worker"])
        worker_gpu = GaugeMetricFamily(
            "worker_gpu_memory_used_bytes", "GPU memory per worker process (NVML).", labels=["worker"]
        )
        worker_framework = GaugeMetricFamily(
            "worker_gpu_memory_framework_bytes",
            "GPU memory per worker as its framework's allocator reports it (the CUDA context not included).",
            labels=["worker"],
        )
        gpu = nvml.process_memory(self.gpus)
        total_cpu, total_rss = 0.0, 0.0
        for index, pid in [(-1, os.getpid()), *self.workers()]:
            try:
                process = psutil.Process(pid)
                times, memory = process.cpu_times(), process.memory_info().rss
            except psutil.Error:
                continue
            total_cpu += times.user + times.system
            total_rss += memory
            if index >= 0:
                worker_rss.add_metric([str(index)], memory)
                if pid in gpu:
                    worker_gpu.add_metric([str(index)], gpu[pid])
                held = float(self.table.gpu_memory[index]) if self.table is not None else np.nan
                if not np.isnan(held):
                    worker_framework.add_metric([str(index)], held)
        cpu.add_metric([], total_cpu)
        rss.add_metric([], total_rss)
        yield from (cpu, rss, worker_rss, worker_gpu, worker_framework)

    def describe(self) -> Iterator[Metric]:
        return iter(())


def served_device(device: str) -> tuple[str, bool]:
    """The device the workers serve on, as the supervisor can tell it without loading a
    framework: ``--device`` itself, ``auto`` taken as ``cuda:0`` (the device both frameworks
    choose where they see a GPU). Second: whether that is a guess."""
    wanted = device.strip().lower()
    return ("cuda:0", True) if wanted == "auto" else (wanted, False)


class Supervisor:
    """Starts, watches and stops the workers of one server (see the module docstring)."""

    def __init__(self, settings: ServerSettings, count: int, command: Sequence[str]) -> None:
        self.settings = settings
        self.count = count
        self.command = list(command)
        self.processes: list[subprocess.Popen[bytes] | None] = [None] * count
        shared = "/dev/shm" if Path("/dev/shm").is_dir() else None  # memory, not disk
        self._dir = tempfile.TemporaryDirectory(prefix="oip-workers-", dir=shared)
        root = Path(self._dir.name)
        self.table_path, self.readiness_path = root / "metrics.table", root / "readiness"
        self.table = MetricsTable(settings.model, settings.max_batch_size, workers=count + 1, path=self.table_path)
        self.readiness = Readiness(self.readiness_path, count)
        self.port = 0
        self.restarts = 0
        self._stopping = threading.Event()

    def running(self) -> list[tuple[int, int]]:
        """(index, pid) of the workers started."""
        return [(index, process.pid) for index, process in enumerate(self.processes) if process is not None]

    def registry(self) -> CollectorRegistry:
        """The server's one metrics registry: every worker's figures from the shared table,
        their processes, and the GPU's figures, once (workers export none: no metrics port)."""
        registry = CollectorRegistry()
        registry.register(TableCollector(self.table))
        registry.register(WorkerProcesses(self.running, self.table))
        device, guessed = served_device(self.settings.device)
        register_gpu_collector(registry, device, quiet=guessed)
        return registry

    def _port_file(self, index: int) -> Path:
        return Path(self._dir.name) / f"worker-{index}.json"

    def _spawn(self, index: int) -> None:
        self._port_file(index).unlink(missing_ok=True)
        place = WorkerPlace(index, self.count, self.table_path, self.readiness_path)
        overrides = ["--workers", "1", "--port", str(self.port), "--metrics-port", "-1",
                     "--port-file", str(self._port_file(index))]  # fmt: skip
        if self.settings.model:  # as resolved for the whole server: every worker serves the same models
            overrides += ["--model", ",".join(self.settings.model)]
        self.processes[index] = subprocess.Popen(
            [*self.command, *overrides], env={**os.environ, WORKER_ENV: place.encode()}
        )

    def _retire(self, index: int) -> None:
        """A worker is gone: keep its counts (in the table's spare last row), drop its gauges."""
        layout = self.table.layout
        for model in self.table.models:
            rows = self.table.rows(model)
            gone = np.array(rows[index])
            gone[layout.inflight] = gone[layout.queue_depth] = 0
            rows[-1] += gone
            rows[-1][layout.last_inference_ms] = max(rows[-1][layout.last_inference_ms], gone[layout.last_inference_ms])
            rows[index] = 0
        self.table.gpu_memory[index] = np.nan

    def run(self) -> int:
        settings = self.settings
        reserved = _reserve_port(settings.host, settings.port)
        self.port = reserved.getsockname()[1]
        stop = threading.Event()
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
        metrics_http = None
        try:
            if settings.metrics_port >= 0:
                metrics_http, _ = start_http_server(settings.metrics_port, settings.host, registry=self.registry())
            print(f"listening on port {self.port} with {self.count} workers", flush=True)
            # The first worker alone first: it exports and compiles what the repository lacks,
            # which the others then find ready (no two processes write one artifact).
            self._spawn(0)
            started = self._wait_until_serving(stop, [0])
            if started:
                for index in range(1, self.count):
                    self._spawn(index)
                started = self._wait_until_serving(stop, range(self.count))
            if not started:
                self._terminate(0.0)
                return 1
            if settings.port_file:
                metrics_port = None if metrics_http is None else int(metrics_http.server_address[1])
                payload = {"port": self.port, "metrics_port": metrics_port, "workers": self.count,
                           "pids": [p.pid for p in self.processes if p]}  # fmt: skip
                tmp = settings.port_file.with_suffix(settings.port_file.suffix + ".tmp")
                tmp.write_text(json.dumps(payload))
                tmp.replace(settings.port_file)
            log.info("SERVING with %d workers on port %d", self.count, self.port)
            while not stop.wait(POLL_S):
                self._restart_dead()
            log.info("signal received: draining %d workers for up to %.1f s", self.count, settings.grace_period_s)
            return 0 if self._terminate(settings.grace_period_s) else 1
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if metrics_http is not None:
                metrics_http.shutdown()
                metrics_http.server_close()
            reserved.close()
            self._dir.cleanup()

    def _wait_until_serving(self, stop: threading.Event, indices: Sequence[int]) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all(self._port_file(i).exists() for i in indices):
            for index, process in enumerate(self.processes):
                if process is not None and process.poll() is not None:
                    reason = self._port_file(index).with_suffix(".error")
                    because = f": {reason.read_text().strip()}" if reason.exists() else ""
                    log.error("worker %d of %d failed to start (exit status %d)%s; stopping the others", index,
                              self.count, process.returncode, because)  # fmt: skip
                    return False
            if stop.is_set() or time.monotonic() > deadline:
                log.error("workers not SERVING (%s); stopping them", "signal" if stop.is_set() else "timed out")
                return False
            time.sleep(POLL_S)
        return True

    def _restart_dead(self) -> None:
        for index, process in enumerate(self.processes):
            if process is None or process.poll() is None:
                continue
            log.error("worker %d (pid %d) exited with status %d; restarting it", index, process.pid,
                      process.returncode)  # fmt: skip
            self.readiness.set(index, False)  # every worker's health: NOT_SERVING until it is back
            self._retire(index)
            self.restarts += 1
            self._spawn(index)

    def _terminate(self, grace: float) -> bool:
        """SIGTERM every worker; True when all exited 0 within the grace period (+2 s)."""
        started = [p for p in self.processes if p is not None]
        for process in started:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace + 2.0
        clean = True
        for process in started:
            try:
                process.wait(max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                log.error("worker pid %d did not stop in time; killing it", process.pid)
                process.kill()
                process.wait()
            clean = clean and process.returncode == 0
        return clean


def supervise(settings: ServerSettings, count: int) -> int:
    """Run ``count`` workers of this very command line (``sys.orig_argv``) behind one port."""
    return Supervisor(settings, count, [sys.executable, *sys.orig_argv[1:]]).run()

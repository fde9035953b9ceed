"""The comparison runner: identical Locust load against torch_server and tf_server.

``python -m loadtest compare`` starts each server in turn (same model, flags and
threads; the other one is stopped), records its cold start (spawn to SERVING) and
idle memory, then runs the same scenarios against it: a closed-loop concurrency
sweep (N users, no think time) and an open-loop arrival-rate sweep (latency
measured from the scheduled send time). With ``--torch-target``/``--tf-target``
it loads servers that already run (e.g. the compose deployment) instead.

Each step is one Locust run of ``warm-up + window + tail`` seconds. The window is
placed after the first request by the warm-up, on the wall clock that Locust's
per-request start stamps, the resource sampler and the metric scrapes share:

* latency percentiles: exact, from the requests *sent* in the window (successes);
* throughput: successes *completed* in the window, per second;
* server CPU/RSS (psutil on the server's process tree, or its own ``process_*``
  metrics when remote), GPU (the server's NVML metrics) and generator CPU are
  sampled every ``SAMPLE_INTERVAL_S``; queue/compute time and mean batch size are
  differences of the server's Prometheus counters between the scrapes that
  bracket the window.

A step is invalid (kept, flagged, left out of the verdict) when the generator's
CPU exceeds ``GENERATOR_CPU_LIMIT`` of its core, errors exceed ``ERROR_RATE_LIMIT``,
the generator fell behind the open-loop schedule (too few sends, or a p99 send lag
over ``SEND_LAG_LIMIT_MS``), other processes on the host used more than
``OTHER_CPU_LIMIT`` of a core (local runs), or the window was cut short.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.metadata
import itertools
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
from prometheus_client.parser import text_string_to_metric_families

from contract.protocol import inference_pb2 as pb
from contract.protocol import inference_pb2_grpc as pb_grpc
from loadtest.servers import ROOT, ServerProcess, ServerStartError, pin_to
from serving.devices import cpu_model

FRAMEWORKS = ("torch", "tensorflow")
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
SAMPLE_INTERVAL_S = 0.5
TAIL_S = 1.0
LOCUST_GRACE_S = 30.0
GENERATOR_CPU_LIMIT = 0.90
ERROR_RATE_LIMIT = 0.01
SEND_LAG_LIMIT_MS = 10.0
OTHER_CPU_LIMIT = 0.25
MIN_WINDOW_FRACTION = 0.8
QUANTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99.9": 99.9}
CDF_LEVELS = np.unique(np.concatenate([np.linspace(0.0, 1.0, 101), [0.95, 0.99, 0.995, 0.999, 0.9999]]))
PACKAGES = ("grpcio", "protobuf", "locust", "gevent", "numpy", "psutil", "prometheus-client", "matplotlib")


# ---------------------------------------------------------------- pure parts


@dataclass
class Samples:
    """Per-request records of one Locust run (as ``read_latencies`` returns them)."""

    start_s: np.ndarray
    latency_us: np.ndarray
    ok: np.ndarray
    lag_us: np.ndarray

    @property
    def end_s(self) -> np.ndarray:
        return self.start_s + self.latency_us / 1e6


def read_latencies(prefix: Path) -> Samples:
    """Merge the ``<prefix>.<pid>[.<n>].npz`` files that ``--latency-file <prefix>`` makes Locust write.

    Their arrays (see ``loadtest.grpc_user.LatencyRecorder``, not imported here: it would
    monkey-patch this process with gevent): ``start_us`` (Unix µs, scheduled or sent),
    ``latency_us`` (-1: never sent, e.g. an open-loop arrival dropped by the generator), ``ok``,
    ``lag_us`` (actual minus scheduled send time; 0 in closed loop, -1 if never sent).
    """
    parts: dict[str, list[np.ndarray]] = {"start_us": [], "latency_us": [], "ok": [], "lag_us": []}
    for path in sorted(prefix.parent.glob(f"{prefix.name}.*.npz")):
        with np.load(path) as data:
            for name, arrays in parts.items():
                arrays.append(data[name])
    if not parts["start_us"]:
        raise FileNotFoundError(f"no {prefix}.*.npz latency file")
    start_us, latency_us, ok, lag_us = (np.concatenate(arrays) for arrays in parts.values())
    sent = latency_us >= 0
    return Samples(
        start_us / 1e6, np.maximum(latency_us, 0).astype(np.float64), ok.astype(bool) & sent, np.maximum(lag_us, 0)
    )


def percentiles(values_ms: np.ndarray) -> dict[str, float | None]:
    """Nearest-rank p50/p90/p99/p99.9 plus mean and max of exact per-request latencies."""
    if len(values_ms) == 0:
        return dict.fromkeys([*QUANTILES, "max", "mean"])
    ranked = np.percentile(values_ms, list(QUANTILES.values()), method="inverted_cdf")
    stats = {name: float(value) for name, value in zip(QUANTILES, ranked, strict=True)}
    return {**stats, "max": float(np.max(values_ms)), "mean": float(np.mean(values_ms))}


def latency_cdf(values_ms: np.ndarray) -> list[list[float]]:
    """``[[latency_ms, fraction ≤ it], ...]`` at fixed levels (dense in the tail), for plots."""
    if len(values_ms) == 0:
        return []
    points = np.quantile(values_ms, CDF_LEVELS, method="inverted_cdf")
    return [[round(float(ms), 4), round(float(level), 5)] for ms, level in zip(points, CDF_LEVELS, strict=True)]


def window_stats(samples: Samples, start: float, end: float, batch_size: int) -> dict[str, Any]:
    """Request figures of the window [start, end): latencies of requests sent in it, throughput of completions."""
    seconds = end - start
    sent = (samples.start_s >= start) & (samples.start_s < end)
    ok_latency_ms = samples.latency_us[sent & samples.ok] / 1000.0
    lag_ms = samples.lag_us[sent] / 1000.0
    ends = samples.end_s
    completed = int(np.count_nonzero(samples.ok & (ends >= start) & (ends < end)))
    requests = int(np.count_nonzero(sent))
    errors = requests - len(ok_latency_ms)
    return {
        "window_s": round(seconds, 3),
        "requests": requests,
        "successes": len(ok_latency_ms),
        "errors": errors,
        "error_rate": errors / requests if requests else None,
        "sent_rps": requests / seconds,
        "throughput_rps": completed / seconds,
        "rows_per_s": completed * batch_size / seconds,
        "latency_ms": percentiles(ok_latency_ms),
        "latency_cdf": latency_cdf(ok_latency_ms),
        "send_lag_ms": {"p99": percentiles(lag_ms)["p99"], "max": float(lag_ms.max()) if len(lag_ms) else None},
    }


def parse_metrics(text: str, model: str) -> dict[str, float]:
    """Prometheus text -> ``{'name{label="v"}': value}`` for ``model``'s series and unlabelled ones.

    The ``model`` label is dropped, histogram buckets and ``_created`` stamps are skipped.
    """
    flat: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = dict(sample.labels)
            if "le" in labels or sample.name.endswith("_created") or labels.pop("model", model) != model:
                continue
            rendered = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
            key = f"{sample.name}{{{rendered}}}" if rendered else sample.name
            flat[key] = flat.get(key, 0.0) + sample.value
    return flat


def _ratio(numerator: float, denominator: float, scale: float = 1.0) -> float | None:
    return numerator / denominator * scale if denominator > 0 else None


def metric_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Server-side breakdown between two scrapes: mean queue/compute/request time, mean batch size, counts."""

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    codes = {
        key.split('code="', 1)[1].rstrip('"}'): delta(key)
        for key in after
        if key.startswith("inference_requests_total{")
    }
    return {
        "queue_ms_mean": _ratio(
            delta("inference_queue_duration_seconds_sum"), delta("inference_queue_duration_seconds_count"), 1e3
        ),
        "compute_ms_mean": _ratio(
            delta("inference_compute_duration_seconds_sum"), delta("inference_compute_duration_seconds_count"), 1e3
        ),
        "request_ms_mean": _ratio(
            delta("inference_request_duration_seconds_sum"), delta("inference_request_duration_seconds_count"), 1e3
        ),
        "batch_size_mean": _ratio(delta("inference_batch_size_sum"), delta("inference_batch_size_count")),
        "executions": delta("inference_executions_total"),
        "rows": delta("inference_rows_total"),
        "requests_by_code": {code: count for code, count in codes.items() if count},
    }


@dataclass
class Tick:
    """One resource sample: wall time, cumulative CPU seconds, RSS, the server's metrics.

    ``host_cpu_s`` counts the busy time of all cores and ``runner_cpu_s`` this process's own,
    so that what neither the server, the generator nor the runner used is other processes' load.
    """

    t: float
    server_cpu_s: float | None
    server_rss: float | None
    generator_cpu_s: float | None
    metrics: dict[str, float] = field(default_factory=dict)
    host_cpu_s: float | None = None
    runner_cpu_s: float | None = None

    @property
    def other_cpu_s(self) -> float | None:
        parts = (self.host_cpu_s, self.runner_cpu_s, self.server_cpu_s, self.generator_cpu_s)
        if any(part is None for part in parts):
            return None
        host, runner, server, generator = (float(part or 0.0) for part in parts)
        return host - runner - server - generator


def _bracket(ticks: Sequence[Tick], start: float, end: float) -> list[Tick]:
    """The ticks from the last one at or before ``start`` to the first one at or after ``end``."""
    first = max((i for i, tick in enumerate(ticks) if tick.t <= start), default=0)
    last = min((i for i, tick in enumerate(ticks) if tick.t >= end), default=len(ticks) - 1)
    return list(ticks[first : last + 1])


def _cpu_pct(ticks: Sequence[Tick], read: Callable[[Tick], float | None]) -> dict[str, float | None]:
    points = [(tick.t, value) for tick in ticks if (value := read(tick)) is not None]
    if len(points) < 2:
        return {"mean": None, "max": None}
    rates = [100.0 * (c1 - c0) / (t1 - t0) for (t0, c0), (t1, c1) in itertools.pairwise(points) if t1 > t0]
    (t_first, c_first), (t_last, c_last) = points[0], points[-1]
    return {"mean": 100.0 * (c_last - c_first) / (t_last - t_first), "max": max(rates)}


def _gauge(ticks: Sequence[Tick], read: Callable[[Tick], float | None]) -> dict[str, float | None]:
    values = [value for tick in ticks if (value := read(tick)) is not None]
    return {"mean": float(np.mean(values)), "max": max(values)} if values else {"mean": None, "max": None}


def _series(prefix: str) -> Callable[[Tick], float | None]:
    def read(tick: Tick) -> float | None:
        values = [value for key, value in tick.metrics.items() if key.startswith(prefix)]
        return sum(values) / len(values) if values else None

    return read


def resource_stats(ticks: Sequence[Tick], start: float, end: float) -> dict[str, Any]:
    """CPU (% of one core), RSS, GPU and the metric breakdown over the ticks bracketing [start, end)."""
    span = _bracket(ticks, start, end)
    other = _cpu_pct(span, lambda tick: tick.other_cpu_s)
    gpu_util = _gauge(span, _series("gpu_utilization_ratio"))
    gpu_memory = _gauge(span, _series("gpu_memory_used_bytes"))
    return {
        "server_cpu_pct": _cpu_pct(span, lambda tick: tick.server_cpu_s),
        "server_rss_bytes": _gauge(span, lambda tick: tick.server_rss),
        "generator_cpu_pct": _cpu_pct(span, lambda tick: tick.generator_cpu_s),
        # A difference of separately sampled counters: clamp the noise below zero.
        "other_cpu_pct": {k: v if v is None else max(v, 0.0) for k, v in other.items()},
        "gpu": None
        if gpu_util["mean"] is None
        else {"utilization_pct_mean": 100.0 * gpu_util["mean"], "memory_used_bytes_max": gpu_memory["max"]},
        "server_metrics": metric_deltas(span[0].metrics, span[-1].metrics) if span else metric_deltas({}, {}),
    }


def invalid_reasons(step: dict[str, Any], *, local: bool = True) -> list[str]:
    """Why a measured step cannot be trusted (empty: valid).

    ``local``: server, generator and runner share this host, so any other busy CPU is a
    neighbour's (with a remote server it may be the server itself, and is not judged).
    """
    reasons = []
    generator = step["generator_cpu_pct"]["mean"]
    if generator is not None and generator > GENERATOR_CPU_LIMIT * 100:  # one Locust process: one core at most
        reasons.append(f"generator CPU {generator:.0f}% > {GENERATOR_CPU_LIMIT * 100:.0f}%")
    other = step["other_cpu_pct"]["mean"]
    if local and other is not None and other > OTHER_CPU_LIMIT * 100:
        reasons.append(f"other processes used {other:.0f}% CPU (> {OTHER_CPU_LIMIT * 100:.0f}%)")
    if step["error_rate"] is None or step["successes"] == 0:
        reasons.append("no successful request in the window")
    elif step["error_rate"] > ERROR_RATE_LIMIT:
        reasons.append(f"error rate {step['error_rate']:.1%} > {ERROR_RATE_LIMIT:.0%}")
    if step["generator_exit_code"] < 0:
        reasons.append("Locust did not stop in time and was killed")
    if step["window_s"] < MIN_WINDOW_FRACTION * step["window_target_s"]:
        reasons.append(f"window cut to {step['window_s']:.1f} s")
    if step["mode"] == "open":
        expected = step["offered_rps"] * step["window_s"]
        if step["requests"] < 0.9 * expected - 3 * math.sqrt(expected):
            reasons.append(f"generator behind schedule: sent {step['sent_rps']:.0f}/s of {step['offered_rps']:.0f}/s")
        lag = step["send_lag_ms"]["p99"]
        if lag is not None and lag > SEND_LAG_LIMIT_MS:
            reasons.append(f"generator send lag p99 {lag:.0f} ms > {SEND_LAG_LIMIT_MS:g} ms")
    return reasons


def parse_list(text: str, kind: Callable[[str], Any]) -> list[Any]:
    """``"1, 4,16"`` -> ``[1, 4, 16]`` (with ``kind`` applied)."""
    return [kind(part.strip()) for part in text.split(",") if part.strip()]


def cpu_split(mode: str, available: Sequence[int]) -> tuple[list[int] | None, list[int] | None]:
    """(server cpus, generator cpus): ``auto`` gives the server the first half, Locust the rest."""
    cpus = sorted(available)
    if mode == "none" or len(cpus) < 2:
        return None, None
    half = len(cpus) // 2
    return cpus[:half], cpus[half:]


# ---------------------------------------------------------------- measuring


@dataclass
class Scenario:
    """One step's load: ``closed`` with ``value`` users, or ``open`` at ``value`` requests/s."""

    mode: str
    value: float

    @property
    def label(self) -> str:
        return f"c={self.value:g}" if self.mode == "closed" else f"rate={self.value:g}/s"


@dataclass
class Options:
    """The comparison's settings (the CLI flags)."""

    model: str = "mlp"
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16, 32])
    rates: list[float] = field(default_factory=list)
    rate_fractions: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.9, 1.2])
    arrival: str = "poisson"
    arrival_users: int = 4
    deadline_ms: float = 1000.0
    step_seconds: float = 4.0
    warmup_seconds: float = 1.5
    repeats: int = 2
    slo_ms: float = 50.0
    batch_size: int = 1
    encoding: str = "raw"
    threads: int = 1
    server_args: list[str] = field(default_factory=list)
    torch_target: str | None = None
    tf_target: str | None = None
    torch_metrics: str | None = None
    tf_metrics: str | None = None
    out: Path | None = None
    cpu_split: str = "auto"

    @property
    def remote(self) -> bool:
        return bool(self.torch_target or self.tf_target)

    @property
    def reference_concurrency(self) -> int:
        """The sweep's middle concurrency: where single-step figures (p50/p99, CPU/request, CDF) are compared."""
        ordered = sorted(self.concurrency)
        return ordered[len(ordered) // 2]

    def server_args_for_all(self) -> list[str]:
        return ["--threads", str(self.threads), *self.server_args]


def progress(message: str) -> None:
    """One progress line on stderr."""
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def _tree_cpu_rss(process: psutil.Process) -> tuple[float, float]:
    """Cumulative CPU seconds and RSS of a process and its live children."""
    cpu, rss = 0.0, 0.0
    for proc in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            cpu += times.user + times.system + times.children_user + times.children_system
            rss += proc.memory_info().rss
    return cpu, rss


def scrape(url: str | None, model: str) -> dict[str, float]:
    """The server's metrics for ``model`` (empty when there is no endpoint or it does not answer)."""
    if url is None:
        return {}
    try:
        with urllib.request.urlopen(url, timeout=2.0) as reply:
            return parse_metrics(reply.read().decode(), model)
    except OSError:
        return {}


@dataclass
class Endpoint:
    """A server under test: a local process (psutil figures) or a remote target (its own metrics)."""

    framework: str
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
                cpu, rss = _tree_cpu_rss(psutil.Process(self.pid))
        generator_cpu = None
        if generator is not None:
            with contextlib.suppress(psutil.Error):
                generator_cpu = _tree_cpu_rss(generator)[0]
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

    def describe(self) -> dict[str, Any]:
        """Server metadata and the model's config (framework version, device, batching) over gRPC."""
        with grpc.insecure_channel(self.target) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            server = stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10)
            config = stub.ModelConfig(pb.ModelConfigRequest(name=self.model), timeout=10).config
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


class Sampler:
    """Samples an endpoint (and the generator) every ``SAMPLE_INTERVAL_S`` on a background thread."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.ticks: list[Tick] = []
        self.generator: psutil.Process | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def _run(self) -> None:
        while True:
            self.ticks.append(self.endpoint.sample(self.generator))
            if self._stop.wait(SAMPLE_INTERVAL_S):
                break
        self.ticks.append(self.endpoint.sample(self.generator))

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def locust_command(
    endpoint: Endpoint, scenario: Scenario, opts: Options, run_s: int, latencies: Path, stats: Path
) -> list[str]:
    """One step's ``locust`` command: latencies to ``<latencies>.*.npz``, CSV stats to ``<stats>_*.csv``."""
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-t", f"{run_s}s", "--stop-timeout", "5",
        "--host", endpoint.target, "--csv", str(stats), "--only-summary", "--loglevel", "WARNING",
        "--model", endpoint.model, "--batch-size", str(opts.batch_size), "--encoding", opts.encoding,
        "--deadline-ms", f"{opts.deadline_ms:g}", "--latency-file", str(latencies),
    ]  # fmt: skip
    if scenario.mode == "open":
        command += ["--load-shape", "rate", "--arrival-rate", f"{scenario.value:g}", "--arrival", opts.arrival,
                    "--arrival-users", str(opts.arrival_users)]  # fmt: skip
    else:
        users = str(int(scenario.value))
        command += ["--load-shape", "none", "-u", users, "-r", users]
    return command


def run_locust(
    endpoint: Endpoint, scenario: Scenario, opts: Options, *, cpus: list[int] | None, latencies: Path, artifacts: Path
) -> tuple[Samples, list[Tick], int]:
    """One Locust run of warm-up + window + tail against ``endpoint``, sampled throughout.

    Latency files go to ``<latencies>.*.npz``; Locust's log and CSV stats are kept as ``<artifacts>.*``.

    Returns the latencies, the resource ticks and Locust's exit status (1 when any request
    failed; negative when it had to be killed for not stopping in time).
    """
    run_s = math.ceil(opts.warmup_seconds + opts.step_seconds + TAIL_S)
    log_path = Path(f"{artifacts}.locust.log")
    with Sampler(endpoint) as sampler, log_path.open("wb") as log:
        process = subprocess.Popen(
            locust_command(endpoint, scenario, opts, run_s, latencies, artifacts),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            preexec_fn=pin_to(cpus),  # noqa: PLW1509 - only sched_setaffinity
        )
        with contextlib.suppress(psutil.Error):
            sampler.generator = psutil.Process(process.pid)
        try:
            process.wait(timeout=run_s + LOCUST_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    try:
        return read_latencies(latencies), sampler.ticks, process.returncode
    except FileNotFoundError as err:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"locust wrote no latencies (exit {process.returncode}):\n{tail}") from err


def measure_step(
    endpoint: Endpoint,
    scenario: Scenario,
    opts: Options,
    repeat: int,
    *,
    cpus: list[int] | None,
    workdir: Path,
    logs: Path,
) -> dict[str, Any]:
    """Run one step and reduce it to its figures (see the module docstring for the window)."""
    name = f"{endpoint.framework}-r{repeat}-{scenario.mode}-{scenario.value:g}"
    samples, ticks, exit_code = run_locust(
        endpoint, scenario, opts, cpus=cpus, latencies=workdir / f"{name}.latency", artifacts=logs / name
    )
    if len(samples.start_s):
        start = float(samples.start_s.min()) + opts.warmup_seconds
        end = min(start + opts.step_seconds, float(samples.end_s.max()))
    else:
        start = end = time.time()
    step: dict[str, Any] = {
        "repeat": repeat,
        "mode": scenario.mode,
        "concurrency": int(scenario.value) if scenario.mode == "closed" else None,
        "offered_rps": scenario.value if scenario.mode == "open" else None,
        "window_target_s": opts.step_seconds,
        **window_stats(samples, start, max(end, start + 1e-9), opts.batch_size),
        **resource_stats(ticks, start, end),
    }
    step["generator_exit_code"] = exit_code
    step["invalid_reasons"] = invalid_reasons(step, local=not opts.remote)
    step["valid"] = not step["invalid_reasons"]
    return step


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def report_step(framework: str, repeat: int, opts: Options, scenario: Scenario, step: dict[str, Any]) -> None:
    verdict = "valid" if step["valid"] else "INVALID: " + "; ".join(step["invalid_reasons"])
    progress(
        f"{framework} r{repeat + 1}/{opts.repeats} {scenario.mode} {scenario.label}: "
        f"{step['throughput_rps']:.1f} req/s (sent {step['sent_rps']:.1f}/s), "
        f"p99 {_fmt(step['latency_ms']['p99'], '.2f', ' ms')}, errors {step['errors']}, "
        f"server CPU {_fmt(step['server_cpu_pct']['mean'], '.0f', '%')}, "
        f"generator CPU {_fmt(step['generator_cpu_pct']['mean'], '.0f', '%')}, "
        f"other CPU {_fmt(step['other_cpu_pct']['mean'], '.0f', '%')} - {verdict}"
    )


def peak_throughput(steps: Sequence[dict[str, Any]]) -> float:
    """Highest closed-loop throughput of a sweep, preferring valid steps."""
    closed = [step for step in steps if step["mode"] == "closed"]
    pool = [step for step in closed if step["valid"]] or closed
    return max((step["throughput_rps"] for step in pool), default=0.0)


def sweep(
    endpoint: Endpoint,
    record: dict[str, Any],
    opts: Options,
    repeat: int,
    *,
    cpus: list[int] | None,
    workdir: Path,
    logs: Path,
) -> None:
    """One repeat against one server: the closed-loop sweep, then the open-loop one.

    Open-loop rates not given are fixed on the first repeat from this server's peak and kept after.
    """

    def run(scenario: Scenario) -> dict[str, Any]:
        step = measure_step(endpoint, scenario, opts, repeat, cpus=cpus, workdir=workdir, logs=logs)
        report_step(endpoint.framework, repeat, opts, scenario, step)
        record["steps"].append(step)
        return step

    closed = [run(Scenario("closed", users)) for users in opts.concurrency]
    if not record["rates"]:
        peak = peak_throughput(closed)
        record["rates"] = [round(max(fraction * peak, 1.0), 1) for fraction in opts.rate_fractions]
        progress(f"{endpoint.framework}: open-loop rates {record['rates']} req/s from peak {peak:.1f} req/s")
    for rate in record["rates"]:
        run(Scenario("open", rate))


@contextlib.contextmanager
def _server(
    framework: str, opts: Options, cpus: list[int] | None, logs: Path, repeat: int
) -> Iterator[tuple[Endpoint, dict[str, Any]]]:
    """The endpoint of one repeat: a fresh local server (cold start, idle RSS measured) or the remote target."""
    if opts.remote:
        target = opts.torch_target if framework == "torch" else opts.tf_target
        metrics = opts.torch_metrics if framework == "torch" else opts.tf_metrics
        assert target is not None
        endpoint = Endpoint(framework, target, metrics, opts.model)
        yield endpoint, {"repeat": repeat, "cold_start_s": None, "idle_rss_bytes": endpoint.sample(None).server_rss}
        return
    server = ServerProcess(
        framework, opts.model, opts.server_args_for_all(), cpus=cpus, log_path=logs / f"{framework}-r{repeat}.log"
    )
    try:
        server.start()
        endpoint = Endpoint(framework, server.target, server.metrics_url, opts.model, pid=server.pid)
        time.sleep(1.0)
        start = {
            "repeat": repeat,
            "cold_start_s": server.cold_start_s,
            "idle_rss_bytes": endpoint.sample(None).server_rss,
        }
        progress(
            f"{framework} r{repeat + 1}/{opts.repeats}: SERVING after {server.cold_start_s:.2f} s, "
            f"idle RSS {_fmt((start['idle_rss_bytes'] or 0) / 2**20, '.0f', ' MiB')}"
        )
        yield endpoint, start
    finally:
        server.close()


@contextlib.contextmanager
def _runner_pinned(cpus: list[int] | None) -> Iterator[None]:
    """Keep the runner itself (sampler, scrapes) off the server's cores for the duration."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _nvml_gpus() -> list[str]:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no NVML library or no driver: a CPU-only host
        return []
    try:
        return [
            str(pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i)))
            for i in range(pynvml.nvmlDeviceGetCount())
        ]
    finally:
        pynvml.nvmlShutdown()


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


def run_comparison(opts: Options, command: Sequence[str] = ()) -> dict[str, Any]:
    """Measure both servers with identical scenarios; the results document that ``report`` renders."""
    out = opts.out or Path("reports") / f"{datetime.datetime.now():%Y%m%d-%H%M%S}"
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    server_cpus, generator_cpus = cpu_split(opts.cpu_split, sorted(os.sched_getaffinity(0)))
    if opts.remote:
        server_cpus = None  # not ours to pin; Locust and the runner still keep to their half
    started = time.time()
    servers: dict[str, dict[str, Any]] = {
        framework: {"starts": [], "steps": [], "rates": list(opts.rates)} for framework in FRAMEWORKS
    }
    progress(
        f"comparing {' vs '.join(FRAMEWORKS)} on {opts.model}: {len(opts.concurrency)} concurrencies + "
        f"{len(opts.rates or opts.rate_fractions)} rates x {opts.repeats} repeats, "
        f"{opts.warmup_seconds:g}+{opts.step_seconds:g} s per step; "
        f"server cpus {server_cpus}, locust cpus {generator_cpus}"
    )
    failures: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="compare-") as tmp, _runner_pinned(generator_cpus):
        for repeat in range(opts.repeats):
            for framework in FRAMEWORKS:
                record = servers[framework]
                try:
                    with _server(framework, opts, server_cpus, logs, repeat) as (endpoint, start):
                        record["starts"].append(start)
                        record.setdefault("target", endpoint.target)
                        record.setdefault("metrics_url", endpoint.metrics_url)
                        record.setdefault("model_config", endpoint.describe())
                        sweep(endpoint, record, opts, repeat, cpus=generator_cpus, workdir=Path(tmp), logs=logs)
                except (ServerStartError, RuntimeError, grpc.RpcError, grpc.FutureTimeoutError) as err:
                    failures.append({"server": framework, "repeat": repeat, "error": str(err)})
                    progress(f"{framework} r{repeat + 1}/{opts.repeats}: FAILED, going on: {err}")
    settings = {
        key: str(value) if isinstance(value, Path) else value for key, value in dataclasses.asdict(opts).items()
    }
    return {
        "meta": {
            "started": datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
            "duration_s": round(time.time() - started, 1),
            "command": " ".join(command),
            "out": str(out),
        },
        "settings": {
            **settings,
            "mode": "remote" if opts.remote else "local",
            "server_args_for_all": opts.server_args_for_all(),
            "reference_concurrency": opts.reference_concurrency,
            "pinning": {"mode": opts.cpu_split, "server_cpus": server_cpus, "generator_cpus": generator_cpus},
            "limits": {
                "generator_cpu_pct": GENERATOR_CPU_LIMIT * 100,
                "other_cpu_pct": OTHER_CPU_LIMIT * 100,
                "send_lag_p99_ms": SEND_LAG_LIMIT_MS,
                "error_rate": ERROR_RATE_LIMIT,
                "min_window_fraction": MIN_WINDOW_FRACTION,
            },
            "sample_interval_s": SAMPLE_INTERVAL_S,
            "tail_s": TAIL_S,
        },
        "environment": environment(),
        "servers": servers,
        "failures": failures,
    }


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``compare`` flags."""
    defaults = Options()
    arg = parser.add_argument
    arg("--model", default=defaults.model, help="zoo model served by both (default: %(default)s)")
    arg("--concurrency", default="1,4,16,32", help="closed-loop users per step, comma-separated (default: %(default)s)")
    arg("--rates", default="", help="open-loop arrival rates, req/s, comma-separated (default: from --rate-fractions)")
    arg("--rate-fractions", default="0.25,0.5,0.9,1.2", help="open-loop rates as fractions of each server's peak "
        "closed-loop throughput, when --rates is not given (default: %(default)s)")  # fmt: skip
    arg("--arrival", choices=["poisson", "fixed"], default=defaults.arrival, help="open-loop arrivals (%(default)s)")
    arg("--arrival-users", type=int, default=defaults.arrival_users,
        help="open-loop streams the rate is split over (default: %(default)s)")  # fmt: skip
    arg("--step-seconds", type=float, default=defaults.step_seconds, help="measured window per step (%(default)s)")
    arg("--warmup-seconds", type=float, default=defaults.warmup_seconds,
        help="discarded load before each window (%(default)s)")  # fmt: skip
    arg("--repeats", type=int, default=defaults.repeats, help="repeats of everything, for the spread (%(default)s)")
    arg("--slo-ms", type=float, default=defaults.slo_ms, help="p99 latency objective, ms (%(default)s)")
    arg("--batch-size", type=int, default=defaults.batch_size, help="rows per request (%(default)s)")
    arg("--deadline-ms", type=float, default=defaults.deadline_ms,
        help="per-request deadline; open loop: from the scheduled send time (%(default)s)")  # fmt: skip
    arg("--encoding", choices=["raw", "typed"], default=defaults.encoding, help="request tensors (%(default)s)")
    arg("--threads", type=int, default=defaults.threads, help="--threads of both servers (%(default)s)")
    arg("--server-arg", action="append", default=[], dest="server_args", metavar="ARG",
        help="extra flag for both servers, repeatable (e.g. --server-arg=--max-batch-size=16)")  # fmt: skip
    arg("--torch-target", help="HOST:PORT of a running torch_server (with --tf-target: start nothing)")
    arg("--tf-target", help="HOST:PORT of a running tf_server")
    arg("--torch-metrics", help="metrics URL of the running torch_server")
    arg("--tf-metrics", help="metrics URL of the running tf_server")
    arg("--out", type=Path, help="report folder (default: reports/<timestamp>)")
    arg("--cpu-split", choices=["auto", "none"], default=defaults.cpu_split,
        help="auto: pin the server to the first half of the cores and Locust to the rest (%(default)s)")  # fmt: skip


def options_from(args: argparse.Namespace) -> Options:
    """Validated ``Options`` from parsed flags; ``ValueError`` on bad combinations."""
    if bool(args.torch_target) != bool(args.tf_target):
        raise ValueError("--torch-target and --tf-target go together")
    opts = Options(
        **{key: value for key, value in vars(args).items() if key in {f.name for f in dataclasses.fields(Options)}}
        | {
            "concurrency": parse_list(args.concurrency, int),
            "rates": parse_list(args.rates, float),
            "rate_fractions": parse_list(args.rate_fractions, float),
        }
    )
    if not opts.concurrency or min(opts.concurrency) < 1:
        raise ValueError("--concurrency needs positive user counts")
    if opts.repeats < 1 or opts.step_seconds <= 0 or opts.warmup_seconds < 0:
        raise ValueError("--repeats >= 1, --step-seconds > 0 and --warmup-seconds >= 0 are required")
    return opts


def main(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run the comparison (``argv``: its command line, recorded) and write the report; the exit status."""
    from loadtest.report import write_report

    try:
        opts = options_from(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results = run_comparison(opts, ["python", "-m", "loadtest", *argv])
    out = Path(results["meta"]["out"])
    write_report(results, out)
    progress(f"report: {out / 'report.html'} (also report.md, results.json, *.png)")
    return 0

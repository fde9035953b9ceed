"""One step of a comparison: one Locust run against one server, sampled, reduced to its figures.

A step is ``warm-up + window + tail`` seconds of one scenario (closed loop: N users; open loop:
an arrival rate) against a server that ``serving`` provides for a (phase, repeat): a fresh local
process (its cold start and idle RSS recorded) or a running target. ``measure_step`` runs it
(``run_locust``: Locust in a child process, pinned to the generator's cores, with as many Locust
processes as the generator's measured cost per request calls for) and reduces the latencies and
resource samples inside the window to the step's figures and validity (``loadtest.compare.run``'s
docstring tells the window and the validity rules).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil

from loadtest.breakdown import step_breakdown
from loadtest.cli import progress
from loadtest.compare.plan import Arm, Options, Scenario, invalid_reasons, locust_processes
from loadtest.sampling import Endpoint, Sampler, StatisticsReader, interval_for, listener_pid
from loadtest.servers import ROOT, ServerProcess, ServerStartError, pinned
from loadtest.stats import errors_text, resource_stats, window_stats
from loadtest.users.latency_file import Samples, read_latencies

LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
TAIL_S = 0.5
LOCUST_GRACE_S = 30.0
#: What a phase catches from one server's run, records as a failure of that (phase, repeat), and goes on after.
RUN_FAILURES: tuple[type[BaseException], ...] = (ServerStartError, RuntimeError, grpc.RpcError, grpc.FutureTimeoutError)
#: Seconds a fresh server idles after SERVING before its idle RSS is read (warm-up is done by then).
IDLE_S = 0.5
#: Generator CPU per request assumed until a step has measured it (µs; see loadtest.tools.overhead).
GENERATOR_US_PER_REQUEST = 300.0


def path_name(name: str) -> str:
    """``name`` (e.g. ``torch[precision=bf16,compile=on]-closed-r0``) as a plain file name: no
    separators, no characters that glob patterns (ours, TensorFlow's) would take as syntax."""
    return re.sub(r"[^A-Za-z0-9._=,-]+", "_", name)


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


#: Outstanding requests per open-loop stream the generator allows at least (Locust's own default).
MIN_IN_FLIGHT = 1000


def max_in_flight(rate: float, streams: int, deadline_ms: float) -> int:
    """Outstanding requests an open-loop stream may hold: every request of one deadline (a server that queues
    up to the deadline holds ``rate x deadline`` of them), with half as much again for Poisson bursts. Fewer
    would make the generator drop arrivals where the server is merely slow, and the step invalid."""
    return max(MIN_IN_FLIGHT, math.ceil(1.5 * rate / streams * deadline_ms / 1000) + 16)


def locust_command(
    endpoint: Endpoint,
    scenario: Scenario,
    opts: Options,
    run_s: int,
    processes: int,
    latencies: Path,
    stats: Path,
    connections: int = 1,
) -> list[str]:
    """One step's ``locust`` command: latencies to ``<latencies>.*.npz``, CSV stats to ``<stats>_*.csv``."""
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-t", f"{run_s}s", "--stop-timeout", "5",
        "--host", endpoint.target, "--csv", str(stats), "--only-summary", "--loglevel", "WARNING",
        "--model", endpoint.model, "--batch-size", str(opts.batch_size), "--encoding", opts.encoding,
        "--deadline-ms", f"{opts.deadline_ms:g}", "--latency-file", str(latencies),
        "--connections", str(connections),
    ]  # fmt: skip
    if processes > 1:
        command += ["--processes", str(processes)]
    if scenario.mode == "open":
        streams = max(opts.arrival_users, processes)
        command += ["--load-shape", "rate", "--arrival-rate", f"{scenario.value:g}", "--arrival", opts.arrival,
                    "--arrival-users", str(streams),
                    "--max-in-flight", str(max_in_flight(scenario.value, streams, opts.deadline_ms))]  # fmt: skip
    else:
        users = str(int(scenario.value))
        command += ["--load-shape", "none", "-u", users, "-r", users]
    return command


def run_locust(
    endpoint: Endpoint,
    scenario: Scenario,
    opts: Options,
    processes: int,
    *,
    cpus: list[int] | None,
    latencies: Path,
    artifacts: Path,
    connections: int = 1,
) -> tuple[Samples, list[Any], int]:
    """One Locust run of warm-up + window + tail against ``endpoint``, sampled throughout.

    Latency files go to ``<latencies>.*.npz``; Locust's log and CSV stats are kept as ``<artifacts>.*``.
    Returns the latencies, the resource ticks and Locust's exit status (1 when any request
    failed; negative when it had to be killed for not stopping in time).
    """
    run_s = math.ceil(opts.warmup_seconds + opts.step_seconds + TAIL_S)
    log_path = Path(f"{artifacts}.locust.log")
    command = locust_command(endpoint, scenario, opts, run_s, processes, latencies, artifacts, connections)
    interval = interval_for(opts.step_seconds)
    with (
        StatisticsReader(endpoint, timeout=interval) as statistics,
        Sampler(endpoint, interval, statistics.read) as sampler,
        log_path.open("wb") as log,
    ):
        process = subprocess.Popen(
            pinned(command, cpus),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
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


@dataclass
class Run:
    """What the steps of a comparison share: options, folders, pinning, generator cost so far."""

    opts: Options
    workdir: Path
    logs: Path
    server_cpus: list[int] | None
    generator_cpus: list[int] | None
    us_per_request: float = GENERATOR_US_PER_REQUEST
    fastest_rps: float = 0.0
    #: gRPC connections per Locust process (``plan.connections``).
    connections: int = 1

    @property
    def generator_cores(self) -> int:
        return len(self.generator_cpus) if self.generator_cpus else len(os.sched_getaffinity(0))


def measure_step(
    run: Run, arm: Arm, endpoint: Endpoint, scenario: Scenario, phase: str, repeat: int, *, local: bool
) -> dict[str, Any]:
    """Run one step and reduce it to its figures (see the module docstring for the window)."""
    opts = run.opts
    processes = locust_processes(scenario, opts.locust_processes, run.generator_cores, run.us_per_request,
                                 run.fastest_rps)  # fmt: skip
    name = path_name(f"{arm.name}-{phase}-r{repeat}-{scenario.mode}-{scenario.value:g}")
    samples, ticks, exit_code = run_locust(
        endpoint, scenario, opts, processes, cpus=run.generator_cpus,
        latencies=run.workdir / f"{name}.latency", artifacts=run.logs / name, connections=run.connections,
    )  # fmt: skip
    if len(samples):
        start = float(samples.start_s.min()) + opts.warmup_seconds
        end = min(start + opts.step_seconds, float(samples.end_s.max()))
    else:
        start = end = time.time()
    step: dict[str, Any] = {
        "phase": phase,
        "repeat": repeat,
        "mode": scenario.mode,
        "concurrency": int(scenario.value) if scenario.mode == "closed" else None,
        "offered_rps": scenario.value if scenario.mode == "open" else None,
        "window_target_s": opts.step_seconds,
        "generator_processes": processes,
        **window_stats(samples, start, max(end, start + 1e-9), opts.batch_size, opts.deadline_ms / 1000),
        **resource_stats(ticks, start, end),
        "breakdown": step_breakdown(samples, ticks, start, end),
    }
    generator_pct: float | None = step["generator_cpu_pct"]["mean"]
    sent: float = step["sent_rps"]
    step["generator_us_per_request"] = 1e4 * generator_pct / sent if generator_pct is not None and sent else None
    step["generator_exit_code"] = exit_code
    # Each Locust process writes its latency file when its test stops: all there means the
    # measurement was complete, even if a process then hung on its way out and was killed.
    step["generator_results_complete"] = len(samples.metas) >= processes
    step["invalid_reasons"] = invalid_reasons(step, local=local, generator_cores=run.generator_cores)
    step["valid"] = not step["invalid_reasons"]
    if step["generator_us_per_request"] and step["sent_rps"] > 100:
        run.us_per_request = step["generator_us_per_request"]
    run.fastest_rps = max(run.fastest_rps, step["throughput_rps"])
    return step


def report_step(arm: Arm, phase: str, repeat: int, opts: Options, scenario: Scenario, step: dict[str, Any]) -> None:
    verdict = "valid" if step["valid"] else "INVALID: " + "; ".join(step["invalid_reasons"])
    errors = errors_text(step["errors"], step.get("errors_by_status"))
    processes = f" x{step['generator_processes']}" if step["generator_processes"] > 1 else ""
    progress(
        f"{arm.name} {phase} r{repeat + 1}/{opts.repeats} {scenario.label}: "
        f"{step['throughput_rps']:.1f} req/s (sent {step['sent_rps']:.1f}/s), "
        f"p99 {_fmt(step['latency_ms']['p99'], '.2f', ' ms')}, {errors}, "
        f"server CPU {_fmt(step['server_cpu_pct']['mean'], '.0f', '%')}, "
        f"generator{processes} CPU {_fmt(step['generator_cpu_pct']['mean'], '.0f', '%')} "
        f"({_fmt(step['generator_us_per_request'], '.0f', ' µs/req')}), "
        f"other CPU {_fmt(step['other_cpu_pct']['mean'], '.0f', '%')}{_workers_text(step)} - {verdict}"
    )


def _workers_text(step: dict[str, Any]) -> str:
    """``, workers 2: 55%/45% (max/min 1.2)`` and the balance note, for a step of a server with several workers."""
    balance = step.get("worker_balance")
    if not balance or balance["workers"] < 2:
        return ""
    shares = "/".join(_fmt(share and 100 * share, ".0f", "%") for share in balance["shares"].values())
    return (
        f", workers {balance['workers']}: {shares} (max/min {_fmt(balance['max_min_ratio'], '.2f')}; {balance['note']})"
    )


@contextlib.contextmanager
def serving(
    run: Run, arm: Arm, record: dict[str, Any], phase: str, repeat: int, model_dir: Path | None
) -> Iterator[tuple[Endpoint, bool]]:
    """The endpoint of one (phase, repeat): a fresh local server (cold start and idle RSS recorded) or the target.

    Yields the endpoint and whether the host's other CPU use can be judged (the server's process is known).
    """
    opts = run.opts
    if arm.target is not None:
        pid = listener_pid(arm.target)
        endpoint = Endpoint(arm.name, arm.target, arm.metrics_url, opts.model, pid=pid)
        if phase != "prepare":
            record["starts"].append({"phase": phase, "repeat": repeat, "cold_start_s": None,
                                     "idle_rss_bytes": endpoint.sample(None).server_rss})  # fmt: skip
        yield endpoint, pid is not None
        return
    assert arm.framework is not None
    args = [*arm.server_args, *(["--model-dir", str(model_dir)] if model_dir else [])]
    log_path = run.logs / path_name(f"{arm.name}-{phase}-r{repeat}.log")
    server = ServerProcess(arm.framework, opts.model, args, cpus=run.server_cpus, log_path=log_path)
    try:
        server.start()
        endpoint = Endpoint(arm.name, server.target, server.metrics_url, opts.model, pid=server.pid)
        if phase != "prepare":
            time.sleep(IDLE_S)
            idle_rss = endpoint.sample(None).server_rss
            record["starts"].append(
                {"phase": phase, "repeat": repeat, "cold_start_s": server.cold_start_s, "idle_rss_bytes": idle_rss}
            )
            progress(
                f"{arm.name} {phase} r{repeat + 1}/{opts.repeats}: SERVING after {server.cold_start_s:.2f} s, "
                f"idle RSS {_fmt((idle_rss or 0) / 2**20, '.0f', ' MiB')}"
            )
        yield endpoint, True
    finally:
        server.close()

"""The comparison runner: identical Locust load against torch_server and tf_server.

``python -m loadtest compare`` measures both servers (and any ``--target`` reference
server beside them) with the same scenarios, in this order:

1. *Preparation*: each server starts once on a fresh model repository (``--model-dir``),
   exporting (and, with ``--compile on``, compiling) its artifacts; that first start is
   timed and reported apart. Its ModelConfig is read, and the comparison refuses to run
   when the servers differ in device, threads, precision, compile mode or batching.
   Every server flag is passed explicitly and identically (``server_args_for_all``).
2. *Closed loop*: per repeat, each server is started fresh (cold start = spawn to
   SERVING with the artifacts already there; idle RSS) and swept over ``--concurrency``.
3. *Open loop*: one grid of absolute arrival rates for every server, from the lower
   valid closed-loop peak (``--rate-fractions`` of it) up past the higher one
   (``--overload`` times it); per repeat each server is started fresh again and swept
   over the grid (latency from the scheduled send time).

In each phase the order alternates ABBA over repeats (forward, reversed, forward...),
and is recorded in results.json (``order``). Default: 3 repeats.

Each step is one Locust run of ``warm-up + window + tail`` seconds. The window starts
``--warmup-seconds`` after the first request, on the wall clock that the per-request
start stamps, the resource sampler and the metric scrapes share:

* latency percentiles: exact, over every request sent in the window, failed ones at the
  time they took to fail (a timeout at its deadline; one never sent at the deadline);
* throughput: successes completed in the window, per second;
* server CPU/RSS (psutil on the server's process tree, or its own ``process_*``
  metrics when remote), GPU (the server's NVML metrics) and generator CPU are sampled
  every ``SAMPLE_INTERVAL_S`` (a sixth of a shorter window: ``sampling.interval_for``) and
  only the samples inside the window count; queue/compute
  time and mean batch size are differences of the server's counters between the first
  and last scrape inside the window.

Per step, the server's ``inference_worker_requests_total`` between the same scrapes gives the
requests each worker process answered (``--server-arg=--workers=N``); a step where one worker
got less than half its fair share is flagged unbalanced (a note: the step stays valid). The
server gets as many cores as it has workers, one at least left for the generator
(``loadtest.compare.plan.pinning``; otherwise a warning, recorded).

A step is invalid (kept, flagged, left out of the verdict and of every resource figure)
when the measurement cannot be trusted: the generator's CPU exceeds ``GENERATOR_CPU_LIMIT``
of its cores, the generator fell behind the open-loop schedule (too few sends, dropped
arrivals, or a p99 send lag over ``SEND_LAG_LIMIT_MS``), other processes on the host used
more than ``OTHER_CPU_LIMIT`` of a core (local runs), no request succeeded, or the window
was cut short. Failed requests are the server's result, not a fault of the measurement:
they count in latency and in the error rate, and a step meets the latency objective only
with at most ``SLO_ERROR_RATE`` of them. When one Locust process would need more than ``PROCESS_CPU_BUDGET`` of a core
for a step, several run (``--processes``), as many as the generator has cores.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil

from client import InferenceServerError
from loadtest.compare import parity
from loadtest.compare.plan import (
    CONNECTIONS_PER_WORKER,
    GENERATOR_CPU_LIMIT,
    MATRIX_KEYS,
    MIN_WINDOW_FRACTION,
    OTHER_CPU_LIMIT,
    PROCESS_CPU_BUDGET,
    SEND_LAG_LIMIT_MS,
    SLO_ERROR_RATE,
    Arm,
    Options,
    Scenario,
    abba,
    check_settings,
    connections,
    expected_settings,
    invalid_reasons,
    locust_processes,
    parse_list,
    pinning,
    plan_arms,
    rate_grid,
    server_workers,
)
from loadtest.sampling import Endpoint, Sampler, environment, interval_for, listener_pid
from loadtest.servers import ROOT, ServerProcess, ServerStartError, pin_to
from loadtest.stats import DECISION_RULE, resource_stats, window_stats
from loadtest.users.latency_file import Samples, read_latencies
from serving.backend import TOLERANCES, Tolerance

LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
TAIL_S = 0.5
LOCUST_GRACE_S = 30.0
#: Generator CPU per request assumed until a step has measured it (µs; see loadtest.tools.overhead).
GENERATOR_US_PER_REQUEST = 300.0
LATENCY_NOTE = (
    "Latency percentiles count every request sent in the window: failed ones at the time they took to fail "
    "(a timeout at its deadline), arrivals the generator never sent at the deadline."
)


class ComparisonRefused(RuntimeError):
    """The servers would not be compared like with like (settings differ); the message says how."""


# ---------------------------------------------------------------- measuring


def path_name(name: str) -> str:
    """``name`` (e.g. ``torch[precision=bf16,compile=on]-closed-r0``) as a plain file name: no
    separators, no characters that glob patterns (ours, TensorFlow's) would take as syntax."""
    return re.sub(r"[^A-Za-z0-9._=,-]+", "_", name)


def progress(message: str) -> None:
    """One progress line on stderr."""
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


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
                    "--arrival-users", str(streams)]  # fmt: skip
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
    with Sampler(endpoint, interval_for(opts.step_seconds)) as sampler, log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
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
    processes = f" x{step['generator_processes']}" if step["generator_processes"] > 1 else ""
    progress(
        f"{arm.name} {phase} r{repeat + 1}/{opts.repeats} {scenario.label}: "
        f"{step['throughput_rps']:.1f} req/s (sent {step['sent_rps']:.1f}/s), "
        f"p99 {_fmt(step['latency_ms']['p99'], '.2f', ' ms')}, errors {step['errors']}, "
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
            time.sleep(1.0)
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


# ---------------------------------------------------------------- the run


def repository_for(opts: Options, arm: Arm, tmp: Path) -> Path:
    """The model repository a local server serves from: the user's (``--torch-repository``,
    ``--tf-repository``: their own models), else a fresh one the first start exports the zoo model into."""
    given = opts.torch_repository if arm.framework == "torch" else opts.tf_repository
    return given if given is not None else tmp / "models" / path_name(arm.name)


def _record(arm: Arm) -> dict[str, Any]:
    return {
        "label": arm.label,
        "framework": arm.framework,
        "kind": arm.kind,
        "variant": arm.variant,
        "server_args": arm.server_args if arm.kind == "local" else None,
        "target": arm.target,
        "metrics_url": arm.metrics_url,
        "prepare": None,
        "starts": [],
        "steps": [],
    }


def prepare(run: Run, arms: Sequence[Arm], records: dict[str, Any], model_dirs: dict[str, Path]) -> dict[str, Any]:
    """Start each server once (exporting into its fresh repository, timed apart), read its ModelConfig,
    and take its outputs on the parity inputs (built from the first server's metadata); returns them
    (``outputs`` by arm, and ``errors`` by arm where a server could not answer)."""
    probe: parity.Probe | None = None
    outputs: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for arm in arms:
        started = time.perf_counter()
        with serving(run, arm, records[arm.name], "prepare", 0, model_dirs.get(arm.name)) as (endpoint, _):
            first_start = time.perf_counter() - started
            config = endpoint.describe()
            if arm.framework is not None:
                # Judged after the settings are (check_parity): a server that cannot answer is refused there.
                try:
                    probe = probe or parity.probe_for(endpoint.target, run.opts.model)
                    outputs[arm.name] = parity.outputs_of(endpoint.target, run.opts.model, probe)
                    records[arm.name]["output_datatypes"] = dict(probe.output_datatypes)
                except (grpc.RpcError, InferenceServerError, ValueError) as err:
                    errors[arm.name] = " ".join(str(err).split())[:300]
        params = config.get("parameters", {})
        records[arm.name]["model_config"] = config
        records[arm.name]["target"] = records[arm.name]["target"] or endpoint.target
        if arm.kind == "local":
            records[arm.name]["prepare"] = {
                "first_start_s": round(first_start, 3),
                "export_s": float(params["export_s"]) if "export_s" in params else None,
                "compile_s": float(params["compile_s"]) if "compile_s" in params else None,
                "model_dir": str(model_dirs[arm.name]),
            }
            own = run.opts.torch_repository is not None
            progress(f"{arm.name}: prepared in {first_start:.1f} s (first start"
                     f"{' from your repository' if own else ': export into a fresh repository'})")  # fmt: skip
    return {"outputs": outputs, "errors": errors}


class ParityFailed(ComparisonRefused):
    """The servers give different outputs for the same inputs: they do not serve the same model."""


def check_parity(
    opts: Options, groups: Sequence[dict[str, Any]], records: dict[str, Any], taken: dict[str, Any]
) -> list[dict[str, Any]]:
    """Per variant, torch's outputs against tensorflow's on the parity inputs (``taken`` by ``prepare``);
    ``ParityFailed`` (with the numbers) beyond the tolerance: the precision's (``serving.backend.TOLERANCES``)
    unless --parity-atol/rtol, or when a server could not answer them."""
    outputs, errors = taken["outputs"], taken["errors"]
    checked, problems = [], []
    problems += [f"{name}: no outputs for the parity inputs ({error})" for name, error in errors.items()]
    for group in groups:
        members = group["arms"]
        if not {"torch", "tensorflow"} <= set(members) or not all(members[f] in outputs for f in members):
            continue
        precision = group["values"].get("precision", opts.precision)
        default = TOLERANCES.get(precision, TOLERANCES["fp32"])
        tolerance = Tolerance(
            atol=default.atol if opts.parity_atol is None else opts.parity_atol,
            rtol=default.rtol if opts.parity_rtol is None else opts.parity_rtol,
        )
        found = parity.differences(
            outputs[members["torch"]], outputs[members["tensorflow"]],
            records[members["torch"]].get("output_datatypes", {}), tolerance,
        )  # fmt: skip
        checked.append({"variant": group["name"], "atol": tolerance.atol, "rtol": tolerance.rtol, "outputs": found})
        for entry in found:
            if not entry["within"]:
                where = f"{group['name']}: output {entry['output']!r} (parity batch {entry['batch']})"
                if entry["max_abs"] is None:
                    problems.append(f"{where}: shapes {entry['shapes']}")
                else:
                    problems.append(
                        f"{where}: max |diff| {entry['max_abs']:.3g}, {entry['max_rel']:.3g} of the largest value, "
                        f"beyond atol {tolerance.atol:g} + rtol {tolerance.rtol:g}"
                    )
    if problems:
        raise ParityFailed(
            "refusing to compare: the servers' outputs differ on the same inputs, so they do not serve the same "
            "model:\n  " + "\n  ".join(problems)
        )
    for entry in checked:
        worst = max((item["max_abs"] for item in entry["outputs"] if item["max_abs"] is not None), default=0.0)
        progress(f"parity ({entry['variant']}): outputs agree, max |diff| {worst:.3g}")
    return checked


def check_fairness(opts: Options, groups: Sequence[dict[str, Any]], records: dict[str, Any]) -> None:
    """Refuse (``ComparisonRefused``) when the servers of a variant report different settings."""
    problems = []
    for group in groups:
        configs = {records[name]["label"]: records[name]["model_config"] for name in group["arms"].values()}
        # Servers that already run were not started with our flags: they need only agree.
        expected = None if opts.remote else expected_settings(opts, group["values"])
        problems += [f"{group['name']}: {problem}" for problem in check_settings(configs, expected)]
    if problems:
        raise ComparisonRefused(
            "refusing to compare: the servers do not report the same settings (ModelConfig parameters):\n  "
            + "\n  ".join(problems)
        )


def phase(
    run: Run,
    arms: Sequence[Arm],
    records: dict[str, Any],
    name: str,
    scenarios: Sequence[Scenario],
    model_dirs: dict[str, Path],
    order: list[dict[str, Any]],
    failures: list[dict[str, Any]],
) -> None:
    """Every repeat of one phase, arms in ABBA order, each on a fresh server."""
    opts = run.opts
    for repeat in range(opts.repeats):
        for arm in abba(arms, repeat):
            order.append({"phase": name, "repeat": repeat, "arm": arm.name})
            try:
                with serving(run, arm, records[arm.name], name, repeat, model_dirs.get(arm.name)) as (endpoint, local):
                    for scenario in scenarios:
                        step = measure_step(run, arm, endpoint, scenario, name, repeat, local=local)
                        report_step(arm, name, repeat, opts, scenario, step)
                        records[arm.name]["steps"].append(step)
            except (ServerStartError, RuntimeError, grpc.RpcError, grpc.FutureTimeoutError) as err:
                failures.append({"server": arm.name, "phase": name, "repeat": repeat, "error": str(err)})
                progress(f"{arm.name} {name} r{repeat + 1}/{opts.repeats}: FAILED, going on: {err}")


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


def run_comparison(opts: Options, command: Sequence[str] = ()) -> dict[str, Any]:
    """Measure every arm with identical scenarios; the results document that ``report`` renders.

    Raises ``ComparisonRefused`` (before any measurement) when the servers' settings differ.
    """
    arms, groups = plan_arms(opts)
    out = report_folder(opts)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # A remote server's flags are not ours: its cores are not ours to pin; Locust and the runner keep to theirs.
    pinned = pinning(opts.cpu_split, sorted(os.sched_getaffinity(0)), () if opts.remote else opts.server_args)
    if opts.remote:
        pinned["server_cpus"] = None
    server_cpus, generator_cpus = pinned["server_cpus"], pinned["generator_cpus"]
    if pinned["warning"]:
        progress(f"warning: {pinned['warning']}")
    started = time.time()
    records = {arm.name: _record(arm) for arm in arms}
    order: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    closed = [Scenario("closed", users) for users in opts.concurrency]
    progress(
        f"comparing {', '.join(arm.name for arm in arms)} on {opts.model}: {len(closed)} concurrencies + "
        f"{len(opts.rates) or len(opts.rate_fractions) + (opts.overload > 0)} rates x {opts.repeats} repeats, "
        f"{opts.warmup_seconds:g}+{opts.step_seconds:g} s per step; server cpus {server_cpus} "
        f"({pinned['server_workers']} worker(s)), locust cpus {generator_cpus}"
    )
    with tempfile.TemporaryDirectory(prefix="compare-") as tmp, _runner_pinned(generator_cpus):
        run = Run(opts, Path(tmp), logs, server_cpus, generator_cpus)
        run.connections = pinned["connections"] = connections(opts.connections, pinned["server_workers"])
        model_dirs = {arm.name: repository_for(opts, arm, Path(tmp)) for arm in arms if arm.kind == "local"}
        taken = prepare(run, arms, records, model_dirs)
        check_fairness(opts, groups, records)
        parity_checked = check_parity(opts, groups, records, taken)
        phase(run, arms, records, "closed", closed, model_dirs, order, failures)
        if opts.rates:
            grid: dict[str, Any] = {"rates": sorted(opts.rates), "fixed": True}
        else:
            compared = [arm for arm in arms if arm.framework is not None] or arms
            grid = rate_grid({arm.name: records[arm.name]["steps"] for arm in compared},
                             opts.rate_fractions, opts.overload)  # fmt: skip
            grid |= {"fixed": False, "fractions": opts.rate_fractions, "overload": opts.overload}
        progress(f"open-loop rates for every server: {grid['rates']} req/s")
        if not grid["rates"]:
            error = "no closed-loop step measured: no peak to build the open-loop grid from"
            failures.append({"server": "all", "phase": "open", "repeat": 0, "error": error})
        if grid["rates"]:
            opened = [Scenario("open", rate) for rate in grid["rates"]]
            phase(run, arms, records, "open", opened, model_dirs, order, failures)
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
            "pinning": pinned,
            "limits": {
                "generator_cpu_pct_per_core": GENERATOR_CPU_LIMIT * 100,
                "other_cpu_pct": OTHER_CPU_LIMIT * 100,
                "send_lag_p99_ms": SEND_LAG_LIMIT_MS,
                "slo_error_rate": SLO_ERROR_RATE,
                "min_window_fraction": MIN_WINDOW_FRACTION,
            },
            "sample_interval_s": interval_for(opts.step_seconds),
            "tail_s": TAIL_S,
            "latency_note": LATENCY_NOTE,
            "decision_rule": DECISION_RULE,
        },
        "environment": environment(),
        "servers": records,
        "variants": groups,
        "grid": grid,
        "parity": parity_checked,
        "order": order,
        "failures": failures,
    }


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``compare`` flags."""
    defaults = Options()
    arg = parser.add_argument
    arg("--model", default=defaults.model, help="the model both serve: a zoo model, or a model of the "
        "--torch-repository / --tf-repository (default: %(default)s)")  # fmt: skip
    arg("--torch-repository", type=Path, help="torch_server's model repository (your own models; default: a fresh "
        "one the zoo model is exported into)")  # fmt: skip
    arg("--tf-repository", type=Path, help="tf_server's model repository (as --torch-repository)")
    arg("--parity-atol", type=float, help="outputs must agree within this absolute tolerance (default: the "
        "precision's, e.g. 1e-5 for fp32)")  # fmt: skip
    arg("--parity-rtol", type=float, help="... plus this relative one (default: the precision's, e.g. 1e-4 for fp32)")
    arg("--concurrency", default="1,4,16,32", help="closed-loop users per step, comma-separated (default: %(default)s)")
    arg("--rates", default="", help="open-loop arrival rates, req/s, comma-separated (default: the grid below)")
    arg("--rate-fractions", default="0.25,0.5,0.9", help="open-loop rates as fractions of the LOWER valid "
        "closed-loop peak of the two servers, the same rates for both (default: %(default)s)")  # fmt: skip
    arg("--overload", type=float, default=defaults.overload,
        help="one more open-loop rate at this multiple of the HIGHER peak; 0: none (default: %(default)s)")  # fmt: skip
    arg("--arrival", choices=["poisson", "fixed"], default=defaults.arrival, help="open-loop arrivals (%(default)s)")
    arg("--arrival-users", type=int, default=defaults.arrival_users,
        help="open-loop streams the rate is split over (default: %(default)s)")  # fmt: skip
    arg("--step-seconds", type=float, default=defaults.step_seconds, help="measured window per step (%(default)s)")
    arg("--warmup-seconds", type=float, default=defaults.warmup_seconds,
        help="discarded load before each window (%(default)s)")  # fmt: skip
    arg("--repeats", type=int, default=defaults.repeats,
        help="repeats of each phase, in ABBA order; a winner needs >= 3 (default: %(default)s)")  # fmt: skip
    arg("--slo-ms", type=float, default=defaults.slo_ms, help="p99 latency objective, ms (%(default)s)")
    arg("--batch-size", type=int, default=defaults.batch_size, help="rows per request (%(default)s)")
    arg("--deadline-ms", type=float, default=defaults.deadline_ms,
        help="per-request deadline; open loop: from the scheduled send time (%(default)s)")  # fmt: skip
    arg("--encoding", choices=["raw", "typed"], default=defaults.encoding, help="request tensors (%(default)s)")
    servers = parser.add_argument_group("server settings, passed explicitly and identically to both servers")
    servers.add_argument("--device", default=defaults.device, help="(%(default)s)")
    servers.add_argument("--threads", type=int, default=defaults.threads, help="intra-op threads (%(default)s)")
    servers.add_argument("--precision", default=defaults.precision, help="fp32, tf32, bf16, fp16 (%(default)s)")
    servers.add_argument("--compile", default=defaults.compile, help="off or on (%(default)s)")
    servers.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size, help="(%(default)s)")
    servers.add_argument("--dynamic-batching", action=argparse.BooleanOptionalAction, default=True, help="(on)")
    servers.add_argument("--max-queue-delay-us", type=int, default=defaults.max_queue_delay_us, help="(%(default)s)")
    servers.add_argument("--max-queue-size", type=int, default=defaults.max_queue_size, help="(%(default)s)")
    servers.add_argument("--instances", type=int, default=defaults.instances, help="(%(default)s)")
    servers.add_argument("--grpc-threads", type=int, default=defaults.grpc_threads, help="(%(default)s)")
    servers.add_argument("--server-arg", action="append", default=[], dest="server_args", metavar="ARG",
                         help="any other flag for both servers, repeatable (--server-arg=--model-arg=...)")  # fmt: skip
    servers.add_argument("--matrix", nargs="+", default=[], metavar="KEY=V1,V2",
                         help=f"measure every combination, one report (keys: {', '.join(MATRIX_KEYS)}); e.g. "
                         "--matrix precision=fp32,bf16 compile=off,on")  # fmt: skip
    arg("--target", action="append", default=[], dest="targets", metavar="NAME=HOST:PORT",
        help="a running OIP server measured beside the two: reference rows (repeatable; ,METRICS_URL)")  # fmt: skip
    arg("--torch-target", help="HOST:PORT of a running torch_server (with --tf-target: start nothing)")
    arg("--tf-target", help="HOST:PORT of a running tf_server")
    arg("--torch-metrics", help="metrics URL of the running torch_server")
    arg("--tf-metrics", help="metrics URL of the running tf_server")
    arg("--locust-processes", default=defaults.locust_processes,
        help="Locust processes per step: a number, or auto (more when one would need over "
        f"{PROCESS_CPU_BUDGET * 100:.0f}%% of a core, at most one per generator core) (%(default)s)")  # fmt: skip
    arg("--connections", default=defaults.connections,
        help="gRPC connections per Locust process, shared by its users: a number, or auto (1; with "
        f"--workers N, {CONNECTIONS_PER_WORKER} per worker, so the kernel spreads them) (%(default)s)")  # fmt: skip
    arg("--out", type=Path, help="report folder (default: <--out-root>/<timestamp>)")
    arg("--out-root", type=Path, help="folder for timestamped report folders (default: reports)")
    arg("--cpu-split", choices=["auto", "none"], default=defaults.cpu_split,
        help="auto: pin the server to the first half of the cores (with --workers N: N cores, one at least "
        "left) and Locust to the rest (%(default)s)")  # fmt: skip


def options_from(args: argparse.Namespace) -> Options:
    """Validated ``Options`` from parsed flags; ``ValueError`` on bad combinations."""
    if bool(args.torch_target) != bool(args.tf_target):
        raise ValueError("--torch-target and --tf-target go together")
    fields = {f.name for f in dataclasses.fields(Options)}
    opts = Options(
        **{key: value for key, value in vars(args).items() if key in fields}
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
    if opts.locust_processes != "auto" and not (opts.locust_processes.isdigit() and int(opts.locust_processes) > 0):
        raise ValueError("--locust-processes: a positive number or auto")
    if opts.matrix and opts.remote:
        raise ValueError("--matrix starts the servers itself: not with --torch-target/--tf-target")
    if (opts.torch_repository is None) != (opts.tf_repository is None):
        raise ValueError("--torch-repository and --tf-repository go together (each server its own repository)")
    if opts.remote and opts.torch_repository is not None:
        raise ValueError("--torch-repository/--tf-repository are for servers compare starts: not with --torch-target")
    server_workers(opts.server_args)  # validates --server-arg=--workers=N
    connections(opts.connections, 1)  # validates --connections
    plan_arms(opts)  # validates --matrix and --target
    return opts


def report_folder(opts: Options) -> Path:
    """Where the report goes: ``--out``, else ``<--out-root>/<timestamp>`` (``reports/`` by default)."""
    return opts.out or (opts.out_root or Path("reports")) / f"{datetime.datetime.now():%Y%m%d-%H%M%S}"


def check_writable(folder: Path) -> str | None:
    """Why the report cannot be written to ``folder`` (None: it can), found before any measurement: a
    container writing to a bind-mounted host folder is the usual case, so the message names the uids."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            return None
    except OSError as err:
        existing = next((parent for parent in (folder, *folder.parents) if parent.exists()), folder)
        try:
            owner = f"uid {existing.stat().st_uid}"
        except OSError:
            owner = "an unknown owner"
        return (
            f"cannot write the report to {folder}: {err.strerror or err} (this process runs as uid {os.getuid()}, "
            f"gid {os.getgid()}; {existing} belongs to {owner}): make it writable for uid {os.getuid()}, or run as "
            "its owner (docker compose: HOST_UID=$(id -u) HOST_GID=$(id -g))"
        )


def main(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run the comparison (``argv``: its command line, recorded) and write the report; the exit status."""
    from loadtest.compare.report import write_report

    try:
        opts = options_from(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    opts.out = report_folder(opts)
    if (problem := check_writable(opts.out)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        results = run_comparison(opts, ["python", "-m", "loadtest", *argv])
    except ComparisonRefused as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except ServerStartError as err:
        print(f"error: a server did not start while preparing the comparison: {err}", file=sys.stderr)
        return 3
    out = Path(results["meta"]["out"])
    write_report(results, out)
    progress(f"report: {out / 'report.html'} (also report.md, results.json, *.png)")
    return 0

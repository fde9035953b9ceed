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
3. *Capacity* (``--capacity on``, the default): per repeat, each server started fresh is searched
   for the highest open-loop rate whose p99 meets ``--slo-ms`` with at most ``SLO_ERROR_RATE``
   errors, from the lower valid closed-loop peak (``loadtest.compare.capacity_phase``).
4. *Sweep* (``--sweep``): each server searched over its configurations for its best, then the two
   bests searched in every repeat for the "each at its best" verdict (``loadtest.compare.sweep_phase``).
5. *Open loop*: one grid of absolute arrival rates for every server, from the lower
   valid closed-loop peak (``--rate-fractions`` of it) up past the higher one
   (``--overload`` times it); per repeat each server is started fresh again and swept
   over the grid (latency from the scheduled send time).
6. *Drain* (``--drain on``, the default): per repeat each server started fresh again gets SIGTERM
   under steady open-loop load at half the lower peak; calls lost, time to exit and readiness
   flip (``loadtest.compare.drain``).

Between preparation and the first timed step, the fidelity guard (``loadtest.compare.fidelity``):
both servers' outputs on the same inputs, largest difference and top-1 agreement; beyond tolerance
the comparison stops (exit status 3) unless ``--allow-mismatch``.

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

import contextlib
import dataclasses
import datetime
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from loadtest.cli import progress
from loadtest.compare import drain, fidelity, sweep_phase
from loadtest.compare.capacity_phase import capacity_phase
from loadtest.compare.plan import (
    GENERATOR_CPU_LIMIT,
    MIN_WINDOW_FRACTION,
    OTHER_CPU_LIMIT,
    SEND_LAG_LIMIT_MS,
    SLO_ERROR_RATE,
    Arm,
    Options,
    Scenario,
    abba,
    connections,
    pinning,
    plan_arms,
    rate_grid,
)
from loadtest.compare.prepare import check_fairness, check_parity, prepare, repository_for
from loadtest.compare.steps import RUN_FAILURES, TAIL_S, Run, measure_step, report_step, serving
from loadtest.sampling import environment, interval_for
from loadtest.stats import DECISION_RULE

LATENCY_NOTE = (
    "Latency percentiles count every request sent in the window: failed ones at the time they took to fail "
    "(a timeout at its deadline), arrivals the generator never sent at the deadline."
)


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
            except RUN_FAILURES as err:
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
        if opts.capacity == "on":
            capacity_phase(run, arms, records, model_dirs, order, failures)
        swept = sweep_phase.sweep_phase(run, arms, records, model_dirs, order, failures) if opts.sweep else None
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
        if opts.drain == "on":
            drain.phase(run, arms, records, model_dirs, order, failures)
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
        "fidelity": fidelity.record(parity_checked, opts.allow_mismatch),
        "sweep": swept,
        "order": order,
        "failures": failures,
    }


def report_folder(opts: Options) -> Path:
    """Where the report goes: ``--out``, else ``<--out-root>/<timestamp>`` (``reports/`` by default)."""
    return opts.out or (opts.out_root or Path("reports")) / f"{datetime.datetime.now():%Y%m%d-%H%M%S}"

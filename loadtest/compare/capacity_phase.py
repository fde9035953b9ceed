"""The comparison's capacity phase: ``loadtest.compare.capacity``'s search run against each server.

After the closed loop, per repeat and in ABBA order over the servers, each server is started fresh
(``steps.serving``) and searched: every probe is one open-loop step (Poisson arrivals, ``--arrival``) of
``--capacity-warmup-seconds`` + ``--capacity-step-seconds`` at the probed rate, measured and judged valid
as any other step (``steps.measure_step``). The start rate is ``--capacity-start`` or the lower valid
closed-loop peak of the compared servers, the same for every server (each repeat's start shifted by a
fraction of the search's resolution: ``capacity.dithered_start``). Probes are kept in the server's
``capacity`` (not among its ``steps``: the open-loop curves keep their own grid). With
``--capacity-replays N``, each search is followed by N open-loop steps of the sweep's length at the rate
it found, on the same server, judged alike (does the capacity hold?). Also here: the
``--capacity*`` flags (``add_arguments``, checked by ``check_options``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest.cli import progress
from loadtest.compare import capacity
from loadtest.compare.capacity import Outcome, ProbeResult, Search, budget_text, dithered_start, search, summarize
from loadtest.compare.plan import GENERATOR_CPU_LIMIT, SLO_ERROR_RATE, Arm, Options, Scenario, abba, peak
from loadtest.compare.steps import RUN_FAILURES, TAIL_S, Run, measure_step, serving
from loadtest.sampling import Endpoint

PHASE = "capacity"
#: The bracket's factor: the search starts at a measured rate (the lower closed-loop peak), so the capacity
#: is seldom more than 1.5x away, and a narrower bracket bisects to a finer lattice in as many probes.
BRACKET_FACTOR = 1.5
#: Seconds a step costs beyond its Locust run (start-up and exit of Locust; measured: ~0.9 s).
STEP_OVERHEAD_S = 0.9
#: Seconds a fresh server costs before its first step (spawn to SERVING, idle RSS; measured for mlp: ~5 s).
START_S = 5.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--capacity*`` flags of ``python -m loadtest compare``."""
    defaults = Options()
    group = parser.add_argument_group(
        "SLO capacity search: per server, the highest open-loop rate with p99 <= --slo-ms and errors <= "
        f"{SLO_ERROR_RATE:.0%} (bracket x{BRACKET_FACTOR:g} from the lower closed-loop peak, then bisection), in "
        "every repeat"
    )
    arg = group.add_argument
    arg("--capacity", choices=["on", "off"], default=defaults.capacity, help="run the search (%(default)s)")
    arg("--capacity-precision", metavar="FRACTION", type=float, default=defaults.capacity_precision,
        help="stop when the lowest failing rate is within this fraction above the highest passing one "
        "(%(default)s)")  # fmt: skip
    arg("--capacity-step-seconds", metavar="SECONDS", type=float, default=defaults.capacity_step_seconds,
        help="measured window per probe (%(default)s)")  # fmt: skip
    arg("--capacity-warmup-seconds", metavar="SECONDS", type=float, default=defaults.capacity_warmup_seconds,
        help="discarded load before each probe's window (%(default)s)")  # fmt: skip
    arg("--capacity-start", metavar="RATE", type=float, default=defaults.capacity_start,
        help="first rate probed, req/s (default: the lower valid closed-loop peak)")  # fmt: skip
    arg("--capacity-max-probes", metavar="N", type=int, default=defaults.capacity_max_probes,
        help="most probes per search, repeated invalid ones included (%(default)s)")  # fmt: skip
    arg("--capacity-replays", metavar="N", type=int, default=defaults.capacity_replays,
        help="after each search, N open-loop steps (--step-seconds) at the rate found, to show it holds "
        "(%(default)s)")  # fmt: skip


def check_options(opts: Options) -> None:
    """``ValueError`` for ``--capacity*`` values a search cannot run with."""
    if opts.capacity_step_seconds <= 0 or opts.capacity_warmup_seconds < 0:
        raise ValueError("--capacity-step-seconds > 0 and --capacity-warmup-seconds >= 0 are required")
    if opts.capacity_replays < 0:
        raise ValueError("--capacity-replays must be >= 0")
    if opts.capacity_start is not None and opts.capacity_start <= 0:
        raise ValueError("--capacity-start must be a positive rate")
    settings(opts)  # precision > 0, max probes >= 1


def settings(opts: Options, max_rate: float | None = None) -> Search:
    return Search(
        slo_ms=opts.slo_ms,
        error_limit=SLO_ERROR_RATE,
        precision=opts.capacity_precision,
        factor=BRACKET_FACTOR,
        max_probes=opts.capacity_max_probes,
        max_rate=max_rate,
    )


#: Share of its CPU limit the generator is planned to use at the search's highest rate: an overloaded
#: server costs the generator more per request (timeouts, backlog) than the closed loop measured.
CEILING_SHARE = 0.8


def generator_ceiling(run: Run) -> float:
    """The most requests/s the generator can offer validly: ``CEILING_SHARE`` of its CPU limit over its cores,
    at the CPU per request the steps so far measured."""
    return round(CEILING_SHARE * GENERATOR_CPU_LIMIT * run.generator_cores * 1e6 / run.us_per_request, 1)


def probe_seconds(opts: Options) -> float:
    """Wall time of one probe: its Locust run (as ``steps.run_locust`` rounds it) and Locust's start and exit."""
    return math.ceil(opts.capacity_warmup_seconds + opts.capacity_step_seconds + TAIL_S) + STEP_OVERHEAD_S


def start_rate(opts: Options, records: dict[str, Any], arms: Sequence[Arm]) -> float | None:
    """``--capacity-start``, else the lower closed-loop peak of the compared servers (valid steps; a server
    without a valid one: all of its steps)."""
    if opts.capacity_start is not None:
        return opts.capacity_start
    compared = [arm for arm in arms if arm.framework is not None] or list(arms)
    peaks = [peak(records[arm.name]["steps"]) or peak(records[arm.name]["steps"], valid=False) for arm in compared]
    known = [value for value in peaks if value]
    return round(min(known), 1) if known else None


def probing(run: Run) -> Run:
    """``run`` with the probes' window and warm-up (``--capacity-step-seconds``, ``--capacity-warmup-seconds``)."""
    opts = run.opts
    short = dataclasses.replace(opts, step_seconds=opts.capacity_step_seconds,
                                warmup_seconds=opts.capacity_warmup_seconds)  # fmt: skip
    return dataclasses.replace(run, opts=short)


def _probe_result(rate: float, step: dict[str, Any]) -> ProbeResult:
    extra = {
        "throughput_rps": step["throughput_rps"],
        "sent_rps": step["sent_rps"],
        "p50_ms": step["latency_ms"]["p50"],
        "server_cpu_pct": step["server_cpu_pct"]["mean"],
        "generator_cpu_pct": step["generator_cpu_pct"]["mean"],
        "errors": step["errors"],
    }
    return ProbeResult(rate, step["latency_ms"]["p99"], step["error_rate"], step["valid"],
                       tuple(step["invalid_reasons"]), extra)  # fmt: skip


def search_server(
    run: Run,
    arm: Arm,
    endpoint: Endpoint,
    repeat: int,
    start: float,
    rules: Search,
    *,
    local: bool,
    stage: str | None = None,
) -> Outcome:
    """One search against a running server: each probe a measured open-loop step, a progress line each
    (``stage`` names the search in it; default: the phase and repeat)."""
    count = 0
    stage = stage or f"{PHASE} r{repeat + 1}/{run.opts.repeats}"

    def probe(rate: float) -> ProbeResult:
        nonlocal count
        count += 1
        rate = round(rate, 1)
        # A phase name per probe: a repeated rate must not find the latency files of the earlier probe.
        step = measure_step(run, arm, endpoint, Scenario("open", rate), f"{PHASE}-p{count}", repeat, local=local)
        result, passed = capacity.judged(_probe_result(rate, step), rules)
        verdict = {True: "pass", False: "fail", None: "INVALID: " + "; ".join(result.reasons)}[passed]
        progress(
            f"{arm.name} {stage} probe {count}: rate={rate:g}/s "
            f"(sent {step['sent_rps']:.0f}/s): p99 {_fmt_ms(result.p99_ms)}, errors {_fmt_pct(result.error_rate)} "
            f"- {verdict}"
        )
        return result

    return search(probe, start, rules)


def replay(
    run: Run, arm: Arm, endpoint: Endpoint, repeat: int, rate: float, rules: Search, *, local: bool
) -> list[tuple[ProbeResult, bool | None]]:
    """``--capacity-replays`` open-loop steps at the rate a search found, as the sweep's steps (``--step-seconds``)."""
    replays = []
    for i in range(run.opts.capacity_replays):
        step = measure_step(run, arm, endpoint, Scenario("open", rate), f"{PHASE}-replay{i + 1}", repeat, local=local)
        result, passed = capacity.judged(_probe_result(rate, step), rules)
        replays.append((result, passed))
        verdict = {True: "pass", False: "fail", None: "INVALID: " + "; ".join(result.reasons)}[passed]
        progress(f"{arm.name} {PHASE} r{repeat + 1}/{run.opts.repeats} replay {i + 1} at {rate:g}/s: "
                 f"p99 {_fmt_ms(result.p99_ms)}, errors {_fmt_pct(result.error_rate)} - {verdict}")  # fmt: skip
    return replays


def _fmt_ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


def _fmt_pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def capacity_phase(
    run: Run,
    arms: Sequence[Arm],
    records: dict[str, Any],
    model_dirs: dict[str, Path],
    order: list[dict[str, Any]],
    failures: list[dict[str, Any]],
) -> None:
    """Every repeat of the search, servers in ABBA order, each on a fresh server; each server's record gets
    its ``capacity`` (``capacity.summarize``)."""
    opts = run.opts
    start = start_rate(opts, records, arms)
    if start is None:
        error = "no closed-loop step measured: no rate to start the capacity search from"
        failures.append({"server": "all", "phase": PHASE, "repeat": 0, "error": error})
        return
    rules = settings(opts, generator_ceiling(run))
    prober = probing(run)
    progress(
        f"capacity search (p99 <= {opts.slo_ms:g} ms, errors <= {SLO_ERROR_RATE:.0%}, precision "
        f"{opts.capacity_precision:g}), from {start:g} req/s, at most {rules.max_rate:g} req/s (the generator's "
        "ceiling): "
        f"{budget_text(rules, len(arms) * opts.repeats, probe_seconds(opts), START_S)}"
    )
    outcomes: dict[str, list[tuple[int, Outcome]]] = {arm.name: [] for arm in arms}
    for repeat in range(opts.repeats):
        for arm in abba(arms, repeat):
            order.append({"phase": PHASE, "repeat": repeat, "arm": arm.name})
            began = time.monotonic()
            try:
                with serving(run, arm, records[arm.name], PHASE, repeat, model_dirs.get(arm.name)) as (endpoint, local):
                    first = round(dithered_start(start, repeat, opts.repeats, rules), 1)
                    outcome = search_server(prober, arm, endpoint, repeat, first, rules, local=local)
                    if outcome.found:
                        outcome.replays = replay(run, arm, endpoint, repeat, outcome.found, rules, local=local)
            except RUN_FAILURES as err:
                failures.append({"server": arm.name, "phase": PHASE, "repeat": repeat, "error": str(err)})
                progress(f"{arm.name} {PHASE} r{repeat + 1}/{opts.repeats}: FAILED, going on: {err}")
                continue
            finally:
                run.us_per_request, run.fastest_rps = prober.us_per_request, max(run.fastest_rps, prober.fastest_rps)
            outcomes[arm.name].append((repeat, outcome))
            found = "n/a" if outcome.found is None else f"{outcome.found:g} req/s"
            progress(
                f"{arm.name} {PHASE} r{repeat + 1}/{opts.repeats}: {outcome.status}, capacity {found} "
                f"({len(outcome.probes)} probes, {time.monotonic() - began:.0f} s)"
                + (f": {outcome.reason}" if outcome.reason else "")
            )
    for arm in arms:
        records[arm.name]["capacity"] = summarize(outcomes[arm.name], rules, start)
        summary = records[arm.name]["capacity"]
        if summary["mean"] is not None:
            spread = "" if summary["half_width_pct"] is None else f" ± {summary['half_width_pct']:.1f}%"
            progress(f"{arm.name} capacity: {summary['mean']:.0f} req/s{spread} (n={len(summary['values'])})")

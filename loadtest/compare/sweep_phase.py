"""The comparison's sweep phase (``--sweep``): each server searched over its configurations
(``loadtest.compare.sweep`` tells the candidates and the rungs), its best then measured in every repeat.

After the capacity phase: per rung, servers in ABBA order, each candidate on a fresh server of its own
configuration (same model repository, same cores), one capacity search each (``capacity_phase.search_server``):
rung 0 from the server's capacity at the comparison's settings (its mean; else the capacity phase's start)
at ``sweep.COARSE_PRECISION``; rung 1 from the rate rung 0 found, with a bracket factor of
``sweep.FINE_FACTOR``, at ``--capacity-precision``. Each server's best is then searched ``--repeats`` times
in ABBA order with the other's best, exactly as the capacity phase searches the servers at the same
settings (``capacity_phase.capacity_phase``, from the lower of the two bests): that gives the "each at its
best" verdict its values and their interval. The sweep's own starts are not cold starts of the comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest.cli import progress
from loadtest.compare import capacity_phase as capacity_runs
from loadtest.compare import sweep
from loadtest.compare.capacity import bisections, expected_probes
from loadtest.compare.plan import Arm, Options, abba, server_workers
from loadtest.compare.steps import RUN_FAILURES, Run, serving
from loadtest.compare.sweep import Candidate

PHASE = "sweep"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--sweep*`` flags of ``python -m loadtest compare``."""
    group = parser.add_argument_group(
        "each at its best (--sweep): per server, the configuration with the highest SLO capacity (successive "
        "halving over the base and its one-setting changes), then a second verdict between the two bests"
    )
    group.add_argument("--sweep", action="store_true", help="run the sweep after the capacity search (off)")
    group.add_argument("--sweep-space", nargs="+", default=[], metavar="KEY=V1,V2",
                       help=f"the values each setting may take (keys: {', '.join(sweep.SWEEP_KEYS)}; default: max "
                       "batch size /4, x1, x2; queue delay 0, 1000 us; instances 1, 2; workers 1, 2 with two "
                       "server cores or more; precision fp32, bf16 and compile off, on on a GPU)")  # fmt: skip


def check_options(opts: Options) -> None:
    """``ValueError`` for a sweep that cannot run with these flags."""
    if not opts.sweep:
        if opts.sweep_space:
            raise ValueError("--sweep-space needs --sweep")
        return
    if opts.remote:
        raise ValueError("--sweep starts each configuration itself: not with --torch-target/--tf-target")
    if opts.matrix:
        raise ValueError("--sweep searches the configurations itself: not with --matrix")
    if opts.capacity != "on":
        raise ValueError("--sweep needs --capacity on (each best is set beside the capacity at the same settings)")
    if server_workers(opts.server_args) == "auto":
        raise ValueError("--sweep with --server-arg=--workers=auto: name a count (or sweep workers=1,2)")
    sweep.parse_space(opts.sweep_space)


def base_config(opts: Options) -> sweep.Config:
    """The comparison's own configuration, as the sweep names its settings."""
    workers = server_workers(opts.server_args)
    return {
        "max_batch_size": str(opts.max_batch_size),
        "max_queue_delay_us": str(opts.max_queue_delay_us),
        "instances": str(opts.instances),
        "workers": str(workers if isinstance(workers, int) else 1),
        "precision": opts.precision,
        "compile": opts.compile,
    }


def _device(records: dict[str, Any], arms: Sequence[Arm]) -> str:
    """The device the servers run on, as their ModelConfig reported it when prepared."""
    for arm in arms:
        device = ((records[arm.name].get("model_config") or {}).get("parameters") or {}).get("device")
        if device:
            return str(device)
    return "cpu"


def _candidate_arm(arm: Arm, candidate: Candidate, index: int) -> Arm:
    return Arm(f"{arm.name}-sweep{index}", f"{arm.label} ({candidate.name})", arm.framework, candidate.config,
               sweep.config_args(arm.server_args, candidate.config))  # fmt: skip


def sweep_phase(
    run: Run,
    arms: Sequence[Arm],
    records: dict[str, Any],
    model_dirs: dict[str, Path],
    order: list[dict[str, Any]],
    failures: list[dict[str, Any]],
) -> dict[str, Any]:
    """Run the sweep; returns results.json's ``sweep``."""
    opts = run.opts
    compared = [arm for arm in arms if arm.framework is not None]
    base = base_config(opts)
    if opts.sweep_space:
        axes, not_swept = sweep.parse_space(opts.sweep_space), dict[str, str]()
    else:
        axes, not_swept = sweep.default_space(base, _device(records, compared), len(run.server_cpus or []) or 1)
    axes = {key: values for key, values in axes.items() if values != [base[key]]}
    ceiling = capacity_runs.generator_ceiling(run)
    rules = capacity_runs.settings(opts, ceiling)
    coarse = dataclasses.replace(rules, precision=sweep.COARSE_PRECISION)
    fine = dataclasses.replace(rules, factor=sweep.FINE_FACTOR)
    pool = {arm.name: [Candidate(config, sweep.label(config, base)) for config in sweep.candidates(base, axes)]
            for arm in compared}  # fmt: skip
    fallback = capacity_runs.start_rate(opts, records, arms)
    starts = {arm.name: (records[arm.name].get("capacity") or {}).get("mean") or fallback for arm in compared}
    count = len(next(iter(pool.values())))
    probes = (expected_probes(coarse), 1 + bisections(fine))
    plan = sweep.budget(count, len(compared), probes, capacity_runs.probe_seconds(opts), capacity_runs.START_S,
                        opts.repeats)  # fmt: skip
    space = ", ".join(f"{key} {'/'.join(values)}" for key, values in axes.items()) or "nothing"
    progress(f"sweep over {space}: {plan}")
    prober = capacity_runs.probing(run)
    index = 0

    def measure(arm: Arm, candidate: Candidate, rung: int, start: float | None) -> None:
        nonlocal index
        index += 1
        search_rules = coarse if rung == 0 else fine
        entry: dict[str, Any] = {"rung": rung, "precision": search_rules.precision, "start_rps": start,
                                 "score": None}  # fmt: skip
        candidate.rungs.append(entry)
        if start is None:
            entry["error"] = "no rate to start from"
            return
        started = time.monotonic()
        order.append({"phase": PHASE, "repeat": rung, "arm": arm.name, "candidate": candidate.name})
        trial = _candidate_arm(arm, candidate, index)
        try:
            stage = f"{PHASE}-rung{rung}"
            with serving(run, trial, {"starts": []}, stage, 0, model_dirs.get(arm.name)) as (endpoint, local):
                outcome = capacity_runs.search_server(prober, trial, endpoint, 0, round(start, 1), search_rules,
                                                      local=local, stage=stage)  # fmt: skip
        except RUN_FAILURES as err:
            entry["error"] = str(err)
            failures.append({"server": arm.name, "phase": PHASE, "repeat": rung, "error": f"{candidate.name}: {err}"})
            progress(f"{arm.name} {PHASE} rung {rung} {candidate.name}: FAILED, going on: {err}")
            return
        finally:
            run.us_per_request, run.fastest_rps = prober.us_per_request, max(run.fastest_rps, prober.fastest_rps)
        entry |= {"score": sweep.score(outcome, ceiling), "seconds": round(time.monotonic() - started, 1),
                  **outcome.as_dict()}  # fmt: skip
        value = "n/a" if entry["score"] is None else f"{entry['score']:g} req/s"
        progress(f"{arm.name} {PHASE} rung {rung} [{candidate.name}]: {outcome.status}, {value} "
                 f"({len(outcome.probes)} probes, {entry['seconds']:.0f} s)")  # fmt: skip

    for arm in abba(compared, 0):
        for candidate in pool[arm.name]:
            measure(arm, candidate, 0, starts[arm.name])
    finalists: dict[str, list[Candidate]] = {}
    for arm in compared:
        finalists[arm.name] = sweep.survivors(pool[arm.name])
        together = sweep.combined(pool[arm.name], base)
        if together is not None and all(c.config != together for c in pool[arm.name]):
            joined = Candidate(together, sweep.label(together, base), [{"rung": 0, "score": None, "skipped": True}])
            pool[arm.name].append(joined)
            finalists[arm.name].append(joined)
    for arm in abba(compared, 1):
        for candidate in finalists[arm.name]:
            measure(arm, candidate, 1, candidate.score or starts[arm.name])
    bests = {arm.name: _best(finalists[arm.name]) for arm in compared}
    best_arms = {
        arm.name: Arm(f"{arm.name}[best]", f"{arm.label} at its best ({best.name})", arm.framework, best.config,
                      sweep.config_args(arm.server_args, best.config))
        for arm in compared
        if (best := bests[arm.name]) is not None
    }  # fmt: skip
    best_records = {arm.name: {"label": arm.label, "starts": [], "steps": []} for arm in best_arms.values()}
    if len(best_arms) == len(compared):
        start = min(best.score for best in bests.values() if best is not None and best.score is not None)
        runner = dataclasses.replace(run, opts=dataclasses.replace(opts, capacity_start=round(start, 1)))
        dirs = {arm.name: model_dirs[name] for name, arm in best_arms.items() if name in model_dirs}
        capacity_runs.capacity_phase(runner, list(best_arms.values()), best_records, dirs, order, failures)
        run.us_per_request, run.fastest_rps = runner.us_per_request, max(run.fastest_rps, runner.fastest_rps)
    else:
        error = "a server has no configuration with a capacity: no 'each at its best' verdict"
        failures.append({"server": "all", "phase": PHASE, "repeat": 0, "error": error})
    servers = {}
    for arm in compared:
        best = bests[arm.name]
        best_arm = best_arms.get(arm.name)
        servers[arm.name] = {
            "label": records[arm.name]["label"],
            "candidates": [candidate.as_dict() for candidate in pool[arm.name]],
            "best": None if best is None else {"name": best.name, "config": best.config},
            "command": None if best is None else sweep.serve_command(arm.framework or "", opts.model,
                                                                      arm.server_args, best.config),
            "arm": None if best_arm is None else best_arm.name,
            "capacity": None if best_arm is None else best_records[best_arm.name].get("capacity"),
            "starts": None if best_arm is None else best_records[best_arm.name]["starts"],
            "default_capacity": records[arm.name].get("capacity"),
        }  # fmt: skip
    return {
        "base": base,
        "space": axes,
        "not_swept": not_swept,
        "coarse_precision": coarse.precision,
        "fine_factor": fine.factor,
        "budget": plan,
        "servers": servers,
    }


def _best(finalists: Sequence[Candidate]) -> Candidate | None:
    """The best of rung 1 (None when no finalist has a score)."""
    return next((c for c in sweep.ranked(finalists) if c.score is not None), None)

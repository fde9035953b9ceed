"""Reading a comparison's results document: each step's figures, their series over repeats, the
characteristics the verdict judges, and the verdict itself (one table per settings variant).

A verdict row gives each server's mean, the leader's margin (relative to the other), and a winner
only when the difference is beyond noise by ``loadtest.stats.DECISION_RULE``; otherwise it says
"no difference beyond noise". Reference servers (``--target``) are read here too (the tables and
plots show them) but never judged. Figures come from valid steps only, except where no repeat of a
scenario is valid: its series then spans all of them, marked invalid.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from loadtest.compare.capacity import capacity_reading
from loadtest.stats import decide

MIB = 2**20

Step = dict[str, Any]
#: A characteristic's values for one server (one per repeat or start that gave one) and where they were measured.
Reading = tuple[list[float], str]
Reader = Callable[[dict[str, Any], dict[str, Any]], Reading]


# ---------------------------------------------------------------- figures and the verdict


def figure(step: Step, name: str) -> float | None:
    """One figure of a step by a path of at most two keys, e.g. ``throughput_rps`` or ``latency_ms.p99.9``."""
    value: Any = step
    for part in name.split(".", 1):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def x_of(step: Step) -> float:
    """Where a step sits on its loop's axis: its users (closed loop) or its offered rate (open loop)."""
    return step["concurrency"] if step["mode"] == "closed" else step["offered_rps"]


@dataclass
class Point:
    """One scenario of one server over its repeats."""

    x: float
    mean: float
    low: float
    high: float
    valid: bool


def series(steps: Sequence[Step], mode: str, name: str) -> list[Point]:
    """Mean and range of figure ``name`` for each scenario of ``mode``, by x: over the valid
    repeats, or over all of them (``valid`` False) when none is valid."""
    groups: dict[float, list[Step]] = {}
    for step in steps:
        if step["mode"] == mode:
            groups.setdefault(x_of(step), []).append(step)
    points = []
    for x, group in sorted(groups.items()):
        valid = [step for step in group if step["valid"]]
        values = [v for step in valid or group if (v := figure(step, name)) is not None]
        if values:
            points.append(Point(x, statistics.fmean(values), min(values), max(values), bool(valid)))
    return points


def _scenario(step: Step) -> str:
    return f"{step['concurrency']} users" if step["mode"] == "closed" else f"open {step['offered_rps']:g}/s"


def _best_scenario(
    server: dict[str, Any], modes: Sequence[str], slo_ms: float | None = None, slo_errors: float = 0.0
) -> Reading:
    """Throughputs of the valid repeats of the scenario with the best mean (whose mean p99 meets ``slo_ms``
    and mean error rate ``slo_errors``, when given)."""
    groups: dict[str, list[Step]] = {}
    for step in server["steps"]:
        if step["valid"] and step["mode"] in modes:
            groups.setdefault(_scenario(step), []).append(step)
    if slo_ms is not None:
        groups = {
            name: group
            for name, group in groups.items()
            if statistics.fmean(figure(s, "latency_ms.p99") or float("inf") for s in group) <= slo_ms
            and statistics.fmean(s["error_rate"] or 0.0 for s in group) <= slo_errors
        }
    if not groups:
        return [], ""
    name, group = max(groups.items(), key=lambda item: statistics.fmean(s["throughput_rps"] for s in item[1]))
    return [s["throughput_rps"] for s in group], name


def _peak(server: dict[str, Any], settings: dict[str, Any]) -> Reading:
    return _best_scenario(server, ["closed"])


def _slo_errors(settings: dict[str, Any]) -> float:
    return float(settings.get("limits", {}).get("slo_error_rate", 0.01))


def slo_throughput(server: dict[str, Any], settings: dict[str, Any]) -> Reading:
    """MLPerf-'Server'-style: the best valid scenario (either loop) whose p99 meets the SLO with at most
    ``slo_error_rate`` errors; 0 if none does."""
    if not any(step["valid"] for step in server["steps"]):
        return [], ""
    values, where = _best_scenario(server, ["closed", "open"], settings["slo_ms"], _slo_errors(settings))
    return (values, where) if values else ([0.0], "none meets it")


def _reference_steps(server: dict[str, Any], settings: dict[str, Any]) -> list[Step]:
    ref = settings["reference_concurrency"]
    return [s for s in server["steps"] if s["valid"] and s["mode"] == "closed" and s["concurrency"] == ref]


def _at_reference(name: str) -> Reader:
    def read(server: dict[str, Any], settings: dict[str, Any]) -> Reading:
        return [v for step in _reference_steps(server, settings) if (v := figure(step, name)) is not None], ""

    return read


def _cpu_per_request(server: dict[str, Any], settings: dict[str, Any]) -> Reading:
    steps = _reference_steps(server, settings)
    pairs = [(figure(s, "server_cpu_pct.mean"), s["throughput_rps"]) for s in steps]
    return [cpu / 100.0 * 1000.0 / rps for cpu, rps in pairs if cpu is not None and rps], ""


def start_figure(key: str, scale: float = 1.0) -> Reader:
    def read(server: dict[str, Any], settings: dict[str, Any]) -> Reading:
        return [start[key] / scale for start in server["starts"] if start.get(key) is not None], ""

    return read


def memory_under_load(server: dict[str, Any], settings: dict[str, Any]) -> Reading:
    """Per (phase, repeat): the largest RSS sampled inside the windows of its valid steps."""
    per_run: dict[tuple[str, int], float] = {}
    for step in server["steps"]:
        if step["valid"] and (rss := figure(step, "server_rss_bytes.max")) is not None:
            key = (step.get("phase", ""), step["repeat"])
            per_run[key] = max(per_run.get(key, 0.0), rss / MIB)
    return list(per_run.values()), ""


def drain_figure(key: str) -> Reader:
    """A figure of the server's drain runs (``loadtest.compare.drain``), one value per run that gave one."""

    def read(server: dict[str, Any], settings: dict[str, Any]) -> Reading:
        return [v for v in (server.get("drain") or {}).get(key, []) if v is not None], ""

    return read


def drain_exit(server: dict[str, Any], settings: dict[str, Any]) -> Reading:
    """Time to exit per drain run; a run killed for outliving its grace period counts at the time it was
    killed (``killed_after_s``: its exit would have come later still)."""
    found = server.get("drain") or {}
    exits = found.get("exit_s", [])
    killed = found.get("killed_after_s") or [None] * len(exits)
    return [value for exited, kill in zip(exits, killed, strict=True) if (value := kill if exited is None else exited)
            is not None], ""  # fmt: skip


@dataclass
class Characteristic:
    """A verdict row: how to read a server's values of it, and which direction is better."""

    name: str
    unit: str
    higher_is_better: bool
    read: Reader
    #: Read from the load steps (valid ones only), not from the server starts.
    from_steps: bool = True


def capacity_characteristic(settings: dict[str, Any]) -> list[Characteristic]:
    """The headline row, when the comparison searched capacity (``--capacity on``; a server's ``capacity``)."""
    if settings.get("capacity") != "on":
        return []
    name = f"SLO capacity (p99 ≤ {settings['slo_ms']:g} ms, errors ≤ {_slo_errors(settings):.0%})"
    return [Characteristic(name, "req/s", True, capacity_reading, from_steps=False)]


def characteristics(settings: dict[str, Any]) -> list[Characteristic]:
    ref = settings["reference_concurrency"]
    return [
        *capacity_characteristic(settings),
        Characteristic("peak throughput (closed loop)", "req/s", True, _peak),
        Characteristic(
            f"max throughput with p99 ≤ {settings['slo_ms']:g} ms, errors ≤ {_slo_errors(settings):.0%}",
            "req/s",
            True,
            slo_throughput,
        ),
        Characteristic(f"p50 latency @ {ref} users", "ms", False, _at_reference("latency_ms.p50")),
        Characteristic(f"p99 latency @ {ref} users", "ms", False, _at_reference("latency_ms.p99")),
        Characteristic("cold start (spawn to SERVING)", "s", False, start_figure("cold_start_s"), from_steps=False),
        Characteristic("idle memory (RSS)", "MiB", False, start_figure("idle_rss_bytes", MIB), from_steps=False),
        Characteristic("memory under load (max RSS)", "MiB", False, memory_under_load),
        Characteristic(f"server CPU per request @ {ref} users", "ms", False, _cpu_per_request),
        Characteristic(
            "calls lost in a drain (SIGTERM at half the lower peak)",
            "calls",
            False,
            drain_figure("lost_calls"),
            from_steps=False,
        ),
        Characteristic("time to exit after SIGTERM, under load", "s", False, drain_exit, from_steps=False),
        Characteristic(
            "readiness flip after SIGTERM (NOT_SERVING seen)",
            "ms",
            False,
            drain_figure("readiness_flip_ms"),
            from_steps=False,
        ),
    ]


def variants(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The compared pairs: ``results['variants']``, or torch vs tensorflow in an older results document."""
    return results.get("variants") or [
        {"name": "as set", "values": {}, "arms": {fw: fw for fw in ("torch", "tensorflow") if fw in results["servers"]}}
    ]


#: The variant name of the second verdict a sweep (``--sweep``) adds: each server in its best configuration.
AT_ITS_BEST = "each at its best"
#: How the comparison's own variant is named beside it.
SAME_SETTINGS = "same settings"


def best_group(results: dict[str, Any]) -> dict[str, Any] | None:
    """The sweep's pair (``--sweep``: ``results['sweep']``), as a variant of its own; None without a sweep."""
    swept = (results.get("sweep") or {}).get("servers") or {}
    if len(swept) != 2:
        return None
    return {"name": AT_ITS_BEST, "values": {}, "arms": {name: name for name in swept}}


def verdict_groups(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every verdict's pair: the variants (``variants``), then each at its best when the comparison swept."""
    best = best_group(results)
    return [*variants(results), *([best] if best else [])]


def best_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The sweep's verdict: the two bests' SLO capacity, over the repeats that searched them."""
    group = best_group(results)
    if group is None:
        return []
    swept = results["sweep"]["servers"]
    item = capacity_characteristic(results["settings"] | {"capacity": "on"})[0]
    values = {name: capacity_reading(swept[name], results["settings"])[0] for name in group["arms"]}
    where = {name: (swept[name].get("best") or {}).get("name", "") for name in group["arms"]}
    return [_row(AT_ITS_BEST, item, values, where, higher_is_better=True)]


def _row(
    variant: str,
    item: Characteristic,
    values: dict[str, list[float]],
    where: dict[str, str],
    *,
    higher_is_better: bool,
    decision: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "variant": variant,
        "characteristic": item.name,
        "unit": item.unit,
        "better": "higher" if higher_is_better else "lower",
        "values": values,
        "where": where,
        "means": {name: statistics.fmean(v) if v else None for name, v in values.items()},
        **(decision or decide(values, higher_is_better)),
    }


def verdict(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per variant and characteristic: each server's values and mean, the leader, margin, and the decision
    (then the sweep's row, ``best_rows``)."""
    settings, servers = results["settings"], results["servers"]
    rows = []
    for group in variants(results):
        names = list(group["arms"].values())
        if len(names) != 2:
            continue
        measured = any(servers[name]["steps"] for name in names)
        for item in characteristics(settings):
            readings = {name: item.read(servers[name], settings) for name in names}
            values = {name: reading[0] for name, reading in readings.items()}
            decision = decide(values, item.higher_is_better)
            if decision["verdict"] == "not measured" and measured and item.from_steps:
                decision["verdict"] = "no valid step to judge by (see Invalid steps)"
            searched = any(servers[name].get("capacity") for name in names)
            if decision["verdict"] == "not measured" and item.read is capacity_reading and searched:
                decision["verdict"] = "no conclusive search (see SLO capacity)"
            where = {name: reading[1] for name, reading in readings.items()}
            rows.append(_row(group["name"], item, values, where, higher_is_better=item.higher_is_better,
                             decision=decision))  # fmt: skip
    return rows + best_rows(results)


# ---------------------------------------------------------------- naming and numbers


def server_label(results: dict[str, Any], name: str) -> str:
    """How a server is named in tables and plots: its label, else its framework's server name."""
    server = results["servers"].get(name, {})
    return str(server.get("label") or {"torch": "torch_server", "tensorflow": "tf_server"}.get(name, name))


def number(value: float | None, digits: int = 3) -> str:
    """Readable number: ``1012``, ``3.45``, ``0.577``; "n/a" for None."""
    if value is None:
        return "n/a"
    if abs(value) < 1e-3:
        return "0"
    return f"{value:.0f}" if abs(value) >= 10**digits else f"{value:.{digits}g}"

"""The comparison's figures for other tools: per-server breakdowns, perf_analyzer-style CSV, summary.json.

Derived from the results document alone, so ``python -m loadtest report`` writes them for an older
results.json too (figures it lacks are left empty / null). Per server and loop, each scenario's
figures are means over its valid repeats, or over all of them when none is valid (as in the report's
tables). Documented in docs/load-testing.md ("Exports").

- ``server_breakdown``: where the time goes per scenario (``loadtest.breakdown``), into results.json
  as each server's ``breakdown``.
- ``perf_csv``: one row per scenario in perf_analyzer's CSV columns (``PERF_COLUMNS``, microseconds),
  ``perf_<server>.csv`` (closed loop: ``Concurrency``) and ``perf_<server>_rate.csv`` (open loop:
  ``Request Rate``).
- ``summary``: summary.json, every step of every server with its units.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from loadtest.breakdown import KEYS, SERVER_PARTS, mean_breakdown
from loadtest.compare.steps import path_name
from loadtest.compare.verdict import Step, figure, x_of

#: perf_analyzer's CSV (``-f``, with ``--verbose-csv`` and server statistics), after its first column.
PERF_COLUMNS = [
    "Inferences/Second", "Client Send", "Network+Server Send/Recv", "Server Queue", "Server Compute Input",
    "Server Compute Infer", "Server Compute Output", "Client Recv", "p50 latency", "p90 latency", "p95 latency",
    "p99 latency", "Avg latency", "request/response", "response wait",
]  # fmt: skip
FIRST_COLUMN = {"closed": "Concurrency", "open": "Request Rate"}
FILE_SUFFIX = {"closed": "", "open": "_rate"}
LATENCY_KEYS = ("p50", "p90", "p95", "p99", "p99.9", "mean", "max")
UNITS = {
    "latency": "ms",
    "breakdown": "ms",
    "throughput_rps": "successful requests completed per second",
    "rows_per_s": "rows (requests x batch size) completed per second",
    "offered_rps": "requests scheduled per second (open loop)",
    "concurrency": "users sending back to back (closed loop)",
    "error_rate": "failed / sent requests, a fraction",
    "errors_by_status": "failed requests by gRPC status code",
}


def scenarios(steps: Sequence[Step], mode: str) -> list[tuple[float, list[Step], bool]]:
    """(x, the steps its figures come from, whether they are valid) of each scenario of ``mode``, by x."""
    groups: dict[float, list[Step]] = {}
    for step in steps:
        if step["mode"] == mode:
            groups.setdefault(x_of(step), []).append(step)
    chosen = []
    for x, group in sorted(groups.items()):
        valid = [step for step in group if step["valid"]]
        chosen.append((x, valid or group, bool(valid)))
    return chosen


def server_breakdown(steps: Sequence[Step]) -> list[dict[str, Any]]:
    """Where the time goes in each scenario of both loops (``loadtest.breakdown.KEYS``, mean ms)."""
    rows = []
    for mode in ("closed", "open"):
        for x, group, valid in scenarios(steps, mode):
            means = mean_breakdown(group)
            if any(value is not None for value in means.values()):
                rows.append({"mode": mode, "x": x, "repeats": len(group), "valid": valid, **means})
    return rows


def add_breakdowns(results: dict[str, Any]) -> None:
    """Each server's ``breakdown`` (``server_breakdown``) into the results document."""
    for server in results["servers"].values():
        server["breakdown"] = server_breakdown(server["steps"])


def latency_ms(step: Step, name: str) -> float | None:
    """A latency percentile of a step (ms); p95, absent from the step's percentiles, from its CDF."""
    value = figure(step, f"latency_ms.{name}")
    if value is None and name.startswith("p"):
        level = round(float(name[1:]) / 100, 5)
        value = next((ms for ms, at in step.get("latency_cdf") or [] if at == level), None)
    return value


def _mean(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.fmean(present) if present else None


def _us(ms: float | None) -> str:
    return "" if ms is None else str(round(ms * 1000))


def perf_row(x: float, group: Sequence[Step]) -> list[str]:
    """One scenario in ``PERF_COLUMNS`` (µs; empty where not measured). The generator sends requests
    serialized in advance and does not parse replies: Client Send, Client Recv and request/response
    are 0. Network+Server Send/Recv is perf_analyzer's: the client's mean less the server's queue and
    compute (so it holds the server's own handling too), never below 0. Percentiles are the report's
    (every request sent in the window); Avg latency and response wait the client mean of successes."""
    parts = mean_breakdown(group)
    client = parts["client_ms"]
    accounted = [parts[name] for name in SERVER_PARTS]
    network = None
    if client is not None and all(part is not None for part in accounted):
        network = max(client - sum(part for part in accounted if part is not None), 0.0)
    rows_per_s = _mean([step.get("rows_per_s") for step in group])
    return [
        f"{x:g}",
        "" if rows_per_s is None else f"{rows_per_s:.2f}",
        "0",
        _us(network),
        *(_us(part) for part in accounted),
        "0",
        *(_us(_mean([latency_ms(step, name) for step in group])) for name in ("p50", "p90", "p95", "p99")),
        _us(client),
        "0",
        _us(client),
    ]


def perf_csv(steps: Sequence[Step], mode: str) -> str | None:
    """perf_analyzer-style CSV of one server's scenarios of ``mode``; None when it has none."""
    chosen = scenarios(steps, mode)
    if not chosen:
        return None
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow([FIRST_COLUMN[mode], *PERF_COLUMNS])
    writer.writerows(perf_row(x, group) for x, group, _ in chosen)
    return text.getvalue()


def _step_summary(step: Step) -> dict[str, Any]:
    latency = {name: latency_ms(step, name) for name in LATENCY_KEYS}
    breakdown: Mapping[str, Any] = step.get("breakdown") or {}
    return {
        "phase": step.get("phase"),
        "repeat": step.get("repeat"),
        "mode": step["mode"],
        "concurrency": step.get("concurrency"),
        "offered_rps": step.get("offered_rps"),
        "valid": step["valid"],
        "invalid_reasons": step.get("invalid_reasons", []),
        "window_s": step.get("window_s"),
        "requests": step.get("requests"),
        "throughput_rps": step.get("throughput_rps"),
        "rows_per_s": step.get("rows_per_s"),
        "sent_rps": step.get("sent_rps"),
        "errors": step.get("errors"),
        "error_rate": step.get("error_rate"),
        "errors_by_status": step.get("errors_by_status"),
        "errors_by_reason": step.get("errors_by_reason"),
        "latency": {"unit": "ms", **latency},
        "breakdown": {"unit": "ms", **{key: breakdown.get(key) for key in KEYS}},
    }


def _capacity_summary(capacity: dict[str, Any] | None) -> dict[str, Any] | None:
    """A ``capacity`` of results.json as summary.json keeps it: mean, 95 % interval, values, objective."""
    if not capacity:
        return None
    keys = ("mean", "interval", "half_width_pct", "values", "slo_ms", "error_limit")
    return {"unit": "req/s", **{key: capacity.get(key) for key in keys}}


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """summary.json: every server's steps with their units (``UNITS``), percentiles and breakdown, its SLO
    capacity, and (``--sweep``) its best configuration with the command that serves it and its capacity."""
    settings = results["settings"]
    swept = (results.get("sweep") or {}).get("servers") or {}
    return {
        "units": UNITS,
        "model": settings.get("model"),
        "batch_size": settings.get("batch_size"),
        "started": results.get("meta", {}).get("started"),
        "latency_note": settings.get("latency_note"),
        "servers": {
            name: {
                "label": server.get("label"),
                "framework": server.get("framework"),
                "steps": [_step_summary(step) for step in server["steps"]],
                "capacity": _capacity_summary(server.get("capacity")),
                "at_its_best": None
                if name not in swept
                else {
                    "config": (swept[name].get("best") or {}).get("config"),
                    "command": swept[name].get("command"),
                    "capacity": _capacity_summary(swept[name].get("capacity")),
                },
            }
            for name, server in results["servers"].items()
        },
    }


def write_exports(results: dict[str, Any], out: Path) -> list[Path]:
    """summary.json and each server's perf CSVs into ``out``; returns the files written."""
    written = [out / "summary.json"]
    written[0].write_text(json.dumps(summary(results), indent=1, allow_nan=False))
    for name, server in results["servers"].items():
        for mode, suffix in FILE_SUFFIX.items():
            text = perf_csv(server["steps"], mode)
            if text is not None:
                path = out / f"perf_{path_name(name)}{suffix}.csv"
                path.write_text(text)
                written.append(path)
    return written

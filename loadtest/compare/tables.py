"""The comparison report's tables, as (head, rows) of strings that the Markdown and HTML renderers
share: the verdict per variant, the SLO capacity and its probes, every server side by side, the
servers' settings, each loop's steps (mean and min-max range over repeats, valid repeats counted, failures
by status), where the time goes, failed requests by status and reason, requests per worker, invalid steps,
failed runs, the fidelity gate (``loadtest.compare.fidelity``), the drain runs (``loadtest.compare.drain``),
and the run's settings and environment. Also the warnings that head the report (outputs that differ beyond
tolerance, a pinning that makes workers share cores, steps unbalanced across workers).
"""

from __future__ import annotations

import json
import statistics
from typing import Any

from loadtest.compare import drain, fidelity, sweep_tables
from loadtest.compare.exports import server_breakdown
from loadtest.compare.verdict import (
    MIB,
    SAME_SETTINGS,
    Point,
    Step,
    characteristics,
    number,
    series,
    server_label,
    verdict_groups,
    x_of,
)
from loadtest.stats import UNBALANCED_SHARE, errors_text, worker_balance
from loadtest.users.latency_file import NOT_RECORDED, status_code

Table = tuple[list[str], list[list[str]]]


def _ranged(points: dict[float, Point], x: float, digits: int = 3) -> str:
    point = points.get(x)
    if point is None:
        return "n/a"
    if point.high - point.low > 0:
        return f"{number(point.mean, digits)} ({number(point.low, digits)}–{number(point.high, digits)})"
    return number(point.mean, digits)


def _verdict_cell(row: dict[str, Any], name: str) -> str:
    """Mean, the number of values behind it, and where it was measured (``1983 (n=3, @ 32 users)``)."""
    values, where = row["values"][name], row["where"][name]
    if not values:
        return "n/a"
    details = ", ".join(filter(None, [f"n={len(values)}", where and f"@ {where}"]))
    return f"{number(row['means'][name], 4)} ({details})"


def verdict_tables(results: dict[str, Any]) -> list[tuple[str, Table]]:
    """One verdict table per variant: characteristic, each server, the difference, the verdict."""
    tables = []
    groups = verdict_groups(results)
    for group in groups:
        rows = [row for row in results["verdict"] if row["variant"] == group["name"]]
        if not rows:
            continue
        names = list(rows[0]["values"])
        body = []
        for row in rows:
            leader, margin = row["leader"], row["margin_pct"]
            difference = "none" if margin == 0 else "n/a"
            if leader is not None:
                difference = f"{server_label(results, leader)} by {'∞' if margin is None else f'{margin:.1f}%'}"
            if row["winner"] is not None:
                decided = f"{server_label(results, row['winner'])} better (ranges apart; p = {row['p_value']:.2g})"
            elif row["p_value"] is not None:
                decided = f"{row['verdict']} (ranges overlap)"
            else:
                decided = row["verdict"]
            body.append(
                [
                    f"{row['characteristic']} ({row['unit']}, {row['better']} is better)",
                    *(_verdict_cell(row, name) for name in names),
                    difference,
                    decided,
                ]
            )
        head = ["characteristic", *(server_label(results, name) for name in names), "difference of means", "verdict"]
        name = SAME_SETTINGS if group["name"] == "as set" and len(groups) > 1 else group["name"]
        title = "Verdict" if len(groups) == 1 else f"Verdict: {name}"
        tables.append((title, (head, body)))
    return tables


def summary_table(results: dict[str, Any]) -> Table:
    """A row per server (each variant, each reference): the verdict's characteristics side by side."""
    settings = results["settings"]
    items = characteristics(settings)
    body = []
    for name, server in results["servers"].items():
        cells = []
        for item in items:
            values, _ = item.read(server, settings)
            cells.append(f"{number(statistics.fmean(values), 4)} (n={len(values)})" if values else "n/a")
        body.append([server_label(results, name), *cells])
    return ["server", *(f"{item.name} ({item.unit})" for item in items)], body


STEP_COLUMNS = {
    "throughput (req/s)": "throughput_rps",
    "error rate": "error_rate",
    "p50 (ms)": "latency_ms.p50",
    "p90 (ms)": "latency_ms.p90",
    "p99 (ms)": "latency_ms.p99",
    "p99.9 (ms)": "latency_ms.p99.9",
    "max (ms)": "latency_ms.max",
    "server CPU %": "server_cpu_pct.mean",
    "server RSS max (MiB)": "server_rss_bytes.max",
    "generator CPU %": "generator_cpu_pct.mean",
    "generator µs/req": "generator_us_per_request",
    "other CPU %": "other_cpu_pct.mean",
    "queue (ms)": "server_metrics.queue_ms_mean",
    "compute (ms)": "server_metrics.compute_ms_mean",
    "batch": "server_metrics.batch_size_mean",
}
OPEN_LOOP_COLUMNS = {"sent (req/s)": "sent_rps", "send lag p99 (ms)": "send_lag_ms.p99"}


def _error_rate(point: Point | None) -> str:
    if point is None:
        return "n/a"
    if point.high - point.low > 0:
        return f"{point.mean:.2%} ({point.low:.2%}–{point.high:.2%})"
    return f"{point.mean:.2%}"


def step_table(results: dict[str, Any], mode: str) -> Table:
    """Every scenario of ``mode`` for every server: mean (range) over repeats, and how many repeats were valid."""
    first = "users" if mode == "closed" else "offered (req/s)"
    paths = STEP_COLUMNS if mode == "closed" else STEP_COLUMNS | OPEN_LOOP_COLUMNS
    head = ["server", first, *paths, "failed, all repeats", "valid"]
    body = []
    for name, server in results["servers"].items():
        steps = [s for s in server["steps"] if s["mode"] == mode]
        columns = {column: {p.x: p for p in series(steps, mode, path)} for column, path in paths.items()}
        columns["server RSS max (MiB)"] = {
            x: Point(x, p.mean / MIB, p.low / MIB, p.high / MIB, p.valid)
            for x, p in columns["server RSS max (MiB)"].items()
        }
        for x in sorted({x_of(s) for s in steps}):
            group = [s for s in steps if x_of(s) == x]
            valid = f"{sum(s['valid'] for s in group)}/{len(group)}"
            cells = [
                _error_rate(columns[column].get(x)) if column == "error rate" else _ranged(columns[column], x)
                for column in paths
            ]
            body.append([server_label(results, name), f"{x:g}", *cells, errors_cell(group), valid])
    return head, body


def error_counts(steps: list[Step], key: str = "errors_by_status") -> dict[str, int]:
    """The steps' failures by status (``key``: or by reason) summed, most frequent first; a step measured before
    they were counted adds its failures as ``NOT_RECORDED`` (only to the counts by status)."""
    counts: dict[str, int] = {}
    for step in steps:
        by = step.get(key)
        if by is None and key == "errors_by_status" and step.get("errors"):
            by = {NOT_RECORDED: step["errors"]}
        for label, count in (by or {}).items():
            counts[label] = counts.get(label, 0) + count
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


def errors_cell(steps: list[Step]) -> str:
    """``errors 3223 (RESOURCE_EXHAUSTED 3100, DEADLINE_EXCEEDED 123)`` over the steps."""
    return errors_text(sum(step.get("errors") or 0 for step in steps), error_counts(steps))


BREAKDOWN_HEAD = {
    "client_ms": "client",
    "network_serialization_ms": "network + serialization",
    "server_ms": "server",
    "queue_ms": "queue",
    "compute_input_ms": "compute input",
    "compute_infer_ms": "compute infer",
    "compute_output_ms": "compute output",
    "server_other_ms": "server other",
}


def breakdown_table(results: dict[str, Any]) -> Table:
    """Where the time goes: each server's scenarios, mean ms per successful request (``loadtest.breakdown``),
    over the valid repeats (all, marked, where none is valid)."""
    head = ["server", "loop", "users / rate", *(f"{name} (ms)" for name in BREAKDOWN_HEAD.values()), "repeats"]
    body = []
    for name, server in results["servers"].items():
        for row in server_breakdown(server["steps"]):
            cells = [number(row[key], 3) if row[key] is not None else "n/a" for key in BREAKDOWN_HEAD]
            repeats = f"{row['repeats']}" + ("" if row["valid"] else " (none valid)")
            body.append([server_label(results, name), row["mode"], f"{row['x']:g}", *cells, repeats])
    return head, body


def failures_by_status_table(results: dict[str, Any]) -> Table:
    """Each scenario with failed requests: its failures by status, and by reason where the status carries one
    (summed over every repeat)."""
    body = []
    for name, server in results["servers"].items():
        for mode in ("closed", "open"):
            for x in sorted({x_of(step) for step in server["steps"] if step["mode"] == mode}):
                everything = [step for step in server["steps"] if step["mode"] == mode and x_of(step) == x]
                by_status = error_counts(everything)
                if not by_status:
                    continue
                sent = sum(step.get("requests") or 0 for step in everything)
                reasons = error_counts(everything, "errors_by_reason")
                for status, count in by_status.items():
                    why = "; ".join(f"{label.split(': ', 1)[1]}: {n}" for label, n in reasons.items()
                                    if status_code(label) == status)  # fmt: skip
                    share = f"{count / sent:.2%}" if sent else "n/a"
                    body.append([server_label(results, name), mode, f"{x:g}", status, str(count), share, why])
    return ["server", "loop", "users / rate", "status", "failed (all repeats)", "of sent", "reasons"], body


def server_table(results: dict[str, Any]) -> Table:
    head = ["server", "target", "framework version", "device", "threads", "workers", "precision", "compile",
            "max batch", "dynamic batching", "first start, exporting (s)", "cold starts (s)",
            "idle RSS (MiB)"]  # fmt: skip
    body = []
    for name, server in results["servers"].items():
        config = server.get("model_config") or {}
        params = config.get("parameters", {})
        cold = [s["cold_start_s"] for s in server["starts"] if s.get("cold_start_s") is not None]
        idle = [s["idle_rss_bytes"] / MIB for s in server["starts"] if s.get("idle_rss_bytes") is not None]
        prepared = server.get("prepare") or {}
        first = prepared.get("first_start_s")
        export = prepared.get("export_s")
        first_cell = "n/a" if first is None else f"{first:.2f}" + ("" if export is None else f" (export {export:.2f})")
        body.append(
            [
                server_label(results, name),
                str(server.get("target") or "n/a"),
                params.get("framework_version", "n/a"),
                params.get("device", "n/a"),
                params.get("threads", "n/a"),
                params.get("workers", "n/a"),
                params.get("precision", "n/a"),
                params.get("compile", "n/a"),
                str(config.get("max_batch_size", "n/a")),
                json.dumps(config.get("dynamic_batching")),
                first_cell,
                ", ".join(f"{c:.2f}" for c in cold) or "n/a",
                ", ".join(f"{m:.0f}" for m in idle) or "n/a",
            ]
        )
    return head, body


def _balance(step: Step) -> dict[str, Any] | None:
    """The step's worker balance (recomputed from its per-worker counts in an older results document)."""
    if "worker_balance" in step:
        return step["worker_balance"]
    return worker_balance((step.get("server_metrics") or {}).get("requests_per_worker") or {})


def worker_table(results: dict[str, Any]) -> Table:
    """Per server, how the requests of each step spread over its worker processes: each worker's share, the
    busiest over the idlest, and a note (UNBALANCED when one got under ``UNBALANCED_SHARE`` of its fair share).
    A server with one worker throughout gets one row that says so."""
    head = ["server", "phase", "repeat", "loop", "users / rate", "workers", "requests", "share per worker",
            "max/min", "note"]  # fmt: skip
    body = []
    for name, server in results["servers"].items():
        steps = [(step, balance) for step in server["steps"] if (balance := _balance(step)) is not None]
        if not steps:
            if server["steps"]:
                body.append(
                    [server_label(results, name), "all", "", "", "", "n/a", "", "", "", "not reported by the server"]
                )
            continue
        if all(balance["workers"] == 1 for _, balance in steps):
            body.append([server_label(results, name), "all", "", "", "", "1", "", "", "", "1 worker"])
            continue
        for step, balance in steps:
            shares = ", ".join(
                f"{worker}: {'n/a' if share is None else f'{share:.0%}'}" for worker, share in balance["shares"].items()
            )
            ratio = balance["max_min_ratio"]
            where = [step.get("phase", ""), str(step["repeat"] + 1), step["mode"], f"{x_of(step):g}"]
            body.append([server_label(results, name), *where, str(balance["workers"]), f"{balance['requests']:.0f}",
                         shares, "∞" if ratio is None else f"{ratio:.2f}", balance["note"]])  # fmt: skip
    return head, body


def run_warnings(results: dict[str, Any]) -> list[str]:
    """What the reader must know before the figures: outputs that differ beyond tolerance (compared anyway),
    a pinning that makes workers share cores, unbalanced steps."""
    warnings = fidelity.warnings(results)
    if pinned := (results["settings"].get("pinning") or {}).get("warning"):
        warnings.append(f"Pinning: {pinned}.")
    for name, server in results["servers"].items():
        unbalanced = [step for step in server["steps"] if (_balance(step) or {}).get("unbalanced")]
        if unbalanced:
            warnings.append(
                f"{server_label(results, name)}: {len(unbalanced)} of {len(server['steps'])} steps unbalanced across "
                f"its workers (one got under {UNBALANCED_SHARE:.0%} of its fair share; see Requests per worker)."
            )
    return warnings


def invalid_table(results: dict[str, Any]) -> Table:
    body = []
    for name, server in results["servers"].items():
        for s in server["steps"]:
            if not s["valid"]:
                where = [s.get("phase", ""), str(s["repeat"] + 1), s["mode"], f"{x_of(s):g}"]
                body.append([server_label(results, name), *where, "; ".join(s["invalid_reasons"])])
    return ["server", "phase", "repeat", "loop", "users / rate", "reasons"], body


def failure_table(results: dict[str, Any]) -> Table:
    body = [
        [server_label(results, f["server"]), f.get("phase", ""), str(f["repeat"] + 1), f["error"]]
        for f in results.get("failures", [])
    ]
    return ["server", "phase", "repeat", "error"], body


def _grid_text(results: dict[str, Any]) -> str:
    grid = results.get("grid") or {}
    rates = ", ".join(f"{r:g}" for r in grid.get("rates", [])) or "none"
    if grid.get("fixed", True):
        return f"{rates} (given)"
    peaks = "; ".join(f"{server_label(results, n)} {number(p)}" for n, p in grid.get("peaks", {}).items())
    if grid.get("invalid_peaks"):
        peaks += " (from INVALID steps, none valid: " + ", ".join(
            server_label(results, n) for n in grid["invalid_peaks"]
        )
        peaks += ")"
    return (
        f"{rates}: {', '.join(f'{f:g}' for f in grid['fractions'])} x the lower valid closed-loop peak "
        f"({number(grid['lower_peak_rps'])}) and {grid['overload']:g} x the higher "
        f"({number(grid['higher_peak_rps'])}); peaks: {peaks}"
    )


def _order_text(results: dict[str, Any]) -> str:
    runs: dict[tuple[str, int], list[str]] = {}
    for entry in results.get("order", []):
        runs.setdefault((entry["phase"], entry["repeat"]), []).append(server_label(results, entry["arm"]))
    return "; ".join(f"{phase} r{repeat + 1}: {', '.join(names)}" for (phase, repeat), names in runs.items())


def _capacity_text(settings: dict[str, Any]) -> str:
    if settings.get("capacity") != "on":
        return "off" if settings.get("capacity") == "off" else "not run (a comparison from before the search)"
    start = settings.get("capacity_start")
    return (
        f"from {'the lower valid closed-loop peak' if start is None else f'{start:g} req/s'}, precision "
        f"{settings['capacity_precision']:g}, probes of {settings['capacity_warmup_seconds']:g} s warm-up + "
        f"{settings['capacity_step_seconds']:g} s window, at most {settings['capacity_max_probes']} per search"
    )


def settings_table(results: dict[str, Any]) -> Table:
    settings, env = results["settings"], results["environment"]
    rows = {
        "model": settings["model"],
        "server flags (both)": " ".join(settings["server_args_for_all"]),
        "matrix": " ".join(settings.get("matrix") or []) or "none",
        "mode": settings["mode"],
        "pinning": json.dumps(settings["pinning"]),
        "closed loop users": ", ".join(map(str, settings["concurrency"])),
        "open loop rates (req/s, every server)": _grid_text(results),
        "run order (ABBA)": _order_text(results),
        "arrivals": f"{settings['arrival']} over {settings['arrival_users']} streams",
        "request deadline": f"{settings['deadline_ms']:g} ms",
        "window / warm-up per step": f"{settings['step_seconds']:g} s / {settings['warmup_seconds']:g} s",
        "repeats": str(settings["repeats"]),
        "batch size / encoding": f"{settings['batch_size']} / {settings['encoding']}",
        "p99 SLO": f"{settings['slo_ms']:g} ms",
        "capacity search": _capacity_text(settings),
        "validity limits": json.dumps(settings["limits"]),
        "latency": settings.get("latency_note", ""),
        "verdict rule": settings.get("decision_rule", ""),
        "CPU": f"{env['cpu_model']} ({env['cpu_count']} logical cores)",
        "GPUs": ", ".join(env["gpus"]) or "none",
        "Python / packages": f"{env['python']}; " + ", ".join(f"{k} {v}" for k, v in env["packages"].items()),
        "platform": env["platform"],
        "started / duration": f"{results['meta']['started']} / {results['meta']['duration_s']:g} s",
    }
    return ["setting", "value"], [[key, str(value)] for key, value in rows.items()]


def _searched(results: dict[str, Any]) -> bool:
    return any(server.get("capacity") for server in results["servers"].values())


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def capacity_table(results: dict[str, Any]) -> Table:
    """The SLO capacity per server (``loadtest.compare.capacity``): mean over the conclusive searches, its 95 %
    Student-t interval and half-width, each repeat's found rate, and the search's settings."""
    head = ["server", "capacity (req/s, mean)", "95% interval (Student t)", "half-width", "conclusive searches",
            "found per repeat (req/s)", "probes per repeat", "replays at the found rate", "search"]  # fmt: skip
    body = []
    for name, server in results["servers"].items():
        capacity = server.get("capacity")
        if not capacity:
            continue
        repeats = capacity["repeats"]
        interval = capacity["interval"]
        found = ", ".join(_rate(r["found"]) if r["found"] is not None else r["status"] for r in repeats)
        resolution = capacity.get("resolution_pct")
        lattice = "" if resolution is None else f" (rates {resolution:.1f}% apart, each repeat's start shifted)"
        search = (f"from {capacity['start_rps']:g} req/s, x{capacity['factor']:g} bracket, bisection to "
                  f"{capacity['precision']:.0%}{lattice}, at most {capacity['max_probes']} probes")  # fmt: skip
        body.append(
            [
                server_label(results, name),
                _rate(capacity["mean"]),
                "n/a (fewer than 2 values)" if interval is None else f"{_rate(interval[0])}–{_rate(interval[1])}",
                "n/a" if capacity["half_width_pct"] is None else f"±{capacity['half_width_pct']:.1f}%",
                f"{len(capacity['values'])}/{len(repeats)}",
                found or "none",
                ", ".join(str(len(r["probes"])) for r in repeats) or "none",
                _replays_text(capacity.get("replays")),
                search,
            ]
        )
    return head, body


def _replays_text(replays: dict[str, int] | None) -> str:
    if not replays or not replays["run"]:
        return "none run"
    invalid = replays["run"] - replays["valid"]
    return f"{replays['passed']} of {replays['valid']} met the SLO" + (f" ({invalid} invalid)" if invalid else "")


def capacity_probe_table(results: dict[str, Any]) -> Table:
    """Every probe of every capacity search (then its replays at the rate found): its rate, p99, error rate, and
    pass, fail or why it was invalid."""
    head = ["server", "repeat", "probe", "rate (req/s)", "sent (req/s)", "p99 (ms)", "error rate", "judged",
            "search"]  # fmt: skip
    body = []
    for name, server in results["servers"].items():
        for entry in (server.get("capacity") or {}).get("repeats", []):
            replays = [(f"replay {i + 1}", probe) for i, probe in enumerate(entry.get("replays", []))]
            for i, (label, probe) in enumerate([*((str(j + 1), p) for j, p in enumerate(entry["probes"])), *replays]):
                judged = {True: "pass", False: "fail"}.get(probe["pass"]) or "INVALID: " + "; ".join(
                    probe["invalid_reasons"]
                )
                last = i == len(entry["probes"]) - 1
                outcome = entry["status"] + (f": {entry['reason']}" if entry["reason"] else "")
                body.append([server_label(results, name), str(entry["repeat"] + 1), label, f"{probe['rate']:g}",
                             _rate(probe.get("sent_rps")), number(probe["p99_ms"]),
                             "n/a" if probe["error_rate"] is None else f"{probe['error_rate']:.2%}", judged,
                             outcome if last else ""])  # fmt: skip
    return head, body


def sections(results: dict[str, Any]) -> list[tuple[str, Table]]:
    slo = f"p99 ≤ {results['settings']['slo_ms']:g} ms"
    return [
        *verdict_tables(results),
        *([(f"SLO capacity ({slo}; open loop, Poisson)", capacity_table(results))] if _searched(results) else []),
        *sweep_tables.sections(results),
        (
            "Fidelity (same inputs to both servers before timing: largest difference, top-1 agreement)",
            fidelity.table(results),
        ),
        ("Every server", summary_table(results)),
        ("Servers", server_table(results)),
        ("Closed loop (concurrency sweep)", step_table(results, "closed")),
        ("Open loop (arrival-rate sweep, the same rates for every server)", step_table(results, "open")),
        ("Where the time goes (mean ms per successful request)", breakdown_table(results)),
        ("Failed requests by status", failures_by_status_table(results)),
        ("Drain (SIGTERM under steady open-loop load at half the lower peak)", drain.table(results)),
        *([("Capacity search probes", capacity_probe_table(results))] if _searched(results) else []),
        ("Requests per worker", worker_table(results)),
        ("Invalid steps", invalid_table(results)),
        ("Failed runs", failure_table(results)),
        ("Settings and environment", settings_table(results)),
    ]

"""The comparison report: results.json, report.md, a self-contained report.html and PNG plots.

Everything is derived from the results document ``loadtest.compare`` builds, so a
report can be re-rendered from its results.json (``python -m loadtest report``).
Figures are means over the valid repeats with their min-max range; invalid steps
are listed with their reasons and left out of the verdict. A verdict row says which server wins one
characteristic, by how much (relative to the loser), and whether that difference
exceeds the run-to-run spread (the larger of the two servers' max-min ranges over
repeats; "n/a" with a single repeat).
"""

from __future__ import annotations

import base64
import html
import json
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

COLORS = {"torch": "#e4572e", "tensorflow": "#2e86de"}
LABELS = {"torch": "torch_server", "tensorflow": "tf_server"}
PERCENTILE_STYLES = {"p50": ":", "p90": "--", "p99": "-"}
MIB = 2**20
NUMBER_LIST = re.compile(r"\[[-+.\deE,\s]*\]")

Step = dict[str, Any]
#: A characteristic's values for one server (one per repeat that gave one) and where they were measured.
Reading = tuple[list[float], str]
Reader = Callable[[dict[str, Any], dict[str, Any]], Reading]


# ---------------------------------------------------------------- figures and the verdict


def figure(step: Step, name: str) -> float | None:
    """One figure of a step by a path of at most two keys, e.g. ``throughput_rps`` or ``latency_ms.p99.9``."""
    value: Any = step
    for part in name.split(".", 1):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _x(step: Step) -> float:
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
            groups.setdefault(_x(step), []).append(step)
    points = []
    for x, group in sorted(groups.items()):
        valid = [step for step in group if step["valid"]]
        values = [v for step in valid or group if (v := figure(step, name)) is not None]
        if values:
            points.append(Point(x, statistics.fmean(values), min(values), max(values), bool(valid)))
    return points


def _scenario(step: Step) -> str:
    return f"{step['concurrency']} users" if step["mode"] == "closed" else f"open {step['offered_rps']:g}/s"


def _best_scenario(server: dict[str, Any], modes: Sequence[str], slo_ms: float | None = None) -> Reading:
    """Throughputs of the valid repeats of the scenario with the best mean (whose mean p99 meets ``slo_ms``)."""
    groups: dict[str, list[Step]] = {}
    for step in server["steps"]:
        if step["valid"] and step["mode"] in modes:
            groups.setdefault(_scenario(step), []).append(step)
    if slo_ms is not None:
        groups = {
            name: group
            for name, group in groups.items()
            if statistics.fmean(figure(s, "latency_ms.p99") or float("inf") for s in group) <= slo_ms
        }
    if not groups:
        return [], ""
    name, group = max(groups.items(), key=lambda item: statistics.fmean(s["throughput_rps"] for s in item[1]))
    return [s["throughput_rps"] for s in group], name


def _peak(server: dict[str, Any], settings: dict[str, Any]) -> Reading:
    return _best_scenario(server, ["closed"])


def _slo_throughput(server: dict[str, Any], settings: dict[str, Any]) -> Reading:
    """MLPerf-'Server'-style: the best valid scenario (either loop) whose p99 meets the SLO; 0 if none does."""
    if not any(step["valid"] for step in server["steps"]):
        return [], ""
    values, where = _best_scenario(server, ["closed", "open"], settings["slo_ms"])
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


def _start_figure(key: str, scale: float = 1.0) -> Reader:
    def read(server: dict[str, Any], settings: dict[str, Any]) -> Reading:
        return [start[key] / scale for start in server["starts"] if start.get(key) is not None], ""

    return read


def _memory_under_load(server: dict[str, Any], settings: dict[str, Any]) -> Reading:
    per_repeat: dict[int, float] = {}
    for step in server["steps"]:
        if (rss := figure(step, "server_rss_bytes.max")) is not None:
            per_repeat[step["repeat"]] = max(per_repeat.get(step["repeat"], 0.0), rss / MIB)
    return list(per_repeat.values()), ""


@dataclass
class Characteristic:
    """A verdict row: how to read a server's values of it, and which direction is better."""

    name: str
    unit: str
    higher_is_better: bool
    read: Reader


def characteristics(settings: dict[str, Any]) -> list[Characteristic]:
    ref = settings["reference_concurrency"]
    return [
        Characteristic("peak throughput (closed loop)", "req/s", True, _peak),
        Characteristic(f"max throughput with p99 ≤ {settings['slo_ms']:g} ms", "req/s", True, _slo_throughput),
        Characteristic(f"p50 latency @ {ref} users", "ms", False, _at_reference("latency_ms.p50")),
        Characteristic(f"p99 latency @ {ref} users", "ms", False, _at_reference("latency_ms.p99")),
        Characteristic("cold start (spawn to SERVING)", "s", False, _start_figure("cold_start_s")),
        Characteristic("idle memory (RSS)", "MiB", False, _start_figure("idle_rss_bytes", MIB)),
        Characteristic("memory under load (max RSS)", "MiB", False, _memory_under_load),
        Characteristic(f"server CPU per request @ {ref} users", "ms", False, _cpu_per_request),
    ]


def decide(values: dict[str, list[float]], higher_is_better: bool) -> dict[str, Any]:
    """Winner, margin (% relative to the loser) and whether the gap exceeds the repeats' spread."""
    (a, a_values), (b, b_values) = values.items()
    if not a_values or not b_values:
        return {"winner": None, "margin_pct": None, "exceeds_spread": None}
    mean_a, mean_b = statistics.fmean(a_values), statistics.fmean(b_values)
    gap = abs(mean_a - mean_b)
    spread = max(max(a_values) - min(a_values), max(b_values) - min(b_values))
    exceeds = gap > spread if min(len(a_values), len(b_values)) > 1 else None
    if gap == 0:
        return {"winner": "tie", "margin_pct": 0.0, "exceeds_spread": exceeds}
    winner = a if (mean_a > mean_b) == higher_is_better else b
    loser_mean = mean_b if winner == a else mean_a
    margin = gap / abs(loser_mean) * 100.0 if loser_mean else None
    return {"winner": winner, "margin_pct": margin, "exceeds_spread": exceeds}


def verdict(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per characteristic: each server's values (over repeats), means, winner, margin, significance."""
    settings, servers = results["settings"], results["servers"]
    rows = []
    for item in characteristics(settings):
        readings = {framework: item.read(server, settings) for framework, server in servers.items()}
        values = {framework: reading[0] for framework, reading in readings.items()}
        rows.append(
            {
                "characteristic": item.name,
                "unit": item.unit,
                "better": "higher" if item.higher_is_better else "lower",
                "values": values,
                "where": {framework: reading[1] for framework, reading in readings.items()},
                "means": {fw: statistics.fmean(v) if v else None for fw, v in values.items()},
                **decide(values, item.higher_is_better),
            }
        )
    return rows


# ---------------------------------------------------------------- plots


def _errorbar(ax: Axes, framework: str, points: Sequence[Point], style: str = "-", label: str | None = None) -> None:
    if not points:
        return
    color = COLORS[framework]
    xs = [p.x for p in points]
    ax.plot(xs, [p.mean for p in points], style, color=color, label=label or LABELS[framework])
    ax.errorbar(
        xs,
        [p.mean for p in points],
        yerr=[[p.mean - p.low for p in points], [p.high - p.mean for p in points]],
        fmt="none",
        ecolor=color,
        alpha=0.6,
        capsize=3,
    )
    for p in points:
        ax.plot(p.x, p.mean, "o", color=color, markerfacecolor=color if p.valid else "white")


def _num(value: float | None, digits: int = 3) -> str:
    """Readable number: ``1012``, ``3.45``, ``0.577``; "n/a" for None."""
    if value is None:
        return "n/a"
    if abs(value) < 1e-3:
        return "0"
    return f"{value:.0f}" if abs(value) >= 10**digits else f"{value:.{digits}g}"


def _log_axis(ax: Axes, which: str, ticks: Sequence[float] = ()) -> None:
    """Log scale with plain-number labels: at ``ticks`` if given, else at 1-2-5 steps."""
    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    if ticks:
        axis.set_ticks(list(ticks))
    else:
        axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def _concurrency_axis(results: dict[str, Any], ax: Axes) -> None:
    _log_axis(ax, "x", results["settings"]["concurrency"])
    ax.set_xlabel("concurrent users (closed loop)")


def _plot_lines(results: dict[str, Any], ax: Axes, mode: str, names: dict[str, str]) -> None:
    for framework, server in results["servers"].items():
        for name, style in names.items():
            label = LABELS[framework] if len(names) == 1 else f"{LABELS[framework]} {name.rsplit('.', 1)[-1]}"
            _errorbar(ax, framework, series(server["steps"], mode, name), style, label)


def plot_throughput(results: dict[str, Any], ax: Axes) -> None:
    _plot_lines(results, ax, "closed", {"throughput_rps": "-"})
    ax.set(ylabel="successful requests/s", title="Throughput vs concurrency")
    _concurrency_axis(results, ax)


def plot_latency_concurrency(results: dict[str, Any], ax: Axes) -> None:
    _plot_lines(results, ax, "closed", {f"latency_ms.{q}": s for q, s in PERCENTILE_STYLES.items()})
    ax.set(ylabel="latency (ms)", title="Latency percentiles vs concurrency")
    _concurrency_axis(results, ax)
    _log_axis(ax, "y")


def plot_latency_rate(results: dict[str, Any], ax: Axes) -> None:
    _plot_lines(results, ax, "open", {f"latency_ms.{q}": s for q, s in PERCENTILE_STYLES.items()})
    ax.axhline(results["settings"]["slo_ms"], color="grey", linewidth=0.8, linestyle="-.", label="p99 SLO")
    ax.set(
        xlabel="offered rate (req/s, open loop, from scheduled send)",
        ylabel="latency (ms)",
        title="Latency percentiles vs offered load",
    )
    _log_axis(ax, "y")


def plot_distribution(results: dict[str, Any], ax: Axes) -> None:
    ref = results["settings"]["reference_concurrency"]
    for framework, server in results["servers"].items():
        steps = [s for s in server["steps"] if s["mode"] == "closed" and s["concurrency"] == ref and s["latency_cdf"]]
        steps.sort(key=lambda s: not s["valid"])  # the first valid repeat, else the first one
        if steps:
            ms, fraction = zip(*steps[0]["latency_cdf"], strict=True)
            label = f"{LABELS[framework]} (repeat {steps[0]['repeat'] + 1}{'' if steps[0]['valid'] else ', invalid'})"
            ax.plot(ms, fraction, color=COLORS[framework], label=label)
    ax.set(xlabel="latency (ms)", ylabel="fraction of requests ≤ latency", title=f"Latency CDF @ {ref} users")
    _log_axis(ax, "x")


def _bars(ax: Axes, groups: Sequence[str], values: dict[str, list[list[float]]], unit: str) -> None:
    """Grouped bars: for each framework, one bar per group (mean, min-max range)."""
    width = min(0.3, 0.8 / len(values))
    for i, (framework, per_group) in enumerate(values.items()):
        xs = [g + (i - (len(values) - 1) / 2) * width for g in range(len(groups))]
        means = [statistics.fmean(v) if v else 0.0 for v in per_group]
        low = [m - min(v) if v else 0.0 for m, v in zip(means, per_group, strict=True)]
        high = [max(v) - m if v else 0.0 for m, v in zip(means, per_group, strict=True)]
        bars = ax.bar(xs, means, width, yerr=[low, high], capsize=3, color=COLORS[framework], label=LABELS[framework])
        ax.bar_label(bars, labels=[_num(m) if v else "n/a" for m, v in zip(means, per_group, strict=True)], fontsize=8)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylabel(unit)


def _verdict_values(results: dict[str, Any], prefix: str) -> dict[str, list[float]]:
    row = next(r for r in results["verdict"] if r["characteristic"].startswith(prefix))
    return row["values"]


def plot_slo(results: dict[str, Any], ax: Axes) -> None:
    values = _verdict_values(results, "max throughput with p99")
    _bars(ax, ["max throughput under the SLO"], {fw: [v] for fw, v in values.items()}, "successful requests/s")
    ax.set_title(f"Max throughput with p99 ≤ {results['settings']['slo_ms']:g} ms (valid steps, both loops)")


def plot_cold_start_memory(results: dict[str, Any], fig: Figure) -> None:
    left, right = fig.subplots(1, 2)
    cold = _verdict_values(results, "cold start")
    left.set_title("Cold start: spawn to SERVING")
    if any(cold.values()):
        _bars(left, ["cold start"], {fw: [v] for fw, v in cold.items()}, "seconds")
    else:
        left.set_axis_off()
        left.text(0.5, 0.5, "not measured:\nthe servers were already running", ha="center", transform=left.transAxes)
    idle, load = _verdict_values(results, "idle memory"), _verdict_values(results, "memory under load")
    _bars(right, ["idle", "under load (max)"], {fw: [idle[fw], load[fw]] for fw in idle}, "RSS (MiB)")
    right.set_title("Server memory")
    fig.legend(*right.get_legend_handles_labels(), loc="outside lower center", ncols=2)


def plot_queue_compute(results: dict[str, Any], ax: Axes) -> None:
    frameworks = list(results["servers"])
    width = 0.8 / len(frameworks)
    concurrencies: list[float] = []
    for i, framework in enumerate(frameworks):
        steps = results["servers"][framework]["steps"]
        queue = series(steps, "closed", "server_metrics.queue_ms_mean")
        compute = {p.x: p.mean for p in series(steps, "closed", "server_metrics.compute_ms_mean")}
        concurrencies = concurrencies or [p.x for p in queue]
        xs = [k + (i - (len(frameworks) - 1) / 2) * width for k in range(len(queue))]
        heights = [compute.get(p.x, 0.0) for p in queue]
        ax.bar(xs, heights, width, color=COLORS[framework], label=f"{LABELS[framework]} compute")
        ax.bar(xs, [p.mean for p in queue], width, bottom=heights, color=COLORS[framework], alpha=0.45,
               hatch="//", label=f"{LABELS[framework]} queue")  # fmt: skip
    ax.set_xticks(range(len(concurrencies)), [f"{c:g}" for c in concurrencies])
    ax.set(xlabel="concurrent users (closed loop)", ylabel="mean time (ms)", title="Server time: queue wait + compute")


def plot_batch_size(results: dict[str, Any], ax: Axes) -> None:
    _plot_lines(results, ax, "closed", {"server_metrics.batch_size_mean": "-"})
    ax.set(ylabel="rows per forward pass", title="Mean batch size")
    _concurrency_axis(results, ax)


AX_PLOTS: dict[str, Callable[[dict[str, Any], Axes], None]] = {
    "throughput_vs_concurrency.png": plot_throughput,
    "latency_vs_concurrency.png": plot_latency_concurrency,
    "latency_vs_rate.png": plot_latency_rate,
    "latency_distribution.png": plot_distribution,
    "slo_throughput.png": plot_slo,
    "queue_compute.png": plot_queue_compute,
    "batch_size.png": plot_batch_size,
}
FIGURE_PLOTS: dict[str, Callable[[dict[str, Any], Figure], None]] = {"cold_start_memory.png": plot_cold_start_memory}
PLOT_NAMES = [*AX_PLOTS, *FIGURE_PLOTS]


def write_plots(results: dict[str, Any], out: Path) -> list[Path]:
    """Render every plot as a PNG in ``out``."""
    paths = []
    for name in PLOT_NAMES:
        fig = plt.figure(figsize=(10 if name in FIGURE_PLOTS else 7.5, 4.8), layout="constrained")
        if name in FIGURE_PLOTS:
            FIGURE_PLOTS[name](results, fig)
        else:
            ax = fig.add_subplot()
            AX_PLOTS[name](results, ax)
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        paths.append(out / name)
    return paths


# ---------------------------------------------------------------- tables


Table = tuple[list[str], list[list[str]]]


def _ranged(points: dict[float, Point], x: float, digits: int = 3) -> str:
    point = points.get(x)
    if point is None:
        return "n/a"
    if point.high - point.low > 0:
        return f"{_num(point.mean, digits)} ({_num(point.low, digits)}–{_num(point.high, digits)})"
    return _num(point.mean, digits)


def _verdict_cell(row: dict[str, Any], framework: str) -> str:
    """Mean, the number of values behind it, and where it was measured (``1983 (n=2, @ 32 users)``)."""
    values, where = row["values"][framework], row["where"][framework]
    if not values:
        return "n/a"
    details = ", ".join(filter(None, [f"n={len(values)}", where and f"@ {where}"]))
    return f"{_num(row['means'][framework], 4)} ({details})"


def verdict_table(rows: Sequence[dict[str, Any]]) -> Table:
    frameworks = list(rows[0]["means"]) if rows else []
    body = []
    for row in rows:
        winner = row["winner"]
        margin = row["margin_pct"]
        body.append(
            [
                f"{row['characteristic']} ({row['unit']}, {row['better']} is better)",
                *(_verdict_cell(row, fw) for fw in frameworks),
                "n/a" if winner is None else LABELS.get(winner, winner),
                "n/a" if winner is None else ("∞" if margin is None else f"{margin:.1f}%"),
                {True: "yes", False: "no", None: "n/a"}[row["exceeds_spread"]],
            ]
        )
    return ["characteristic", *(LABELS[fw] for fw in frameworks), "winner", "margin", "beyond run-to-run spread"], body


STEP_COLUMNS = {
    "throughput (req/s)": "throughput_rps",
    "p50 (ms)": "latency_ms.p50",
    "p90 (ms)": "latency_ms.p90",
    "p99 (ms)": "latency_ms.p99",
    "p99.9 (ms)": "latency_ms.p99.9",
    "max (ms)": "latency_ms.max",
    "errors": "errors",
    "server CPU %": "server_cpu_pct.mean",
    "server RSS max (MiB)": "server_rss_bytes.max",
    "generator CPU %": "generator_cpu_pct.mean",
    "other CPU %": "other_cpu_pct.mean",
    "queue (ms)": "server_metrics.queue_ms_mean",
    "compute (ms)": "server_metrics.compute_ms_mean",
    "batch": "server_metrics.batch_size_mean",
}
OPEN_LOOP_COLUMNS = {"sent (req/s)": "sent_rps", "send lag p99 (ms)": "send_lag_ms.p99"}


def step_table(results: dict[str, Any], mode: str) -> Table:
    """Every scenario of ``mode`` for both servers: mean (range) over repeats, and how many repeats were valid."""
    first = "users" if mode == "closed" else "offered (req/s)"
    paths = STEP_COLUMNS if mode == "closed" else STEP_COLUMNS | OPEN_LOOP_COLUMNS
    head = ["server", first, *paths, "valid"]
    body = []
    for framework, server in results["servers"].items():
        steps = [s for s in server["steps"] if s["mode"] == mode]
        columns = {name: {p.x: p for p in series(steps, mode, path)} for name, path in paths.items()}
        if columns["server RSS max (MiB)"]:
            columns["server RSS max (MiB)"] = {
                x: Point(x, p.mean / MIB, p.low / MIB, p.high / MIB, p.valid)
                for x, p in columns["server RSS max (MiB)"].items()
            }
        for x in sorted({_x(s) for s in steps}):
            group = [s for s in steps if _x(s) == x]
            valid = f"{sum(s['valid'] for s in group)}/{len(group)}"
            body.append([LABELS[framework], f"{x:g}", *(_ranged(columns[n], x) for n in paths), valid])
    return head, body


def server_table(results: dict[str, Any]) -> Table:
    head = ["server", "target", "framework version", "device", "threads", "max batch", "dynamic batching",
            "cold start (s)", "idle RSS (MiB)"]  # fmt: skip
    body = []
    for framework, server in results["servers"].items():
        config = server.get("model_config", {})
        params = config.get("parameters", {})
        cold = [s["cold_start_s"] for s in server["starts"] if s["cold_start_s"] is not None]
        idle = [s["idle_rss_bytes"] / MIB for s in server["starts"] if s["idle_rss_bytes"] is not None]
        body.append(
            [
                LABELS[framework],
                server.get("target", "n/a"),
                params.get("framework_version", "n/a"),
                params.get("device", "n/a"),
                params.get("threads", "n/a"),
                str(config.get("max_batch_size", "n/a")),
                json.dumps(config.get("dynamic_batching")),
                ", ".join(f"{c:.2f}" for c in cold) or "n/a",
                ", ".join(f"{m:.0f}" for m in idle) or "n/a",
            ]
        )
    return head, body


def invalid_table(results: dict[str, Any]) -> Table:
    body = [
        [LABELS[fw], str(s["repeat"] + 1), s["mode"], f"{_x(s):g}", "; ".join(s["invalid_reasons"])]
        for fw, server in results["servers"].items()
        for s in server["steps"]
        if not s["valid"]
    ]
    return ["server", "repeat", "loop", "users / rate", "reasons"], body


def failure_table(results: dict[str, Any]) -> Table:
    body = [[LABELS[f["server"]], str(f["repeat"] + 1), f["error"]] for f in results.get("failures", [])]
    return ["server", "repeat", "error"], body


def settings_table(results: dict[str, Any]) -> Table:
    settings, env = results["settings"], results["environment"]
    rows = {
        "model": settings["model"],
        "server flags (both)": " ".join(settings["server_args_for_all"]),
        "mode": settings["mode"],
        "pinning": json.dumps(settings["pinning"]),
        "closed loop users": ", ".join(map(str, settings["concurrency"])),
        "open loop rates (req/s)": "; ".join(
            f"{LABELS[fw]}: {', '.join(f'{r:g}' for r in s['rates'])}" for fw, s in results["servers"].items()
        ),
        "arrivals": f"{settings['arrival']} over {settings['arrival_users']} streams",
        "request deadline": f"{settings['deadline_ms']:g} ms",
        "window / warm-up per step": f"{settings['step_seconds']:g} s / {settings['warmup_seconds']:g} s",
        "repeats": str(settings["repeats"]),
        "batch size / encoding": f"{settings['batch_size']} / {settings['encoding']}",
        "p99 SLO": f"{settings['slo_ms']:g} ms",
        "validity limits": json.dumps(settings["limits"]),
        "CPU": f"{env['cpu_model']} ({env['cpu_count']} logical cores)",
        "GPUs": ", ".join(env["gpus"]) or "none",
        "Python / packages": f"{env['python']}; " + ", ".join(f"{k} {v}" for k, v in env["packages"].items()),
        "platform": env["platform"],
        "started / duration": f"{results['meta']['started']} / {results['meta']['duration_s']:g} s",
    }
    return ["setting", "value"], [[key, str(value)] for key, value in rows.items()]


def sections(results: dict[str, Any]) -> list[tuple[str, Table]]:
    return [
        ("Verdict", verdict_table(results["verdict"])),
        ("Servers", server_table(results)),
        ("Closed loop (concurrency sweep)", step_table(results, "closed")),
        ("Open loop (arrival-rate sweep)", step_table(results, "open")),
        ("Invalid steps", invalid_table(results)),
        ("Failed repeats", failure_table(results)),
        ("Settings and environment", settings_table(results)),
    ]


NOTES = (
    "Closed loop: N users send back to back. Open loop: arrivals on a schedule; latency counts from the scheduled "
    "send time, so queueing in the generator is not hidden; unless fixed with --rates, each server's rates are "
    "fractions of its own peak closed-loop throughput. Latency percentiles are exact, over the successful "
    "requests sent in each step's window (warm-up excluded); throughput counts successes completed in the window. "
    "Figures are means over the valid repeats, with the min–max range in brackets (over all repeats, drawn hollow, "
    "where none is valid). Queue and compute times are the servers' own metrics (compute is per forward pass). "
    "Invalid steps are listed with their reasons and left out of the verdict."
)


def render_markdown(results: dict[str, Any]) -> str:
    def table(head: list[str], body: list[list[str]]) -> str:
        if not body:
            return "_none_\n"
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(
            [*lines, *("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body)]
        )

    parts = [f"# torch_server vs tf_server: {results['settings']['model']}", "", NOTES, ""]
    for title, (head, body) in sections(results):
        parts += [f"## {title}", "", table(head, body), ""]
    parts += ["## Plots", "", *(f"![{name}]({name})" for name in PLOT_NAMES), ""]
    return "\n".join(parts)


CSS = """
body { font: 14px/1.45 system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .6em 0; font-size: 12.5px; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f4f6f8; } tr:nth-child(even) td { background: #fafbfc; }
.note { color: #555; } .plots { display: flex; flex-wrap: wrap; gap: 12px; }
.plots img { max-width: 580px; width: 100%; border: 1px solid #eee; }
"""


def render_html(results: dict[str, Any], out: Path) -> str:
    def table(head: list[str], body: list[list[str]]) -> str:
        if not body:
            return "<p class=note>none</p>"
        cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
        rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
        return f"<table><tr>{cells}</tr>{rows}</table>"

    def image(name: str) -> str:
        data = base64.b64encode((out / name).read_bytes()).decode()
        return f'<img alt="{name}" src="data:image/png;base64,{data}">'

    title = f"torch_server vs tf_server: {html.escape(results['settings']['model'])}"
    body = [f"<h1>{title}</h1>", f"<p class=note>{html.escape(NOTES)}</p>"]
    for i, (name, (head, rows)) in enumerate(sections(results)):
        body += [f"<h2>{html.escape(name)}</h2>", table(head, rows)]
        if i == 0:
            body += ["<h2>Plots</h2>", "<div class=plots>", *map(image, PLOT_NAMES), "</div>"]
    return f"<!doctype html><html><head><meta charset=utf-8><title>{title}</title><style>{CSS}</style></head>" \
        f"<body>{''.join(body)}</body></html>"  # fmt: skip


def _dumps(results: dict[str, Any]) -> str:
    """Indented JSON with each list of plain numbers kept on one line."""
    text = json.dumps(results, indent=1, allow_nan=False)
    return NUMBER_LIST.sub(lambda match: " ".join(match.group().split()), text)


def write_report(results: dict[str, Any], out: Path) -> None:
    """Write results.json (with the verdict added), the PNGs, report.md and report.html into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    results["verdict"] = verdict(results)
    (out / "results.json").write_text(_dumps(results))
    write_plots(results, out)
    (out / "report.md").write_text(render_markdown(results))
    (out / "report.html").write_text(render_html(results, out))

"""The comparison report: results.json, report.md, a self-contained report.html and PNG plots.

Everything is derived from the results document ``loadtest.compare.run`` builds, so a
report can be re-rendered from its results.json (``python -m loadtest report``).
Figures are means over the valid repeats with their min-max range; invalid steps are
listed with their reasons and left out of the verdict and of every resource figure.
A verdict row (one table per settings variant) gives each server's mean, the leader's
margin (relative to the other), and a winner only when the difference is beyond noise
by ``loadtest.stats.DECISION_RULE``; otherwise it says "no difference beyond noise".
Reference servers (``--target``) get rows in the tables and plots, not in the verdict.
"Requests per worker" shows how each step's requests spread over a server's worker processes
(``--workers``), flagging steps where one worker got too few; warnings (a pinning that makes
workers share cores, unbalanced steps) head the report.
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

from loadtest.stats import UNBALANCED_SHARE, decide, worker_balance

#: Line colours of the two frameworks (variants of a matrix get lighter and darker shades).
FRAMEWORK_COLORS = {"torch": ["#e4572e", "#a33a1b", "#f29479", "#6e2410"], "tensorflow": ["#2e86de", "#1b5a9c",
                    "#7fb3eb", "#0f3866"]}  # fmt: skip
REFERENCE_COLORS = ["#555555", "#3aa655", "#8e44ad", "#b8860b"]
PERCENTILE_STYLES = {"p50": ":", "p90": "--", "p99": "-"}
MIB = 2**20
NUMBER_LIST = re.compile(r"\[[-+.\deE,\s]*\]")

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


def _slo_throughput(server: dict[str, Any], settings: dict[str, Any]) -> Reading:
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


def _start_figure(key: str, scale: float = 1.0) -> Reader:
    def read(server: dict[str, Any], settings: dict[str, Any]) -> Reading:
        return [start[key] / scale for start in server["starts"] if start.get(key) is not None], ""

    return read


def _memory_under_load(server: dict[str, Any], settings: dict[str, Any]) -> Reading:
    """Per (phase, repeat): the largest RSS sampled inside the windows of its valid steps."""
    per_run: dict[tuple[str, int], float] = {}
    for step in server["steps"]:
        if step["valid"] and (rss := figure(step, "server_rss_bytes.max")) is not None:
            key = (step.get("phase", ""), step["repeat"])
            per_run[key] = max(per_run.get(key, 0.0), rss / MIB)
    return list(per_run.values()), ""


@dataclass
class Characteristic:
    """A verdict row: how to read a server's values of it, and which direction is better."""

    name: str
    unit: str
    higher_is_better: bool
    read: Reader
    #: Read from the load steps (valid ones only), not from the server starts.
    from_steps: bool = True


def characteristics(settings: dict[str, Any]) -> list[Characteristic]:
    ref = settings["reference_concurrency"]
    return [
        Characteristic("peak throughput (closed loop)", "req/s", True, _peak),
        Characteristic(
            f"max throughput with p99 ≤ {settings['slo_ms']:g} ms, errors ≤ {_slo_errors(settings):.0%}",
            "req/s",
            True,
            _slo_throughput,
        ),
        Characteristic(f"p50 latency @ {ref} users", "ms", False, _at_reference("latency_ms.p50")),
        Characteristic(f"p99 latency @ {ref} users", "ms", False, _at_reference("latency_ms.p99")),
        Characteristic("cold start (spawn to SERVING)", "s", False, _start_figure("cold_start_s"), from_steps=False),
        Characteristic("idle memory (RSS)", "MiB", False, _start_figure("idle_rss_bytes", MIB), from_steps=False),
        Characteristic("memory under load (max RSS)", "MiB", False, _memory_under_load),
        Characteristic(f"server CPU per request @ {ref} users", "ms", False, _cpu_per_request),
    ]


def _groups(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The compared pairs: ``results['variants']``, or torch vs tensorflow in an older results document."""
    return results.get("variants") or [
        {"name": "as set", "values": {}, "arms": {fw: fw for fw in ("torch", "tensorflow") if fw in results["servers"]}}
    ]


def verdict(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per variant and characteristic: each server's values and mean, the leader, margin, and the decision."""
    settings, servers = results["settings"], results["servers"]
    rows = []
    for group in _groups(results):
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
            rows.append(
                {
                    "variant": group["name"],
                    "characteristic": item.name,
                    "unit": item.unit,
                    "better": "higher" if item.higher_is_better else "lower",
                    "values": values,
                    "where": {name: reading[1] for name, reading in readings.items()},
                    "means": {name: statistics.fmean(v) if v else None for name, v in values.items()},
                    **decision,
                }
            )
    return rows


# ---------------------------------------------------------------- plots


def _label(results: dict[str, Any], name: str) -> str:
    server = results["servers"].get(name, {})
    return str(server.get("label") or {"torch": "torch_server", "tensorflow": "tf_server"}.get(name, name))


def colors(results: dict[str, Any]) -> dict[str, str]:
    """One colour per server: shades of orange for torch, of blue for tensorflow, others for references."""
    counts: dict[str, int] = {}
    chosen = {}
    for name, server in results["servers"].items():
        framework = server.get("framework", name if name in FRAMEWORK_COLORS else None)
        palette = FRAMEWORK_COLORS.get(framework or "", REFERENCE_COLORS)
        key = framework or "reference"
        chosen[name] = palette[counts.get(key, 0) % len(palette)]
        counts[key] = counts.get(key, 0) + 1
    return chosen


def _errorbar(ax: Axes, color: str, label: str, points: Sequence[Point], style: str = "-") -> None:
    if not points:
        return
    xs = [p.x for p in points]
    ax.plot(xs, [p.mean for p in points], style, color=color, label=label)
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
    palette = colors(results)
    for server_name, server in results["servers"].items():
        for name, style in names.items():
            label = _label(results, server_name)
            if len(names) > 1:
                label += f" {name.rsplit('.', 1)[-1]}"
            _errorbar(ax, palette[server_name], label, series(server["steps"], mode, name), style)


def plot_throughput(results: dict[str, Any], ax: Axes) -> None:
    _plot_lines(results, ax, "closed", {"throughput_rps": "-"})
    ax.set(ylabel="successful requests/s", title="Throughput vs concurrency")
    _concurrency_axis(results, ax)


def plot_latency_concurrency(results: dict[str, Any], ax: Axes) -> None:
    _plot_lines(results, ax, "closed", {f"latency_ms.{q}": s for q, s in PERCENTILE_STYLES.items()})
    ax.set(ylabel="latency (ms, failures included)", title="Latency percentiles vs concurrency")
    _concurrency_axis(results, ax)
    _log_axis(ax, "y")


def plot_latency_rate(results: dict[str, Any], ax: Axes) -> None:
    _plot_lines(results, ax, "open", {f"latency_ms.{q}": s for q, s in PERCENTILE_STYLES.items()})
    ax.axhline(results["settings"]["slo_ms"], color="grey", linewidth=0.8, linestyle="-.", label="p99 SLO")
    ax.set(
        xlabel="offered rate (req/s, open loop, same rates for every server)",
        ylabel="latency (ms, from scheduled send, failures included)",
        title="Latency percentiles vs offered load",
    )
    _log_axis(ax, "y")


def plot_distribution(results: dict[str, Any], ax: Axes) -> None:
    ref = results["settings"]["reference_concurrency"]
    palette = colors(results)
    for name, server in results["servers"].items():
        steps = [s for s in server["steps"] if s["mode"] == "closed" and s["concurrency"] == ref and s["latency_cdf"]]
        steps.sort(key=lambda s: not s["valid"])  # the first valid repeat, else the first one
        if steps:
            ms, fraction = zip(*steps[0]["latency_cdf"], strict=True)
            note = f"repeat {steps[0]['repeat'] + 1}{'' if steps[0]['valid'] else ', invalid'}"
            ax.plot(ms, fraction, color=palette[name], label=f"{_label(results, name)} ({note})")
    ax.set(xlabel="latency (ms)", ylabel="fraction of requests ≤ latency", title=f"Latency CDF @ {ref} users")
    _log_axis(ax, "x")


def _bars(ax: Axes, groups: Sequence[str], values: dict[str, list[list[float]]], results: dict[str, Any]) -> None:
    """Grouped bars: for each server, one bar per group (mean, min-max range)."""
    palette = colors(results)
    width = min(0.3, 0.8 / max(len(values), 1))
    for i, (name, per_group) in enumerate(values.items()):
        xs = [g + (i - (len(values) - 1) / 2) * width for g in range(len(groups))]
        means = [statistics.fmean(v) if v else 0.0 for v in per_group]
        low = [m - min(v) if v else 0.0 for m, v in zip(means, per_group, strict=True)]
        high = [max(v) - m if v else 0.0 for m, v in zip(means, per_group, strict=True)]
        bars = ax.bar(xs, means, width, yerr=[low, high], capsize=3, color=palette[name], label=_label(results, name))
        ax.bar_label(bars, labels=[_num(m) if v else "n/a" for m, v in zip(means, per_group, strict=True)], fontsize=8)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_xlim(-0.6, len(groups) - 0.4)


def _per_server(results: dict[str, Any], read: Reader) -> dict[str, list[float]]:
    return {name: read(server, results["settings"])[0] for name, server in results["servers"].items()}


def plot_slo(results: dict[str, Any], ax: Axes) -> None:
    values = _per_server(results, _slo_throughput)
    _bars(ax, ["max throughput under the SLO"], {name: [v] for name, v in values.items()}, results)
    ax.set_ylabel("successful requests/s")
    ax.set_title(f"Max throughput with p99 ≤ {results['settings']['slo_ms']:g} ms (valid steps, both loops)")


def plot_cold_start_memory(results: dict[str, Any], fig: Figure) -> None:
    left, right = fig.subplots(1, 2)
    cold = _per_server(results, _start_figure("cold_start_s"))
    left.set_title("Cold start: spawn to SERVING (artifacts exported)")
    started = {name: values for name, values in cold.items() if values}
    if started:
        _bars(left, ["cold start"], {name: [v] for name, v in started.items()}, results)
        left.set_ylabel("seconds")
    else:
        left.set_axis_off()
        left.text(0.5, 0.5, "not measured:\nthe servers were already running", ha="center", transform=left.transAxes)
    idle = _per_server(results, _start_figure("idle_rss_bytes", MIB))
    load = _per_server(results, _memory_under_load)
    _bars(right, ["idle", "under load (max)"], {name: [idle[name], load[name]] for name in idle}, results)
    right.set_ylabel("RSS (MiB)")
    right.set_title("Server memory")
    fig.legend(*right.get_legend_handles_labels(), loc="outside lower center", ncols=min(4, len(idle)))


def plot_queue_compute(results: dict[str, Any], ax: Axes) -> None:
    palette = colors(results)
    names = list(results["servers"])
    width = 0.8 / max(len(names), 1)
    concurrencies: list[float] = []
    for i, name in enumerate(names):
        steps = results["servers"][name]["steps"]
        queue = series(steps, "closed", "server_metrics.queue_ms_mean")
        compute = {p.x: p.mean for p in series(steps, "closed", "server_metrics.compute_ms_mean")}
        if not queue:
            continue
        concurrencies = concurrencies or [p.x for p in queue]
        xs = [k + (i - (len(names) - 1) / 2) * width for k in range(len(queue))]
        heights = [compute.get(p.x, 0.0) for p in queue]
        label = _label(results, name)
        ax.bar(xs, heights, width, color=palette[name], label=f"{label} compute")
        ax.bar(xs, [p.mean for p in queue], width, bottom=heights, color=palette[name], alpha=0.45,
               hatch="//", label=f"{label} queue")  # fmt: skip
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


def _verdict_cell(row: dict[str, Any], name: str) -> str:
    """Mean, the number of values behind it, and where it was measured (``1983 (n=3, @ 32 users)``)."""
    values, where = row["values"][name], row["where"][name]
    if not values:
        return "n/a"
    details = ", ".join(filter(None, [f"n={len(values)}", where and f"@ {where}"]))
    return f"{_num(row['means'][name], 4)} ({details})"


def verdict_tables(results: dict[str, Any]) -> list[tuple[str, Table]]:
    """One verdict table per variant: characteristic, each server, the difference, the verdict."""
    tables = []
    for group in _groups(results):
        rows = [row for row in results["verdict"] if row["variant"] == group["name"]]
        if not rows:
            continue
        names = list(rows[0]["values"])
        body = []
        for row in rows:
            leader, margin = row["leader"], row["margin_pct"]
            difference = "none" if margin == 0 else "n/a"
            if leader is not None:
                difference = f"{_label(results, leader)} by {'∞' if margin is None else f'{margin:.1f}%'}"
            if row["winner"] is not None:
                decided = f"{_label(results, row['winner'])} better (ranges apart; p = {row['p_value']:.2g})"
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
        head = ["characteristic", *(_label(results, name) for name in names), "difference of means", "verdict"]
        title = "Verdict" if len(_groups(results)) == 1 else f"Verdict: {group['name']}"
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
            cells.append(f"{_num(statistics.fmean(values), 4)} (n={len(values)})" if values else "n/a")
        body.append([_label(results, name), *cells])
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
    head = ["server", first, *paths, "valid"]
    body = []
    for name, server in results["servers"].items():
        steps = [s for s in server["steps"] if s["mode"] == mode]
        columns = {column: {p.x: p for p in series(steps, mode, path)} for column, path in paths.items()}
        columns["server RSS max (MiB)"] = {
            x: Point(x, p.mean / MIB, p.low / MIB, p.high / MIB, p.valid)
            for x, p in columns["server RSS max (MiB)"].items()
        }
        for x in sorted({_x(s) for s in steps}):
            group = [s for s in steps if _x(s) == x]
            valid = f"{sum(s['valid'] for s in group)}/{len(group)}"
            cells = [
                _error_rate(columns[column].get(x)) if column == "error rate" else _ranged(columns[column], x)
                for column in paths
            ]
            body.append([_label(results, name), f"{x:g}", *cells, valid])
    return head, body


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
                _label(results, name),
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
                body.append([_label(results, name), "all", "", "", "", "n/a", "", "", "", "not reported by the server"])
            continue
        if all(balance["workers"] == 1 for _, balance in steps):
            body.append([_label(results, name), "all", "", "", "", "1", "", "", "", "1 worker"])
            continue
        for step, balance in steps:
            shares = ", ".join(
                f"{worker}: {'n/a' if share is None else f'{share:.0%}'}" for worker, share in balance["shares"].items()
            )
            ratio = balance["max_min_ratio"]
            where = [step.get("phase", ""), str(step["repeat"] + 1), step["mode"], f"{_x(step):g}"]
            body.append([_label(results, name), *where, str(balance["workers"]), f"{balance['requests']:.0f}", shares,
                         "∞" if ratio is None else f"{ratio:.2f}", balance["note"]])  # fmt: skip
    return head, body


def run_warnings(results: dict[str, Any]) -> list[str]:
    """What the reader must know before the figures: a pinning that makes workers share cores, unbalanced steps."""
    warnings = []
    if pinned := (results["settings"].get("pinning") or {}).get("warning"):
        warnings.append(f"Pinning: {pinned}.")
    for name, server in results["servers"].items():
        unbalanced = [step for step in server["steps"] if (_balance(step) or {}).get("unbalanced")]
        if unbalanced:
            warnings.append(
                f"{_label(results, name)}: {len(unbalanced)} of {len(server['steps'])} steps unbalanced across its "
                f"workers (one got under {UNBALANCED_SHARE:.0%} of its fair share; see Requests per worker)."
            )
    return warnings


def invalid_table(results: dict[str, Any]) -> Table:
    body = []
    for name, server in results["servers"].items():
        for s in server["steps"]:
            if not s["valid"]:
                where = [s.get("phase", ""), str(s["repeat"] + 1), s["mode"], f"{_x(s):g}"]
                body.append([_label(results, name), *where, "; ".join(s["invalid_reasons"])])
    return ["server", "phase", "repeat", "loop", "users / rate", "reasons"], body


def failure_table(results: dict[str, Any]) -> Table:
    body = [
        [_label(results, f["server"]), f.get("phase", ""), str(f["repeat"] + 1), f["error"]]
        for f in results.get("failures", [])
    ]
    return ["server", "phase", "repeat", "error"], body


def _grid_text(results: dict[str, Any]) -> str:
    grid = results.get("grid") or {}
    rates = ", ".join(f"{r:g}" for r in grid.get("rates", [])) or "none"
    if grid.get("fixed", True):
        return f"{rates} (given)"
    peaks = "; ".join(f"{_label(results, n)} {_num(p)}" for n, p in grid.get("peaks", {}).items())
    if grid.get("invalid_peaks"):
        peaks += " (from INVALID steps, none valid: " + ", ".join(_label(results, n) for n in grid["invalid_peaks"])
        peaks += ")"
    return (
        f"{rates}: {', '.join(f'{f:g}' for f in grid['fractions'])} x the lower valid closed-loop peak "
        f"({_num(grid['lower_peak_rps'])}) and {grid['overload']:g} x the higher ({_num(grid['higher_peak_rps'])}); "
        f"peaks: {peaks}"
    )


def _order_text(results: dict[str, Any]) -> str:
    runs: dict[tuple[str, int], list[str]] = {}
    for entry in results.get("order", []):
        runs.setdefault((entry["phase"], entry["repeat"]), []).append(_label(results, entry["arm"]))
    return "; ".join(f"{phase} r{repeat + 1}: {', '.join(names)}" for (phase, repeat), names in runs.items())


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


def parity_table(results: dict[str, Any]) -> Table:
    """The parity gate: per variant and output, the largest difference between the servers' outputs on
    the same inputs, before anything was timed (results from before the gate have none)."""
    body = []
    for entry in results.get("parity", []):
        outputs: dict[str, list[float]] = {}
        for item in entry["outputs"]:
            outputs.setdefault(item["output"], []).append(item["max_abs"])
        tolerance = f"atol {entry['atol']:g} + rtol {entry['rtol']:g}"
        body += [[entry["variant"], name, f"{max(errors):.3g}", tolerance] for name, errors in outputs.items()]
    return ["variant", "output", "largest difference, torch vs tf", "tolerance"], body


def sections(results: dict[str, Any]) -> list[tuple[str, Table]]:
    return [
        *verdict_tables(results),
        ("Parity (same inputs, same outputs, checked before timing)", parity_table(results)),
        ("Every server", summary_table(results)),
        ("Servers", server_table(results)),
        ("Closed loop (concurrency sweep)", step_table(results, "closed")),
        ("Open loop (arrival-rate sweep, the same rates for every server)", step_table(results, "open")),
        ("Requests per worker", worker_table(results)),
        ("Invalid steps", invalid_table(results)),
        ("Failed runs", failure_table(results)),
        ("Settings and environment", settings_table(results)),
    ]


NOTES = (
    "Closed loop: N users send back to back. Open loop: arrivals on a schedule, at the same absolute rates for "
    "every server; latency counts from the scheduled send time, so queueing in the generator is not hidden. "
    "Latency percentiles are exact and include failed requests at the time they took to fail (a timeout at its "
    "deadline); the error rate is in every row. Failed requests are a result, not an invalid measurement; a step "
    "meets the latency objective only with few of them (slo_error_rate under the validity limits). Throughput "
    "counts successes completed in the window (warm-up excluded). Figures are means over the valid repeats, with "
    "the min–max range in brackets (over all repeats, drawn hollow, where none is valid); resource figures come "
    "from valid steps' windows only. Each phase runs the servers in ABBA order over repeats, each on a fresh "
    "process; cold start is timed with the artifacts already exported. Queue and compute times are the servers' "
    "own metrics (compute is per forward pass). A winner is named only beyond noise: see 'verdict rule' under "
    "settings."
)


def _title(results: dict[str, Any]) -> str:
    return f"torch_server vs tf_server: {results['settings']['model']}"


def render_markdown(results: dict[str, Any]) -> str:
    def table(head: list[str], body: list[list[str]]) -> str:
        if not body:
            return "_none_\n"
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(
            [*lines, *("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body)]
        )

    parts = [f"# {_title(results)}", "", NOTES, "", *(f"**Warning:** {warning}\n" for warning in run_warnings(results))]
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
.note { color: #555; } .warning { color: #a33a1b; font-weight: 600; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; }
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

    title = html.escape(_title(results))
    body = [f"<h1>{title}</h1>", f"<p class=note>{html.escape(NOTES)}</p>"]
    body += [f"<p class=warning>Warning: {html.escape(warning)}</p>" for warning in run_warnings(results)]
    verdicts = len(verdict_tables(results))
    for i, (name, (head, rows)) in enumerate(sections(results)):
        body += [f"<h2>{html.escape(name)}</h2>", table(head, rows)]
        if i == max(verdicts, 1) - 1:
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

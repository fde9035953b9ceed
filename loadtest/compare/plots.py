"""The comparison report's PNG plots (matplotlib, headless): the SLO capacity search's probes,
throughput and latency against concurrency and offered rate, the latency distribution, the SLO
throughput, cold start and memory, queue vs compute time, the mean batch size, where the time goes (a
stacked bar per server and concurrency) and the failed requests by status against the offered rate. Each
server keeps one colour in every plot: shades of orange for torch, of blue for tensorflow, others for reference
servers. Hollow markers: no repeat of that scenario was valid.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from loadtest.compare.exports import server_breakdown
from loadtest.compare.tables import error_counts
from loadtest.compare.verdict import (
    MIB,
    Point,
    Reader,
    memory_under_load,
    number,
    series,
    server_label,
    slo_throughput,
    start_figure,
    x_of,
)

#: Line colours of the two frameworks (variants of a matrix get lighter and darker shades).
FRAMEWORK_COLORS = {"torch": ["#e4572e", "#a33a1b", "#f29479", "#6e2410"], "tensorflow": ["#2e86de", "#1b5a9c",
                    "#7fb3eb", "#0f3866"]}  # fmt: skip
REFERENCE_COLORS = ["#555555", "#3aa655", "#8e44ad", "#b8860b"]
PERCENTILE_STYLES = {"p50": ":", "p90": "--", "p99": "-"}


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
            label = server_label(results, server_name)
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
            ax.plot(ms, fraction, color=palette[name], label=f"{server_label(results, name)} ({note})")
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
        bars = ax.bar(
            xs, means, width, yerr=[low, high], capsize=3, color=palette[name], label=server_label(results, name)
        )
        ax.bar_label(
            bars, labels=[number(m) if v else "n/a" for m, v in zip(means, per_group, strict=True)], fontsize=8
        )
    ax.set_xticks(range(len(groups)), groups)
    ax.set_xlim(-0.6, len(groups) - 0.4)


def _per_server(results: dict[str, Any], read: Reader) -> dict[str, list[float]]:
    return {name: read(server, results["settings"])[0] for name, server in results["servers"].items()}


def plot_slo(results: dict[str, Any], ax: Axes) -> None:
    values = _per_server(results, slo_throughput)
    _bars(ax, ["max throughput under the SLO"], {name: [v] for name, v in values.items()}, results)
    ax.set_ylabel("successful requests/s")
    ax.set_title(f"Max throughput with p99 ≤ {results['settings']['slo_ms']:g} ms (valid steps, both loops)")


def plot_capacity(results: dict[str, Any], ax: Axes) -> None:
    """Per server, every capacity probe's p99 against its rate (filled: pass, hollow: fail, x: invalid), the
    SLO, and the capacity found (dashed, its 95 % interval shaded)."""
    palette = colors(results)
    slo = results["settings"]["slo_ms"]
    drawn = False
    for name, server in results["servers"].items():
        capacity = server.get("capacity")
        if not capacity:
            continue
        color, label = palette[name], server_label(results, name)
        probes = [probe for entry in capacity["repeats"] for probe in entry["probes"] if probe["p99_ms"] is not None]
        named = False
        for judged, marker, face in ((True, "o", color), (False, "o", "white"), (None, "x", color)):
            chosen = [probe for probe in probes if probe["pass"] is judged]
            if chosen:
                xs, ys = [p["rate"] for p in chosen], [p["p99_ms"] for p in chosen]
                edges = None if judged is None else color  # an x has no edge
                ax.scatter(xs, ys, marker=marker, c=face, edgecolors=edges, zorder=3, label=None if named else label)
                drawn = named = True
        if capacity["mean"] is not None:
            found = f"{label} capacity: {number(capacity['mean'])} req/s"
            ax.axvline(capacity["mean"], color=color, linestyle="--", label=found)
            if capacity["interval"]:
                ax.axvspan(*capacity["interval"], color=color, alpha=0.12)
    title = "SLO capacity search: filled pass, hollow fail, x invalid; dashed: capacity (95% interval)"
    ax.set(xlabel="probed rate (req/s, open loop)", ylabel="p99 latency (ms, failures included)", title=title)
    ax.title.set_fontsize(10)
    if not drawn:
        ax.text(0.5, 0.5, "capacity not searched", ha="center", transform=ax.transAxes)
        return
    ax.axhline(slo, color="grey", linewidth=0.8, linestyle="-.", label=f"p99 SLO {slo:g} ms")
    _log_axis(ax, "y")


def plot_cold_start_memory(results: dict[str, Any], fig: Figure) -> None:
    left, right = fig.subplots(1, 2)
    cold = _per_server(results, start_figure("cold_start_s"))
    left.set_title("Cold start: spawn to SERVING (artifacts exported)")
    started = {name: values for name, values in cold.items() if values}
    if started:
        _bars(left, ["cold start"], {name: [v] for name, v in started.items()}, results)
        left.set_ylabel("seconds")
    else:
        left.set_axis_off()
        left.text(0.5, 0.5, "not measured:\nthe servers were already running", ha="center", transform=left.transAxes)
    idle = _per_server(results, start_figure("idle_rss_bytes", MIB))
    load = _per_server(results, memory_under_load)
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
        label = server_label(results, name)
        ax.bar(xs, heights, width, color=palette[name], label=f"{label} compute")
        ax.bar(xs, [p.mean for p in queue], width, bottom=heights, color=palette[name], alpha=0.45,
               hatch="//", label=f"{label} queue")  # fmt: skip
    ax.set_xticks(range(len(concurrencies)), [f"{c:g}" for c in concurrencies])
    ax.set(xlabel="concurrent users (closed loop)", ylabel="mean time (ms)", title="Server time: queue wait + compute")


def plot_batch_size(results: dict[str, Any], ax: Axes) -> None:
    _plot_lines(results, ax, "closed", {"server_metrics.batch_size_mean": "-"})
    ax.set(ylabel="rows per forward pass", title="Mean batch size")
    _concurrency_axis(results, ax)


#: Colours of the breakdown's parts (``loadtest.breakdown.PARTS``) and their legend names.
PART_STYLES = {
    "network_serialization_ms": ("#9e9e9e", "network + serialization"),
    "server_other_ms": ("#c7a76c", "server other (decode, batching, encode)"),
    "queue_ms": ("#8e44ad", "queue"),
    "compute_input_ms": ("#3aa655", "compute input"),
    "compute_infer_ms": ("#1b5a9c", "compute infer"),
    "compute_output_ms": ("#e4572e", "compute output"),
}
STATUS_COLORS = ["#a33a1b", "#f2a541", "#6e2410", "#2e86de", "#555555", "#8e44ad", "#3aa655", "#b8860b"]


def _nothing(fig: Figure, text: str) -> None:
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


def plot_breakdown(results: dict[str, Any], fig: Figure) -> None:
    """Where the time goes: per server, a stacked bar per closed-loop concurrency (mean ms per success)."""
    rows = {name: [row for row in server_breakdown(server["steps"]) if row["mode"] == "closed"]
            for name, server in results["servers"].items()}  # fmt: skip
    rows = {name: found for name, found in rows.items() if found}
    if not rows:
        _nothing(fig, "where the time goes: not measured\n(no server reported ModelStatistics in a window)")
        return
    axes = fig.subplots(1, len(rows), sharey=True, squeeze=False)[0]
    for ax, (name, found) in zip(axes, rows.items(), strict=True):
        positions = range(len(found))
        bottom = [0.0] * len(found)
        for part, (color, label) in PART_STYLES.items():
            heights = [max(row[part] or 0.0, 0.0) for row in found]  # a negative difference is noise: drawn as 0
            ax.bar(positions, heights, 0.6, bottom=bottom, color=color, label=label)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        for x, row in zip(positions, found, strict=True):
            if row["client_ms"] is not None:
                ax.annotate(number(row["client_ms"]), (x, row["client_ms"]), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(positions), [f"{row['x']:g}" for row in found])
        ax.set(title=server_label(results, name), xlabel="concurrent users (closed loop)")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel("mean time per successful request (ms)")
    fig.suptitle("Where the time goes: client = network + serialization + server (queue, compute, other)")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=8)


def plot_errors_by_status(results: dict[str, Any], fig: Figure) -> None:
    """Failed requests by status against the offered rate (open loop): per server, stacked error rates."""
    counts: dict[str, list[tuple[float, dict[str, int], int]]] = {}
    for name, server in results["servers"].items():
        steps = [step for step in server["steps"] if step["mode"] == "open"]
        for x in sorted({x_of(step) for step in steps}):
            group = [step for step in steps if x_of(step) == x]
            sent = sum(step.get("requests") or 0 for step in group)
            counts.setdefault(name, []).append((x, error_counts(group), sent))
    statuses = list(dict.fromkeys(status for found in counts.values() for _, by, _ in found for status in by))
    if not statuses:
        _nothing(fig, "failed requests by status: none in the open loop" if counts else "no open-loop step")
        return
    palette = {status: STATUS_COLORS[i % len(STATUS_COLORS)] for i, status in enumerate(statuses)}
    axes = fig.subplots(1, len(counts), sharey=True, squeeze=False)[0]
    for ax, (name, found) in zip(axes, counts.items(), strict=True):
        positions = range(len(found))
        bottom = [0.0] * len(found)
        for status in statuses:
            heights = [100.0 * by.get(status, 0) / sent if sent else 0.0 for _, by, sent in found]
            ax.bar(positions, heights, 0.6, bottom=bottom, color=palette[status], label=status)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        ax.set_xticks(list(positions), [f"{x:g}" for x, _, _ in found], rotation=30)
        ax.set(title=server_label(results, name), xlabel="offered rate (req/s, open loop)")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel("failed requests (% of sent, all repeats)")
    fig.suptitle("Failed requests by gRPC status vs offered load")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=min(4, len(statuses)))


AX_PLOTS: dict[str, Callable[[dict[str, Any], Axes], None]] = {
    "slo_capacity.png": plot_capacity,
    "throughput_vs_concurrency.png": plot_throughput,
    "latency_vs_concurrency.png": plot_latency_concurrency,
    "latency_vs_rate.png": plot_latency_rate,
    "latency_distribution.png": plot_distribution,
    "slo_throughput.png": plot_slo,
    "queue_compute.png": plot_queue_compute,
    "batch_size.png": plot_batch_size,
}
FIGURE_PLOTS: dict[str, Callable[[dict[str, Any], Figure], None]] = {
    "cold_start_memory.png": plot_cold_start_memory,
    "breakdown.png": plot_breakdown,
    "errors_by_status.png": plot_errors_by_status,
}
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

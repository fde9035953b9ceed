"""The comparison report: results.json, report.md, a self-contained report.html and PNG plots.

Everything is derived from the results document ``loadtest.compare.run`` builds, so a
report can be re-rendered from its results.json (``python -m loadtest report``).
Figures are means over the valid repeats with their min-max range; invalid steps are
listed with their reasons and left out of the verdict and of every resource figure.
A verdict row (one table per settings variant, ``loadtest.compare.verdict``) gives each
server's mean, the leader's margin, and a winner only when the difference is beyond noise.
Reference servers (``--target``) get rows in the tables and plots, not in the verdict.
"Requests per worker" shows how each step's requests spread over a server's worker processes
(``--workers``), flagging steps where one worker got too few; warnings (a pinning that makes
workers share cores, unbalanced steps) head the report. The tables are ``loadtest.compare.tables``,
the plots ``loadtest.compare.plots``; this module renders and writes them.
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path
from typing import Any

from loadtest.compare.exports import add_breakdowns, write_exports
from loadtest.compare.plots import PLOT_NAMES, write_plots
from loadtest.compare.tables import run_warnings, sections, verdict_tables
from loadtest.compare.verdict import verdict

NUMBER_LIST = re.compile(r"\[[-+.\deE,\s]*\]")


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
    """Write results.json (with the verdict and each server's breakdown added), the exports (summary.json,
    perf_<server>*.csv: ``loadtest.compare.exports``), the PNGs, report.md and report.html into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    results["verdict"] = verdict(results)
    add_breakdowns(results)
    (out / "results.json").write_text(_dumps(results))
    write_exports(results, out)
    write_plots(results, out)
    (out / "report.md").write_text(render_markdown(results))
    (out / "report.html").write_text(render_html(results, out))

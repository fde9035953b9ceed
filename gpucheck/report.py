"""The GPU check's report as markdown (``gpu_check.md``, printed too): the frameworks, one row
per run, the worker sweep, and the verdict (OK, FAILED or INCOMPLETE, and what the time budget
skipped).
"""

from __future__ import annotations

from typing import Any

from gpucheck.options import TIME_BUDGET


def _cell(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# GPU check ({report['device']}), {report['date']}",
        "",
        f"Host {report['host']}, Python {report['python']}, {report['elapsed_s']} s of a {report['budget_s']:g} s "
        f"time budget; {report['options']['concurrency']} closed-loop callers for {report['options']['seconds']} s "
        "per run. Efficiency = served rows/s / in-process rows/s at the mean batch the server formed. "
        f"Overall: {verdict(report)}.",
        "",
    ]
    for framework, state in report["frameworks"].items():
        if "skipped" in state:
            lines.append(f"- **{framework}: skipped** — {state['skipped']}.")
        else:
            failed = [note for note in state["prepared"] if "error" in note]
            skipped = [note for note in state["prepared"] if "skipped" in note]
            lines.append(
                f"- {framework}: ran; artifact builds: {len(state['prepared'])}, failed: {len(failed)}, "
                f"skipped for the {TIME_BUDGET}: {len(skipped)}."
            )
    lines += [
        "",
        "| framework | model | precision | compile | parity (max abs) | reported | cold start s | load / compile s | "
        "req/s | p50 ms | p99 ms | mean batch | in-process rows/s | efficiency | GPU MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in report["runs"]:
        head = f"| {entry['framework']} | {entry['model']} | {entry['precision']} | {entry['compile']} |"
        if "skipped" in entry:
            lines.append(f"{head} skipped: {entry['skipped']} |" + " |" * 10)
            continue
        if "error" in entry:
            lines.append(f"{head} FAILED: {entry['error'][:200]} |" + " |" * 10)
            continue
        parity = entry["parity"]
        worst = max(output["max_abs"] for output in parity["outputs"].values())
        served = entry.get("served", {})
        memory = entry.get("gpu_memory_mib")
        mib = (
            memory.get("process", memory.get("framework", memory.get("device_rise")))
            if isinstance(memory, dict)
            else None
        )
        reported = entry["reported"]
        startup = f"{reported.get('load_s') or '–'} / {reported.get('compile_s') if entry['compile'] == 'on' else '–'}"
        lines.append(
            f"{head} {'ok' if parity['ok'] else 'FAILED'} ({worst:.2g}) | {'ok' if entry['reported_ok'] else 'WRONG'} "
            f"| {_cell(entry.get('cold_start_s'), '.1f')} | {startup} "
            f"| {_cell(served.get('requests_per_s'), '.0f')} | {_cell(served.get('p50_ms'), '.2f')} "
            f"| {_cell(served.get('p99_ms'), '.2f')} | {_cell(served.get('mean_batch'), '.1f')} "
            f"| {forward_cell(entry.get('in_process', {}))} "
            f"| {_cell(entry.get('efficiency'), '.2f')} | {_cell(mib)} |"
        )
    if report.get("workers"):
        base = next((w["requests_per_s"] for w in report["workers"] if "requests_per_s" in w), None)
        lines += [
            "",
            "Workers (torch_server, mlp fp32, 64 callers over 64 connections; one worker per core):",
            "",
            "| workers | req/s | vs 1 worker | p50 ms | p99 ms | errors | requests per worker |",
            "|---|---|---|---|---|---|---|",
        ]
        for entry in report["workers"]:
            if "skipped" in entry:
                lines.append(f"| {entry['workers']} | skipped: {entry['skipped']} | | | | | |")
                continue
            if "error" in entry:
                lines.append(f"| {entry['workers']} | FAILED: {entry['error'][:200]} | | | | | |")
                continue
            ratio = entry["requests_per_s"] / base if base else None
            spread = " ".join(f"{count:.0f}" for count in entry["requests_per_worker"].values())
            lines.append(
                f"| {entry['workers']} | {entry['requests_per_s']:.0f} | {_cell(ratio, '.2f')} | {entry['p50_ms']:.2f} "
                f"| {entry['p99_ms']:.2f} | {sum(entry['errors'].values())} | {spread} |"
            )
    return "\n".join(lines) + "\n"


def forward_cell(forward: dict[str, Any]) -> str:
    if "skipped" in forward:
        return f"skipped: {forward['skipped']}"
    if "error" in forward:
        return f"FAILED: {forward['error'][:200]}"
    return _cell(forward.get("rows_per_s"), ".0f")


def verdict(report: dict[str, Any]) -> str:
    """OK, FAILED or INCOMPLETE, and what the time budget skipped."""
    skipped = report["skipped_for_time"]
    runs = len(report["runs"])
    if report["ok"]:
        word = "OK"
    elif runs and skipped["runs"] == runs:
        word = f"INCOMPLETE (no run finished within the {TIME_BUDGET})"
    else:
        word = "FAILED"
    if skipped["runs"] or skipped["workers"]:
        word += (
            f"; skipped for the {TIME_BUDGET}: {skipped['runs']} of {runs} runs, "
            f"{skipped['workers']} of {len(report.get('workers', []))} worker-sweep steps"
        )
    return word

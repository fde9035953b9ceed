"""The report's tables of a sweep (``--sweep``, ``loadtest.compare.sweep``): each server at the comparison's
settings beside its best configuration (with the command that serves it), and every candidate's rungs."""

from __future__ import annotations

from typing import Any

from loadtest.compare.verdict import number, server_label

Table = tuple[list[str], list[list[str]]]


def _capacity_text(capacity: dict[str, Any] | None) -> str:
    """``812 req/s ±3.1% (n=3)``, or why there is none."""
    if not capacity or capacity.get("mean") is None:
        return "n/a (no conclusive search)"
    spread = "" if capacity.get("half_width_pct") is None else f" ±{capacity['half_width_pct']:.1f}%"
    return f"{number(capacity['mean'], 4)} req/s{spread} (n={len(capacity['values'])})"


def best_table(results: dict[str, Any]) -> Table:
    """Per server: its capacity at the comparison's settings, its best configuration, that one's capacity over
    the repeats, the gain, and the one command that serves it."""
    head = ["server", "capacity at the same settings", "best configuration", "capacity at its best",
            "gain", "serve it with"]  # fmt: skip
    body = []
    for name, server in ((results.get("sweep") or {}).get("servers") or {}).items():
        default, best = server.get("default_capacity"), server.get("capacity")
        gain = "n/a"
        if default and best and default.get("mean") and best.get("mean") is not None:
            gain = f"{100 * (best['mean'] / default['mean'] - 1):+.1f}%"
        chosen = server.get("best") or {}
        body.append([server_label(results, name), _capacity_text(default), chosen.get("name", "none"),
                     _capacity_text(best), gain, server.get("command") or "n/a"])  # fmt: skip
    return head, body


def candidates_table(results: dict[str, Any]) -> Table:
    """Every candidate of every server: what rung 0 and rung 1 found (req/s; the search's status otherwise)."""
    head = ["server", "candidate", "rung 0 (coarse)", "rung 1 (fine)", "probes"]
    body = []
    for name, server in ((results.get("sweep") or {}).get("servers") or {}).items():
        best = (server.get("best") or {}).get("name")
        for candidate in server["candidates"]:
            cells = ["not run", "not run"]
            probes = []
            for rung in candidate["rungs"]:
                if rung.get("skipped"):
                    cells[rung["rung"]] = "(combined from rung 0)"
                    continue
                cells[rung["rung"]] = _rung_text(rung)
                probes.append(str(len(rung.get("probes") or [])))
            marker = " (best)" if candidate["name"] == best else ""
            body.append([server_label(results, name), candidate["name"] + marker, *cells, " + ".join(probes)])
    return head, body


def _rung_text(rung: dict[str, Any]) -> str:
    if rung.get("error"):
        return f"failed: {rung['error']}"[:120]
    value = rung.get("score")
    status = rung.get("status", "")
    if value is None:
        return status or "n/a"
    return f"{number(value, 4)} req/s" + ("" if status == "found" else f" ({status})")


def sections(results: dict[str, Any]) -> list[tuple[str, Table]]:
    """The sweep's sections of the report (none without a sweep)."""
    swept = results.get("sweep")
    if not swept:
        return []
    space = "; ".join(f"{key} {', '.join(values)}" for key, values in swept["space"].items()) or "nothing"
    fixed = "; ".join(f"{key}: {why}" for key, why in swept.get("not_swept", {}).items())
    return [
        ("Each at its best (the sweep's best configuration per server, searched in every repeat)", best_table(results)),
        (f"Sweep candidates (space: {space}{'; not swept: ' + fixed if fixed else ''})", candidates_table(results)),
    ]

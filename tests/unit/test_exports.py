"""The report's new views and exports: failures by status in the tables, the breakdown per server, the
perf_analyzer-style CSV and summary.json, from synthetic results and from results written before them."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loadtest.compare import exports, report, tables
from tests.helpers.synthetic import OVERLOADED, check_report_folder, synthetic_results

PERF_HEADER = (
    "Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,"
    "Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency,"
    "Avg latency,request/response,response wait"
)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("report")
    results = synthetic_results()
    report.write_report(results, out)
    return out, results


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as file:
        return list(csv.DictReader(file))


def test_perf_csv_has_perf_analyzers_columns_in_microseconds(written: tuple[Path, dict[str, Any]]) -> None:
    out, results = written
    assert (out / "perf_torch.csv").read_text().splitlines()[0] == PERF_HEADER
    assert (out / "perf_torch_rate.csv").read_text().splitlines()[0] == PERF_HEADER.replace(
        "Concurrency", "Request Rate", 1
    )
    rows = _rows(out / "perf_torch.csv")
    assert [row["Concurrency"] for row in rows] == ["1", "4"]
    # The synthetic torch steps: client 4 ms = queue 0.5 + compute 0.1 + 1.5 + 0.2, and 1.7 ms of network and
    # the server's own handling (perf_analyzer's Network+Server Send/Recv).
    row = rows[0]
    assert {column: row[column] for column in exports.PERF_COLUMNS[1:8]} == {
        "Client Send": "0",
        "Network+Server Send/Recv": "1700",
        "Server Queue": "500",
        "Server Compute Input": "100",
        "Server Compute Infer": "1500",
        "Server Compute Output": "200",
        "Client Recv": "0",
    }
    assert (row["Avg latency"], row["request/response"], row["response wait"]) == ("4000", "0", "4000")
    steps = [s for s in results["servers"]["torch"]["steps"] if s["mode"] == "closed" and s["concurrency"] == 1]
    for name in ("p50", "p90", "p99"):
        expected = np.mean([step["latency_ms"][name] for step in steps]) * 1000
        assert int(row[f"{name} latency"]) == round(expected), name
    assert int(row["p50 latency"]) <= int(row["p90 latency"]) <= int(row["p95 latency"]) <= int(row["p99 latency"])
    assert float(row["Inferences/Second"]) == pytest.approx(np.mean([step["rows_per_s"] for step in steps]), abs=0.01)


def test_perf_network_is_never_below_zero() -> None:
    step = {"mode": "closed", "concurrency": 2, "valid": True, "rows_per_s": 10.0, "latency_ms": {},
            "breakdown": {"client_ms": 1.0, "queue_ms": 0.6, "compute_input_ms": 0.0, "compute_infer_ms": 0.6,
                          "compute_output_ms": 0.0}}  # fmt: skip
    row = dict(zip(["Concurrency", *exports.PERF_COLUMNS], exports.perf_row(2, [step]), strict=True))
    assert row["Network+Server Send/Recv"] == "0"
    assert row["p50 latency"] == ""  # not measured: empty, never a made-up 0


def test_summary_json_gives_every_step_with_units_and_percentiles(written: tuple[Path, dict[str, Any]]) -> None:
    out, results = written
    summary = json.loads((out / "summary.json").read_text())
    assert summary["units"]["latency"] == "ms"
    assert summary["model"] == "mlp"
    torch = summary["servers"]["torch"]
    assert len(torch["steps"]) == len(results["servers"]["torch"]["steps"])
    first = torch["steps"][0]
    assert first["latency"]["unit"] == first["breakdown"]["unit"] == "ms"
    assert set(first["latency"]) == {"unit", "p50", "p90", "p95", "p99", "p99.9", "mean", "max"}
    assert first["latency"]["p90"] <= first["latency"]["p95"] <= first["latency"]["p99"]
    assert first["breakdown"]["client_ms"] == pytest.approx(4.0)
    overloaded = [step for step in torch["steps"] if step["offered_rps"] == 300.0]
    assert overloaded
    assert all(step["errors_by_status"] == OVERLOADED["errors_by_status"] for step in overloaded)
    assert all(step["error_rate"] == pytest.approx(0.1) for step in overloaded)


def test_results_json_has_a_breakdown_per_server(written: tuple[Path, dict[str, Any]]) -> None:
    out, _ = written
    saved = json.loads((out / "results.json").read_text())
    rows = saved["servers"]["tensorflow"]["breakdown"]
    assert [(row["mode"], row["x"]) for row in rows] == [("closed", 1), ("closed", 4), ("open", 100.0),
                                                          ("open", 300.0)]  # fmt: skip
    assert rows[0]["client_ms"] == pytest.approx(5.0)  # tf's synthetic steps are 1.25 times slower
    assert rows[0]["network_serialization_ms"] == pytest.approx(1.25)
    assert rows[-1]["valid"] is False  # the overloaded steps are all invalid: their figures, marked


def test_report_shows_failures_by_status_and_where_the_time_goes(written: tuple[Path, dict[str, Any]]) -> None:
    out, _ = written
    markdown = (out / "report.md").read_text()
    assert "errors 150 (RESOURCE_EXHAUSTED 120, DEADLINE_EXCEEDED 30)" in markdown  # 3 repeats of the 300/s step
    assert "| torch_server | open | 300 | RESOURCE_EXHAUSTED | 120 |" in markdown
    assert "queue full (N requests waiting): 120" in markdown
    assert "## Where the time goes (mean ms per successful request)" in markdown
    assert "| torch_server | closed | 1 | 4 | 1 | 3 | 0.5 | 0.1 | 1.5 | 0.2 | 0.7 | 3 |" in markdown


def _strip(value: Any) -> Any:
    """A results document as written before failures by status and breakdowns existed."""
    new = {"errors_by_status", "errors_by_reason", "breakdown"}
    if isinstance(value, dict):
        return {key: _strip(item) for key, item in value.items() if key not in new}
    if isinstance(value, list):
        return [_strip(item) for item in value]
    return value


def test_an_older_results_document_still_renders(tmp_path: Path) -> None:
    older = _strip(synthetic_results())
    report.write_report(older, tmp_path)
    check_report_folder(tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    assert "errors 150 (NOT_RECORDED 150)" in markdown  # failures known, their status not
    assert "## Where the time goes (mean ms per successful request)\n\n_none_" in markdown
    row = _rows(tmp_path / "perf_torch.csv")[0]
    assert (row["Server Queue"], row["Avg latency"], row["Client Send"]) == ("", "", "0")
    assert row["p99 latency"] != ""
    summary = json.loads((tmp_path / "summary.json").read_text())
    step = summary["servers"]["torch"]["steps"][0]
    assert step["errors_by_status"] is None
    assert step["breakdown"]["client_ms"] is None


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        ([{"errors": 0, "errors_by_status": {}}], "errors 0"),
        (
            [
                {"errors": 3, "errors_by_status": {"RESOURCE_EXHAUSTED": 2, "DEADLINE_EXCEEDED": 1}},
                {"errors": 5, "errors_by_status": {"DEADLINE_EXCEEDED": 5}},
            ],
            "errors 8 (DEADLINE_EXCEEDED 6, RESOURCE_EXHAUSTED 2)",
        ),
        # A step measured before failures were counted by status (an older results.json): NOT_RECORDED.
        (
            [{"errors": 4}, {"errors": 1, "errors_by_status": {"UNAVAILABLE": 1}}],
            "errors 5 (NOT_RECORDED 4, UNAVAILABLE 1)",
        ),
    ],
)
def test_the_tables_sum_failures_by_status_over_repeats(steps: list[dict[str, Any]], expected: str) -> None:
    assert tables.errors_cell(steps) == expected

"""The fidelity guard: top-1 agreement, the per-output summary, and the comparison's stop (exit 3) or,
with --allow-mismatch, its going on with the mismatch recorded and stated at the head of the report."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loadtest.compare import command, drain, fidelity, parity, plan, prepare
from loadtest.compare import run as compare
from serving.backend import Tolerance

FP32 = Tolerance(atol=1e-5, rtol=1e-4)


def test_top1_agreement_counts_rows_whose_argmax_agrees() -> None:
    want = np.array([[0.1, 0.9, 0.0], [0.8, 0.2, 0.0], [0.3, 0.3, 0.4]])
    got = np.array([[0.2, 0.8, 0.0], [0.1, 0.9, 0.0], [0.0, 0.1, 0.9]])
    assert fidelity.top1(want, got) == (2, 3)
    # Every position of the leading axes is a row: (2, 2, 3) -> 4 rows.
    assert fidelity.top1(np.stack([want[:2], want[1:]]), np.stack([got[:2], want[1:]])) == (3, 4)
    assert fidelity.top1(want.astype(np.int64), want.astype(np.int64)) == (3, 3)


@pytest.mark.parametrize(
    ("want", "got"),
    [
        (np.zeros(4), np.zeros(4)),  # no class axis
        (np.zeros((4, 1)), np.zeros((4, 1))),  # one class: nothing to agree on
        (np.zeros((4, 3)), np.zeros((4, 2))),  # shapes differ
        (np.array([["a", "b"]], dtype=object), np.array([["a", "b"]], dtype=object)),  # not numbers
    ],
)
def test_top1_needs_a_class_axis(want: np.ndarray, got: np.ndarray) -> None:
    assert fidelity.top1(want, got) is None


def test_differences_carry_top1_and_the_summary_adds_it_up_over_batches() -> None:
    logits = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    flipped = logits.copy()
    flipped[2] = [1.0, 0.0]
    expected: list[dict[str, np.ndarray]] = [{"logits": logits, "sum": np.ones((3, 1))},
                                             {"logits": logits[:1], "sum": np.ones((1, 1))}]  # fmt: skip
    actual: list[dict[str, np.ndarray]] = [{"logits": flipped, "sum": np.ones((3, 1))},
                                           {"logits": logits[:1], "sum": np.ones((1, 1))}]  # fmt: skip
    found = parity.differences(expected, actual, {}, FP32)
    first = next(entry for entry in found if entry["output"] == "logits" and entry["batch"] == 0)
    assert (first["top1_agree"], first["top1_rows"], first["within"]) == (2, 3, False)
    assert next(entry for entry in found if entry["output"] == "sum")["top1_rows"] is None
    summary = {item["output"]: item for item in fidelity.per_output(found)}
    assert summary["logits"]["top1_agreement"] == pytest.approx(3 / 4)  # 2 of 3 rows, then 1 of 1
    assert summary["logits"]["top1_rows"] == 4
    assert summary["logits"]["max_abs"] == pytest.approx(1.0)
    assert not summary["logits"]["within"]
    assert summary["sum"]["top1_agreement"] is None
    assert summary["sum"]["within"]
    record = fidelity.record([{"variant": "as set", "atol": 1e-5, "rtol": 1e-4, "outputs": found}], True)
    assert (record["verdict"], record["proceeded_despite_mismatch"]) == ("mismatch", True)
    assert record["variants"][0]["verdict"] == "mismatch"
    assert fidelity.record([], False)["verdict"] == "not checked"


def _taken(shift: float) -> dict[str, Any]:
    logits = np.array([[0.0, 1.0, 0.5], [2.0, 0.0, 0.1]], np.float32)
    other = logits.copy()
    other[1, 1] += shift
    return {"outputs": {"torch": [{"logits": logits}], "tensorflow": [{"logits": other}]}, "errors": {}}


def _groups() -> list[dict[str, Any]]:
    return [{"name": "as set", "values": {}, "arms": {"torch": "torch", "tensorflow": "tensorflow"}}]


def test_check_parity_refuses_a_mismatch_unless_allowed() -> None:
    records: dict[str, Any] = {"torch": {}, "tensorflow": {}}
    with pytest.raises(prepare.ParityFailed, match=r"output 'logits'.*max \|diff\| 3"):
        prepare.check_parity(plan.Options(), _groups(), records, _taken(3.0))
    checked = prepare.check_parity(plan.Options(allow_mismatch=True), _groups(), records, _taken(3.0))
    assert [entry["within"] for entry in checked[0]["outputs"]] == [False]
    assert prepare.check_parity(plan.Options(), _groups(), records, _taken(0.0))[0]["outputs"][0]["within"]
    # A server that could not answer is refused even so: nothing was compared.
    failed = _taken(0.0) | {"errors": {"tensorflow": "UNAVAILABLE"}}
    with pytest.raises(prepare.ParityFailed, match="no outputs for the parity inputs"):
        prepare.check_parity(plan.Options(allow_mismatch=True), _groups(), records, failed)


def _compare(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, shift: float, *flags: str) -> int:
    """``python -m loadtest compare`` in-process, with the servers' outputs on the parity inputs given and
    every timed phase left out (what runs is the gate, the results document and the report)."""
    from loadtest.__main__ import build_parser

    timed: list[str] = []
    monkeypatch.setattr(compare, "prepare", lambda *args, **kwargs: _taken(shift))
    monkeypatch.setattr(compare, "check_fairness", lambda *args, **kwargs: None)
    monkeypatch.setattr(compare, "_runner_pinned", lambda cpus: contextlib.nullcontext())
    monkeypatch.setattr(compare, "phase", lambda run, arms, records, name, *args: timed.append(name))
    monkeypatch.setattr(drain, "phase", lambda *args: timed.append("drain"))
    argv = ["compare", "--rates", "10", "--out", str(tmp_path), *flags]
    status = command.main(build_parser().parse_args(argv), argv)
    assert timed == ([] if status == 3 else ["closed", "open", "drain"])
    return status


def test_a_mismatch_stops_the_comparison_with_exit_3(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _compare(monkeypatch, tmp_path, 3.0) == 3
    stderr = capsys.readouterr().err
    assert "refusing to compare: the servers' outputs differ on the same inputs" in stderr
    assert "--allow-mismatch compares them anyway" in stderr
    assert not (tmp_path / "results.json").exists()


def test_with_allow_mismatch_it_goes_on_and_the_report_says_so_first(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _compare(monkeypatch, tmp_path, 3.0, "--allow-mismatch") == 0
    assert "WARNING: the servers' outputs differ on the same inputs; comparing anyway" in capsys.readouterr().err
    results = json.loads((tmp_path / "results.json").read_text())
    found = results["fidelity"]
    assert (found["verdict"], found["allow_mismatch"], found["proceeded_despite_mismatch"]) == ("mismatch", True, True)
    (logits,) = found["variants"][0]["outputs"]
    assert (logits["max_abs"], logits["top1_agreement"], logits["within"]) == (3.0, 0.5, False)
    markdown = (tmp_path / "report.md").read_text()
    warning = markdown.index("**Warning:** FIDELITY MISMATCH")
    assert warning < markdown.index("## Verdict")
    assert "output 'logits' max |diff| 3 beyond atol 1e-05 + rtol 0.0001, top-1 agreement 50.0%" in markdown
    section = markdown.split("## Fidelity", 1)[1].split("\n## ", 1)[0]
    assert (
        "| as set | logits | 3 | 50.0% of 2 rows | atol 1e-05 + rtol 0.0001 | MISMATCH: beyond tolerance |" in section
    )
    assert "FIDELITY MISMATCH" in (tmp_path / "report.html").read_text()


def test_servers_that_agree_are_compared_without_a_warning(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert _compare(monkeypatch, tmp_path, 0.0) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert (results["fidelity"]["verdict"], results["fidelity"]["proceeded_despite_mismatch"]) == ("agree", False)
    markdown = (tmp_path / "report.md").read_text()
    assert "FIDELITY MISMATCH" not in markdown
    assert "| as set | logits | 0 | 100.0% of 2 rows | atol 1e-05 + rtol 0.0001 | within tolerance |" in markdown


def test_an_older_results_document_shows_its_parity_entries_as_fidelity(tmp_path: Path) -> None:
    from loadtest.compare import report
    from tests.helpers.synthetic import synthetic_results

    results = synthetic_results()
    results["parity"] = [  # as written before top-1 agreement was counted
        {"variant": "as set", "atol": 1e-5, "rtol": 1e-4,
         "outputs": [{"batch": 0, "output": "logits", "max_abs": 2e-6, "max_rel": 1e-6, "within": True}]}
    ]  # fmt: skip
    report.write_report(results, tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    assert "| as set | logits | 2e-06 | n/a | atol 1e-05 + rtol 0.0001 | within tolerance |" in markdown
    assert "FIDELITY MISMATCH" not in markdown

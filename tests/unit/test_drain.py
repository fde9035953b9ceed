"""The drain scenario's pure part: each call's fate, the figures from the timestamps, the results
document's ``drain``, the verdict rows and the report's table (no server: ``tests/integration/test_drain.py``)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest

from loadtest import driver
from loadtest.compare import drain, report
from loadtest.compare import run as compare
from tests.helpers.synthetic import synthetic_results


def call(scheduled: float, latency: float, status: str = "OK", lag: float = 0.0) -> driver.Arrival:
    return driver.Arrival("0", scheduled, lag, latency, status)


@pytest.mark.parametrize(
    ("status", "fate"),
    [
        ("OK", "served"),
        ("UNAVAILABLE", "refused"),
        (driver.BACKLOG, "unsent"),
        ("CANCELLED", "lost"),
        ("INTERNAL", "lost"),
        ("DEADLINE_EXCEEDED", "lost"),
        ("UNKNOWN", "lost"),  # a reset connection
        ("RESOURCE_EXHAUSTED", "lost"),
    ],
)
def test_only_ok_and_unavailable_lose_nothing(status: str, fate: str) -> None:
    assert drain.classify(status) == fate


def test_figures_from_the_calls_and_the_events() -> None:
    calls = [
        call(0.10, 0.02),  # served before the signal
        call(0.95, 0.20),  # in flight at the signal (1.0), served after it
        call(0.98, 0.30, "CANCELLED"),  # in flight, lost
        call(1.01, 0.001, "UNAVAILABLE"),  # refused after the signal
        call(1.02, 0.50, "DEADLINE_EXCEEDED"),  # admitted after the signal and never answered: lost
        call(0.20, 0.01, "RESOURCE_EXHAUSTED"),  # refused before the signal: not the drain's
        call(1.90, 0.0, driver.BACKLOG),  # never sent: neither in flight nor lost
        call(0.99, 0.02, "OK", lag=0.02),  # sent at 1.01, after the signal: not in flight at it
    ]
    health = [(0.5, "SERVING"), (0.99, "NOT_SERVING"), (1.0, "SERVING"), (1.004, "NOT_SERVING"),
              (1.009, "NOT_SERVING"), (2.6, "error:UNAVAILABLE")]  # fmt: skip
    found = drain.figures(calls, drain.Timeline(signal_s=1.0, exit_s=3.5, health=health))
    assert found["calls"] == 8
    assert found["statuses"] == {"CANCELLED": 1, "DEADLINE_EXCEEDED": 1, driver.BACKLOG: 1, "OK": 3,
                                 "RESOURCE_EXHAUSTED": 1, "UNAVAILABLE": 1}  # fmt: skip
    assert (found["lost_calls"], found["lost_before_signal"]) == (2, 1)
    assert found["lost_window_s"] == pytest.approx([0.28, 0.52])  # the two lost after the signal, by their end
    assert [(e["status"], e["sent_s"], e["ended_s"]) for e in found["lost_examples"]] == [
        ("CANCELLED", pytest.approx(-0.02), pytest.approx(0.28)),
        ("DEADLINE_EXCEEDED", pytest.approx(0.02), pytest.approx(0.52)),
    ]
    assert found["in_flight_at_signal"] == 2
    assert found["served_after_signal"] == 2
    assert found["send_lag_p99_ms"] == pytest.approx(20.0)  # the one late send, the backlog left out
    # The first NOT_SERVING at or after the signal (one before it is not the drain's).
    assert found["readiness_flip_ms"] == pytest.approx(4.0)
    assert found["exit_s"] == pytest.approx(2.5)


def test_a_flip_never_seen_and_a_server_that_had_to_be_killed_have_no_figure() -> None:
    timeline = drain.Timeline(signal_s=1.0, exit_s=None, health=[(0.5, "SERVING"), (1.2, "error:UNAVAILABLE")])
    found = drain.figures([call(0.5, 0.01)], timeline)
    assert (found["readiness_flip_ms"], found["exit_s"], found["lost_calls"]) == (None, None, 0)


def _run(repeat: int, lost: int, flip: float | None, exit_s: float | None, **statuses: int) -> dict[str, Any]:
    return {"repeat": repeat, "rate_rps": 250.0, "grace_s": 10.0, "calls": sum(statuses.values()), "lost_calls": lost,
            "lost_before_signal": 0, "lost_window_s": [1.5, 1.5] if lost else None, "lost_examples": [],
            "statuses": dict(sorted(statuses.items())), "in_flight_at_signal": 3, "served_after_signal": 3,
            "send_lag_p99_ms": 0.5, "readiness_flip_ms": flip, "exit_s": exit_s,
            "killed_after_s": None if exit_s is not None else 16.0,
            "exit_code": 0 if exit_s is not None else -9}  # fmt: skip


def test_record_lists_each_figure_per_repeat_and_sums_them_up() -> None:
    runs = [_run(0, 0, 2.0, 2.1, OK=500, UNAVAILABLE=400), _run(1, 2, 6.0, 2.3, OK=480, UNAVAILABLE=410, CANCELLED=2),
            _run(2, 0, None, None, OK=490, UNAVAILABLE=5)]  # fmt: skip
    found = drain.record(runs)
    assert set(drain.FIGURES) <= set(found)
    assert found["lost_calls"] == [0, 2, 0]
    assert found["exit_s"] == [2.1, 2.3, None]
    assert found["readiness_flip_ms"] == [2.0, 6.0, None]
    assert found["rate_rps"] == [250.0] * 3
    total = found["summary"]
    assert (total["runs"], total["calls"], total["lost_calls"], total["lost_before_signal"]) == (3, 2287, 2, 0)
    assert total["statuses"] == {"CANCELLED": 2, "OK": 1470, "UNAVAILABLE": 815}
    assert total["readiness_flip_ms"] == {"mean": pytest.approx(4.0), "max": 6.0, "missing": 1}
    assert total["exit_s"] == {"mean": pytest.approx(2.2), "max": 2.3, "missing": 1}
    assert total["exit_codes"] == [-9, 0]
    assert (total["rate_rps"], total["grace_s"]) == ([250.0], [10.0])


def test_grace_period_from_the_server_flags_or_the_servers_default() -> None:
    assert drain.grace_period(["--threads", "1", "--grace-period-s", "4"]) == 4.0
    assert drain.grace_period(["--grace-period-s=4", "--grace-period-s=2.5"]) == 2.5  # the last one counts
    assert drain.grace_period(["--threads", "1"]) == 10.0


def test_the_load_is_half_the_lower_valid_closed_loop_peak() -> None:
    def closed(users: int, rps: float, valid: bool = True) -> dict[str, Any]:
        return {"mode": "closed", "concurrency": users, "throughput_rps": rps, "valid": valid}

    steps = {"torch": [closed(1, 300.0), closed(4, 900.0), closed(16, 5000.0, valid=False)],
             "tensorflow": [closed(1, 200.0), closed(4, 700.0)]}  # fmt: skip
    assert drain.drain_rate(steps) == 350.0
    assert drain.drain_rate({"torch": [], "tensorflow": []}) is None


def _with_drain(results: dict[str, Any]) -> dict[str, Any]:
    results["servers"]["torch"]["drain"] = drain.record(
        [_run(r, 0, 2.0 + r, 2.05 + r / 100, OK=500, UNAVAILABLE=400) for r in range(3)]
    )
    results["servers"]["tensorflow"]["drain"] = drain.record(
        [
            _run(0, 3, 9.0, 2.5, OK=400, CANCELLED=3),
            _run(1, 1, 8.0, 2.6, OK=400, UNKNOWN=1),
            _run(2, 2, None, None, OK=400, INTERNAL=2),
        ]
    )
    return results


def test_the_verdict_judges_calls_lost_time_to_exit_and_readiness_flip(tmp_path: Path) -> None:
    report.write_report(_with_drain(synthetic_results()), tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {row["characteristic"]: row for row in results["verdict"]}
    lost = rows["calls lost in a drain (SIGTERM at half the lower peak)"]
    assert lost["values"] == {"torch": [0, 0, 0], "tensorflow": [3, 1, 2]}
    assert (lost["better"], lost["winner"]) == ("lower", "torch")
    exit_row = rows["time to exit after SIGTERM, under load"]
    assert exit_row["winner"] == "torch"
    assert exit_row["values"]["tensorflow"] == [2.5, 2.6, 16.0]  # the killed run at the time it was killed
    flip = rows["readiness flip after SIGTERM (NOT_SERVING seen)"]
    assert flip["values"]["tensorflow"] == [9.0, 8.0]  # the run that never saw NOT_SERVING gives no value
    assert flip["verdict"].startswith("too few values")
    assert results["servers"]["torch"]["drain"]["summary"]["lost_calls"] == 0
    markdown = (tmp_path / "report.md").read_text()
    section = markdown.split("## Drain", 1)[1].split("\n## ", 1)[0]
    assert (
        "| tf_server | 1 | 250 | 0.5 | 10 | 403 | CANCELLED 3, OK 400 | 3 | 1.500 | 0 | 3 | 3 | 9 | 2.50 | 0 |"
        in section
    )
    assert (
        "| tf_server | 3 | 250 | 0.5 | 10 | 402 | INTERNAL 2, OK 400 | 2 | 1.500 | 0 | 3 | 3 | not seen | killed | -9 |"
        in section
    )
    assert "bare (reference)" not in section  # not ours to stop


def test_a_report_without_drain_runs_says_none(tmp_path: Path) -> None:
    report.write_report(synthetic_results(), tmp_path)
    section = (tmp_path / "report.md").read_text().split("## Drain", 1)[1].split("\n## ", 1)[0]
    assert "_none_" in section


def test_drain_phase_runs_the_started_servers_in_abba_order_and_records_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from loadtest.compare import plan, steps

    started: list[str] = []

    class Started:
        def __init__(self, framework: str, model: str, args: list[str], **kwargs: Any) -> None:
            self.framework, self.args = framework, args

        def start(self) -> None:
            started.append(self.framework)

        def close(self) -> None:
            pass

    def fake_run(server: Any, model: str, rate: float, **kwargs: Any) -> dict[str, Any]:
        assert kwargs["grace_s"] == 3.0
        return {k: v for k, v in _run(0, 0, 1.0, 2.0, OK=10).items() if k != "repeat"} | {"rate_rps": rate}

    monkeypatch.setattr(drain, "ServerProcess", Started)
    monkeypatch.setattr(drain, "drain_run", fake_run)
    opts = plan.Options(repeats=3, targets=["ref=127.0.0.1:1"], server_args=["--grace-period-s", "3"])
    arms, _ = plan.plan_arms(opts)
    run = steps.Run(opts, tmp_path, tmp_path, None, None)
    closed = {"mode": "closed", "concurrency": 4, "throughput_rps": 400.0, "valid": True}
    records: dict[str, Any] = {arm.name: {"steps": [closed], "starts": []} for arm in arms}
    order: list[dict[str, Any]] = []
    drain.phase(run, arms, records, {}, order, [])
    assert [entry["arm"] for entry in order] == ["torch", "tensorflow", "tensorflow", "torch", "torch", "tensorflow"]
    assert started == ["torch", "tensorflow", "tensorflow", "torch", "torch", "tensorflow"]  # the reference: never
    assert records["torch"]["drain"]["repeat"] == [0, 1, 2]
    assert records["torch"]["drain"]["rate_rps"] == [200.0] * 3
    assert "drain" not in records["ref"]
    # No closed-loop peak: no load to drain under, said as a failure.
    failures: list[dict[str, Any]] = []
    empty: dict[str, Any] = {arm.name: {"steps": [], "starts": []} for arm in arms}
    drain.phase(run, arms, empty, {}, [], failures)
    assert [failure["phase"] for failure in failures] == ["drain"]


@pytest.mark.parametrize("setting", ["on", "off"])
def test_the_comparison_drains_after_the_open_loop_unless_drain_off(
    setting: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    phases: list[str] = []
    monkeypatch.setattr(compare, "prepare", lambda *args, **kwargs: {"outputs": {}, "errors": {}})
    monkeypatch.setattr(compare, "check_fairness", lambda *args, **kwargs: None)
    monkeypatch.setattr(compare, "_runner_pinned", lambda cpus: contextlib.nullcontext())
    monkeypatch.setattr(compare, "phase", lambda run, arms, records, name, *args: phases.append(name))
    monkeypatch.setattr(drain, "phase", lambda *args: phases.append("drain"))
    compare.run_comparison(compare.Options(rates=[10.0], drain=setting, out=tmp_path))
    assert phases == (["closed", "open", "drain"] if setting == "on" else ["closed", "open"])

"""The SLO capacity search (``loadtest.compare.capacity``) over fake probes, its interval, and its place in
the comparison: the phase (servers and steps faked), the verdict row, the report's table and plot."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from loadtest import stats
from loadtest.compare import capacity, capacity_phase, command, plan, plots, report, steps
from loadtest.compare.capacity import ProbeResult, Search
from tests.helpers.synthetic import check_report_folder, synthetic_results

SLO = Search(slo_ms=50.0, error_limit=0.01, precision=0.05)


def queue_probe(saturation: float, service_ms: float = 5.0) -> Callable[[float], ProbeResult]:
    """A server whose p99 grows as an M/M/1 queue's towards ``saturation``: p99 = service / (1 - rate / saturation),
    so with a 50 ms SLO and 5 ms service its true capacity is 0.9 x saturation."""

    def probe(rate: float) -> ProbeResult:
        if rate >= saturation:
            return ProbeResult(rate, 1000.0, 0.3, True)
        return ProbeResult(rate, service_ms / (1 - rate / saturation), 0.0, True)

    return probe


def recorded(probe: Callable[[float], ProbeResult]) -> tuple[Callable[[float], ProbeResult], list[float]]:
    rates: list[float] = []

    def wrapped(rate: float) -> ProbeResult:
        rates.append(rate)
        return probe(rate)

    return wrapped, rates


# ---------------------------------------------------------------- the search


@pytest.mark.parametrize("precision", [0.01, 0.05, 0.1])
@pytest.mark.parametrize("start", [30.0, 850.0, 1000.0, 2000.0, 45000.0])
def test_search_finds_a_known_capacity_within_its_precision(start: float, precision: float) -> None:
    true = 900.0  # saturation 1000
    rules = Search(slo_ms=50.0, error_limit=0.01, precision=precision, max_probes=30)
    outcome = capacity.search(queue_probe(1000.0), start, rules)
    assert outcome.status == capacity.FOUND
    assert outcome.found == outcome.low
    assert outcome.low is not None
    assert outcome.high is not None
    assert outcome.low <= true < outcome.high  # the highest passing rate and the lowest failing one
    assert outcome.high / outcome.low <= 1 + precision
    assert outcome.low >= true / (1 + precision)
    # Every probe judged as the objective says, and the bracket's ends are probes that passed and failed.
    judged = {result.rate: passed for result, passed in outcome.probes}
    assert all(passed == (rate <= true) for rate, passed in judged.items())
    assert judged[outcome.low] is True
    assert judged[outcome.high] is False


def test_bracket_grows_by_the_factor_from_a_passing_start_until_a_probe_fails() -> None:
    probe, rates = recorded(queue_probe(1000.0))  # capacity 900
    outcome = capacity.search(probe, 100.0, SLO)
    assert rates[:5] == [100.0, 200.0, 400.0, 800.0, 1600.0]
    assert outcome.low is not None
    assert outcome.low >= 800.0


def test_bracket_shrinks_by_the_factor_from_a_failing_start_until_a_probe_passes() -> None:
    probe, rates = recorded(queue_probe(1000.0))
    outcome = capacity.search(probe, 8000.0, SLO)
    assert rates[:4] == [8000.0, 4000.0, 2000.0, 1000.0]
    assert rates[4] == 500.0
    assert outcome.high is not None
    assert outcome.high <= 1000.0


def test_bisection_probes_geometric_midpoints_and_stops_at_the_precision() -> None:
    probe, rates = recorded(queue_probe(1000.0))  # capacity 900: bracket [500, 1000] from a start of 1000
    rules = Search(slo_ms=50.0, error_limit=0.01, precision=0.1)
    outcome = capacity.search(probe, 1000.0, rules)
    low, high = 500.0, 1000.0
    for rate in rates[2:]:
        assert rate == pytest.approx(math.sqrt(low * high))
        low, high = (rate, high) if rate <= 900.0 else (low, rate)
    # Three halvings of log(2) bring the ratio to 2^(1/8) = 1.09 <= 1.1; two (1.19) would not.
    assert len(rates) == 2 + 3 == capacity.expected_probes(rules)
    assert (outcome.low, outcome.high) == (pytest.approx(low), pytest.approx(high))
    # 707 and 841 pass, 917 fails: the capacity is the highest passing rate, 1000 x 2^(-1/4).
    assert outcome.found == pytest.approx(1000.0 * 2 ** (-1 / 4))
    assert outcome.high == pytest.approx(1000.0 * 2 ** (-1 / 8))


def test_dithered_starts_spread_the_repeats_over_the_resolution_instead_of_one_lattice_point() -> None:
    rules = Search(slo_ms=50.0, error_limit=0.01, precision=0.1)
    cell = 2 ** (1 / 8)  # three bisections of a x2 bracket
    assert capacity.resolution(rules) == pytest.approx(cell)
    starts = [capacity.dithered_start(1000.0, repeat, 3, rules) for repeat in range(3)]
    assert starts == [pytest.approx(1000.0 * cell ** (j / 3)) for j in range(3)]
    assert capacity.dithered_start(1000.0, 3, 3, rules) == pytest.approx(1000.0)
    # A noiseless server: from one start every repeat finds the same rate; dithered, three rates a third
    # of a cell apart, all within one cell below the true capacity.
    same = {capacity.search(queue_probe(1000.0), 1000.0, rules).found for _ in range(3)}
    assert len(same) == 1
    found = sorted(capacity.search(queue_probe(1000.0), start, rules).found or 0.0 for start in starts)
    assert all(900.0 / cell <= value <= 900.0 for value in found)
    assert found[1] / found[0] == pytest.approx(cell ** (1 / 3))
    assert found[2] / found[1] == pytest.approx(cell ** (1 / 3))


def test_the_bracket_grows_up_to_the_generators_ceiling_and_never_past_it() -> None:
    probe, rates = recorded(queue_probe(1000.0))  # capacity 900
    capped = Search(slo_ms=50.0, error_limit=0.01, precision=0.05, max_rate=300.0)
    outcome = capacity.search(probe, 100.0, capped)
    assert rates == [100.0, 200.0, 300.0]
    assert (outcome.status, outcome.found, outcome.low) == (capacity.ABOVE_CEILING, None, 300.0)
    # A ceiling above the capacity fails there: a valid bracket, bisected as ever.
    probe, rates = recorded(queue_probe(1000.0))
    outcome = capacity.search(probe, 600.0, Search(slo_ms=50.0, error_limit=0.01, precision=0.05, max_rate=950.0))
    assert rates[:2] == [600.0, 950.0]
    assert max(rates) == 950.0
    assert outcome.status == capacity.FOUND
    assert outcome.low is not None
    assert outcome.low <= 900.0 < (outcome.high or 0.0) <= 1.05 * outcome.low
    # A start above the ceiling starts at the ceiling.
    probe, rates = recorded(queue_probe(1000.0))
    capacity.search(probe, 5000.0, Search(slo_ms=50.0, error_limit=0.01, max_rate=2000.0))
    assert rates[:2] == [2000.0, 1000.0]


def test_the_generators_ceiling_follows_its_measured_cost_per_request(tmp_path: Path) -> None:
    run = steps.Run(plan.Options(), tmp_path, tmp_path, [0], [1], us_per_request=180.0)
    assert capacity_phase.generator_ceiling(run) == pytest.approx(0.8 * 0.9 * 1e6 / 180.0)
    run = steps.Run(plan.Options(), tmp_path, tmp_path, [0], [1, 2], us_per_request=180.0)
    assert capacity_phase.generator_ceiling(run) == pytest.approx(2 * 0.8 * 0.9 * 1e6 / 180.0)


def test_errors_above_the_limit_fail_a_probe_whose_p99_meets_the_slo() -> None:
    assert SLO.passes(ProbeResult(10.0, 49.0, 0.01, True))
    assert not SLO.passes(ProbeResult(10.0, 49.0, 0.0101, True))
    assert not SLO.passes(ProbeResult(10.0, 50.1, 0.0, True))
    assert not SLO.passes(ProbeResult(10.0, None, None, True))

    def erroring(rate: float) -> ProbeResult:  # fast, but from 600/s on 2 % of requests fail
        return ProbeResult(rate, 1.0, 0.02 if rate >= 600.0 else 0.0, True)

    outcome = capacity.search(erroring, 1000.0, SLO)
    assert outcome.low is not None
    assert outcome.low < 600.0 <= (outcome.high or 0.0)


def test_an_invalid_probe_is_neither_pass_nor_fail_and_is_run_once_more() -> None:
    calls: dict[float, int] = {}

    def flaky(rate: float) -> ProbeResult:
        calls[rate] = calls.get(rate, 0) + 1
        if rate == 1000.0 and calls[rate] == 1:  # would pass if it were judged: p99 1 ms
            return ProbeResult(rate, 1.0, 0.0, False, ("generator CPU 95% > 90%",))
        return queue_probe(1000.0)(rate)

    outcome = capacity.search(flaky, 1000.0, SLO)
    assert calls[1000.0] == 2
    assert [(result.rate, passed) for result, passed in outcome.probes[:3]] == [
        (1000.0, None),
        (1000.0, False),
        (500.0, True),
    ]
    assert outcome.status == capacity.FOUND
    assert outcome.low is not None
    assert outcome.low <= 900.0 < (outcome.high or 0.0)
    record = outcome.as_dict()["probes"][0]
    assert (record["valid"], record["pass"], record["invalid_reasons"]) == (False, None, ["generator CPU 95% > 90%"])


@pytest.mark.parametrize("p99_ms", [1.0, 5000.0])  # an invalid probe that would pass, or fail, if judged
def test_a_probe_invalid_twice_makes_the_search_inconclusive(p99_ms: float) -> None:
    def probe(rate: float) -> ProbeResult:
        if rate == 500.0:
            return ProbeResult(rate, p99_ms, 0.0, False, ("generator send lag p99 30 ms > 10 ms",))
        return queue_probe(1000.0)(rate)

    outcome = capacity.search(probe, 1000.0, SLO)
    assert outcome.status == capacity.INCONCLUSIVE
    assert outcome.found is None
    assert [(r.rate, passed) for r, passed in outcome.probes] == [(1000.0, False), (500.0, None), (500.0, None)]
    assert outcome.reason is not None
    assert "500/s was invalid twice" in outcome.reason
    assert "send lag" in outcome.reason


def test_a_search_stops_at_its_probe_budget_without_a_capacity() -> None:
    rules = Search(slo_ms=50.0, error_limit=0.01, precision=0.001, max_probes=4)
    outcome = capacity.search(queue_probe(1000.0), 1000.0, rules)
    assert (outcome.status, outcome.found, len(outcome.probes)) == (capacity.BUDGET_EXHAUSTED, None, 4)


def test_a_server_that_fails_at_every_rate_has_capacity_zero() -> None:
    rules = Search(slo_ms=50.0, error_limit=0.01, min_rate=10.0, max_probes=30)
    outcome = capacity.search(lambda rate: ProbeResult(rate, 80.0, 0.0, True), 100.0, rules)
    assert (outcome.status, outcome.found) == (capacity.NONE_PASSES, 0.0)
    assert [r.rate for r, _ in outcome.probes] == [100.0, 50.0, 25.0, 12.5]


def test_search_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="precision"):
        Search(slo_ms=50.0, error_limit=0.01, precision=0.0)
    with pytest.raises(ValueError, match="positive rate"):
        capacity.search(queue_probe(1000.0), 0.0, SLO)


# ---------------------------------------------------------------- the interval over repeats


def test_student_t_interval_over_repeats() -> None:
    interval = stats.mean_interval([100.0, 110.0, 120.0])
    half = 4.303 * 10.0 / math.sqrt(3)  # t(0.975, 2 df) x s / sqrt(n)
    assert interval["mean"] == pytest.approx(110.0)
    assert interval["interval"] == [pytest.approx(110.0 - half), pytest.approx(110.0 + half)]
    assert interval["half_width_pct"] == pytest.approx(100.0 * half / 110.0)
    assert stats.mean_interval([5.0, 5.0])["interval"] == [5.0, 5.0]
    assert stats.mean_interval([7.0]) == {"mean": 7.0, "interval": None, "half_width": None, "half_width_pct": None,
                                          "n": 1}  # fmt: skip
    assert stats.mean_interval([])["mean"] is None


@pytest.mark.parametrize(("df", "exact"), [(1, 12.7062), (2, 4.3027), (10, 2.2281), (30, 2.0423), (31, 2.0395),
                                           (60, 2.0003), (120, 1.9799), (1000, 1.9623)])  # fmt: skip
def test_t_quantiles(df: int, exact: float) -> None:
    assert stats.t_975(df) == pytest.approx(exact, abs=1e-3)


def _outcome(found: float | None, status: str = capacity.FOUND) -> capacity.Outcome:
    probes: list[tuple[ProbeResult, bool | None]] = [(ProbeResult(found or 100.0, 10.0, 0.0, True), True)]
    return capacity.Outcome(status, found, found, None, probes)


def test_summary_keeps_every_repeat_and_averages_the_conclusive_ones() -> None:
    outcomes = [(0, _outcome(100.0)), (1, _outcome(None, capacity.INCONCLUSIVE)), (2, _outcome(120.0))]
    summary = capacity.summarize(outcomes, SLO, 800.0)
    assert summary["values"] == [100.0, 120.0]
    assert summary["mean"] == pytest.approx(110.0)
    half = 12.706 * statistics_stdev([100.0, 120.0]) / math.sqrt(2)
    assert summary["interval"] == [pytest.approx(110.0 - half), pytest.approx(110.0 + half)]
    assert [entry["repeat"] for entry in summary["repeats"]] == [0, 1, 2]
    assert summary["repeats"][1]["status"] == capacity.INCONCLUSIVE
    assert summary["repeats"][0]["probes"][0] | {} == {"rate": 100.0, "p99_ms": 10.0, "error_rate": 0.0, "valid": True,
                                                      "pass": True, "invalid_reasons": []}  # fmt: skip
    assert (summary["slo_ms"], summary["error_limit"], summary["precision"], summary["start_rps"]) == (
        50.0,
        0.01,
        0.05,
        800.0,
    )
    values, where = capacity.capacity_reading({"capacity": summary}, {})
    assert (values, where) == ([100.0, 120.0], "1 of 3 searches inconclusive")
    assert capacity.capacity_reading({}, {}) == ([], "")


def statistics_stdev(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


# ---------------------------------------------------------------- in the comparison


def _with_capacity(results: dict[str, Any], found: dict[str, list[float]]) -> dict[str, Any]:
    for name, values in found.items():
        outcomes = []
        for repeat, value in enumerate(values):
            probes: list[tuple[ProbeResult, bool | None]] = [
                (ProbeResult(2 * value, 900.0, 0.2, True), False),
                (ProbeResult(value, 20.0, 0.0, True), True),
                (ProbeResult(1.05 * value, 70.0, 0.0, False, ("generator CPU 95% > 90%",)), None),
                (ProbeResult(1.05 * value, 60.0, 0.0, True), False),
            ]
            outcome = capacity.Outcome(capacity.FOUND, value, value, 1.05 * value, probes)
            outcome.replays = [capacity.judged(ProbeResult(value, 40.0 + 6 * repeat, 0.0, True), SLO)]
            outcomes.append((repeat, outcome))
        results["servers"][name]["capacity"] = capacity.summarize(outcomes, SLO, 400.0)
    return results


def test_capacity_heads_the_verdict_and_the_report(tmp_path: Path) -> None:
    results = _with_capacity(synthetic_results(), {"torch": [300.0, 310.0, 305.0], "tensorflow": [250.0, 255.0, 252.0],
                                                   "bare": [600.0, 600.0, 600.0]})  # fmt: skip
    report.write_report(results, tmp_path)
    written = check_report_folder(tmp_path)
    first = written["verdict"][0]
    assert first["characteristic"] == "SLO capacity (p99 ≤ 50 ms, errors ≤ 1%)"
    assert (first["better"], first["winner"]) == ("higher", "torch")
    assert first["values"] == {"torch": [300.0, 310.0, 305.0], "tensorflow": [250.0, 255.0, 252.0]}
    assert written["servers"]["torch"]["capacity"]["half_width_pct"] == pytest.approx(
        100 * 4.303 * 5.0 / math.sqrt(3) / 305.0, rel=1e-3
    )
    markdown = (tmp_path / "report.md").read_text()
    assert markdown.index("## SLO capacity (p99 ≤ 50 ms") < markdown.index("## Every server")
    assert "| torch_server | 305 | 293–317 | ±4.1% | 3/3 | 300, 310, 305 | 4, 4, 4 | 2 of 3 met the SLO |" in markdown
    assert "| torch_server | 3 | replay 1 | 305 | n/a | 52 | 0.00% | fail |  |" in markdown
    assert written["servers"]["torch"]["capacity"]["replays"] == {"passed": 2, "valid": 3, "run": 3}
    assert "| tf_server | 1 | 3 | 262.5 | n/a | 70 | 0.00% | INVALID: generator CPU 95% > 90% |  |" in markdown
    assert "slo_capacity.png" in plots.PLOT_NAMES
    assert (tmp_path / "slo_capacity.png").stat().st_size > 0


def test_overlapping_capacities_give_no_winner_and_no_search_gives_no_row() -> None:
    from loadtest.compare.verdict import verdict

    results = _with_capacity(synthetic_results(), {"torch": [300.0, 250.0, 305.0], "tensorflow": [250.0, 301.0, 252.0]})
    first = verdict(results)[0]
    assert first["characteristic"].startswith("SLO capacity")
    assert (first["winner"], first["verdict"]) == (None, "no difference beyond noise")
    for name in ("torch", "tensorflow"):  # every search inconclusive: said so, in that row only
        results["servers"][name]["capacity"] = capacity.summarize(
            [(0, _outcome(None, capacity.INCONCLUSIVE))], SLO, 1.0
        )
    rows = verdict(results)
    assert rows[0]["verdict"] == "no conclusive search (see SLO capacity)"
    assert all(row["verdict"] != rows[0]["verdict"] for row in rows[1:])
    results["settings"]["capacity"] = "off"
    assert not any(row["characteristic"].startswith("SLO capacity") for row in verdict(results))


def test_capacity_flags() -> None:
    from loadtest.__main__ import build_parser

    parser = build_parser()
    opts = command.options_from(parser.parse_args(["compare"]))
    assert (opts.capacity, opts.capacity_precision, opts.capacity_start) == ("on", 0.05, None)
    opts = command.options_from(parser.parse_args(["compare", "--capacity", "off", "--capacity-precision", "0.05",
                                                   "--capacity-start", "800"]))  # fmt: skip
    assert (opts.capacity, opts.capacity_precision, opts.capacity_start) == ("off", 0.05, 800.0)
    for bad in (["--capacity-precision", "0"], ["--capacity-start", "-1"], ["--capacity-step-seconds", "0"],
                ["--capacity-replays", "-1"]):  # fmt: skip
        with pytest.raises(ValueError):  # noqa: PT011 - each names its own problem
            command.options_from(parser.parse_args(["compare", *bad]))


def test_capacity_phase_searches_each_server_in_abba_order_from_the_lower_peak(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    saturation = {"torch": 1000.0, "tensorflow": 600.0}
    served: list[tuple[str, int]] = []
    probed: list[tuple[str, str, float, float, float]] = []

    @contextmanager
    def fake_serving(run: Any, arm: Any, record: Any, phase: str, repeat: int, model_dir: Any) -> Iterator[Any]:
        served.append((arm.name, repeat))
        yield None, True

    def fake_step(run: Any, arm: Any, endpoint: Any, scenario: Any, phase: str, repeat: int, **_: Any) -> Any:
        probed.append((arm.name, phase, scenario.value, run.opts.step_seconds, run.opts.warmup_seconds))
        result = queue_probe(saturation[arm.name])(scenario.value)
        return {"throughput_rps": scenario.value, "sent_rps": scenario.value, "errors": 0, "valid": result.valid,
                "invalid_reasons": [], "latency_ms": {"p50": 1.0, "p99": result.p99_ms},
                "error_rate": result.error_rate, "server_cpu_pct": {"mean": 50.0},
                "generator_cpu_pct": {"mean": 20.0}}  # fmt: skip

    monkeypatch.setattr(capacity_phase, "serving", fake_serving)
    monkeypatch.setattr(capacity_phase, "measure_step", fake_step)
    opts = plan.Options(repeats=2, capacity_precision=0.1, capacity_replays=1)
    arms, _ = plan.plan_arms(opts)
    closed = {"torch": 900.0, "tensorflow": 700.0}  # closed-loop peaks: the search starts at the lower one
    records: dict[str, Any] = {
        arm.name: {"steps": [{"mode": "closed", "concurrency": 4, "throughput_rps": closed[arm.name], "valid": True}],
                   "starts": []}
        for arm in arms
    }  # fmt: skip
    order: list[dict[str, Any]] = []
    run = steps.Run(opts, tmp_path, tmp_path, None, None)
    capacity_phase.capacity_phase(run, arms, records, {}, order, [])
    assert served == [("torch", 0), ("tensorflow", 0), ("tensorflow", 1), ("torch", 1)]
    assert [(entry["arm"], entry["repeat"], entry["phase"]) for entry in order] == [
        (name, repeat, "capacity") for name, repeat in served
    ]
    # Repeat 1 starts half a resolution cell above repeat 0 (dithered), the same for both servers.
    firsts = [(name, rate) for name, phase, rate, *_ in probed if phase == "capacity-p1"]
    shifted = round(700.0 * capacity.resolution(capacity_phase.settings(opts)) ** (1 / 2), 1)  # half a lattice cell
    assert firsts == [("torch", 700.0), ("tensorflow", 700.0), ("tensorflow", shifted), ("torch", shifted)]
    # Each probe of a search has a phase name of its own (its latency files), with the probes' window.
    torch_first = [phase for name, phase, *_ in probed[: len(records["torch"]["capacity"]["repeats"][0]["probes"])]]
    assert torch_first == [f"capacity-p{i}" for i in range(1, len(torch_first) + 1)]
    # Probes have the capacity window; the replay of each found rate is a sweep step, named apart.
    assert {(step, warmup) for _, phase, _, step, warmup in probed if "replay" not in phase} == {(2.0, 0.5)}
    replays = [(name, phase, rate, step, warmup) for name, phase, rate, step, warmup in probed if "replay" in phase]
    assert [(name, phase, step, warmup) for name, phase, _, step, warmup in replays] == [
        (name, "capacity-replay1", opts.step_seconds, opts.warmup_seconds) for name, _ in served
    ]
    assert [rate for *_, rate, _, _ in replays] == [
        entry["found"]
        for name, repeat in served
        for entry in records[name]["capacity"]["repeats"]
        if entry["repeat"] == repeat
    ]
    assert records["torch"]["capacity"]["replays"]["run"] == 2
    for name, saturated in saturation.items():
        found = records[name]["capacity"]
        assert len(found["values"]) == 2
        for value in found["values"]:
            assert 0.9 * saturated / 1.1 <= value <= 0.9 * saturated
        assert found["start_rps"] == 700.0
    assert json.dumps(records)  # results.json can hold it


def test_an_open_loop_step_lets_each_stream_hold_a_deadlines_worth_of_requests() -> None:
    """A server that queues up to the deadline holds rate x deadline requests: a generator that allowed fewer
    outstanding would drop arrivals (client backlog) and make every overloaded probe invalid, never a fail."""
    from loadtest.sampling import Endpoint

    endpoint = Endpoint("torch", "127.0.0.1:1", None, "mlp")
    opts = plan.Options(deadline_ms=1000.0, arrival_users=4)

    def allowed(rate: float, processes: int = 1) -> int:
        command = steps.locust_command(endpoint, plan.Scenario("open", rate), opts, 5, processes, Path("l"), Path("s"))
        return int(command[command.index("--max-in-flight") + 1])

    assert allowed(100.0) == steps.MIN_IN_FLIGHT  # a slow rate keeps Locust's default
    for rate in (5209.6, 20000.0):
        assert allowed(rate) >= 1.5 * rate / 4 * 1.0  # per stream: its share of one deadline's arrivals, and more
    assert allowed(20000.0, processes=8) >= 1.5 * 20000.0 / 8  # more streams share the rate

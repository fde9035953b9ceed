"""Each server at its best (``--sweep``): the candidates, the successive halving, the commands that reproduce
a configuration (``loadtest.compare.sweep``), the phase over faked servers (``loadtest.compare.sweep_phase``),
and the second verdict and its tables in the report."""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from loadtest.compare import capacity, capacity_phase, command, plan, report, steps, sweep, sweep_phase
from loadtest.compare.capacity import Outcome
from loadtest.compare.sweep import Candidate
from tests.helpers.synthetic import check_report_folder, synthetic_results

BASE = {"max_batch_size": "32", "max_queue_delay_us": "0", "instances": "1", "workers": "1", "precision": "fp32",
        "compile": "off"}  # fmt: skip


def scored(name: str, value: float | None, config: dict[str, str] | None = None) -> Candidate:
    return Candidate(config or dict(BASE), name, [{"rung": 0, "score": value}])


# ---------------------------------------------------------------- the plan


def test_candidates_are_the_base_and_its_one_setting_changes_not_the_grid() -> None:
    axes = {"max_batch_size": ["8", "32", "64"], "instances": ["1", "2"], "max_queue_delay_us": ["0", "1000"]}
    found = sweep.candidates(BASE, axes)
    assert found[0] == BASE
    assert len(found) == 1 + 2 + 1 + 1  # the full grid would be 12
    assert [sweep.label(config, BASE) for config in found] == [
        "base", "max_batch_size=8", "max_batch_size=64", "instances=2", "max_queue_delay_us=1000"
    ]  # fmt: skip
    assert all(sum(config[key] != BASE[key] for key in BASE) <= 1 for config in found)


def test_default_space_sweeps_precision_and_compile_on_a_gpu_and_workers_with_two_server_cores() -> None:
    axes, not_swept = sweep.default_space(BASE, "cpu", 1)
    assert axes == {"max_batch_size": ["8", "32", "64"], "max_queue_delay_us": ["0", "1000"], "instances": ["1", "2"]}
    assert set(not_swept) == {"workers", "precision", "compile"}
    axes, not_swept = sweep.default_space(BASE, "cuda:0", 4)
    assert (axes["workers"], axes["precision"], axes["compile"]) == (["1", "2"], ["fp32", "bf16"], ["off", "on"])
    assert not_swept == {}


def test_sweep_space_is_parsed_and_checked() -> None:
    assert sweep.parse_space(["max-batch-size=8,64", "instances=1,2,2"]) == {
        "max_batch_size": ["8", "64"], "instances": ["1", "2"]
    }  # fmt: skip
    for bad in (["threads=1,2"], ["instances"], ["instances=1", "instances=2"]):
        with pytest.raises(ValueError, match="--sweep-space"):
            sweep.parse_space(bad)


def test_score_reads_a_found_capacity_the_ceiling_or_nothing() -> None:
    assert sweep.score(Outcome(capacity.FOUND, 800.0, 800.0, 850.0, []), 5000.0) == 800.0
    assert sweep.score(Outcome(capacity.NONE_PASSES, 0.0, None, 1.0, []), 5000.0) == 0.0
    assert sweep.score(Outcome(capacity.ABOVE_CEILING, None, 4900.0, None, []), 5000.0) == 4900.0
    assert sweep.score(Outcome(capacity.INCONCLUSIVE, None, 700.0, 900.0, []), 5000.0) is None
    assert sweep.score(None, 5000.0) is None


def test_successive_halving_keeps_the_better_half_and_the_base_wins_a_tie() -> None:
    found = [scored("base", 500.0), scored("a", 400.0), scored("b", 500.0), scored("c", 650.0), scored("d", None)]
    assert [c.name for c in sweep.ranked(found)] == ["c", "base", "b", "a", "d"]
    assert [c.name for c in sweep.survivors(found)] == ["c", "base", "b"]  # 5 -> 3
    assert [c.name for c in sweep.survivors([scored("base", None), scored("a", None)])] == []


def test_combined_takes_every_setting_that_beat_the_base_at_its_best_value() -> None:
    found = [
        scored("base", 500.0),
        scored("mbs8", 450.0, BASE | {"max_batch_size": "8"}),
        scored("mbs64", 520.0, BASE | {"max_batch_size": "64"}),
        scored("inst2", 600.0, BASE | {"instances": "2"}),
        scored("delay", 480.0, BASE | {"max_queue_delay_us": "1000"}),
    ]
    assert sweep.combined(found, BASE) == BASE | {"max_batch_size": "64", "instances": "2"}
    assert sweep.combined(found[:4:2] + found[4:], BASE) is None  # one setting beat the base: nothing new
    assert sweep.combined([scored("base", None), *found[1:]], BASE) is None


def test_a_configuration_is_served_by_one_command_with_the_swept_flags_set() -> None:
    args = ["--device", "cpu", "--max-batch-size", "32", "--instances", "1", "--warmup", "--workers=3"]
    config = BASE | {"max_batch_size": "64", "workers": "2"}
    assert sweep.config_args(args, config) == [
        "--device", "cpu", "--max-batch-size", "64", "--instances", "1", "--warmup",
        "--max-queue-delay-us", "0", "--workers", "2", "--precision", "fp32", "--compile", "off",
    ]  # fmt: skip
    line = shlex.split(sweep.serve_command("tensorflow", "resnet", args, config))
    assert line[:6] == ["python", "-m", "tf_server", "serve", "--model", "resnet"]
    assert line[line.index("--workers") + 1] == "2"
    assert "--workers=3" not in line


def test_budget_is_told_in_searches_and_minutes() -> None:
    text = sweep.budget(5, 2, (4, 3), 3.9, 5.0, 3)
    head = "2 servers x (5 candidates in rung 0, at most 4 in rung 1, the best x 3 repeats): 24 searches"
    assert text.startswith(head)
    minutes = 2 * (5 * (4 * 3.9 + 5) + 4 * (3 * 3.9 + 5) + 3 * (4 * 3.9 + 5)) / 60
    assert f"about {minutes:.1f} min" in text


def test_sweep_flags_are_checked() -> None:
    from loadtest.__main__ import build_parser

    parser = build_parser()
    opts = command.options_from(parser.parse_args(["compare", "--sweep", "--sweep-space", "instances=1,2"]))
    assert (opts.sweep, opts.sweep_space) == (True, ["instances=1,2"])
    assert command.options_from(parser.parse_args(["compare"])).sweep is False
    for bad, problem in (
        (["--sweep-space", "instances=1,2"], "needs --sweep"),
        (["--sweep", "--capacity", "off"], "needs --capacity on"),
        (["--sweep", "--torch-target", "h:1", "--tf-target", "h:2"], "not with --torch-target"),
        (["--sweep", "--matrix", "instances=1,2"], "not with --matrix"),
        (["--sweep", "--sweep-space", "threads=1,2"], "--sweep-space"),
    ):
        with pytest.raises(ValueError, match=problem):
            command.options_from(parser.parse_args(["compare", *bad]))


# ---------------------------------------------------------------- the phase, servers faked


def saturation_of(framework: str, args: list[str]) -> float:
    """A fake server's saturation by its configuration: torch gains from a second instance, tensorflow from
    bigger batches and more from both together; a queue delay costs both."""
    value = {"torch": 1000.0, "tensorflow": 800.0}[framework]
    instances = int(args[args.index("--instances") + 1])
    batch = int(args[args.index("--max-batch-size") + 1])
    delay = int(args[args.index("--max-queue-delay-us") + 1])
    if framework == "torch":
        value *= 1.6 if instances == 2 else 1.0
    else:
        value *= (1.3 if batch == 64 else 0.7 if batch == 8 else 1.0) * (1.2 if instances == 2 else 1.0)
    return value * (0.8 if delay else 1.0)


def test_sweep_phase_finds_each_servers_best_and_measures_both_in_every_repeat(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    served: list[tuple[str, str, int]] = []

    @contextmanager
    def fake_serving(run: Any, arm: Any, record: Any, phase: str, repeat: int, model_dir: Any) -> Iterator[Any]:
        served.append((arm.name, phase, repeat))
        record["starts"].append({"phase": phase, "repeat": repeat, "cold_start_s": 1.0, "idle_rss_bytes": 1})
        yield arm, True

    def fake_step(run: Any, arm: Any, endpoint: Any, scenario: Any, phase: str, repeat: int, **_: Any) -> Any:
        rate, saturation = scenario.value, saturation_of(arm.framework, arm.server_args)
        p99 = 1000.0 if rate >= saturation else 5.0 / (1 - rate / saturation)
        return {"throughput_rps": rate, "sent_rps": rate, "errors": 0, "valid": True, "invalid_reasons": [],
                "latency_ms": {"p50": 1.0, "p99": p99}, "error_rate": 0.3 if rate >= saturation else 0.0,
                "server_cpu_pct": {"mean": 50.0}, "generator_cpu_pct": {"mean": 20.0}}  # fmt: skip

    for module in (capacity_phase, sweep_phase):
        monkeypatch.setattr(module, "serving", fake_serving)
    monkeypatch.setattr(capacity_phase, "measure_step", fake_step)
    opts = plan.Options(repeats=2, sweep=True, sweep_space=["max_batch_size=8,32,64", "instances=1,2"])
    arms, _ = plan.plan_arms(opts)
    records: dict[str, Any] = {arm.name: {"label": arm.label, "framework": arm.framework, "starts": [], "steps": [],
                                          "capacity": {"mean": 700.0}} for arm in arms}  # fmt: skip
    order: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    run = steps.Run(opts, tmp_path, tmp_path, None, None, us_per_request=50.0)
    swept = sweep_phase.sweep_phase(run, arms, records, {}, order, failures)

    assert failures == []
    torch, tf = swept["servers"]["torch"], swept["servers"]["tensorflow"]
    assert torch["best"]["name"] == "instances=2"
    assert tf["best"]["name"] == "max_batch_size=64, instances=2"  # the combined one: not a rung-0 candidate
    assert [c["name"] for c in tf["candidates"]][-1] == "max_batch_size=64, instances=2"
    # Rung 0: the base and its 3 one-setting changes per server; rung 1: the better half and the combined one.
    rung0 = [entry for entry in order if entry["phase"] == "sweep" and entry["repeat"] == 0]
    rung1 = [entry for entry in order if entry["phase"] == "sweep" and entry["repeat"] == 1]
    assert [e["arm"] for e in rung0] == ["torch"] * 4 + ["tensorflow"] * 4
    assert [e["arm"] for e in rung1] == ["tensorflow"] * 3 + ["torch"] * 2  # ABBA over the rungs
    # The best is found within the search's precision of its true capacity (p99 = 50 ms at 0.9 x saturation).
    true_best = 0.9 * 1000.0 * 1.6
    found = next(c for c in torch["candidates"] if c["name"] == "instances=2")["rungs"][1]["score"]
    assert true_best / (1 + opts.capacity_precision) <= found <= true_best
    # Both bests searched in every repeat, ABBA, from the lower of the two (the "each at its best" verdict).
    best_runs = [(e["arm"], e["repeat"]) for e in order if e["phase"] == "capacity"]
    assert best_runs == [("torch[best]", 0), ("tensorflow[best]", 0), ("tensorflow[best]", 1), ("torch[best]", 1)]
    assert torch["capacity"]["start_rps"] == round(min(torch["candidates"][3]["rungs"][1]["score"],
                                                       tf["candidates"][-1]["rungs"][1]["score"]), 1)  # fmt: skip
    assert len(torch["capacity"]["values"]) == 2
    assert torch["capacity"]["mean"] > 0.9 * true_best / 1.1
    assert torch["default_capacity"] == {"mean": 700.0}
    # The sweep's starts are not the comparison's cold starts; its best's starts are kept apart.
    assert all(record["starts"] == [] for record in records.values())
    assert len(torch["starts"]) == 2
    line = shlex.split(torch["command"])
    assert line[line.index("--instances") + 1] == "2"
    assert line[line.index("--max-batch-size") + 1] == "32"


# ---------------------------------------------------------------- the report


def _capacity(values: list[float]) -> dict[str, Any]:
    search = capacity.Search(slo_ms=50.0, error_limit=0.01)
    outcomes = [(i, Outcome(capacity.FOUND, v, v, 1.1 * v, [])) for i, v in enumerate(values)]
    return capacity.summarize(outcomes, search, 500.0)


def with_sweep(results: dict[str, Any], best: dict[str, list[float]]) -> dict[str, Any]:
    results["settings"]["capacity"] = "on"
    servers = {}
    for name, values in best.items():
        rung = {"rung": 0, "score": values[0], "status": "found", "probes": [{}] * 4}
        servers[name] = {
            "label": name,
            "candidates": [{"name": "base", "config": BASE, "rungs": [rung]},
                           {"name": "instances=2", "config": BASE | {"instances": "2"},
                            "rungs": [rung | {"score": values[0] * 1.2}, {"rung": 1, "score": values[0] * 1.25,
                                                                        "status": "found", "probes": [{}] * 3}]}],
            "best": {"name": "instances=2", "config": BASE | {"instances": "2"}},
            "command": f"python -m {sweep.SERVER_MODULES[name]} serve --model mlp --instances 2",
            "capacity": _capacity(values),
            "default_capacity": _capacity([v / 1.25 for v in values]),
        }  # fmt: skip
    results["sweep"] = {"base": BASE, "space": {"instances": ["1", "2"]}, "not_swept": {"workers": "one core"},
                        "servers": servers}  # fmt: skip
    return results


def test_each_at_its_best_is_a_second_verdict_with_each_best_spelled_out(tmp_path: Path) -> None:
    results = with_sweep(synthetic_results(), {"torch": [900.0, 910.0, 905.0], "tensorflow": [700.0, 705.0, 702.0]})
    report.write_report(results, tmp_path)
    written = check_report_folder(tmp_path)
    best = [row for row in written["verdict"] if row["variant"] == "each at its best"]
    assert len(best) == 1
    assert (best[0]["winner"], best[0]["where"]["torch"]) == ("torch", "instances=2")
    assert best[0]["values"] == {"torch": [900.0, 910.0, 905.0], "tensorflow": [700.0, 705.0, 702.0]}
    markdown = (tmp_path / "report.md").read_text()
    assert "## Verdict: same settings" in markdown
    assert markdown.index("## Verdict: same settings") < markdown.index("## Verdict: each at its best")
    row = next(line for line in markdown.splitlines() if line.startswith("| torch_server | 724"))
    command = "python -m torch_server serve --model mlp --instances 2"
    assert f"instances=2 | 905 req/s ±1.4% (n=3) | +25.0% | {command}" in row
    assert "| tf_server | instances=2 (best) | 840 req/s | 875 req/s | 4 + 3 |" in markdown
    assert "not swept: workers: one core" in markdown


def test_without_a_sweep_there_is_one_verdict_and_no_sweep_tables(tmp_path: Path) -> None:
    results = synthetic_results()
    report.write_report(results, tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    assert "## Verdict\n" in markdown
    assert "each at its best" not in markdown
    assert "Sweep candidates" not in markdown

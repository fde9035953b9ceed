"""The comparison with servers of several worker processes (--workers): requests per worker, pinning."""

from __future__ import annotations

import contextlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client import metrics
from loadtest import sampling, stats
from loadtest.compare import command, plan, report, steps, tables
from loadtest.compare import run as compare
from loadtest.servers import ServerProcess
from loadtest.stats import Tick
from tests.helpers.synthetic import synthetic_results

WORKERS_TEXT = """\
# HELP inference_worker_requests_total Inference requests answered by each worker process.
# TYPE inference_worker_requests_total counter
inference_worker_requests_total{model="mlp",worker="0"} 40.0
inference_worker_requests_total{model="mlp",worker="10"} 5.0
inference_worker_requests_total{model="mlp",worker="2"} 7.0
inference_worker_requests_total{model="mlp",worker="replaced"} 3.0
inference_worker_requests_total{model="resnet",worker="0"} 900.0
# HELP inference_requests_total Inference requests by final gRPC status code.
# TYPE inference_requests_total counter
inference_requests_total{code="OK",model="mlp"} 55.0
"""


# ---------------------------------------------------------------- requests per worker


def test_requests_per_worker_reads_one_models_series_by_worker_label() -> None:
    counts = stats.requests_per_worker(metrics.parse_metrics(WORKERS_TEXT, "mlp"))
    assert counts == {"0": 40.0, "2": 7.0, "10": 5.0, "replaced": 3.0}  # resnet's left out
    assert list(counts) == ["0", "2", "10", "replaced"]  # numeric order, replaced last
    assert stats.requests_per_worker({"inference_requests_total": 5.0}) == {}


def test_worker_deltas_count_between_two_scrapes() -> None:
    before = {'inference_worker_requests_total{worker="0"}': 10.0, 'inference_worker_requests_total{worker="1"}': 4.0}
    after = {'inference_worker_requests_total{worker="0"}': 60.0, 'inference_worker_requests_total{worker="1"}': 50.0,
             'inference_worker_requests_total{worker="replaced"}': 2.0}  # fmt: skip
    assert stats.worker_deltas(before, after) == {"0": 50.0, "1": 46.0, "replaced": 2.0}
    assert stats.metric_deltas(before, after)["requests_per_worker"] == {"0": 50.0, "1": 46.0, "replaced": 2.0}


def test_worker_balance_flags_a_worker_under_half_its_fair_share() -> None:
    balanced = stats.worker_balance({"0": 120.0, "1": 80.0})
    assert balanced is not None
    assert balanced["workers"] == 2
    assert balanced["shares"] == {"0": pytest.approx(0.6), "1": pytest.approx(0.4)}
    assert balanced["max_min_ratio"] == pytest.approx(1.5)
    assert (balanced["unbalanced"], balanced["note"]) == (False, "2 workers, balanced")
    # Fair share 80 each: 40 is exactly half of it (still fine), 39 is under.
    assert (stats.worker_balance({"0": 100.0, "1": 100.0, "2": 40.0}) or {})["unbalanced"] is False
    starved = stats.worker_balance({"0": 101.0, "1": 100.0, "2": 39.0})
    assert starved is not None
    assert starved["unbalanced"] is True
    assert starved["note"].startswith("UNBALANCED: worker 2 16% of the requests (fair share 33% each")
    idle = stats.worker_balance({"0": 400.0, "1": 0.0})
    assert idle is not None
    assert (idle["unbalanced"], idle["max_min_ratio"], idle["shares"]["1"]) == (True, None, 0.0)


def test_worker_balance_says_one_worker_and_judges_only_what_it_can() -> None:
    assert stats.worker_balance({}) is None  # the server does not report it
    lone = stats.worker_balance({"0": 5000.0})
    assert lone == {"workers": 1, "requests": 5000.0, "shares": {"0": 1.0}, "max_min_ratio": 1.0,
                    "unbalanced": False, "note": "1 worker"}  # fmt: skip
    few = stats.worker_balance({"0": 30.0, "1": 2.0})  # fair share 16 < 20: noise, not a finding
    assert few is not None
    assert (few["unbalanced"], few["note"]) == (False, "too few requests to judge the spread (32)")
    restarted = stats.worker_balance({"0": 500.0, "1": -80.0, "replaced": 100.0})  # worker 1 restarted
    assert restarted is not None
    assert restarted["requests"] == 520.0
    assert (restarted["unbalanced"], restarted["note"]) == (False, "a worker was restarted in the window: "
                                                                   "spread not judged")  # fmt: skip
    # Worker 1 restarted (its 40 earlier requests moved to "replaced") and answered 5 since: not a finding.
    assert (stats.worker_balance({"0": 500.0, "1": 5.0, "replaced": 40.0}) or {})["unbalanced"] is False


def _counters(t: float, counts: tuple[float, float]) -> dict[str, float]:
    return {f'inference_worker_requests_total{{worker="{i}"}}': count for i, count in enumerate(counts)}


def test_requests_per_worker_of_a_step_come_only_from_scrapes_inside_its_window() -> None:
    # Warm-up (before 2.0 s): worker 0 alone answers 1000 requests; in the window both answer 50 a second.
    ticks = []
    for t in np.arange(0.0, 10.5, 0.5):
        warm = min(t, 2.0) * 500.0
        window = max(t - 2.0, 0.0) * 50.0
        ticks.append(Tick(t, t, 100.0, t, _counters(t, (warm + window, window)), 2.0 * t, 0.0))
    figures = stats.resource_stats(ticks, 2.2, 7.2)  # scrapes at 2.5 ... 7.0: 4.5 s
    assert figures["server_metrics"]["requests_per_worker"] == {"0": 225.0, "1": 225.0}
    assert figures["worker_balance"]["note"] == "2 workers, balanced"
    everything = stats.resource_stats(ticks, 0.0, 10.0)
    assert everything["worker_balance"]["unbalanced"] is True  # the warm-up would have made it look lopsided


# ---------------------------------------------------------------- pinning


def test_server_workers_reads_either_form_of_the_flag() -> None:
    assert plan.server_workers([]) is None
    assert plan.server_workers(["--workers=2"]) == 2
    assert plan.server_workers(["--workers", "3", "--grace-period-s", "5"]) == 3
    assert plan.server_workers(["--workers=2", "--workers", "AUTO"]) == "auto"  # the last one counts
    for bad in (["--workers=0"], ["--workers", "many"], ["--workers"]):
        with pytest.raises(ValueError, match="--workers"):
            plan.server_workers(bad)


def test_pinning_gives_the_server_a_core_per_worker() -> None:
    eight = list(range(8))
    assert plan.cpu_split("auto", eight, 3) == ([0, 1, 2], [3, 4, 5, 6, 7])
    three = plan.pinning("auto", eight, ["--workers=3"])
    assert (three["server_cpus"], three["generator_cpus"], three["warning"]) == ([0, 1, 2], [3, 4, 5, 6, 7], None)
    assert three["server_workers"] == 3
    # Without workers (or with one) the halves, as before.
    for args in ([], ["--workers", "1"]):
        assert plan.pinning("auto", eight, args)["server_cpus"] == [0, 1, 2, 3]
    # auto: every core but the generator's, one worker on each.
    auto = plan.pinning("auto", [0, 1, 2, 3], ["--workers", "auto"])
    assert (auto["server_cpus"], auto["generator_cpus"], auto["server_workers"]) == ([0, 1, 2], [3], 3)
    assert auto["warning"] is None
    assert plan.pinning("none", eight, ["--workers=4"])["server_cpus"] is None


def test_pinning_warns_when_the_workers_must_share_cores() -> None:
    two = plan.pinning("auto", [0, 1], ["--workers=2"])
    assert (two["server_cpus"], two["generator_cpus"], two["server_workers"]) == ([0], [1], 2)
    assert two["warning"] == (
        "--workers 2 needs 2 server cores, but 2 are available and the generator keeps one: "
        "the server gets [0], so its 2 workers share 1 core"
    )
    four = plan.pinning("auto", [0, 1, 2, 3], ["--workers", "8"])
    assert four["server_cpus"] == [0, 1, 2]
    assert "its 8 workers share 3 cores" in four["warning"]
    alone = plan.pinning("auto", [0], ["--workers=2"])
    assert alone["server_cpus"] is None
    assert alone["warning"] == "one CPU only: nothing pinned, the server's 2 workers share it with the generator"
    assert plan.pinning("auto", [0, 1], ["--workers", "auto"])["warning"] is None  # auto: 1 worker on 1 core


def test_comparison_records_the_pinning_and_its_warning(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("prepare", "check_fairness", "phase"):
        monkeypatch.setattr(compare, name, lambda *args, **kwargs: None)
    monkeypatch.setattr(compare, "check_parity", lambda *args, **kwargs: [])
    monkeypatch.setattr(compare, "_runner_pinned", lambda cpus: contextlib.nullcontext())
    monkeypatch.setattr(compare.os, "sched_getaffinity", lambda pid: {0, 1})
    opts = plan.Options(server_args=["--workers=2"], out=tmp_path)
    results = compare.run_comparison(opts)
    pinned = results["settings"]["pinning"]
    assert (pinned["server_cpus"], pinned["generator_cpus"], pinned["server_workers"]) == ([0], [1], 2)
    assert "share 1 core" in pinned["warning"]
    assert "warning: --workers 2 needs 2 server cores" in capsys.readouterr().err
    # A running server's cores are not ours, whatever its flags.
    remote = compare.run_comparison(plan.Options(torch_target="h:1", tf_target="h:2", out=tmp_path))
    assert remote["settings"]["pinning"]["server_cpus"] is None
    assert remote["settings"]["pinning"]["generator_cpus"] == [1]
    from loadtest.__main__ import build_parser

    with pytest.raises(ValueError, match="--workers"):
        command.options_from(build_parser().parse_args(["compare", "--server-arg=--workers=none"]))


# ---------------------------------------------------------------- the report


def _with_workers(results: dict[str, Any], name: str, counts: list[dict[str, float]]) -> None:
    for step, per_worker in zip(results["servers"][name]["steps"], counts, strict=False):
        step["server_metrics"]["requests_per_worker"] = per_worker
        step["worker_balance"] = stats.worker_balance(per_worker)


def test_report_shows_the_spread_over_workers_and_flags_unbalanced_steps(tmp_path: Path) -> None:
    results = synthetic_results(repeats=1)
    _with_workers(results, "torch", [{"0": 300.0, "1": 100.0}, {"0": 390.0, "1": 10.0}])  # the 2nd: unbalanced
    _with_workers(results, "tensorflow", [{"0": 500.0}] * 4)
    results["settings"]["pinning"]["warning"] = "the server gets [0], so its 2 workers share 1 core"
    report.write_report(results, tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    section = markdown.split("## Requests per worker", 1)[1].split("\n## ", 1)[0]
    assert (
        "| torch_server | closed | 1 | closed | 1 | 2 | 400 | 0: 75%, 1: 25% | 3.00 | 2 workers, balanced |" in section
    )
    assert (
        "| torch_server | closed | 1 | closed | 4 | 2 | 400 | 0: 98%, 1: 2% | 39.00 | UNBALANCED: worker 1 2%"
        in section
    )
    assert "| tf_server | all |  |  |  | 1 |  |  |  | 1 worker |" in section  # one row, no noise
    assert "| bare (reference) | all |  |  |  | n/a |  |  |  | not reported by the server |" in section
    head = markdown.split("## ", 1)[0]
    assert "**Warning:** Pinning: the server gets [0], so its 2 workers share 1 core." in head
    assert "**Warning:** torch_server: 1 of 4 steps unbalanced across its workers" in head
    page = (tmp_path / "report.html").read_text()
    assert page.index("<p class=warning>Warning: torch_server: 1 of 4 steps unbalanced") < page.index("<h2>")
    assert "UNBALANCED: worker 1 2%" in page
    saved = json.loads((tmp_path / "results.json").read_text())["servers"]["torch"]["steps"][1]
    assert saved["server_metrics"]["requests_per_worker"] == {"0": 390.0, "1": 10.0}
    assert saved["worker_balance"]["unbalanced"] is True
    # A results document from before the balance was recorded: worked out from the counts.
    del results["servers"]["torch"]["steps"][1]["worker_balance"]
    assert any("UNBALANCED" in row[-1] for row in tables.worker_table(results)[1])


def test_report_of_single_worker_servers_has_no_warnings(tmp_path: Path) -> None:
    results = synthetic_results(repeats=1)
    _with_workers(results, "torch", [{"0": 500.0}] * 4)
    assert tables.run_warnings(results) == []
    rows = tables.worker_table(results)[1]
    assert [(row[0], row[-1]) for row in rows] == [("torch_server", "1 worker"),
                                                   ("tf_server", "not reported by the server"),
                                                   ("bare (reference)", "not reported by the server")]  # fmt: skip


# ---------------------------------------------------------------- end to end


@pytest.mark.skipif(not importlib.util.find_spec("torch"), reason="needs torch")
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_comparison_step_counts_the_requests_of_each_of_two_workers(tmp_path: Path) -> None:
    args = ["--workers", "2", "--threads", "1", "--device", "cpu", "--model-dir", str(tmp_path / "models")]
    opts = plan.Options(step_seconds=2.0, warmup_seconds=0.5, locust_processes="1")
    with ServerProcess("torch", "mlp", args) as server:
        endpoint = sampling.Endpoint("torch", server.target, server.metrics_url, "mlp", pid=server.pid)
        run = steps.Run(opts, tmp_path, tmp_path, None, None)
        # One connection (one worker answers): with several, our Locust user can hang when the
        # test stops (about 1 run in 20 with 4 connections, 6 in 20 with 16; an open bug).
        arm = plan.Arm("torch", "torch_server", "torch", {})
        step = steps.measure_step(run, arm, endpoint, plan.Scenario("closed", 4), "closed", 0, local=True)
    per_worker = step["server_metrics"]["requests_per_worker"]
    balance = step["worker_balance"]
    assert set(per_worker) == {"0", "1"}, per_worker
    answered = sum(per_worker.values())
    # The same two scrapes as every other server figure: the requests the server counted in the window.
    assert answered == sum(step["server_metrics"]["requests_by_code"].values()) > 0
    # ... which are the generator's over that span (the first to the last scrape inside the window; the
    # throughput is over the whole window, and moves within it on a busy host: hence the margin).
    expected = step["throughput_rps"] * step["resource_window_s"]
    assert answered == pytest.approx(expected, rel=0.35), (answered, expected, step["resource_window_s"])
    assert balance["workers"] == 2
    assert balance["requests"] == answered
    assert sum(balance["shares"].values()) == pytest.approx(1.0)


def test_connections_spread_over_workers_by_default() -> None:
    assert plan.connections("auto", 1) == 1  # a lone server: one HTTP/2 connection, as a client would
    assert plan.connections("auto", 2) == 2 * plan.CONNECTIONS_PER_WORKER
    assert plan.connections("3", 2) == 3
    with pytest.raises(ValueError, match="--connections"):
        plan.connections("0", 2)
    scenario = plan.Scenario("closed", 8)
    endpoint = sampling.Endpoint("torch", "127.0.0.1:1", None, "mlp")
    command = steps.locust_command(endpoint, scenario, plan.Options(), 5, 1, Path("lat"), Path("st"), 8)
    assert command[command.index("--connections") + 1] == "8"

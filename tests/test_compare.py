"""The comparison runner and its report: pure parts on synthetic data, then one real end-to-end run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loadtest import compare, report
from loadtest.compare import Samples, Tick

ROOT = Path(__file__).resolve().parent.parent

METRICS_TEXT = """\
# HELP inference_requests_total Inference requests by final gRPC status code.
# TYPE inference_requests_total counter
inference_requests_total{code="OK",model="mlp"} 120.0
inference_requests_total{code="RESOURCE_EXHAUSTED",model="mlp"} 3.0
inference_requests_total{code="OK",model="resnet"} 7.0
# HELP inference_requests_created Inference requests by final gRPC status code.
# TYPE inference_requests_created gauge
inference_requests_created{code="OK",model="mlp"} 1.7e9
# HELP inference_queue_duration_seconds Queue wait.
# TYPE inference_queue_duration_seconds histogram
inference_queue_duration_seconds_bucket{le="0.001",model="mlp"} 100.0
inference_queue_duration_seconds_bucket{le="+Inf",model="mlp"} 123.0
inference_queue_duration_seconds_count{model="mlp"} 123.0
inference_queue_duration_seconds_sum{model="mlp"} 0.246
# HELP inference_batch_size Rows per model execution.
# TYPE inference_batch_size histogram
inference_batch_size_count{model="mlp"} 40.0
inference_batch_size_sum{model="mlp"} 120.0
# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 12.5
# HELP gpu_utilization_ratio GPU busy fraction (NVML).
# TYPE gpu_utilization_ratio gauge
gpu_utilization_ratio{device="0"} 0.5
"""


def test_percentiles_are_nearest_rank_over_exact_values() -> None:
    stats = compare.percentiles(np.arange(1, 101, dtype=float))
    assert stats == {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99.9": 100.0, "max": 100.0, "mean": 50.5}
    assert set(compare.percentiles(np.empty(0)).values()) == {None}


def test_window_counts_sent_requests_for_latency_and_completions_for_throughput() -> None:
    start = np.arange(0.0, 10.0, 0.01)  # 100 req/s for 10 s
    latency_us = np.full(len(start), 20_000.0)  # 20 ms each
    ok = np.ones(len(start), dtype=bool)
    ok[500] = False
    stats = compare.window_stats(Samples(start, latency_us, ok, np.zeros(len(start))), 2.0, 7.0, batch_size=4)
    assert stats["requests"] == 500
    assert stats["errors"] == 1
    assert stats["error_rate"] == pytest.approx(0.002)
    assert stats["throughput_rps"] == pytest.approx(99.8)
    assert stats["rows_per_s"] == pytest.approx(4 * 99.8)
    assert stats["latency_ms"]["p99"] == pytest.approx(20.0)
    assert stats["latency_cdf"][-1] == [20.0, 1.0]


def test_read_latencies_merges_processes_and_marks_unsent_requests_failed(tmp_path: Path) -> None:
    prefix = tmp_path / "step.latency"
    for pid, starts in ((11, [3_000_000, 1_000_000]), (12, [2_000_000])):
        np.savez(
            f"{prefix}.{pid}.npz",
            start_us=np.array(starts, dtype=np.int64),
            latency_us=np.array([-1, 1500][: len(starts)] if pid == 11 else [2500], dtype=np.int64),
            ok=np.array([True, True][: len(starts)]),
            lag_us=np.zeros(len(starts), dtype=np.int64),
        )
    samples = compare.read_latencies(prefix)
    assert sorted(samples.start_s) == [1.0, 2.0, 3.0]
    assert samples.ok.sum() == 2  # the -1 (never sent) row is a failure whatever its flag says
    with pytest.raises(FileNotFoundError):
        compare.read_latencies(tmp_path / "missing")


def test_parse_metrics_keeps_one_model_and_unlabelled_series() -> None:
    flat = compare.parse_metrics(METRICS_TEXT, "mlp")
    assert flat['inference_requests_total{code="OK"}'] == 120.0
    assert flat['inference_requests_total{code="RESOURCE_EXHAUSTED"}'] == 3.0
    assert flat["inference_queue_duration_seconds_count"] == 123.0
    assert flat["process_cpu_seconds_total"] == 12.5
    assert flat['gpu_utilization_ratio{device="0"}'] == 0.5
    assert not any("bucket" in key or "created" in key for key in flat)


def test_metric_deltas_give_means_between_two_scrapes() -> None:
    before = compare.parse_metrics(METRICS_TEXT, "mlp")
    after = dict(before)
    after["inference_queue_duration_seconds_sum"] += 0.5
    after["inference_queue_duration_seconds_count"] += 100
    after["inference_batch_size_sum"] += 300
    after["inference_batch_size_count"] += 100
    after['inference_requests_total{code="OK"}'] += 300
    deltas = compare.metric_deltas(before, after)
    assert deltas["queue_ms_mean"] == pytest.approx(5.0)
    assert deltas["batch_size_mean"] == pytest.approx(3.0)
    assert deltas["compute_ms_mean"] is None
    assert deltas["requests_by_code"] == {"OK": 300}


def test_resource_stats_bracket_the_window() -> None:
    ticks = [
        Tick(t, 0.5 * t, 100.0 + t, 0.95 * t, {"x": t}, host_cpu_s=2.0 * t, runner_cpu_s=0.05 * t)
        for t in np.arange(0.0, 10.5, 0.5)
    ]
    stats = compare.resource_stats(ticks, 2.2, 7.2)
    assert stats["server_cpu_pct"]["mean"] == pytest.approx(50.0)
    assert stats["generator_cpu_pct"]["max"] == pytest.approx(95.0)
    assert stats["server_rss_bytes"]["max"] == pytest.approx(107.5)
    assert stats["other_cpu_pct"]["mean"] == pytest.approx(50.0)
    assert stats["gpu"] is None


def _step(**overrides: Any) -> dict[str, Any]:
    step = {
        "mode": "closed",
        "generator_cpu_pct": {"mean": 40.0},
        "other_cpu_pct": {"mean": 5.0},
        "send_lag_ms": {"p99": 0.5},
        "generator_exit_code": 0,
        "error_rate": 0.0,
        "successes": 100,
        "requests": 100,
        "window_s": 10.0,
        "window_target_s": 10.0,
        "offered_rps": None,
        "sent_rps": 10.0,
    }
    return step | overrides


def test_invalid_reasons() -> None:
    assert compare.invalid_reasons(_step()) == []
    saturated = compare.invalid_reasons(_step(generator_cpu_pct={"mean": 97.0}, error_rate=0.05))
    assert [reason.split()[0] for reason in saturated] == ["generator", "error"]
    behind = _step(mode="open", offered_rps=1000.0, requests=5000, sent_rps=500.0, send_lag_ms={"p99": 30.0})
    assert compare.invalid_reasons(behind) == [
        "generator behind schedule: sent 500/s of 1000/s",
        "generator send lag p99 30 ms > 10 ms",
    ]
    assert compare.invalid_reasons(_step(window_s=5.0)) == ["window cut to 5.0 s"]
    assert compare.invalid_reasons(_step(generator_exit_code=-9)) == ["Locust did not stop in time and was killed"]
    busy_host = _step(other_cpu_pct={"mean": 60.0})
    assert compare.invalid_reasons(busy_host) == ["other processes used 60% CPU (> 25%)"]
    assert compare.invalid_reasons(busy_host, local=False) == []


def test_cpu_split_and_lists() -> None:
    assert compare.cpu_split("auto", [0, 1]) == ([0], [1])
    assert compare.cpu_split("auto", [0]) == (None, None)
    assert compare.cpu_split("none", [0, 1, 2, 3]) == (None, None)
    assert compare.parse_list(" 1, 4,16,", int) == [1, 4, 16]


@pytest.mark.parametrize(
    ("values", "higher", "expected"),
    [
        ({"torch": [110.0, 112.0], "tensorflow": [100.0, 101.0]}, True, ("torch", 10.45, True)),
        ({"torch": [110.0, 130.0], "tensorflow": [100.0, 101.0]}, True, ("torch", 19.4, False)),
        ({"torch": [2.0], "tensorflow": [3.0]}, False, ("torch", 33.33, None)),
        ({"torch": [2.0, 2.0], "tensorflow": [2.0, 2.0]}, False, ("tie", 0.0, False)),
        ({"torch": [], "tensorflow": [3.0]}, False, (None, None, None)),
    ],
)
def test_decide_winner_margin_and_spread(
    values: dict[str, list[float]], higher: bool, expected: tuple[str | None, float | None, bool | None]
) -> None:
    decision = report.decide(values, higher)
    winner, margin, exceeds = expected
    assert decision["winner"] == winner
    assert decision["margin_pct"] == (None if margin is None else pytest.approx(margin, abs=0.01))
    assert decision["exceeds_spread"] is exceeds


def test_throughput_characteristics_pick_the_best_valid_scenario() -> None:
    def step(users: int, rps: float, p99: float, repeat: int = 0, valid: bool = True) -> dict[str, Any]:
        return {"mode": "closed", "concurrency": users, "offered_rps": None, "repeat": repeat,
                "throughput_rps": rps, "latency_ms": {"p99": p99}, "valid": valid}  # fmt: skip

    server = {"steps": [step(4, 100, 10), step(4, 110, 12, repeat=1), step(16, 300, 80), step(8, 900, 4, valid=False)]}
    for slo_ms, expected in ((50.0, ([100, 110], "4 users")), (5.0, ([0.0], "none meets it"))):
        settings = {"reference_concurrency": 4, "slo_ms": slo_ms}
        read = {item.name.split(" (")[0]: item.read for item in report.characteristics(settings)}
        assert read[f"max throughput with p99 ≤ {slo_ms:g} ms"](server, settings) == expected
        assert read["peak throughput"](server, settings) == ([300], "16 users")
        assert read["p99 latency @ 4 users"](server, settings) == ([10, 12], "")


def _synthetic_results() -> dict[str, Any]:
    """A two-repeat results document shaped like ``compare.run_comparison``'s."""
    rng = np.random.default_rng(0)
    servers: dict[str, Any] = {}
    for framework, speed in (("torch", 1.0), ("tensorflow", 0.8)):
        steps = []
        for repeat in range(2):
            scenarios = [("closed", c) for c in (1, 4)] + [("open", r) for r in (100.0, 300.0)]
            for mode, x in scenarios:
                latency = rng.gamma(4.0, 1.0 / speed, 500)
                steps.append(
                    {
                        "repeat": repeat,
                        "mode": mode,
                        "concurrency": x if mode == "closed" else None,
                        "offered_rps": x if mode == "open" else None,
                        **compare.window_stats(
                            Samples(np.linspace(0, 5, 500), latency * 1000, np.ones(500, bool), np.zeros(500)), 0, 5, 1
                        ),
                        "server_cpu_pct": {"mean": 50.0 * x / 4, "max": 60.0},
                        "server_rss_bytes": {"mean": 3e8 / speed, "max": 3.1e8 / speed},
                        "generator_cpu_pct": {"mean": 30.0, "max": 35.0},
                        "other_cpu_pct": {"mean": 3.0, "max": 5.0},
                        "gpu": None,
                        "server_metrics": compare.metric_deltas({}, {}) | {"queue_ms_mean": 0.5, "compute_ms_mean": 1},
                        "invalid_reasons": [] if x != 300.0 else ["error rate 5.0% > 1%"],
                        "valid": x != 300.0,
                    }
                )
        servers[framework] = {
            "starts": [{"repeat": r, "cold_start_s": 3.0 / speed + r, "idle_rss_bytes": 2e8} for r in range(2)],
            "steps": steps,
            "rates": [100.0, 300.0],
            "target": "127.0.0.1:1",
            "model_config": {"parameters": {"framework_version": "1.0", "device": "cpu"}, "max_batch_size": 32},
        }
    options = compare.Options(concurrency=[1, 4], repeats=2)
    settings = {
        **vars(options),
        "out": None,
        "mode": "local",
        "server_args_for_all": options.server_args_for_all(),
        "reference_concurrency": options.reference_concurrency,
        "pinning": {"mode": "auto", "server_cpus": [0], "generator_cpus": [1]},
        "limits": {"generator_cpu_pct": 90.0},
    }
    return {
        "meta": {"started": "2024-01-01T00:00:00", "duration_s": 1.0, "command": [], "out": ""},
        "settings": settings,
        "environment": compare.environment(),
        "servers": servers,
        "failures": [{"server": "tensorflow", "repeat": 1, "error": "tf_server exited with 1"}],
    }


def _check_report_folder(out: Path) -> dict[str, Any]:
    for name in ["report.html", "report.md", *report.PLOT_NAMES]:
        assert (out / name).stat().st_size > 0, name
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(report.PLOT_NAMES)
    assert page.index("Verdict") < page.index("<img")
    markdown = (out / "report.md").read_text()
    assert "## Verdict" in markdown
    assert "| characteristic | torch_server | tf_server | winner | margin | beyond run-to-run spread |" in markdown
    results = json.loads((out / "results.json").read_text())
    assert {"meta", "settings", "environment", "servers", "failures", "verdict"} <= set(results)
    return results


def test_report_from_synthetic_results(tmp_path: Path) -> None:
    report.write_report(_synthetic_results(), tmp_path)
    results = _check_report_folder(tmp_path)
    rows = {row["characteristic"]: row for row in results["verdict"]}
    peak = rows["peak throughput (closed loop)"]
    assert len(peak["values"]["torch"]) == 2
    assert peak["winner"] in ("torch", "tensorflow", "tie")
    assert rows["cold start (spawn to SERVING)"]["winner"] == "torch"
    assert rows["cold start (spawn to SERVING)"]["exceeds_spread"] is False  # gap 0.75 s < repeat range 1 s
    assert rows["idle memory (RSS)"]["winner"] == "tie"
    assert "error rate 5.0% &gt; 1%" in (tmp_path / "report.html").read_text()
    assert "| tf_server | 2 | tf_server exited with 1 |" in (tmp_path / "report.md").read_text()


@pytest.mark.skipif(
    not (importlib.util.find_spec("torch") and importlib.util.find_spec("tensorflow")),
    reason="needs both frameworks installed",
)
@pytest.mark.timeout(300)
def test_compare_end_to_end_on_mlp(tmp_path: Path) -> None:
    out = tmp_path / "report"
    command = [
        sys.executable, "-m", "loadtest", "compare", "--model", "mlp", "--concurrency", "1,4",
        "--rate-fractions", "0.25,0.9", "--step-seconds", "2", "--warmup-seconds", "1", "--repeats", "1",
        "--out", str(out),
    ]  # fmt: skip
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=280, check=False)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "report: " in finished.stderr
    results = _check_report_folder(out)
    assert set(results["servers"]) == {"torch", "tensorflow"}
    assert results["failures"] == []
    for framework, server in results["servers"].items():
        assert server["starts"][0]["cold_start_s"] > 0
        assert server["starts"][0]["idle_rss_bytes"] > 0
        assert server["model_config"]["parameters"]["framework_version"]
        scenarios = [(step["mode"], step["concurrency"] or step["offered_rps"]) for step in server["steps"]]
        assert scenarios == [("closed", 1), ("closed", 4), *(("open", rate) for rate in server["rates"])], framework
        for step in server["steps"]:
            assert step["throughput_rps"] > 0
            assert step["latency_ms"]["p99"] > 0
            assert step["server_cpu_pct"]["mean"] is not None
            assert step["generator_cpu_pct"]["mean"] is not None
            assert step["server_metrics"]["batch_size_mean"] >= 1
            assert isinstance(step["valid"], bool)
    assert len(results["verdict"]) == 8

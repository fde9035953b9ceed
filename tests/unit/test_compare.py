"""The comparison runner and its report: pure parts on synthetic data, then one real end-to-end run."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client import metrics
from loadtest import sampling, stats
from loadtest.compare import command, plan, report, steps, verdict
from loadtest.compare import run as compare
from loadtest.stats import Tick
from loadtest.users.latency_file import read_latencies
from tests.helpers.synthetic import check_report_folder, samples, synthetic_results

ROOT = Path(__file__).resolve().parents[2]

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


# ---------------------------------------------------------------- statistics


def test_percentiles_are_nearest_rank_over_exact_values() -> None:
    figures = stats.percentiles(np.arange(1, 101, dtype=float))
    assert figures == {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99.9": 100.0, "max": 100.0, "mean": 50.5}
    assert set(stats.percentiles(np.empty(0)).values()) == {None}


def test_window_counts_sent_requests_for_latency_and_completions_for_throughput() -> None:
    start = np.arange(0.0, 10.0, 0.01)  # 100 req/s for 10 s
    latency_ms = np.full(len(start), 20.0)
    ok = np.ones(len(start), dtype=bool)
    ok[500] = False
    figures = stats.window_stats(samples(start, latency_ms, ok), 2.0, 7.0, batch_size=4, deadline_s=1.0)
    assert figures["requests"] == 500
    assert figures["errors"] == 1
    assert figures["error_rate"] == pytest.approx(0.002)
    assert figures["throughput_rps"] == pytest.approx(99.8)
    assert figures["rows_per_s"] == pytest.approx(4 * 99.8)
    assert figures["latency_ms"]["p99"] == pytest.approx(20.0)
    assert figures["latency_cdf"][-1] == [20.0, 1.0]


def test_failed_requests_count_in_latency_at_their_elapsed_time_and_unsent_at_the_deadline() -> None:
    start = np.arange(0.0, 1.0, 0.001)  # 1000 requests in the window
    latency_ms = np.full(1000, 2.0)
    ok = np.ones(1000, dtype=bool)
    latency_ms[::100] = 250.0  # 10 timeouts at a 250 ms deadline (1%)
    ok[::100] = False
    latency_ms[1::100] = -1.0  # 10 arrivals never sent
    ok[1::100] = False
    figures = stats.window_stats(samples(start, latency_ms, ok), 0.0, 1.0, batch_size=1, deadline_s=0.5)
    assert figures["errors"] == 20
    assert figures["unsent"] == 10
    assert figures["error_rate"] == pytest.approx(0.02)
    # Successes alone would say 2 ms at p99; the 2% failures make p99 the slower of them.
    assert figures["latency_ok_ms"]["p99"] == pytest.approx(2.0)
    assert figures["latency_ms"]["p99"] == pytest.approx(250.0)  # the timeouts, at their elapsed time
    assert figures["latency_ms"]["p99.9"] == pytest.approx(500.0)  # never sent: at the deadline
    assert figures["latency_ms"]["p90"] == pytest.approx(2.0)
    assert figures["latency_ms"]["max"] == pytest.approx(500.0)
    assert figures["sent_rps"] == pytest.approx(990.0)


def test_read_latencies_merges_processes_and_marks_unsent_requests_failed(tmp_path: Path) -> None:
    prefix = tmp_path / "step.latency"
    for pid, starts, latency in ((11, [3_000_000, 1_000_000], [-1, 1500]), (12, [2_000_000], [2500])):
        np.savez(
            f"{prefix}.{pid}.npz",
            start_us=np.array(starts, dtype=np.int64),
            latency_us=np.array(latency, dtype=np.int64),
            ok=np.ones(len(starts), dtype=bool),
            lag_us=np.zeros(len(starts), dtype=np.int64),
            meta=np.array(json.dumps({"pid": pid})),
        )
    merged = read_latencies(prefix)
    assert merged.start_s.tolist() == [1.0, 2.0, 3.0]  # sorted by start across processes
    assert merged.latency_us.tolist() == [1500.0, 2500.0, -1.0]
    assert merged.ok.tolist() == [True, True, False]  # the -1 (never sent) row is a failure whatever its flag says
    assert sorted(meta["pid"] for meta in merged.metas) == [11, 12]
    with pytest.raises(FileNotFoundError):
        read_latencies(tmp_path / "missing")


def test_parse_metrics_keeps_one_model_and_unlabelled_series() -> None:
    flat = metrics.parse_metrics(METRICS_TEXT, "mlp")
    assert flat['inference_requests_total{code="OK"}'] == 120.0
    assert flat['inference_requests_total{code="RESOURCE_EXHAUSTED"}'] == 3.0
    assert flat["inference_queue_duration_seconds_count"] == 123.0
    assert flat["process_cpu_seconds_total"] == 12.5
    assert flat['gpu_utilization_ratio{device="0"}'] == 0.5
    assert not any("bucket" in key or "created" in key for key in flat)


def test_metric_deltas_give_means_between_two_scrapes() -> None:
    before = metrics.parse_metrics(METRICS_TEXT, "mlp")
    after = dict(before)
    after["inference_queue_duration_seconds_sum"] += 0.5
    after["inference_queue_duration_seconds_count"] += 100
    after["inference_batch_size_sum"] += 300
    after["inference_batch_size_count"] += 100
    after['inference_requests_total{code="OK"}'] += 300
    deltas = stats.metric_deltas(before, after)
    assert deltas["queue_ms_mean"] == pytest.approx(5.0)
    assert deltas["batch_size_mean"] == pytest.approx(3.0)
    assert deltas["compute_ms_mean"] is None
    assert deltas["requests_by_code"] == {"OK": 300}


def test_sampler_keeps_its_interval_when_samples_are_slow() -> None:
    """Ticks come every interval, not that long after each (slow) sample ended."""

    class SlowEndpoint:
        def sample(self, generator: object) -> Tick:
            time.sleep(0.06)  # scraping a busy server
            return Tick(time.time(), 1.0, 1.0, None, {})

    with sampling.Sampler(SlowEndpoint(), interval=0.1) as sampler:  # type: ignore[arg-type]
        time.sleep(1.2)
    times = [tick.t for tick in sampler.ticks[:-1]]  # the last one is taken on stopping
    gaps = np.diff(times)
    assert len(gaps) >= 8
    assert gaps.mean() < 0.125, gaps  # 0.16 when each interval started after a sample


def test_short_windows_are_sampled_often_enough_to_lose_a_tick_or_two() -> None:
    assert sampling.interval_for(4.0) == sampling.SAMPLE_INTERVAL_S  # the default window: unchanged
    for window in (1.0, 1.5, 2.0, 3.0):
        interval = sampling.interval_for(window)
        # A window holds at least floor(window / interval) intervals; two fewer still cover half of it.
        assert (window // interval - 2) * interval >= 0.5 * window, window


def test_resource_stats_use_only_the_samples_inside_the_window() -> None:
    # A warm-up before 2.0 s: the server burns 100% CPU and grows to 900 bytes, then settles at 50%.
    ticks = []
    for t in np.arange(0.0, 10.5, 0.5):
        server_cpu = t if t <= 2.0 else 2.0 + 0.5 * (t - 2.0)
        queue = {"inference_queue_duration_seconds_sum": 9.0 if t < 2.0 else 10.0 + (t - 2.0),
                 "inference_queue_duration_seconds_count": 100.0 * t}  # fmt: skip
        ticks.append(Tick(t, server_cpu, 900.0 if t < 2.0 else 100.0 + t, 0.3 * t, queue, 2.0 * t, 0.05 * t))
    figures = stats.resource_stats(ticks, 2.2, 7.2)
    assert figures["server_cpu_pct"]["mean"] == pytest.approx(50.0)
    assert figures["server_cpu_pct"]["max"] == pytest.approx(50.0)  # the warm-up's 100% left out
    assert figures["server_rss_bytes"]["max"] == pytest.approx(107.0)  # so is its 900-byte peak
    assert figures["generator_cpu_pct"]["mean"] == pytest.approx(30.0)
    assert figures["resource_window_s"] == pytest.approx(4.5)
    assert figures["server_metrics"]["queue_ms_mean"] == pytest.approx(10.0)  # 4.5 s of queue / 450 requests
    assert figures["gpu"] is None


def _step(**overrides: Any) -> dict[str, Any]:
    step = {
        "mode": "closed",
        "generator_cpu_pct": {"mean": 40.0},
        "other_cpu_pct": {"mean": 5.0},
        "send_lag_ms": {"p99": 0.5},
        "generator_exit_code": 0,
        "generator_processes": 1,
        "error_rate": 0.0,
        "successes": 100,
        "requests": 100,
        "unsent": 0,
        "window_s": 10.0,
        "resource_window_s": 9.5,
        "window_target_s": 10.0,
        "offered_rps": None,
        "sent_rps": 10.0,
    }
    return step | overrides


def test_invalid_reasons() -> None:
    assert plan.invalid_reasons(_step()) == []
    saturated = plan.invalid_reasons(_step(generator_cpu_pct={"mean": 97.0}, error_rate=0.05))
    assert saturated == ["generator CPU 97% > 90%"]
    # Errors are the server's result, not a fault of the measurement; a window without a success is.
    assert plan.invalid_reasons(_step(error_rate=0.3)) == []
    assert plan.invalid_reasons(_step(error_rate=1.0, successes=0)) == ["no successful request in the window"]
    behind = _step(mode="open", offered_rps=1000.0, sent_rps=500.0, send_lag_ms={"p99": 30.0}, unsent=12)
    assert plan.invalid_reasons(behind) == [
        "generator behind schedule: sent 500/s of 1000/s",
        "generator dropped 12 arrivals (client backlog)",
        "generator send lag p99 30 ms > 10 ms",
    ]
    assert plan.invalid_reasons(_step(mode="open", offered_rps=1000.0, sent_rps=999.0)) == []
    # Send lag on its own, every arrival sent on schedule and none dropped, is enough.
    lagging = _step(mode="open", offered_rps=1000.0, sent_rps=1000.0, send_lag_ms={"p99": 30.0}, unsent=0)
    assert plan.invalid_reasons(lagging) == ["generator send lag p99 30 ms > 10 ms"]
    assert plan.invalid_reasons(lagging | {"send_lag_ms": {"p99": 10.0}}) == []  # at the limit: still valid
    assert plan.invalid_reasons(_step(window_s=5.0, resource_window_s=4.5)) == ["window cut to 5.0 s"]
    assert plan.invalid_reasons(_step(resource_window_s=1.0)) == ["resource samples cover only 1.0 s of the window"]
    killed = ["Locust did not stop in time and was killed before writing all its results"]
    assert plan.invalid_reasons(_step(generator_exit_code=-9)) == killed
    assert plan.invalid_reasons(_step(generator_exit_code=-9, generator_results_complete=False)) == killed
    # Killed only on its way out, every latency file written at test stop: the measurement stands.
    assert plan.invalid_reasons(_step(generator_exit_code=-9, generator_results_complete=True)) == []
    busy_host = _step(other_cpu_pct={"mean": 60.0})
    assert plan.invalid_reasons(busy_host) == ["other processes used 60% CPU (> 25%)"]
    assert plan.invalid_reasons(busy_host, local=False) == []
    # Two Locust processes on two generator cores may use up to 90% of each.
    two = _step(generator_cpu_pct={"mean": 150.0}, generator_processes=2)
    assert plan.invalid_reasons(two, generator_cores=2) == []
    assert plan.invalid_reasons(two, generator_cores=1) == ["generator CPU 150% > 90%"]


def test_cpu_split_lists_matrix_and_targets() -> None:
    assert plan.cpu_split("auto", [0, 1]) == ([0], [1])
    assert plan.cpu_split("auto", [0]) == (None, None)
    assert plan.cpu_split("none", [0, 1, 2, 3]) == (None, None)
    assert plan.parse_list(" 1, 4,16,", int) == [1, 4, 16]
    assert plan.parse_matrix(["precision=fp32,bf16", "compile=off,on"]) == [
        {"precision": "fp32", "compile": "off"},
        {"precision": "fp32", "compile": "on"},
        {"precision": "bf16", "compile": "off"},
        {"precision": "bf16", "compile": "on"},
    ]
    for bad in (["colour=red"], ["precision"], ["precision=fp32", "precision=bf16"]):
        with pytest.raises(ValueError, match="--matrix"):
            plan.parse_matrix(bad)
    assert plan.parse_target("bare=127.0.0.1:9000") == ("bare", "127.0.0.1:9000", None)
    assert plan.parse_target("t=h:1,http://h:2/metrics") == ("t", "h:1", "http://h:2/metrics")
    with pytest.raises(ValueError, match="NAME=HOST:PORT"):
        plan.parse_target("127.0.0.1:9000")


def test_command_line_help_and_options() -> None:
    from loadtest.__main__ import build_parser

    parser = build_parser()
    commands = next(action for action in parser._actions if action.dest == "command")
    assert isinstance(commands.choices, dict)
    assert "--matrix" in commands.choices["compare"].format_help()
    args = parser.parse_args(["compare", "--precision", "bf16", "--matrix", "compile=off,on", "--repeats", "3",
                              "--target", "bare=127.0.0.1:9000", "--locust-processes", "2"])  # fmt: skip
    opts = command.options_from(args)
    assert (opts.precision, opts.matrix, opts.repeats, opts.targets) == ("bf16", ["compile=off,on"], 3,
                                                                         ["bare=127.0.0.1:9000"])  # fmt: skip
    for bad in (["--locust-processes", "many"], ["--torch-target", "h:1"], ["--matrix", "colour=red"]):
        with pytest.raises(ValueError):  # noqa: PT011 - each names its own problem
            command.options_from(parser.parse_args(["compare", *bad]))


def test_every_server_flag_is_explicit_and_identical() -> None:
    opts = plan.Options(precision="bf16", compile="on", server_args=["--grace-period-s", "5"])
    arms, groups = plan.plan_arms(opts)
    assert [arm.name for arm in arms] == ["torch", "tensorflow"]
    assert arms[0].server_args == arms[1].server_args == opts.server_args_for_all()
    args = opts.server_args_for_all()
    flags = dict(zip(args[0:18:2], args[1:18:2], strict=True))
    assert flags == {"--device": "cpu", "--threads": "1", "--precision": "bf16", "--compile": "on",
                     "--max-batch-size": "32", "--max-queue-delay-us": "0", "--max-queue-size": "1024",
                     "--instances": "1", "--grpc-threads": "0"}  # fmt: skip
    assert args[18:] == ["--dynamic-batching", "--warmup", "--grace-period-s", "5"]
    assert groups == [{"name": "as set", "values": {}, "arms": {"torch": "torch", "tensorflow": "tensorflow"}}]


def test_matrix_and_reference_arms() -> None:
    opts = plan.Options(matrix=["precision=fp32,bf16"], targets=["bare=127.0.0.1:9000"])
    arms, groups = plan.plan_arms(opts)
    assert [(arm.name, arm.kind) for arm in arms] == [
        ("torch[precision=fp32]", "local"),
        ("tensorflow[precision=fp32]", "local"),
        ("torch[precision=bf16]", "local"),
        ("tensorflow[precision=bf16]", "local"),
        ("bare", "reference"),
    ]
    assert "--precision bf16" in " ".join(arms[2].server_args)
    assert arms[4].target == "127.0.0.1:9000"
    assert [group["arms"] for group in groups] == [
        {"torch": "torch[precision=fp32]", "tensorflow": "tensorflow[precision=fp32]"},
        {"torch": "torch[precision=bf16]", "tensorflow": "tensorflow[precision=bf16]"},
    ]


def test_each_phase_runs_the_servers_in_abba_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ran: list[tuple[str, int, str]] = []

    def fake_serving(run: Any, arm: Any, record: Any, phase: str, repeat: int, model_dir: Any) -> Any:
        ran.append((phase, repeat, arm.name))
        return _nullcontext((None, True))

    def fake_step(run: Any, arm: Any, endpoint: Any, scenario: Any, phase: str, repeat: int, **_: Any) -> Any:
        return {"valid": True, "invalid_reasons": [], "throughput_rps": 1.0, "sent_rps": 1.0, "errors": 0,
                "latency_ms": {"p99": 1.0}, "server_cpu_pct": {"mean": 1.0}, "generator_cpu_pct": {"mean": 1.0},
                "other_cpu_pct": {"mean": 1.0}, "generator_processes": 1, "generator_us_per_request": 1.0}  # fmt: skip

    monkeypatch.setattr(compare, "serving", fake_serving)
    monkeypatch.setattr(compare, "measure_step", fake_step)
    opts = plan.Options(repeats=4, targets=["ref=127.0.0.1:1"])
    arms, _ = plan.plan_arms(opts)
    run = steps.Run(opts, tmp_path, tmp_path, None, None)
    records: dict[str, dict[str, list[Any]]] = {arm.name: {"steps": [], "starts": []} for arm in arms}
    order: list[dict[str, Any]] = []
    compare.phase(run, arms, records, "closed", [plan.Scenario("closed", 1)], {}, order, [])
    forward, backward = ["torch", "tensorflow", "ref"], ["ref", "tensorflow", "torch"]
    assert [entry["arm"] for entry in order] == forward + backward + forward + backward
    assert [(e["phase"], e["repeat"], e["arm"]) for e in order] == ran


class _nullcontext:
    def __init__(self, value: Any) -> None:
        self.value = value

    def __enter__(self) -> Any:
        return self.value

    def __exit__(self, *exc: object) -> None:
        return None


def _closed(users: int, rps: float, valid: bool = True) -> dict[str, Any]:
    return {"mode": "closed", "concurrency": users, "throughput_rps": rps, "valid": valid}


def test_open_loop_grid_is_one_set_of_absolute_rates_from_the_lower_valid_peak() -> None:
    steps = {
        "torch": [_closed(4, 1000), _closed(4, 1100), _closed(16, 3000), _closed(32, 9000, valid=False)],
        "tensorflow": [_closed(4, 900), _closed(16, 2000), _closed(16, 2200)],
    }
    grid = plan.rate_grid(steps, [0.25, 0.5, 0.9], 1.1)
    assert grid["peaks"] == {"torch": 3000, "tensorflow": 2100}  # the invalid 9000 left out
    assert grid["rates"] == [525.0, 1050.0, 1890.0, 3300.0]  # of 2100 (lower), and 1.1 x 3000 (higher)
    assert grid["invalid_peaks"] == []
    no_valid = plan.rate_grid({"torch": [_closed(4, 500, valid=False)]}, [0.5], 0)
    assert no_valid["rates"] == [250.0]
    assert no_valid["invalid_peaks"] == ["torch"]


def test_locust_processes_follow_the_expected_generator_load() -> None:
    open_3000 = plan.Scenario("open", 3000)
    assert plan.locust_processes(open_3000, "auto", generator_cores=1, us_per_request=250, rate_hint=0) == 1
    assert plan.locust_processes(open_3000, "auto", generator_cores=4, us_per_request=250, rate_hint=0) == 2
    assert plan.locust_processes(open_3000, "auto", generator_cores=8, us_per_request=600, rate_hint=0) == 3
    closed_2 = plan.Scenario("closed", 2)
    assert plan.locust_processes(closed_2, "auto", generator_cores=8, us_per_request=600, rate_hint=9000) == 2
    assert plan.locust_processes(closed_2, "3", generator_cores=1, us_per_request=1, rate_hint=0) == 3


def _config(**parameters: str) -> dict[str, Any]:
    params = {"device": "cpu", "threads": "1", "precision": "fp32", "compile": "off"} | parameters
    batching = {"max_queue_delay_us": 0, "max_queue_size": 1024, "preferred_batch_sizes": []}
    return {"parameters": params, "max_batch_size": 32, "instances": 1, "dynamic_batching": batching}


def test_check_settings_refuses_servers_that_differ() -> None:
    expected = plan.expected_settings(plan.Options(), {})
    assert plan.check_settings({"a": _config(), "b": _config()}, expected) == []
    assert plan.check_settings({"a": _config(), "b": _config(device="cuda:0")}, expected) == ["device: a cpu, b cuda:0"]
    assert plan.check_settings({"a": _config(threads="2"), "b": _config(precision="bf16")}) == [
        "threads: a 2, b 1",
        "precision: a fp32, b bf16",
    ]
    other_batching = _config() | {"dynamic_batching": None}
    assert plan.check_settings({"a": _config(), "b": other_batching})[0].startswith("dynamic_batching:")
    assert plan.check_settings({"a": _config(compile="on"), "b": _config(compile="on")}, expected) == [
        "compile: asked for off, the servers report on"
    ]
    unreported = {"parameters": {}, "max_batch_size": 32, "instances": 1, "dynamic_batching": None}
    assert "precision: asked for fp32, the servers report None" in plan.check_settings(
        {"a": unreported, "b": unreported}, expected
    )


# ---------------------------------------------------------------- in-process fake servers


# ---------------------------------------------------------------- the decision and the report


@pytest.mark.parametrize(
    ("values", "higher", "expected"),
    [
        # Ranges apart with 3 values each: a winner, p = 2 / C(6, 3) = 0.1.
        ({"torch": [110.0, 112.0, 111.0], "tensorflow": [100.0, 101.0, 99.0]}, True, ("torch", "torch", 0.1)),
        ({"torch": [2.0, 2.1, 2.2], "tensorflow": [3.0, 3.1, 2.9]}, False, ("torch", "torch", 0.1)),
        # A bigger gap in the means, but the ranges overlap: no winner.
        ({"torch": [110.0, 130.0, 99.5], "tensorflow": [100.0, 101.0, 99.0]}, True, (None, "torch", 0.1)),
        # Ranges that touch (one value shared) are not apart, whichever server leads and either way round.
        ({"torch": [103.0, 101.0, 102.0], "tensorflow": [99.0, 101.0, 100.0]}, True, (None, "torch", 0.1)),
        ({"torch": [99.0, 101.0, 100.0], "tensorflow": [103.0, 101.0, 102.0]}, True, (None, "tensorflow", 0.1)),
        ({"torch": [1.0, 1.2, 1.1], "tensorflow": [1.3, 1.2, 1.4]}, False, (None, "torch", 0.1)),
        ({"torch": [1.3, 1.2, 1.4], "tensorflow": [1.0, 1.2, 1.1]}, False, (None, "tensorflow", 0.1)),
        # Apart, but only 2 values each: too few to call it.
        ({"torch": [110.0, 112.0], "tensorflow": [100.0, 101.0]}, True, (None, "torch", None)),
        ({"torch": [2.0, 2.0, 2.0], "tensorflow": [2.0, 2.0, 2.0]}, False, (None, None, 0.1)),
        ({"torch": [], "tensorflow": [3.0]}, False, (None, None, None)),
    ],
)
def test_decide_names_a_winner_only_beyond_noise(
    values: dict[str, list[float]], higher: bool, expected: tuple[str | None, str | None, float | None]
) -> None:
    decision = stats.decide(values, higher)
    winner, leader, p_value = expected
    assert decision["winner"] == winner
    assert decision["leader"] == leader
    assert decision["p_value"] == (None if p_value is None else pytest.approx(p_value))
    if winner is None and p_value is not None:
        assert decision["verdict"] == "no difference beyond noise"


def test_separation_p_value() -> None:
    assert stats.separation_p_value(3, 3) == pytest.approx(0.1)
    assert stats.separation_p_value(6, 6) == pytest.approx(2 / 924)
    assert stats.separation_p_value(1, 1) == 1.0


def test_throughput_characteristics_pick_the_best_valid_scenario() -> None:
    def step(users: int, rps: float, p99: float, repeat: int = 0, valid: bool = True, errors: float = 0.0) -> Any:
        return {"mode": "closed", "concurrency": users, "offered_rps": None, "repeat": repeat,
                "throughput_rps": rps, "latency_ms": {"p99": p99}, "valid": valid, "error_rate": errors}  # fmt: skip

    server = {"steps": [step(4, 100, 10), step(4, 110, 12, repeat=1), step(16, 300, 80), step(8, 900, 4, valid=False),
                        step(6, 200, 3, errors=0.02)]}  # fmt: skip
    for slo_ms, expected in ((50.0, ([100, 110], "4 users")), (5.0, ([0.0], "none meets it"))):
        settings = {"reference_concurrency": 4, "slo_ms": slo_ms, "limits": {"slo_error_rate": 0.01}}
        read = {item.name.split(" (")[0]: item.read for item in verdict.characteristics(settings)}
        # 6 users meets the latency objective but fails 2% of its requests: it does not count.
        assert read[f"max throughput with p99 ≤ {slo_ms:g} ms, errors ≤ 1%"](server, settings) == expected
        assert read["peak throughput"](server, settings) == ([300], "16 users")
        assert read["p99 latency @ 4 users"](server, settings) == ([10, 12], "")


def test_report_fromsynthetic_results(tmp_path: Path) -> None:
    report.write_report(synthetic_results(), tmp_path)
    results = check_report_folder(tmp_path)
    rows = {row["characteristic"]: row for row in results["verdict"]}
    assert {row["variant"] for row in results["verdict"]} == {"as set"}  # the reference is not in the verdict
    peak = rows["peak throughput (closed loop)"]
    assert peak["values"] == {"torch": [400.0, 401.0, 402.0], "tensorflow": [320.0, 321.0, 322.0]}
    assert (peak["winner"], peak["verdict"]) == ("torch", "torch better")
    assert peak["margin_pct"] == pytest.approx(80.0 / 321.0 * 100)
    # Means that differ, ranges that overlap: a leader, and no winner.
    p99 = rows["p99 latency @ 4 users"]
    assert p99["leader"] is not None
    assert (p99["winner"], p99["verdict"]) == (None, "no difference beyond noise")
    cold = rows["cold start (spawn to SERVING)"]
    assert len(cold["values"]["torch"]) == 6  # both phases' starts
    assert cold["winner"] == "torch"
    idle = rows["idle memory (RSS)"]
    assert (idle["leader"], idle["winner"], idle["verdict"]) == ("torch", None, "no difference beyond noise")
    memory = rows["memory under load (max RSS)"]
    assert max(memory["values"]["torch"]) == pytest.approx(3.1e8 / 2**20)  # invalid steps' 9e9 left out
    markdown = (tmp_path / "report.md").read_text()
    assert "| torch_server better (ranges apart; p = 0.1) |" in markdown
    assert "no difference beyond noise (ranges overlap)" in markdown
    assert "bare (reference)" in markdown  # a row beside the two servers
    assert "closed r1: torch_server, tf_server, bare (reference); closed r2: bare (reference), tf_server" in markdown
    assert "generator send lag p99 30 ms &gt; 10 ms" in (tmp_path / "report.html").read_text()
    assert "| tf_server | open | 2 | tf_server exited with 1 |" in markdown


# ---------------------------------------------------------------- end to end


def test_matrix_report_has_a_verdict_per_combination_and_a_row_per_server(tmp_path: Path) -> None:
    results = synthetic_results()
    servers = results["servers"]
    for precision in ("fp32", "bf16"):
        for framework in ("torch", "tensorflow"):
            arm = dict(servers[framework])
            arm["label"] = f"{arm['label']} (precision {precision})"
            arm["variant"] = {"precision": precision}
            servers[f"{framework}[precision={precision}]"] = arm
    del servers["torch"], servers["tensorflow"]
    results["variants"] = []
    for p in ("fp32", "bf16"):
        arms = {fw: f"{fw}[precision={p}]" for fw in ("torch", "tensorflow")}
        results["variants"].append({"name": f"precision {p}", "values": {"precision": p}, "arms": arms})
    results["settings"]["matrix"] = ["precision=fp32,bf16"]
    report.write_report(results, tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    assert "## Verdict: precision fp32" in markdown
    assert "## Verdict: precision bf16" in markdown
    assert "| characteristic | torch_server (precision bf16) | tf_server (precision bf16) |" in markdown
    every = markdown.split("## Every server", 1)[1].split("##", 1)[0]
    assert [line.split("|")[1].strip() for line in every.splitlines() if line.startswith("| ") and "(" in line][1:] == [
        "bare (reference)",
        "torch_server (precision fp32)",
        "tf_server (precision fp32)",
        "torch_server (precision bf16)",
        "tf_server (precision bf16)",
    ]
    assert {row["variant"] for row in json.loads((tmp_path / "results.json").read_text())["verdict"]} == {
        "precision fp32",
        "precision bf16",
    }


def test_file_names_of_matrix_arms_are_plain() -> None:
    name = steps.path_name("tensorflow[precision=bf16,compile=on]-closed-r0-closed-16/x")
    assert name == "tensorflow_precision=bf16,compile=on_-closed-r0-closed-16_x"
    assert steps.path_name("torch-open-r2-open-1050.4") == "torch-open-r2-open-1050.4"

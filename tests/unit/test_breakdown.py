"""Where the time goes: the breakdown's arithmetic, its window, and the ModelStatistics it reads."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from contract.protocol import inference_pb2 as pb
from loadtest import breakdown
from loadtest.stats import Tick
from loadtest.users.latency_file import Samples
from serving.metrics import ModelMetrics


def _statistics(**durations: tuple[float, float]) -> dict[str, float]:
    """Cumulative figures as ``flatten`` gives them: name -> (count, ms in all)."""
    flat = {}
    for name, (count, total_ms) in durations.items():
        flat[f"{name}_count"] = count
        flat[f"{name}_ns"] = total_ms * 1e6
    return flat


def test_the_breakdown_splits_client_time_into_network_and_server_parts() -> None:
    # 200 successes: 600 ms of server time in all (3 ms each); per request 1 ms queue, 0.1 input, 1.4 infer, 0.2 output.
    deltas = _statistics(
        success=(200, 600.0), queue=(200, 200.0), compute_input=(200, 20.0), compute_infer=(200, 280.0),
        compute_output=(200, 40.0),
    )  # fmt: skip
    figures = breakdown.time_breakdown(4.5, deltas)
    assert figures == pytest.approx(
        {
            "client_ms": 4.5,
            "server_ms": 3.0,
            "network_serialization_ms": 1.5,
            "queue_ms": 1.0,
            "compute_input_ms": 0.1,
            "compute_infer_ms": 1.4,
            "compute_output_ms": 0.2,
            "server_other_ms": 0.3,
        }
    )
    assert sum(figures[part] or 0.0 for part in breakdown.PARTS) == pytest.approx(4.5)


def test_a_breakdown_without_a_figure_leaves_out_what_needs_it() -> None:
    figures = breakdown.time_breakdown(None, _statistics(success=(10, 20.0), queue=(0, 0.0)))
    assert figures["server_ms"] == pytest.approx(2.0)
    assert figures["network_serialization_ms"] is None  # no client mean
    assert figures["queue_ms"] is None  # no request queued
    assert figures["server_other_ms"] is None
    assert set(figures) == set(breakdown.KEYS)


def test_statistics_deltas_refuse_counters_that_went_back() -> None:
    before = {"success_count": 10.0, "success_ns": 5e6, "queue_count": 4.0}
    after = {"success_count": 30.0, "success_ns": 25e6, "queue_count": 1.0, "fail_count": 2.0}
    assert breakdown.statistics_deltas(before, after) == {
        "success_count": 20.0,
        "success_ns": 20e6,
        "queue_count": None,  # a restarted server
        "fail_count": None,  # not in the first reading
    }


def test_a_steps_breakdown_reads_only_the_window() -> None:
    # Requests every 10 ms for 3 s; the window is [1, 2). Send to response: 5 ms, of which the open-loop
    # send lag (1 ms, from the scheduled time) is the generator's, not the request's.
    start = np.arange(300) * 0.01
    latency_us = np.full(300, 6000.0)
    latency_us[:100] = 50_000.0  # the warm-up's slow requests: outside the window
    ok = np.ones(300, dtype=bool)
    ok[150] = False  # a failure: not a success's time
    latency_us[150] = 900_000.0
    samples = Samples(start, latency_us, ok, np.full(300, 1000.0))

    def tick(t: float, successes: float, server_ms: float, queue_ms: float) -> Tick:
        figures = _statistics(success=(successes, server_ms), queue=(successes, queue_ms),
                              compute_input=(successes, 0.0), compute_infer=(successes, 2.0 * successes),
                              compute_output=(successes, 0.0))  # fmt: skip
        return Tick(t, None, None, None, statistics=figures)

    ticks = [
        tick(0.5, 50, 5000.0, 4000.0),  # before the window: the warm-up's slow start is left out
        tick(1.0, 100, 5300.0, 4100.0),
        Tick(1.4, None, None, None),  # a tick whose reading timed out: skipped
        tick(2.0, 200, 5700.0, 4200.0),  # 100 successes, 4 ms each; 1 ms queued, 2 ms computing
        tick(2.5, 250, 9000.0, 9000.0),  # after the window
    ]
    figures = breakdown.step_breakdown(samples, ticks, 1.0, 2.0)
    assert figures["client_ms"] == pytest.approx(5.0)
    assert figures["server_ms"] == pytest.approx(4.0)
    assert figures["network_serialization_ms"] == pytest.approx(1.0)
    assert figures["queue_ms"] == pytest.approx(1.0)
    assert figures["compute_infer_ms"] == pytest.approx(2.0)
    assert figures["server_other_ms"] == pytest.approx(1.0)
    assert figures["server_requests"] == 100
    assert figures["client_requests"] == 99  # the one failure left out
    # Fewer than two readings inside the window: no server figure, the client's still.
    alone = breakdown.step_breakdown(samples, ticks[:2], 1.0, 2.0)
    assert alone["client_ms"] == pytest.approx(5.0)
    assert alone["server_ms"] is None
    assert alone["network_serialization_ms"] is None


def test_the_breakdown_reads_what_the_servers_model_statistics_hold() -> None:
    """The serving core's own ModelStatistics (both servers answer with it), flattened and broken down."""
    metrics = ModelMetrics("mlp")
    before = breakdown.flatten([metrics.statistics()])
    # One batch of two requests that waited 1 and 3 ms; compute 0.1 + 1.0 + 0.2 ms; answered in 4 ms on average.
    metrics.batch_done(rows=2, waits_s=[0.001, 0.003], input_ns=100_000, infer_ns=1_000_000, output_ns=200_000)
    for duration_ns in (2_500_000, 5_500_000):
        metrics.request_started()
        metrics.request_done("OK", duration_ns)
    metrics.request_started()
    metrics.request_done("RESOURCE_EXHAUSTED", 10_000)  # a refusal: not a success's time
    after = breakdown.flatten([metrics.statistics()])
    figures = breakdown.time_breakdown(5.0, breakdown.statistics_deltas(before, after))
    assert figures == pytest.approx(
        {
            "client_ms": 5.0,
            "server_ms": 4.0,
            "network_serialization_ms": 1.0,
            "queue_ms": 2.0,
            "compute_input_ms": 0.1,
            "compute_infer_ms": 1.0,
            "compute_output_ms": 0.2,
            "server_other_ms": 0.7,
        }
    )
    assert after["inference_count"] == 2
    assert after["execution_count"] == 1


def test_flatten_adds_up_every_version_of_the_model() -> None:
    def version(count: int, ns: int) -> pb.ModelStatistics:
        duration = pb.StatisticDuration(count=count, ns=ns)
        return pb.ModelStatistics(inference_stats=pb.InferStatistics(success=duration, queue=duration))

    flat = breakdown.flatten([version(2, 10), version(3, 20)])
    assert (flat["success_count"], flat["success_ns"], flat["queue_ns"], flat["compute_infer_count"]) == (5, 30, 30, 0)


def test_mean_breakdown_over_repeats_skips_the_missing() -> None:
    steps: list[dict[str, Any]] = [
        {"breakdown": {"client_ms": 4.0, "server_ms": 3.0}},
        {"breakdown": {"client_ms": 6.0, "server_ms": None}},
        {},  # measured before breakdowns existed
    ]
    means = breakdown.mean_breakdown(steps)
    assert means["client_ms"] == pytest.approx(5.0)
    assert means["server_ms"] == pytest.approx(3.0)
    assert means["queue_ms"] is None

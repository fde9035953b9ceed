"""Overload without collapse, on a real server process (loopback, bounded: ~20 s).

Open-loop arrivals at twice the measured peak must leave the server serving close to its
peak, refusing the excess quickly, keeping the admitted requests within their deadline, and
back to normal soon after. (Refusing in handler threads took the core from the model:
goodput fell to ~0.1x the peak; the servers refuse before a handler thread, see
docs/serving.md#admission.) The margins are loose: CI machines are noisy; ``python -m
loadtest overload`` prints the figures.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.tools.overload import OverloadOptions, measure, refusal_cost

pytestmark = pytest.mark.slow

#: Every request's deadline, from its scheduled send time. One second, as operators set them
#: (and as ``make compare`` does): at 250 ms, a neighbour's time slices on a shared core and the
#: generator's own late sends took enough of the budget that admitted requests missed it.
DEADLINE_MS = 1000.0


def test_twice_the_peak_is_refused_quickly_and_served_near_the_peak(tmp_path: Path) -> None:
    result = measure("torch", OverloadOptions(model="resnet", seconds=2.0, deadline_ms=DEADLINE_MS), None, tmp_path)
    overload = result["phases"]["200%"]
    refusals = sum(count for status, count in overload["statuses"].items() if status.startswith("RESOURCE_EXHAUSTED"))
    assert refusals > 0, overload["statuses"]  # the excess was refused...
    # Refused by the admission rules (a wait past the deadline, a full queue; grpcio's in-flight
    # cap as the last resort), or, admitted, failed before computing where it would be late.
    allowed = ("OK", "RESOURCE_EXHAUSTED: would wait about", "RESOURCE_EXHAUSTED: queue full",
               "RESOURCE_EXHAUSTED: Concurrent RPC limit", "DEADLINE_EXCEEDED")  # fmt: skip
    assert all(status.startswith(allowed) for status in overload["statuses"]), overload["statuses"]
    expired = overload["statuses"].get("DEADLINE_EXCEEDED", 0)
    assert expired < refusals, overload["statuses"]  # mostly refused at once, not after waiting
    assert result["goodput_vs_peak"] >= 0.5  # ...while the model kept serving
    # ...in batches: the server's own figures over the 2x phase (the tool's scrapes) show them.
    at_2x = result["server_at_2x"]
    assert at_2x, "the server's metrics were not scraped over the 2x phase"
    assert at_2x["executions"] > 0, at_2x
    assert at_2x["batch_size_mean"] > 1, at_2x
    # Refused, not queued until the deadline (measured from the actual send; unpinned on this
    # 2-core box beside the generator, the server's core saturated on purpose: 20-36 ms with the
    # old in-flight cap of 80 calls, 198-223 ms with a queue that admits up to the deadline, whose
    # polling thread is busier; pinned, docs/benchmarks.md#overload: 10-39 ms).
    assert result["refusal_p99_ms"] <= DEADLINE_MS / 2
    # Admitted ones made their deadline (a queue admits up to it: give the client's clock 1 %).
    assert overload["admitted_latency_ms"]["p99"] <= DEADLINE_MS * 1.01
    # Back to normal: 1 s after the overload the admitted requests' p99 is well inside the deadline. With a
    # queue that admits up to the deadline, the queue the overload left takes a second or two to work off
    # (CI, 2-core host: 196 ms against 56 ms at 0.8x, where the old in-flight cap recovered within 3x):
    # a server that did not recover would stay at the deadline.
    assert result["p99_1s_after_overload_ms"] <= DEADLINE_MS / 2


def test_the_cost_of_a_refusal_is_measured_on_the_bare_refusing_server() -> None:
    # Every call refused (refusal_cost raises otherwise), and each took the server some CPU.
    cost = refusal_cost("mlp", None)
    assert cost["refusals_per_s"] > 100, cost
    assert 0 < cost["cpu_us"] < 10_000, cost

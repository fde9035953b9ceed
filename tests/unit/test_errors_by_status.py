"""Failed requests by outcome: each request's status in the latency files, counted inside a step's window."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from loadtest import stats
from loadtest.users import latency_file
from loadtest.users.latency_file import LatencyRecorder, Samples, read_latencies

QUEUE_FULL = "RESOURCE_EXHAUSTED: queue full (N requests waiting)"
PAST_DEADLINE = "RESOURCE_EXHAUSTED: would wait about N ms for its batch, past its deadline in N ms"


def test_status_labels_keep_the_reason_of_a_refusal_without_its_numbers() -> None:
    assert latency_file.status_label("RESOURCE_EXHAUSTED", "queue full (1024 requests waiting); retry later") == (
        QUEUE_FULL
    )
    assert latency_file.status_label(
        "RESOURCE_EXHAUSTED",
        "would wait about 12.5 ms for its batch, past its deadline in 3.0 ms; not queued, retry later",
    ) == (PAST_DEADLINE)
    assert latency_file.status_label("DEADLINE_EXCEEDED", "Deadline Exceeded") == "DEADLINE_EXCEEDED"
    assert latency_file.status_label("RESOURCE_EXHAUSTED", None) == "RESOURCE_EXHAUSTED"
    assert latency_file.status_code(QUEUE_FULL) == "RESOURCE_EXHAUSTED"


def test_a_recorder_numbers_each_outcome_once_and_caps_the_labels() -> None:
    recorder = LatencyRecorder()
    first = recorder.status_id("RESOURCE_EXHAUSTED", "queue full (8 requests waiting); retry later")
    assert first == recorder.status_id("RESOURCE_EXHAUSTED", "queue full (1024 requests waiting); retry later")
    assert first not in (latency_file.OK_ID, latency_file.UNSENT_ID)
    assert recorder.status_id("UNAVAILABLE", "a") == recorder.status_id("UNAVAILABLE", "b")
    # Reasons without end: past the cap, a failure is numbered by its code alone.
    ids = {recorder.status_id("RESOURCE_EXHAUSTED", f"reason {chr(65 + i % 26) * (1 + i // 26)}") for i in range(200)}
    assert max(ids) == latency_file.MAX_LABELS  # numbers 0..MAX_LABELS - 1 for labels, then one for the bare code
    assert recorder.status_id("RESOURCE_EXHAUSTED", "yet another reason") == max(ids)


def _write_old_file(prefix: Path, pid: int, starts_us: list[int], latency_us: list[int], ok: list[bool]) -> None:
    """A latency file as written before outcomes were recorded: no ``status``."""
    np.savez(
        f"{prefix}.{pid}.npz",
        start_us=np.array(starts_us, dtype=np.int64),
        latency_us=np.array(latency_us, dtype=np.int64),
        ok=np.array(ok),
        lag_us=np.zeros(len(starts_us), dtype=np.int64),
        meta=np.array(json.dumps({"pid": pid})),
    )


def test_outcomes_survive_save_and_merge_with_files_written_before_them(tmp_path: Path) -> None:
    prefix = tmp_path / "step.latency"
    recorder = LatencyRecorder()
    # Labels are numbered in the order a process meets them: this one meets DEADLINE_EXCEEDED first.
    deadline = recorder.status_id("DEADLINE_EXCEEDED", "Deadline Exceeded")
    full = recorder.status_id("RESOURCE_EXHAUSTED", "queue full (3 requests waiting); retry later")
    now_perf, now_wall = time.perf_counter(), time.time()
    at = [now_perf + t for t in (1.0, 2.0, 3.0, 4.0)]
    recorder.record((at[0], 0.001, True, 0.0, latency_file.OK_ID))
    recorder.record((at[1], 0.002, False, 0.0, full))
    recorder.record((at[2], 0.5, False, 0.0, deadline))
    recorder.record((at[3], -1.0, False, -1.0, latency_file.UNSENT_ID))
    recorder.save(prefix, {"mode": "open"})
    between = [round((now_wall + t) * 1e6) for t in (1.5, 2.5, 3.5)]  # interleaved with the new file's
    _write_old_file(prefix, 1, between, [1000, 250_000, -1], [True, False, False])
    run = read_latencies(prefix)
    status, labels = run.outcomes()
    assert [labels[i] for i in status] == [
        "OK", "OK", "RESOURCE_EXHAUSTED: queue full (N requests waiting)", "NOT_RECORDED", "DEADLINE_EXCEEDED",
        "UNSENT", "UNSENT",
    ]  # fmt: skip
    figures = stats.window_stats(run, now_wall, now_wall + 10.0, batch_size=1, deadline_s=1.0)
    assert figures["errors_by_status"] == {"UNSENT": 2, "RESOURCE_EXHAUSTED": 1, "NOT_RECORDED": 1,
                                           "DEADLINE_EXCEEDED": 1}  # fmt: skip
    assert figures["errors_by_reason"] == {QUEUE_FULL: 1}


def _samples(labels: list[str], outcome: np.ndarray) -> Samples:
    start = np.arange(len(outcome)) * 0.01
    unsent = outcome == labels.index("UNSENT")
    latency_us = np.where(unsent, -1.0, 2000.0)
    ok = outcome == labels.index("OK")
    return Samples(start, latency_us, ok, np.where(unsent, -1.0, 0.0), status=outcome, statuses=labels)


def test_failures_are_counted_by_status_inside_the_window_only() -> None:
    labels = ["OK", "UNSENT", QUEUE_FULL, "DEADLINE_EXCEEDED", PAST_DEADLINE, "UNAVAILABLE"]
    outcome = np.zeros(300, dtype=np.int16)  # 3 s at 100 req/s; the window is [1, 2): requests 100..199
    outcome[100:110] = labels.index(QUEUE_FULL)
    outcome[110:115] = labels.index(PAST_DEADLINE)
    outcome[120:123] = labels.index("DEADLINE_EXCEEDED")
    outcome[130:132] = labels.index("UNSENT")
    outcome[:50] = labels.index("UNAVAILABLE")  # before the window (warm-up): not counted
    outcome[250:] = labels.index("DEADLINE_EXCEEDED")  # after it
    figures = stats.window_stats(_samples(labels, outcome), 1.0, 2.0, batch_size=1, deadline_s=1.0)
    by_status = figures["errors_by_status"]
    assert by_status == {"RESOURCE_EXHAUSTED": 15, "DEADLINE_EXCEEDED": 3, "UNSENT": 2}
    assert list(by_status) == ["RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "UNSENT"]  # most frequent first
    assert sum(by_status.values()) == figures["errors"] == 20
    assert figures["errors_by_reason"] == {QUEUE_FULL: 10, PAST_DEADLINE: 5}
    assert stats.errors_text(figures["errors"], by_status) == (
        "errors 20 (RESOURCE_EXHAUSTED 15, DEADLINE_EXCEEDED 3, UNSENT 2)"
    )


def test_samples_without_outcomes_still_say_which_were_never_sent() -> None:
    start = np.arange(10) * 0.1
    latency_us = np.array([1000.0] * 6 + [300_000.0] * 2 + [-1.0] * 2)
    ok = np.array([True] * 6 + [False] * 4)
    figures = stats.window_stats(Samples(start, latency_us, ok, np.zeros(10)), 0.0, 1.0, 1, 1.0)
    assert figures["errors_by_status"] == {"NOT_RECORDED": 2, "UNSENT": 2}
    assert figures["errors_by_reason"] == {}

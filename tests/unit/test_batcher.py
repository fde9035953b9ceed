"""The dynamic batcher on its own: natural batching, merge/split, flush triggers,
shedding, deadlines, cancellation, error fan-out, padding of ragged inputs, draining,
and the leader/follower hand-off under many concurrent callers."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import pytest

from contract.datatypes import TensorSpec
from contract.errors import Cancelled, DeadlineExceeded, ResourceExhausted, Unavailable
from serving.batcher import DynamicBatcher, Request
from serving.metrics import ModelMetrics
from serving.settings import BatchingSettings

INPUTS = (TensorSpec("x", "FP32", (-1, 2)),)
OUTPUTS = (TensorSpec("y", "FP32", (-1, 2)),)


class Model:
    """Records every batch and the thread that ran it; y = 2x. Can be gated (blocks until
    released), slowed down, or made to fail."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.batches: list[dict[str, np.ndarray]] = []
        self.threads: list[threading.Thread] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail = fail
        self.delay_s = 0.0
        self.running = 0
        self.most_running = 0
        self._lock = threading.Lock()

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            self.entered.set()
            assert self.gate.wait(10)
            if self.delay_s:
                time.sleep(self.delay_s)
            self.batches.append({k: np.array(v) for k, v in inputs.items()})
            self.threads.append(threading.current_thread())
            if self.fail is not None:
                raise self.fail
            return {"y": inputs["x"] * 2}
        finally:
            with self._lock:
                self.running -= 1

    @property
    def sizes(self) -> list[int]:
        return [batch["x"].shape[0] for batch in self.batches]


def make(model: Any, inputs: Any = INPUTS, outputs: Any = OUTPUTS, pad: Any = None, **settings: Any) -> DynamicBatcher:
    batcher = DynamicBatcher(model, inputs, outputs, BatchingSettings(**settings), ModelMetrics("m"), pad_values=pad)
    batcher.start()
    return batcher


def rows(start: int, count: int) -> dict[str, np.ndarray]:
    return {"x": np.arange(start * 2, (start + count) * 2, dtype=np.float32).reshape(count, 2)}


@pytest.fixture
def pool() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(32) as executor:
        yield executor


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.002)


def test_lone_request_runs_on_the_callers_thread() -> None:
    model = Model()
    batcher = make(model, max_batch_size=8)
    result = batcher.infer(rows(0, 3), 3)
    np.testing.assert_array_equal(result["y"], rows(0, 3)["x"] * 2)
    assert model.threads == [threading.current_thread()]


def test_natural_batching_takes_everything_queued_while_busy(pool: concurrent.futures.ThreadPoolExecutor) -> None:
    model = Model()
    model.gate.clear()
    batcher = make(model, max_batch_size=16)  # no queue delay: the default
    first = pool.submit(batcher.infer, rows(0, 1), 1)
    assert model.entered.wait(5)
    queued = [pool.submit(batcher.infer, rows(i, 1), 1) for i in range(1, 6)]
    wait_until(lambda: batcher.queue_depth == 5)
    model.gate.set()
    for i, future in enumerate([first, *queued]):
        np.testing.assert_array_equal(future.result(5)["y"], rows(i, 1)["x"] * 2)
    assert model.sizes == [1, 5]


def test_merge_and_split_are_exact(pool: concurrent.futures.ThreadPoolExecutor) -> None:
    model = Model()
    batcher = make(model, max_batch_size=16, max_queue_delay_us=300_000)
    sizes = [1, 3, 2, 4, 1]
    starts = np.cumsum([0, *sizes[:-1]])
    futures = [pool.submit(batcher.infer, rows(s, n), n) for s, n in zip(starts, sizes, strict=True)]
    for start, size, future in zip(starts, sizes, futures, strict=True):
        np.testing.assert_array_equal(future.result(5)["y"], rows(start, size)["x"] * 2)
    assert model.sizes == [11]


def test_size_flush_does_not_wait_for_delay(pool: concurrent.futures.ThreadPoolExecutor) -> None:
    model = Model()
    batcher = make(model, max_batch_size=4, max_queue_delay_us=10_000_000)
    started = time.monotonic()
    futures = [pool.submit(batcher.infer, rows(i, 1), 1) for i in range(4)]
    for future in futures:
        future.result(5)
    assert time.monotonic() - started < 2.0
    assert model.sizes == [4]


def test_timeout_flush_after_max_queue_delay(pool: concurrent.futures.ThreadPoolExecutor) -> None:
    model = Model()
    batcher = make(model, max_batch_size=64, max_queue_delay_us=100_000)
    started = time.monotonic()
    futures = [pool.submit(batcher.infer, rows(0, 1), 1), pool.submit(batcher.infer, rows(1, 2), 2)]
    for future in futures:
        future.result(5)
    assert 0.09 <= time.monotonic() - started < 2.0
    assert model.sizes == [3]


def test_batching_off_runs_one_request_per_pass(pool: concurrent.futures.ThreadPoolExecutor) -> None:
    model = Model()
    model.gate.clear()
    batcher = make(model, max_batch_size=8, dynamic_batching=False)
    futures = [pool.submit(batcher.infer, rows(i, 2), 2) for i in range(3)]
    wait_until(lambda: model.entered.is_set() and batcher.queue_depth == 2)
    model.gate.set()
    for future in futures:
        future.result(5)
    assert model.sizes == [2, 2, 2]


def test_batches_never_exceed_max_batch_size(pool: concurrent.futures.ThreadPoolExecutor) -> None:
    model = Model()
    model.gate.clear()
    batcher = make(model, max_batch_size=4)
    futures = [pool.submit(batcher.infer, rows(3 * i, 3), 3) for i in range(5)]
    wait_until(lambda: model.entered.is_set() and batcher.queue_depth == 4)
    model.gate.set()
    for i, future in enumerate(futures):
        np.testing.assert_array_equal(future.result(5)["y"], rows(3 * i, 3)["x"] * 2)
    assert all(size <= 4 for size in model.sizes)
    assert sum(model.sizes) == 15


def test_full_queue_sheds_with_resource_exhausted(pool: concurrent.futures.ThreadPoolExecutor) -> None:
    model = Model()
    model.gate.clear()
    batcher = make(model, max_batch_size=1, max_queue_size=2)
    first = pool.submit(batcher.infer, rows(0, 1), 1)
    assert model.entered.wait(5)  # first is computing, queue empty
    queued = [pool.submit(batcher.infer, rows(i, 1), 1) for i in (1, 2)]
    wait_until(lambda: batcher.queue_depth == 2)
    with pytest.raises(ResourceExhausted, match="queue full"):
        batcher.infer(rows(3, 1), 1)
    model.gate.set()
    for future in (first, *queued):
        future.result(5)


def test_expired_deadline_is_never_computed(pool: concurrent.futures.ThreadPoolExecutor) -> None:
    model = Model()
    model.gate.clear()
    batcher = make(model, max_batch_size=8)
    first = pool.submit(batcher.infer, rows(0, 1), 1)
    assert model.entered.wait(5)
    late = pool.submit(batcher.infer, rows(50, 1), 1, 0.05)
    with pytest.raises(DeadlineExceeded, match="not computed"):
        late.result(5)  # answered at its deadline, while the model is still busy
    assert batcher.queue_depth == 0
    model.gate.set()
    first.result(5)
    assert all(100.0 not in batch["x"] for batch in model.batches)


def test_expired_while_queued_behind_a_batch_is_never_computed() -> None:
    """A streamed request (no waiting thread) whose deadline passes in the queue is failed by
    the leader that finds it, not computed."""
    model = Model()
    batcher = make(model, max_batch_size=8)
    done: list[Request] = []
    model.delay_s = 0.1
    threading.Thread(target=batcher.infer, args=(rows(0, 1), 1)).start()
    assert model.entered.wait(5)
    batcher.submit(rows(50, 1), 1, 0.02, done.append)
    wait_until(lambda: bool(done))
    assert isinstance(done[0].error, DeadlineExceeded)
    assert all(100.0 not in batch["x"] for batch in model.batches)


def test_cancelled_request_is_dropped(pool: concurrent.futures.ThreadPoolExecutor) -> None:
    model = Model()
    model.gate.clear()
    batcher = make(model, max_batch_size=8)
    first = pool.submit(batcher.infer, rows(0, 1), 1)
    assert model.entered.wait(5)
    queued: list[Request] = []
    doomed = pool.submit(batcher.infer, rows(50, 1), 1, None, queued.append)
    wait_until(lambda: bool(queued))
    kept = pool.submit(batcher.infer, rows(60, 1), 1)
    wait_until(lambda: batcher.queue_depth == 2)
    batcher.cancel(queued[0])
    with pytest.raises(Cancelled):
        doomed.result(5)
    model.gate.set()
    first.result(5)
    np.testing.assert_array_equal(kept.result(5)["y"], rows(60, 1)["x"] * 2)
    computed = np.concatenate([batch["x"] for batch in model.batches])
    assert 100.0 not in computed
    assert 120.0 in computed


@pytest.mark.parametrize("error", [ValueError("boom"), KeyboardInterrupt()])
def test_error_reaches_every_request_of_the_batch(
    pool: concurrent.futures.ThreadPoolExecutor, error: BaseException
) -> None:
    model = Model(fail=error)
    batcher = make(model, max_batch_size=8, max_queue_delay_us=100_000)
    futures = [pool.submit(batcher.infer, rows(i, 1), 1) for i in range(3)]
    errors = [future.exception(5) for future in futures]
    assert len(model.batches) == 1
    expected = ValueError if isinstance(error, Exception) else RuntimeError
    assert all(isinstance(err, expected) for err in errors), errors
    # The batcher keeps serving after a failed batch: no instance was lost.
    model.fail = None
    np.testing.assert_array_equal(batcher.infer(rows(7, 1), 1)["y"], rows(7, 1)["x"] * 2)
    assert batcher.drain(1.0)


def test_ragged_inputs_are_padded_and_outputs_cut_back(pool: concurrent.futures.ThreadPoolExecutor) -> None:
    specs = (TensorSpec("ids", "INT64", (-1, -1)), TensorSpec("mask", "INT64", (-1, -1)))
    outputs = (TensorSpec("hidden", "FP32", (-1, -1, 2)), TensorSpec("pooled", "FP32", (-1, 2)))
    seen: list[tuple[int, ...]] = []

    def predict(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        seen.append(inputs["ids"].shape)
        ids, mask = inputs["ids"], inputs["mask"]
        hidden = np.stack([ids * mask, ids + mask], axis=-1).astype(np.float32)
        pooled = (hidden * mask[..., None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
        return {"hidden": hidden, "pooled": pooled.astype(np.float32)}

    batcher = make(predict, specs, outputs, pad={"ids": 0, "mask": 0}, max_batch_size=8, max_queue_delay_us=200_000)
    requests = [np.arange(1, 1 + n, dtype=np.int64)[None].repeat(r, 0) for n, r in ((3, 1), (7, 2), (5, 1))]
    futures = [pool.submit(batcher.infer, {"ids": ids, "mask": np.ones_like(ids)}, ids.shape[0]) for ids in requests]
    for ids, future in zip(requests, futures, strict=True):
        result = future.result(5)
        alone = predict({"ids": ids, "mask": np.ones_like(ids)})
        assert result["hidden"].shape == (*ids.shape, 2)
        np.testing.assert_array_equal(result["hidden"], alone["hidden"])
        np.testing.assert_allclose(result["pooled"], alone["pooled"])
    assert seen[0] == (4, 7)


def test_ragged_inputs_are_padded_with_each_inputs_own_pad_value(pool: concurrent.futures.ThreadPoolExecutor) -> None:
    specs = (TensorSpec("ids", "INT64", (-1, -1)), TensorSpec("mask", "INT64", (-1, -1)))
    outputs = (TensorSpec("pooled", "FP32", (-1, 1)),)
    seen: list[dict[str, np.ndarray]] = []

    def predict(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        seen.append({name: np.array(array) for name, array in inputs.items()})
        return {"pooled": (inputs["ids"] * inputs["mask"]).sum(axis=1, keepdims=True).astype(np.float32)}

    batcher = make(predict, specs, outputs, pad={"ids": 7, "mask": 3}, max_batch_size=8, max_queue_delay_us=200_000)
    short, long = np.array([[1, 2]], np.int64), np.array([[4, 5, 6, 8]], np.int64)
    futures = [pool.submit(batcher.infer, {"ids": ids, "mask": np.ones_like(ids)}, 1) for ids in (short, long)]
    for future in futures:
        future.result(5)
    assert len(seen) == 1, "the two requests were not batched together"
    batch = seen[0]
    first = 0 if batch["ids"][0, 0] == 1 else 1
    np.testing.assert_array_equal(batch["ids"][first], [1, 2, 7, 7])
    np.testing.assert_array_equal(batch["mask"][first], [1, 1, 3, 3])
    np.testing.assert_array_equal(batch["ids"][1 - first], [4, 5, 6, 8])


def test_preferred_batch_sizes_pad_rows(pool: concurrent.futures.ThreadPoolExecutor) -> None:
    model = Model()
    batcher = make(model, max_batch_size=8, max_queue_delay_us=100_000, preferred_batch_sizes=[4, 8])
    futures = [pool.submit(batcher.infer, rows(i, 1), 1) for i in range(3)]
    for i, future in enumerate(futures):
        np.testing.assert_array_equal(future.result(5)["y"], rows(i, 1)["x"] * 2)
    assert model.sizes == [4]


def test_instances_run_batches_concurrently(pool: concurrent.futures.ThreadPoolExecutor) -> None:
    model = Model()
    model.delay_s = 0.05
    batcher = make(model, max_batch_size=1, instances=2)
    futures = [pool.submit(batcher.infer, rows(i, 1), 1) for i in range(6)]
    for i, future in enumerate(futures):
        np.testing.assert_array_equal(future.result(5)["y"], rows(i, 1)["x"] * 2)
    assert model.most_running == 2


def test_streamed_and_blocking_requests_batch_together(pool: concurrent.futures.ThreadPoolExecutor) -> None:
    model = Model()
    model.gate.clear()
    batcher = make(model, max_batch_size=8)
    first = pool.submit(batcher.infer, rows(0, 1), 1)
    assert model.entered.wait(5)
    done: list[Request] = []
    for i in (1, 2):
        batcher.submit(rows(i, 1), 1, None, done.append)  # queued: returns at once
    blocked = pool.submit(batcher.infer, rows(3, 1), 1)
    wait_until(lambda: batcher.queue_depth == 3)
    model.gate.set()
    first.result(5)
    np.testing.assert_array_equal(blocked.result(5)["y"], rows(3, 1)["x"] * 2)
    wait_until(lambda: len(done) == 2)
    for i, request in zip((1, 2), done, strict=True):
        assert request.outputs is not None
        np.testing.assert_array_equal(request.outputs["y"], rows(i, 1)["x"] * 2)
    assert model.sizes == [1, 3]


def test_many_concurrent_callers_each_get_their_own_rows(pool: concurrent.futures.ThreadPoolExecutor) -> None:
    model = Model()
    batcher = make(model, max_batch_size=8)
    sizes = [1 + i % 3 for i in range(400)]
    starts = np.cumsum([0, *sizes[:-1]])
    futures = [pool.submit(batcher.infer, rows(s, n), n) for s, n in zip(starts, sizes, strict=True)]
    for start, size, future in zip(starts, sizes, futures, strict=True):
        np.testing.assert_array_equal(future.result(10)["y"], rows(start, size)["x"] * 2)
    assert sum(model.sizes) == sum(sizes)
    assert max(model.sizes) > 1  # batches formed while the callers raced
    assert batcher.drain(1.0)


def test_drain_finishes_queued_work_then_refuses(pool: concurrent.futures.ThreadPoolExecutor) -> None:
    model = Model()
    model.gate.clear()
    batcher = make(model, max_batch_size=1)
    pending = [pool.submit(batcher.infer, rows(i, 1), 1) for i in range(3)]
    wait_until(lambda: model.entered.is_set() and batcher.queue_depth == 2)
    drained = pool.submit(batcher.drain, 10.0)
    wait_until(lambda: not batcher.accepting)
    with pytest.raises(Unavailable):
        batcher.infer(rows(9, 1), 1)
    assert not drained.done()
    model.gate.set()
    assert drained.result(5) is True
    assert all(future.result(5)["y"].shape == (1, 2) for future in pending)


def test_drain_times_out_while_a_batch_hangs(pool: concurrent.futures.ThreadPoolExecutor) -> None:
    model = Model()
    model.gate.clear()
    batcher = make(model, max_batch_size=1)
    pending = pool.submit(batcher.infer, rows(0, 1), 1)
    assert model.entered.wait(5)
    assert batcher.drain(0.05) is False
    model.gate.set()
    pending.result(5)
    assert batcher.drain(1.0) is True


def test_request_that_would_outlive_its_deadline_is_refused_at_once(
    pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    model = Model()
    model.delay_s = 0.05  # every batch takes 50 ms
    batcher = make(model, max_batch_size=2)
    backlog = [pool.submit(batcher.infer, rows(i, 1), 1) for i in range(12)]  # ~6 batches: the cycle is learnt
    wait_until(lambda: len(model.batches) >= 3)
    started = time.monotonic()
    with pytest.raises(ResourceExhausted, match="past its deadline"):
        batcher.infer(rows(90, 1), 1, timeout=0.06)
    assert time.monotonic() - started < 0.03  # refused, not queued until the deadline
    patient = batcher.infer(rows(91, 1), 1, timeout=10.0)  # a deadline it can meet is admitted
    np.testing.assert_array_equal(patient["y"], rows(91, 1)["x"] * 2)
    for future in backlog:
        future.result(5)
    assert all(180.0 not in batch["x"] for batch in model.batches)


def test_max_queue_wait_bounds_the_queue_in_time(pool: concurrent.futures.ThreadPoolExecutor) -> None:
    model = Model()
    model.delay_s = 0.05
    batcher = make(model, max_batch_size=2, max_queue_wait_ms=120)
    warm = [pool.submit(batcher.infer, rows(i, 1), 1) for i in range(8)]
    for future in warm:  # the cycle is learnt (50 ms), and the queue is empty again
        future.result(5)
    futures = [pool.submit(batcher.infer, rows(i, 1), 1) for i in range(16)]
    outcomes = [future.exception(10) for future in futures]
    refused = [err for err in outcomes if err is not None]
    assert refused, "a backlog of 8 batches of 50 ms must exceed a 120 ms bound"
    assert all(isinstance(err, ResourceExhausted) and "120 ms limit" in str(err) for err in refused)
    assert len(refused) < len(futures)  # the first ones were served


def test_a_leader_failing_outside_a_forward_pass_hands_its_queue_on(
    pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    model = Model()
    model.gate.clear()
    batcher = make(model, max_batch_size=1)

    def broken_callback(request: Request) -> None:
        raise KeyboardInterrupt  # a bug outside the forward pass, while this caller leads

    leader = pool.submit(batcher.submit, rows(0, 1), 1, None, broken_callback)
    assert model.entered.wait(5)
    queued = [pool.submit(batcher.infer, rows(i, 1), 1) for i in (1, 2)]
    wait_until(lambda: batcher.queue_depth == 2)
    model.gate.set()
    with pytest.raises(KeyboardInterrupt):
        leader.result(5)
    for i, future in zip((1, 2), queued, strict=True):  # not stranded behind the failed leader
        np.testing.assert_array_equal(future.result(5)["y"], rows(i, 1)["x"] * 2)
    assert batcher.drain(1.0)


def test_request_that_cannot_finish_before_its_deadline_is_never_computed() -> None:
    """At its turn, a request whose deadline is closer than a forward pass takes would be
    answered late: failed at once (DEADLINE_EXCEEDED), its rows never computed."""
    model = Model()
    model.delay_s = 0.2  # every forward pass takes 200 ms
    batcher = make(model, max_batch_size=8)
    batcher.infer(rows(0, 1), 1)  # the forward pass's duration is learnt
    done: list[Request] = []
    running = threading.Thread(target=batcher.infer, args=(rows(1, 1), 1))
    model.entered.clear()
    running.start()
    assert model.entered.wait(5)
    batcher.submit(rows(50, 1), 1, 0.3, done.append)  # its turn in ~200 ms: ~100 ms left, < 200 ms
    wait_until(lambda: bool(done))
    running.join(5)
    assert isinstance(done[0].error, DeadlineExceeded), done[0].error
    assert "before a batch could finish" in str(done[0].error)
    assert all(100.0 not in batch["x"] for batch in model.batches)

"""The dynamic batcher on its own: merge/split, flush triggers, shedding, deadlines,
cancellation, error fan-out, padding of ragged inputs, draining."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from serving.batcher import DynamicBatcher
from serving.datatypes import TensorSpec
from serving.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from serving.metrics import ServerMetrics
from serving.settings import BatchingSettings

INPUTS = (TensorSpec("x", "FP32", (-1, 2)),)
OUTPUTS = (TensorSpec("y", "FP32", (-1, 2)),)


class Model:
    """Records every batch; y = 2x. Can be gated (blocks until released) or made to fail."""

    def __init__(self, fail: bool = False) -> None:
        self.batches: list[dict[str, np.ndarray]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail = fail

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.entered.set()
        assert self.gate.wait(10)
        self.batches.append({k: np.array(v) for k, v in inputs.items()})
        if self.fail:
            raise ValueError("boom")
        return {"y": inputs["x"] * 2}


def make(
    model: Model, inputs: Any = INPUTS, outputs: Any = OUTPUTS, pad: Any = None, **settings: Any
) -> DynamicBatcher:
    registry = CollectorRegistry()
    metrics = ServerMetrics(registry).for_model("m")
    batcher = DynamicBatcher(model, inputs, outputs, BatchingSettings(**settings), metrics, pad_values=pad)
    batcher.start()
    return batcher


def rows(start: int, count: int) -> dict[str, np.ndarray]:
    return {"x": np.arange(start * 2, (start + count) * 2, dtype=np.float32).reshape(count, 2)}


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_merge_and_split_are_exact() -> None:
    async def main() -> None:
        model = Model()
        batcher = make(model, max_batch_size=16, max_queue_delay_us=200_000)
        sizes = [1, 3, 2, 4, 1]
        starts = np.cumsum([0, *sizes[:-1]])
        results = await asyncio.gather(*(batcher.submit(rows(s, n), n) for s, n in zip(starts, sizes, strict=True)))
        for start, size, result in zip(starts, sizes, results, strict=True):
            np.testing.assert_array_equal(result["y"], rows(start, size)["x"] * 2)
        assert len(model.batches) == 1
        assert model.batches[0]["x"].shape == (11, 2)
        await batcher.close()

    run(main())


def test_size_flush_does_not_wait_for_delay() -> None:
    async def main() -> None:
        model = Model()
        batcher = make(model, max_batch_size=4, max_queue_delay_us=10_000_000)
        started = time.monotonic()
        await asyncio.gather(*(batcher.submit(rows(i, 1), 1) for i in range(4)))
        assert time.monotonic() - started < 2.0
        assert [b["x"].shape[0] for b in model.batches] == [4]
        await batcher.close()

    run(main())


def test_timeout_flush_after_max_queue_delay() -> None:
    async def main() -> None:
        model = Model()
        batcher = make(model, max_batch_size=64, max_queue_delay_us=100_000)
        started = time.monotonic()
        await asyncio.gather(batcher.submit(rows(0, 1), 1), batcher.submit(rows(1, 2), 2))
        elapsed = time.monotonic() - started
        assert 0.09 <= elapsed < 2.0
        assert [b["x"].shape[0] for b in model.batches] == [3]
        await batcher.close()

    run(main())


def test_batching_off_runs_one_request_per_pass() -> None:
    async def main() -> None:
        model = Model()
        batcher = make(model, max_batch_size=8, dynamic_batching=False)
        await asyncio.gather(*(batcher.submit(rows(i, 2), 2) for i in range(3)))
        assert [b["x"].shape[0] for b in model.batches] == [2, 2, 2]
        await batcher.close()

    run(main())


def test_batches_never_exceed_max_batch_size() -> None:
    async def main() -> None:
        model = Model()
        model.gate.clear()
        batcher = make(model, max_batch_size=4, max_queue_delay_us=0)
        tasks = [asyncio.ensure_future(batcher.submit(rows(i, 3), 3)) for i in range(5)]
        await asyncio.sleep(0.05)
        model.gate.set()
        await asyncio.gather(*tasks)
        assert all(b["x"].shape[0] <= 4 for b in model.batches)
        assert sum(b["x"].shape[0] for b in model.batches) == 15
        await batcher.close()

    run(main())


def test_full_queue_sheds_with_resource_exhausted() -> None:
    async def main() -> None:
        model = Model()
        model.gate.clear()
        batcher = make(model, max_batch_size=1, max_queue_size=2, max_queue_delay_us=0)
        first = asyncio.ensure_future(batcher.submit(rows(0, 1), 1))
        await asyncio.to_thread(model.entered.wait, 5)  # first is computing, queue empty
        queued = [asyncio.ensure_future(batcher.submit(rows(i, 1), 1)) for i in (1, 2)]
        await asyncio.sleep(0.01)
        with pytest.raises(ResourceExhausted, match="queue full"):
            await batcher.submit(rows(3, 1), 1)
        model.gate.set()
        await asyncio.gather(first, *queued)
        await batcher.close()

    run(main())


def test_expired_deadline_is_never_computed() -> None:
    async def main() -> None:
        model = Model()
        model.gate.clear()
        batcher = make(model, max_batch_size=8, max_queue_delay_us=0)
        first = asyncio.ensure_future(batcher.submit(rows(0, 1), 1))
        await asyncio.to_thread(model.entered.wait, 5)
        late = asyncio.ensure_future(batcher.submit(rows(50, 1), 1, timeout=0.05))
        await asyncio.sleep(0.15)
        model.gate.set()
        await first
        with pytest.raises(DeadlineExceeded, match="not computed"):
            await late
        assert all(100.0 not in b["x"] for b in model.batches)
        await batcher.close()

    run(main())


def test_cancelled_request_is_dropped() -> None:
    async def main() -> None:
        model = Model()
        model.gate.clear()
        batcher = make(model, max_batch_size=8, max_queue_delay_us=0)
        first = asyncio.ensure_future(batcher.submit(rows(0, 1), 1))
        await asyncio.to_thread(model.entered.wait, 5)
        doomed = asyncio.ensure_future(batcher.submit(rows(50, 1), 1))
        kept = asyncio.ensure_future(batcher.submit(rows(60, 1), 1))
        await asyncio.sleep(0.01)
        doomed.cancel()
        model.gate.set()
        await asyncio.gather(first, kept)
        assert doomed.cancelled()
        computed = np.concatenate([b["x"] for b in model.batches])
        assert 100.0 not in computed
        assert 120.0 in computed
        await batcher.close()

    run(main())


def test_error_reaches_every_request_of_the_batch() -> None:
    async def main() -> None:
        model = Model(fail=True)
        batcher = make(model, max_batch_size=8, max_queue_delay_us=100_000)
        results = await asyncio.gather(*(batcher.submit(rows(i, 1), 1) for i in range(3)), return_exceptions=True)
        assert len(model.batches) == 1
        assert all(isinstance(r, ValueError) for r in results)
        # The batcher keeps serving after a failed batch.
        model.fail = False
        np.testing.assert_array_equal((await batcher.submit(rows(7, 1), 1))["y"], rows(7, 1)["x"] * 2)
        await batcher.close()

    run(main())


def test_ragged_inputs_are_padded_and_outputs_cut_back() -> None:
    specs = (TensorSpec("ids", "INT64", (-1, -1)), TensorSpec("mask", "INT64", (-1, -1)))
    outputs = (TensorSpec("hidden", "FP32", (-1, -1, 2)), TensorSpec("pooled", "FP32", (-1, 2)))

    def predict(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        seen.append(inputs["ids"].shape)
        ids, mask = inputs["ids"], inputs["mask"]
        hidden = np.stack([ids * mask, ids + mask], axis=-1).astype(np.float32)
        pooled = (hidden * mask[..., None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
        return {"hidden": hidden, "pooled": pooled.astype(np.float32)}

    seen: list[tuple[int, ...]] = []

    async def main() -> None:
        batcher = DynamicBatcher(
            predict,
            specs,
            outputs,
            BatchingSettings(max_batch_size=8, max_queue_delay_us=100_000),
            ServerMetrics(CollectorRegistry()).for_model("enc"),
            pad_values={"ids": 0, "mask": 0},
        )
        batcher.start()
        requests = [np.arange(1, 1 + n, dtype=np.int64)[None].repeat(r, 0) for n, r in ((3, 1), (7, 2), (5, 1))]
        calls = [batcher.submit({"ids": ids, "mask": np.ones_like(ids)}, ids.shape[0]) for ids in requests]
        results = await asyncio.gather(*calls)
        assert seen == [(4, 7)]
        for ids, result in zip(requests, results, strict=True):
            alone = predict({"ids": ids, "mask": np.ones_like(ids)})
            assert result["hidden"].shape == (*ids.shape, 2)
            np.testing.assert_array_equal(result["hidden"], alone["hidden"])
            np.testing.assert_allclose(result["pooled"], alone["pooled"])
        await batcher.close()

    run(main())


def test_preferred_batch_sizes_pad_rows() -> None:
    async def main() -> None:
        model = Model()
        batcher = make(model, max_batch_size=8, max_queue_delay_us=50_000, preferred_batch_sizes=[4, 8])
        results = await asyncio.gather(*(batcher.submit(rows(i, 1), 1) for i in range(3)))
        assert [b["x"].shape[0] for b in model.batches] == [4]
        for i, result in enumerate(results):
            np.testing.assert_array_equal(result["y"], rows(i, 1)["x"] * 2)
        await batcher.close()

    run(main())


def test_drain_finishes_queued_work_then_refuses() -> None:
    async def main() -> None:
        model = Model()
        model.gate.clear()
        batcher = make(model, max_batch_size=1, max_queue_delay_us=0)
        pending = [asyncio.ensure_future(batcher.submit(rows(i, 1), 1)) for i in range(3)]
        await asyncio.sleep(0.01)
        drain = asyncio.ensure_future(batcher.drain())
        await asyncio.sleep(0.01)
        with pytest.raises(Unavailable):
            await batcher.submit(rows(9, 1), 1)
        model.gate.set()
        await drain
        assert all(task.done() and task.exception() is None for task in pending)
        await batcher.close()

    run(main())

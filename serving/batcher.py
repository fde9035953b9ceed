"""The dynamic batcher: one per served model, identical for every framework.

Requests are queued and merged into one forward pass of up to ``max_batch_size``
rows; the oldest queued request waits at most ``max_queue_delay`` for others to
join. The queue is bounded (``max_queue_size`` requests): beyond it requests are
shed with RESOURCE_EXHAUSTED. A request whose deadline passes while queued is
answered DEADLINE_EXCEEDED and never computed; a cancelled one is dropped. An error
in a forward pass reaches every request of that batch. Each request gets exactly its
own rows back.

Inputs with variable dimensions beyond the batch dimension (token sequences) are
padded to the batch's longest with the model's pad value; the k-th variable
dimension of each output is cut back to the request's own k-th variable size.
With preferred batch sizes, each batch is padded up to the next preferred size
(repeating its last row), which keeps compiled graphs on a few shapes.

Forward passes run on a thread pool with ``instances`` workers, never on the event
loop, so health and metadata RPCs stay responsive under load.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from serving.datatypes import TensorSpec
from serving.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from serving.metrics import ModelMetrics
from serving.settings import BatchingSettings

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
Predict = Callable[[Mapping[str, np.ndarray]], Arrays]


@dataclass(eq=False)
class _Request:
    inputs: Mapping[str, np.ndarray]
    rows: int
    future: asyncio.Future[Arrays]
    enqueued_ns: int
    deadline: float | None  # loop.time() by which the answer is due
    # Sizes of the variable (-1) non-batch dimensions, from the first ragged input.
    ragged_sizes: tuple[int, ...] = field(default=())


class DynamicBatcher:
    """Queue, merge, execute and split requests for one model."""

    def __init__(
        self,
        predict: Predict,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        settings: BatchingSettings,
        metrics: ModelMetrics,
        pad_values: Mapping[str, int | float] | None = None,
    ) -> None:
        self._predict = predict
        self._input_specs = {spec.name: spec for spec in inputs}
        self._output_specs = {spec.name: spec for spec in outputs}
        self._settings = settings
        self._metrics = metrics
        self._pad_values = dict(pad_values or {})
        self._ragged_inputs = [spec.name for spec in inputs if any(dim == -1 for dim in spec.shape[1:])]
        self._preferred = sorted(set(settings.preferred_batch_sizes))
        self._queue: collections.deque[_Request] = collections.deque()
        self._queued_rows = 0
        self._executor = ThreadPoolExecutor(max_workers=settings.instances, thread_name_prefix="model")
        self._slots = asyncio.Semaphore(settings.instances)
        self._wakeup = asyncio.Event()
        self._batch_ready = asyncio.Event()
        self._running: set[asyncio.Task[None]] = set()
        self._scheduler: asyncio.Task[None] | None = None
        self._accepting = False

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._accepting = True
        self._scheduler = asyncio.get_running_loop().create_task(self._schedule(), name="batcher")

    async def submit(self, inputs: Mapping[str, np.ndarray], rows: int, timeout: float | None = None) -> Arrays:
        """Queue one validated request of ``rows`` rows; its outputs when computed.

        ``timeout``: seconds left until the caller's deadline (None: no deadline).
        """
        if not self._accepting:
            raise Unavailable("server is shutting down; not accepting new requests")
        if len(self._queue) >= self._settings.max_queue_size:
            raise ResourceExhausted(f"queue full ({self._settings.max_queue_size} requests waiting); retry later")
        loop = asyncio.get_running_loop()
        request = _Request(
            inputs=inputs,
            rows=rows,
            future=loop.create_future(),
            enqueued_ns=time.perf_counter_ns(),
            deadline=None if timeout is None else loop.time() + timeout,
            ragged_sizes=self._ragged_sizes(inputs),
        )
        self._queue.append(request)
        self._queued_rows += rows
        self._metrics.queue_depth.set(len(self._queue))
        self._wakeup.set()
        if self._queued_rows >= self._settings.max_batch_size:
            self._batch_ready.set()
        try:
            return await request.future
        except asyncio.CancelledError:
            # The caller went away (client cancel or deadline): if still queued, the
            # scheduler skips it; if already computing, its rows are just discarded.
            request.future.cancel()
            raise

    async def drain(self) -> None:
        """Stop accepting, then wait until every queued and running batch is done."""
        self._accepting = False
        while self._queue or self._running:
            self._wakeup.set()
            await asyncio.sleep(0.005)

    async def close(self) -> None:
        await self.drain()
        if self._scheduler is not None:
            self._scheduler.cancel()
            await asyncio.gather(self._scheduler, return_exceptions=True)
        self._executor.shutdown(wait=True)

    # ---- scheduling ----

    def _ragged_sizes(self, inputs: Mapping[str, np.ndarray]) -> tuple[int, ...]:
        if not self._ragged_inputs:
            return ()
        name = self._ragged_inputs[0]
        spec = self._input_specs[name]
        shape = inputs[name].shape
        return tuple(shape[axis] for axis in range(1, len(spec.shape)) if spec.shape[axis] == -1)

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self._settings.max_queue_delay_us / 1e6
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._slots.acquire()
            try:
                if self._settings.dynamic_batching and delay > 0 and self._queued_rows < self._settings.max_batch_size:
                    oldest = self._queue[0].enqueued_ns
                    remaining = delay - (time.perf_counter_ns() - oldest) / 1e9
                    if remaining > 0:
                        # Wake on a full batch (submit sets the event) or when the oldest
                        # request has waited max_queue_delay, whichever comes first.
                        self._batch_ready.clear()
                        timer = loop.call_later(remaining, self._batch_ready.set)
                        try:
                            await self._batch_ready.wait()
                        finally:
                            timer.cancel()
                batch = self._take_batch(loop.time())
            except BaseException:
                self._slots.release()
                raise
            if not batch:
                self._slots.release()
                continue
            task = loop.create_task(self._execute(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _take_batch(self, now: float) -> list[_Request]:
        """Pop the next batch: FIFO, whole requests, expired/cancelled ones dropped."""
        batch: list[_Request] = []
        rows = 0
        limit = self._settings.max_batch_size if self._settings.dynamic_batching else 0
        while self._queue:
            request = self._queue[0]
            if request.future.done():  # cancelled by its caller while queued
                self._pop()
                continue
            if request.deadline is not None and now >= request.deadline:
                self._pop()
                waited_ms = (time.perf_counter_ns() - request.enqueued_ns) / 1e6
                request.future.set_exception(
                    DeadlineExceeded(f"deadline expired after {waited_ms:.1f} ms in the queue; not computed")
                )
                continue
            if batch and (rows + request.rows > limit or not self._compatible(batch[0], request)):
                break
            self._pop()
            batch.append(request)
            rows += request.rows
        self._metrics.queue_depth.set(len(self._queue))
        return batch

    def _pop(self) -> None:
        request = self._queue.popleft()
        self._queued_rows -= request.rows

    def _compatible(self, first: _Request, other: _Request) -> bool:
        """Requests with different variable sizes merge only when the model pads."""
        if first.ragged_sizes == other.ragged_sizes:
            return True
        return all(name in self._pad_values for name in self._ragged_inputs)

    # ---- execution ----

    async def _execute(self, batch: list[_Request]) -> None:
        loop = asyncio.get_running_loop()
        try:
            started = time.perf_counter_ns()
            for request in batch:
                self._metrics.queued(started - request.enqueued_ns)
            results = await loop.run_in_executor(self._executor, self._run, batch)
            for request, outputs in zip(batch, results, strict=True):
                if not request.future.done():
                    request.future.set_result(outputs)
        except Exception as err:  # one failure reaches every request of the batch
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(err)
        finally:
            self._slots.release()
            if self._queue:
                self._wakeup.set()

    def _run(self, batch: list[_Request]) -> list[Arrays]:
        """On a worker thread: merge, forward, split; records the batch's timings."""
        t0 = time.perf_counter_ns()
        merged, rows = merge(batch, self._input_specs, self._pad_values, self._preferred)
        t1 = time.perf_counter_ns()
        outputs = self._predict(merged)
        t2 = time.perf_counter_ns()
        results = split(outputs, batch, self._output_specs)
        t3 = time.perf_counter_ns()
        self._metrics.batch_done(rows, len(batch), t1 - t0, t2 - t1, t3 - t2)
        return results


def merge(
    batch: Sequence[_Request],
    specs: Mapping[str, TensorSpec],
    pad_values: Mapping[str, int | float],
    preferred: Sequence[int] = (),
) -> tuple[Arrays, int]:
    """Concatenate the requests' inputs along the batch dimension.

    Variable non-batch dimensions are padded to the longest in the batch; with
    preferred sizes, rows are padded up to the next one. Returns (inputs, rows)
    where rows counts the real and padding rows computed.
    """
    rows = sum(request.rows for request in batch)
    target = rows
    if preferred:
        index = bisect.bisect_left(preferred, rows)
        if index < len(preferred):
            target = preferred[index]
    merged: Arrays = {}
    for name, spec in specs.items():
        parts = [request.inputs[name] for request in batch]
        variable_axes = [axis for axis in range(1, len(spec.shape)) if spec.shape[axis] == -1]
        if variable_axes and len(parts) > 1:
            longest = [max(part.shape[axis] for part in parts) for axis in variable_axes]
            parts = [_pad_to(part, variable_axes, longest, pad_values.get(name, 0)) for part in parts]
        if target > rows:
            last = parts[-1][-1:]
            parts.append(np.repeat(last, target - rows, axis=0))
        merged[name] = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    return merged, target


def _pad_to(array: np.ndarray, axes: Sequence[int], sizes: Sequence[int], value: int | float) -> np.ndarray:
    widths = [(0, 0)] * array.ndim
    needs = False
    for axis, size in zip(axes, sizes, strict=True):
        if array.shape[axis] < size:
            widths[axis] = (0, size - array.shape[axis])
            needs = True
    return np.pad(array, widths, constant_values=value) if needs else array


def split(
    outputs: Mapping[str, np.ndarray], batch: Sequence[_Request], specs: Mapping[str, TensorSpec]
) -> list[Arrays]:
    """Each request's own rows of every output, variable dims cut to its sizes."""
    results: list[Arrays] = [{} for _ in batch]
    for name, array in outputs.items():
        spec = specs.get(name)
        variable_axes = [] if spec is None else [a for a in range(1, len(spec.shape)) if spec.shape[a] == -1]
        offset = 0
        for result, request in zip(results, batch, strict=True):
            part = array[offset : offset + request.rows]
            offset += request.rows
            if variable_axes and request.ragged_sizes:
                index: list[slice] = [slice(None)] * part.ndim
                for k, axis in enumerate(variable_axes[: len(request.ragged_sizes)]):
                    index[axis] = slice(0, request.ragged_sizes[k])
                part = part[tuple(index)]
            result[name] = part
    return results

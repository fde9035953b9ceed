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

Forward passes run on ``instances`` worker threads, never on the event loop, so
health and metadata RPCs stay responsive under load.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
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
    enqueued: float  # time.monotonic() when queued
    deadline: float | None  # time.monotonic() by which the answer is due
    # Sizes of the variable (-1) non-batch dimensions, from the first ragged input.
    ragged_sizes: tuple[int, ...] = field(default=())


class DynamicBatcher:
    """Queue, merge, execute and split requests for one model.

    ``submit`` runs on the event loop. Each model instance is a worker thread that
    forms a batch (one worker at a time, so a batch is never split between two
    half-empty passes), runs it, and hands every result back to the loop in one
    callback. Waiting for a batch to fill uses a condition variable, so
    ``max_queue_delay`` is honoured to the tens of microseconds, not to the event
    loop's millisecond timer.
    """

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
        self._limit = settings.max_batch_size if settings.dynamic_batching else 0
        self._delay = settings.max_queue_delay_us / 1e6 if settings.dynamic_batching else 0.0
        self._queue: collections.deque[_Request] = collections.deque()
        self._queued_rows = 0
        self._cond = threading.Condition()
        self._forming = threading.Lock()
        self._busy = 0
        self._stopping = False
        self._accepting = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._workers: list[threading.Thread] = []

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        for index in range(self._settings.instances):
            worker = threading.Thread(target=self._work, name=f"model-instance-{index}", daemon=True)
            worker.start()
            self._workers.append(worker)

    async def submit(self, inputs: Mapping[str, np.ndarray], rows: int, timeout: float | None = None) -> Arrays:
        """Queue one validated request of ``rows`` rows; its outputs when computed.

        ``timeout``: seconds left until the caller's deadline (None: no deadline).
        """
        if not self._accepting:
            raise Unavailable("server is shutting down; not accepting new requests")
        if len(self._queue) >= self._settings.max_queue_size:
            raise ResourceExhausted(f"queue full ({self._settings.max_queue_size} requests waiting); retry later")
        now = time.monotonic()
        request = _Request(
            inputs=inputs,
            rows=rows,
            future=asyncio.get_running_loop().create_future(),
            enqueued=now,
            deadline=None if timeout is None else now + timeout,
            ragged_sizes=self._ragged_sizes(inputs),
        )
        with self._cond:
            self._queue.append(request)
            self._queued_rows += rows
            self._cond.notify()
        self._metrics.queue_depth.set(len(self._queue))
        # If the caller goes away (client cancel or deadline), cancelling its task
        # cancels request.future at once: a worker that has not taken the request yet
        # skips it; one already computing it discards its rows.
        return await request.future

    async def drain(self) -> None:
        """Stop accepting, then wait until every queued and running batch is done."""
        self._accepting = False
        while self._queue or self._busy:
            await asyncio.sleep(0.005)

    async def close(self) -> None:
        await self.drain()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for worker in self._workers:
            await asyncio.to_thread(worker.join)

    def _ragged_sizes(self, inputs: Mapping[str, np.ndarray]) -> tuple[int, ...]:
        if not self._ragged_inputs:
            return ()
        name = self._ragged_inputs[0]
        spec = self._input_specs[name]
        shape = inputs[name].shape
        return tuple(shape[axis] for axis in range(1, len(spec.shape)) if spec.shape[axis] == -1)

    # ---- worker threads ----

    def _work(self) -> None:
        while True:
            with self._forming:
                batch, expired = self._next_batch()
            if batch is None:
                return
            if expired:
                self._post(self._fail_expired, expired)
            if not batch:
                self._done()
                continue
            try:
                results: list[Arrays] | BaseException = self._run(batch)
            except Exception as err:  # one failure reaches every request of the batch
                results = err
            self._post(self._deliver, batch, results)
            self._done()

    def _next_batch(self) -> tuple[list[_Request] | None, list[_Request]]:
        """Wait for work, then for the batch to fill or the oldest request's delay
        to pass; pop it. (None, []) when stopping with nothing left."""
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None, []
                self._cond.wait()
            if self._delay > 0:
                flush_at = self._queue[0].enqueued + self._delay
                while self._queued_rows < self._limit and not self._stopping:
                    remaining = flush_at - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            batch, expired = self._take_batch(time.monotonic())
            self._busy += 1
        self._metrics.queue_depth.set(len(self._queue))
        return batch, expired

    def _take_batch(self, now: float) -> tuple[list[_Request], list[_Request]]:
        """Pop the next batch: FIFO, whole requests; drops cancelled requests and
        returns the expired ones separately (never computed)."""
        batch: list[_Request] = []
        expired: list[_Request] = []
        rows = 0
        while self._queue:
            request = self._queue[0]
            if request.future.done():  # cancelled by its caller while queued
                self._pop()
                continue
            if request.deadline is not None and now >= request.deadline:
                self._pop()
                expired.append(request)
                continue
            if batch and (rows + request.rows > self._limit or not self._compatible(batch[0], request)):
                break
            self._pop()
            batch.append(request)
            rows += request.rows
        return batch, expired

    def _pop(self) -> None:
        request = self._queue.popleft()
        self._queued_rows -= request.rows

    def _compatible(self, first: _Request, other: _Request) -> bool:
        """Requests with different variable sizes merge only when the model pads."""
        if first.ragged_sizes == other.ragged_sizes:
            return True
        return all(name in self._pad_values for name in self._ragged_inputs)

    def _done(self) -> None:
        with self._cond:
            self._busy -= 1

    def _run(self, batch: list[_Request]) -> list[Arrays]:
        """Merge, forward, split; records the batch's timings."""
        t0 = time.perf_counter_ns()
        now = time.monotonic()
        for request in batch:
            self._metrics.queued(int((now - request.enqueued) * 1e9))
        merged, rows = merge(batch, self._input_specs, self._pad_values, self._preferred)
        t1 = time.perf_counter_ns()
        outputs = self._predict(merged)
        t2 = time.perf_counter_ns()
        results = split(outputs, batch, self._output_specs)
        t3 = time.perf_counter_ns()
        self._metrics.batch_done(rows, len(batch), t1 - t0, t2 - t1, t3 - t2)
        return results

    # ---- back on the event loop ----

    def _post(self, callback: Callable[..., None], *args: object) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            log.debug("event loop closed; dropping a batch's results")

    @staticmethod
    def _deliver(batch: list[_Request], results: list[Arrays] | BaseException) -> None:
        for index, request in enumerate(batch):
            if request.future.done():
                continue
            if isinstance(results, BaseException):
                request.future.set_exception(results)
            else:
                request.future.set_result(results[index])

    @staticmethod
    def _fail_expired(expired: list[_Request]) -> None:
        now = time.monotonic()
        for request in expired:
            if not request.future.done():
                waited_ms = (now - request.enqueued) * 1e3
                request.future.set_exception(
                    DeadlineExceeded(f"deadline expired after {waited_ms:.1f} ms in the queue; not computed")
                )


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

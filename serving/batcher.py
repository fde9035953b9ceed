"""The dynamic batcher: one per served model, identical for every framework.

Natural batching: a free model instance takes everything queued (up to
``max_batch_size`` rows) at once; while it computes, newcomers queue and form the next
batch. A lone request pays nothing, and under load batches form by themselves. An
optional ``max_queue_delay`` makes the oldest queued request wait that long for company
(fuller batches, at a latency cost); the default is 0, as in Triton.

There are no model threads: the calling threads take turns (leader/follower). A
request that finds a free instance runs the batch itself, on its own gRPC thread, so a
lone request crosses no thread boundary at all; requests that find every instance busy
queue and wait. A leader that has its own answer hands the next batch to a waiting
caller (one wake-up) and returns; it keeps leading only while nobody waits who could
take over (stream requests carry a callback, not a thread). At most ``instances``
leaders run at once.

Admission: the batcher learns its batch cycle (one batch's start to the next's, while
requests kept waiting) and refuses a request at once (RESOURCE_EXHAUSTED, nothing
computed) when the full batches queued ahead of it would keep it waiting past its own
deadline or past ``max_queue_wait`` (when set). Overload is therefore answered with
quick refusals while the admitted requests keep a bounded wait, instead of every request
queueing until its deadline. The queue is also bounded in requests (``max_queue_size``).
A request whose deadline passes while queued anyway is answered DEADLINE_EXCEEDED and
never computed; a cancelled one is dropped. An error in a forward pass reaches every
request of that batch and the batcher goes on; the leader that met it hands over as
usual, so no failure leaves the model without a runner. Each request gets exactly its
own rows back.

Inputs with variable dimensions beyond the batch dimension (token sequences) are padded
to the batch's longest with the model's pad value; the k-th variable dimension of each
output is cut back to the request's own k-th variable size. With preferred batch sizes,
each batch is padded up to the next preferred size (repeating its last row), which keeps
compiled graphs on a few shapes.
"""

from __future__ import annotations

import bisect
import collections
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from contract.datatypes import TensorSpec
from contract.errors import Cancelled, DeadlineExceeded, ResourceExhausted, Unavailable
from serving.metrics import ModelMetrics
from serving.settings import BatchingSettings

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
Predict = Callable[[Mapping[str, np.ndarray]], Arrays]
Callback = Callable[["Request"], None]

#: Weight of each new sample in the batch-cycle estimate (exponential moving average).
CYCLE_SMOOTHING = 0.2

#: Give the core to other ready threads (a no-op where the OS offers no sched_yield).
_yield_cpu: Callable[[], None] = getattr(os, "sched_yield", lambda: None)

# Request states (changed under the batcher's lock only).
QUEUED, RUNNING, FINISHED = 0, 1, 2


class Request:
    """One caller's rows, and their fate: ``outputs`` or ``error`` once FINISHED."""

    __slots__ = (
        "awake",
        "callback",
        "deadline",
        "enqueued",
        "error",
        "inputs",
        "outputs",
        "ragged_sizes",
        "rows",
        "shape_key",
        "state",
        "wake",
    )

    def __init__(
        self,
        inputs: Mapping[str, np.ndarray],
        rows: int,
        deadline: float | None,
        ragged_sizes: tuple[int, ...],
        callback: Callback | None,
        shape_key: tuple[int, ...] = (),
    ) -> None:
        self.inputs = inputs
        self.rows = rows
        #: time.monotonic() when queued, and by when the answer is due (None: no deadline).
        self.enqueued = 0.0
        self.deadline = deadline
        #: Sizes of the variable (-1) non-batch dimensions, from the first ragged input.
        self.ragged_sizes = ragged_sizes
        #: Sizes of every input's variable dimensions: requests merge unpadded only when these agree.
        self.shape_key = shape_key
        self.state = QUEUED
        self.outputs: Arrays | None = None
        self.error: BaseException | None = None
        #: A blocked caller waits on ``wake`` (held until it may go on); a streamed request
        #: has a ``callback`` instead, called once with the finished request.
        self.wake: Any = None
        self.callback = callback
        #: True while this request's caller runs batches (it led at once, or a leader handed
        #: it the next batch); it then needs no wake-up and cannot be handed another.
        self.awake = False


class DynamicBatcher:
    """Queue, merge, execute and split requests for one model (see the module docstring)."""

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
        self._metrics = metrics
        self._pad_values = dict(pad_values or {})
        self._ragged_inputs = [spec.name for spec in inputs if any(dim == -1 for dim in spec.shape[1:])]
        self._ragged_axes = (
            [axis for axis, dim in enumerate(self._input_specs[self._ragged_inputs[0]].shape) if axis and dim == -1]
            if self._ragged_inputs
            else []
        )
        self._all_padded = all(name in self._pad_values for name in self._ragged_inputs)
        self._preferred = sorted(set(settings.preferred_batch_sizes))
        self._limit = settings.max_batch_size if settings.dynamic_batching else 0
        self._delay = settings.max_queue_delay_us / 1e6 if settings.dynamic_batching else 0.0
        self._instances = settings.instances
        self._max_queue = settings.max_queue_size
        # Guards every field below; ``_changed`` wakes leaders waiting for a batch to fill
        # and ``drain`` waiting for the batcher to go idle.
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._queue: collections.deque[Request] = collections.deque()
        self._queued = 0  # requests in _queue still QUEUED (the rest are cancelled or expired)
        self._queued_rows = 0
        self._busy = 0  # leaders running
        # Admission: seconds from one batch's start to the next's while requests kept
        # waiting (None until measured), and (start, rows, end; inf while running) of the last.
        self._cycle: float | None = None
        self._last_batch: tuple[float, int, float] = (0.0, 0, -math.inf)
        self._max_wait = settings.max_queue_wait_ms / 1e3
        #: Seconds a forward pass takes (moving average of the latest; 0 until measured).
        self._compute = 0.0
        self._filling = 0  # leaders waiting for a batch to fill (max_queue_delay)
        self._accepting = False
        #: Requests queued when the latest batch was taken (before taking it): under load the
        #: depth between batches, where ``queue_depth`` read just after a batch left may be 0.
        self.depth_at_batch = 0
        metrics.bind_queue_depth(lambda: self._queued, lambda: self.depth_at_batch)

    @property
    def queue_depth(self) -> int:
        return self._queued

    @property
    def accepting(self) -> bool:
        return self._accepting

    def start(self) -> None:
        with self._lock:
            self._accepting = True

    # ---- callers ----

    def infer(
        self,
        inputs: Mapping[str, np.ndarray],
        rows: int,
        timeout: float | None = None,
        on_queued: Callable[[Request], object] | None = None,
        screened: bool = False,
    ) -> Arrays:
        """Compute one validated request of ``rows`` rows and return its outputs.

        ``timeout``: seconds left until the caller's deadline (None: no deadline). The
        calling thread may run batches (its own and others') while it waits.
        ``on_queued(request)`` runs when the request has to wait its turn, e.g. to
        ``cancel`` it if the client goes away. ``screened``: its wait was already judged
        (``serving.admission``, as the call arrived); only the queue bound is checked again.
        """
        request = self._request(inputs, rows, timeout, None)
        request.wake = threading.Lock()
        request.wake.acquire()
        if self._enqueue(request, screened):
            self._lead(request)
        elif on_queued is not None:
            on_queued(request)
        self._await(request)
        if request.error is not None:
            raise request.error
        assert request.outputs is not None
        return request.outputs

    def submit(self, inputs: Mapping[str, np.ndarray], rows: int, timeout: float | None, callback: Callback) -> Request:
        """Queue one validated request; ``callback(request)`` runs once it is finished.

        Does not wait for the answer, but when an instance is free the calling thread runs
        the batch at once (it is the leader), so the callback may run before this returns.
        """
        request = self._request(inputs, rows, timeout, callback)
        if self._enqueue(request):
            self._lead(request)
        return request

    def cancel(self, request: Request) -> None:
        """The caller went away: drop the request if it is still queued."""
        with self._lock:
            if request.state != QUEUED:
                return
            self._unqueue(request)
            request.error = Cancelled("the client cancelled the request")
            notify = self._notifiable(request)
        if notify:
            self._finish(request)

    def drain(self, timeout: float | None = None) -> bool:
        """Stop accepting, then wait until every queued and running batch is done.

        True when idle; False if ``timeout`` (seconds) ran out first.
        """
        with self._changed:
            self._accepting = False
            return self._changed.wait_for(lambda: not self._queued and not self._busy, timeout)

    # ---- queueing ----

    def _request(
        self, inputs: Mapping[str, np.ndarray], rows: int, timeout: float | None, callback: Callback | None
    ) -> Request:
        ragged: tuple[int, ...] = ()
        key: tuple[int, ...] = ()
        if self._ragged_axes:
            shape = inputs[self._ragged_inputs[0]].shape
            ragged = tuple(shape[axis] for axis in self._ragged_axes)
            key = ragged if len(self._ragged_inputs) == 1 else self._shape_key(inputs)
        deadline = None if timeout is None else time.monotonic() + timeout
        return Request(inputs, rows, deadline, ragged, callback, key)

    def _shape_key(self, inputs: Mapping[str, np.ndarray]) -> tuple[int, ...]:
        return tuple(
            size
            for name in self._ragged_inputs
            for axis, size in enumerate(inputs[name].shape)
            if axis and self._input_specs[name].shape[axis] == -1
        )

    def _enqueue(self, request: Request, screened: bool = False) -> bool:
        """Queue ``request``; True when its caller must lead (an instance was free).

        A ``screened`` request's wait was judged as its call arrived: judged again here, a
        moment later with its deadline that much closer, a request admitted at the margin
        would be refused in its handler thread after all, the dearest place to refuse it."""
        with self._lock:
            if not self._accepting:
                raise Unavailable("server is shutting down; not accepting new requests")
            now = time.monotonic()
            refused = self.refusal(request.rows, None if screened else request.deadline, now, screened)
            if refused is not None:
                self._metrics.refused(refused[0])
                raise ResourceExhausted(refused[1])
            request.enqueued = now
            self._queue.append(request)
            self._queued += 1
            self._queued_rows += request.rows
            if self._filling:
                self._changed.notify_all()
            if self._busy < self._instances:
                self._busy += 1
                request.awake = True
                return True
            return False

    def refusal(
        self, rows: int, deadline: float | None, now: float, bound_only: bool = False, arriving: int = 0
    ) -> tuple[str, str] | None:
        """Why a request of ``rows`` rows due at ``deadline`` (time.monotonic(); None: no
        deadline) is to be refused now, as (reason, message), or None to admit it.

        Reasons: ``queue_full`` (``max_queue_size`` requests wait), ``deadline`` (the full
        batches queued ahead of it, at the measured batch cycle, would keep it waiting past
        its deadline), ``max_wait`` (... past ``max_queue_wait``). Decided under the lock
        when queueing; also read without it (``serving.admission``), before a request is
        even received, where a stale figure errs by a request or two either way, and where
        ``arriving`` calls admitted before it are not queued yet (no handler thread has
        decoded them): they count as waiting, of the queue's mean rows each.
        ``bound_only``: only ``queue_full``.
        """
        queued = self._queued
        if queued + arriving >= self._max_queue:
            return "queue_full", f"queue full ({self._max_queue} requests waiting); retry later"
        cycle = self._cycle
        if cycle is None or not (queued or arriving) or bound_only:
            return None
        rows_ahead = self._queued_rows + arriving * (self._queued_rows / queued if queued else 1)
        batches_ahead = math.ceil((rows_ahead + rows) / max(self._limit, 1))
        wait = batches_ahead * cycle
        if deadline is not None and now + wait > deadline:
            return "deadline", (
                f"would wait about {wait * 1e3:.1f} ms for its batch, past its deadline in "
                f"{max(deadline - now, 0.0) * 1e3:.1f} ms; not queued, retry later"
            )
        if self._max_wait and wait > self._max_wait:
            return "max_wait", (
                f"would wait about {wait * 1e3:.1f} ms for its batch, over the server's "
                f"{self._max_wait * 1e3:.0f} ms limit; not queued, retry later"
            )
        return None

    def _measure(self, rows: int, oldest: float, now: float) -> None:
        """Learn the batch cycle as a batch starts (under the lock): when its oldest request
        was already waiting before the previous batch ended, the model never idled between
        the two, and one batch took the time between their starts."""
        previous_start, _, previous_end = self._last_batch
        if oldest <= previous_end and now > previous_start:
            sample = now - previous_start
            self._cycle = sample if self._cycle is None else self._cycle + CYCLE_SMOOTHING * (sample - self._cycle)
        self._last_batch = (now, rows, math.inf)

    def _ended(self, started: float) -> None:
        """The batch that started at ``started`` is done (under the lock)."""
        start, rows, _ = self._last_batch
        if start == started:
            self._last_batch = (start, rows, time.monotonic())

    def _unqueue(self, request: Request) -> None:
        """Mark a QUEUED request finished (under the lock); it stays in the deque, skipped."""
        request.state = FINISHED
        self._queued -= 1
        self._queued_rows -= request.rows

    def _await(self, request: Request) -> None:
        """Block until ``request`` is FINISHED; lead when handed a batch; give up at its
        deadline while it is still queued (answered DEADLINE_EXCEEDED, never computed).

        ``wake`` is held whenever the caller runs, so each wake-up (answer or promotion)
        releases it exactly once.
        """
        wake = request.wake
        while request.state != FINISHED:
            timeout = -1.0 if request.deadline is None else max(request.deadline - time.monotonic(), 0.0)
            if wake.acquire(timeout=timeout):
                if request.awake:  # promoted: a leader handed over its instance
                    self._lead(request)
                continue
            with self._lock:
                promoted = request.awake
                if not promoted and request.state == QUEUED:
                    self._unqueue(request)
                    request.error = self._expired(request, time.monotonic())
                    return
            wake.acquire()  # the promotion's or the answer's wake-up, imminent
            if promoted:
                self._lead(request)

    # ---- leading ----

    def _lead(self, own: Request) -> None:
        """Run batches until ``own`` is finished and a waiting caller can take over, or
        nothing is queued. The caller holds one of the ``instances`` slots (``_busy``),
        which it hands over or gives back."""
        successor: Request | None = None
        # Let the threads that are ready to run go first: on a busy core they are mostly
        # requests being decoded, which then join this batch instead of waiting for the
        # next one. With nothing else ready this returns at once. (Only on taking over:
        # a leader that yields before every batch starves some callers; mlp at c=8:
        # p99 3.8 ms once, 11 ms every time.)
        _yield_cpu()
        try:
            while True:
                with self._lock:
                    batch, expired = self._next_batch()
                    if not batch and not expired:
                        return
                    expired = [request for request in expired if self._notifiable(request)]
                    started = self._last_batch[0]
                for request in expired:
                    self._finish(request)
                if batch:
                    self._run(batch, started)
                if own.state == FINISHED:
                    with self._lock:
                        successor = self._successor()
                        if successor is not None:
                            successor.awake = True
                    if successor is not None:
                        successor.wake.release()
                        return
        except BaseException:
            # Outside a forward pass (whose errors reach its requests) this is a bug of ours:
            # say so, and let the finally clause hand the queue on rather than strand it.
            log.exception("the batcher failed while leading; handing its queue on")
            raise
        finally:
            handed_over = successor is not None
            with self._lock:
                own.awake = False
                if not handed_over and self._queued:  # only when leaving on an error
                    successor = self._successor()
                    if successor is not None:
                        successor.awake = True
                if successor is None:
                    self._busy -= 1
                    if not self._busy and not self._queued:
                        self._changed.notify_all()
            if successor is not None and not handed_over:
                successor.wake.release()

    @staticmethod
    def _notifiable(request: Request) -> bool:
        """Whether a request just FINISHED needs telling (under the lock): a caller that is
        awake (leading) finds its request finished when it looks."""
        return request.callback is not None or (request.wake is not None and not request.awake)

    def _successor(self) -> Request | None:
        """The oldest queued request whose caller is blocked and can lead (under the lock)."""
        for request in self._queue:
            if request.state == QUEUED and request.wake is not None and not request.awake:
                return request
        return None

    def _next_batch(self) -> tuple[list[Request], list[Request]]:
        """(batch, expired) popped from the queue (under the lock); waits for the batch to
        fill when a queue delay is set. Both empty: nothing left to run."""
        if self._delay > 0 and self._queued and self._queued_rows < self._limit:
            flush_at = self._oldest_enqueued() + self._delay
            self._filling += 1
            try:
                while self._queued and self._queued_rows < self._limit:
                    remaining = flush_at - time.monotonic()
                    if remaining <= 0:
                        break
                    self._changed.wait(remaining)
            finally:
                self._filling -= 1
        now = time.monotonic()
        self.depth_at_batch = self._queued
        batch: list[Request] = []
        expired: list[Request] = []
        rows = 0
        queue = self._queue
        while queue:
            request = queue[0]
            if request.state != QUEUED:  # cancelled or expired while queued
                queue.popleft()
                continue
            if request.deadline is not None and now + self._compute > request.deadline:
                # Expired, or would be before a batch could finish: computing it would only
                # take the model from requests that can still make their deadline.
                queue.popleft()
                self._unqueue(request)
                request.error = self._expired(request, now)
                expired.append(request)
                continue
            if batch and (rows + request.rows > self._limit or not self._compatible(batch[0], request)):
                break
            queue.popleft()
            request.state = RUNNING
            self._queued -= 1
            self._queued_rows -= request.rows
            batch.append(request)
            rows += request.rows
        if batch:
            self._measure(rows, batch[0].enqueued, now)
        return batch, expired

    def _oldest_enqueued(self) -> float:
        for request in self._queue:
            if request.state == QUEUED:
                return request.enqueued
        return time.monotonic()

    def _compatible(self, first: Request, other: Request) -> bool:
        """Requests with different variable sizes merge only when the model pads them."""
        return first.shape_key == other.shape_key or self._all_padded

    def _expired(self, request: Request, now: float) -> DeadlineExceeded:
        waited_ms = (now - request.enqueued) * 1e3
        assert request.deadline is not None
        if now >= request.deadline:
            return DeadlineExceeded(f"deadline expired after {waited_ms:.1f} ms in the queue; not computed")
        return DeadlineExceeded(
            f"deadline due in {(request.deadline - now) * 1e3:.1f} ms, before a batch could finish (about "
            f"{self._compute * 1e3:.1f} ms), after {waited_ms:.1f} ms in the queue; not computed"
        )

    def _run(self, batch: list[Request], started: float) -> None:
        """Merge, forward, split, deliver; one failure reaches every request of the batch."""
        t0 = time.perf_counter_ns()
        try:
            merged, rows = merge(batch, self._input_specs, self._pad_values, self._preferred)
            t1 = time.perf_counter_ns()
            outputs = self._predict(merged)
            t2 = time.perf_counter_ns()
            padded = len(batch) > 1 and any(r.shape_key != batch[0].shape_key for r in batch)
            results = split(outputs, batch, self._output_specs, padded)
            t3 = time.perf_counter_ns()
            forward = (t2 - t1) / 1e9
            smoothed = self._compute + CYCLE_SMOOTHING * (forward - self._compute)
            self._compute = smoothed if self._compute else forward
            self._metrics.batch_done(rows, [started - r.enqueued for r in batch], t1 - t0, t2 - t1, t3 - t2)
        except BaseException as err:
            error = err if isinstance(err, Exception) else RuntimeError(f"forward pass aborted by {err!r}")
            for request in batch:
                request.error = error
        else:
            for request, result in zip(batch, results, strict=True):
                request.outputs = result
        with self._lock:
            self._ended(started)
            for request in batch:
                request.state = FINISHED
            notify = [request for request in batch if self._notifiable(request)]
        for request in notify:
            self._finish(request)

    @staticmethod
    def _finish(request: Request) -> None:
        """Tell a finished request's caller: wake its thread or run its callback."""
        if request.callback is not None:
            try:
                request.callback(request)
            except Exception:
                log.exception("a request's completion callback failed")
        elif request.wake is not None:
            request.wake.release()


def merge(
    batch: Sequence[Request],
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
    if len(batch) == 1 and target == rows:
        return dict(batch[0].inputs), rows
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
    outputs: Mapping[str, np.ndarray], batch: Sequence[Request], specs: Mapping[str, TensorSpec], padded: bool = False
) -> list[Arrays]:
    """Each request's own rows of every output; when the batch was ``padded`` (requests of different
    lengths), outputs' variable dims cut back to each request's lengths (its first ragged input's)."""
    if not padded and len(batch) == 1:
        rows = batch[0].rows
        return [{name: array if array.shape[0] == rows else array[:rows] for name, array in outputs.items()}]
    results: list[Arrays] = [{} for _ in batch]
    for name, array in outputs.items():
        spec = specs.get(name)
        variable_axes = [] if spec is None else [a for a in range(1, len(spec.shape)) if spec.shape[a] == -1]
        offset = 0
        for result, request in zip(results, batch, strict=True):
            part = array[offset : offset + request.rows]
            offset += request.rows
            if padded and variable_axes and request.ragged_sizes:
                index: list[slice] = [slice(None)] * part.ndim
                for k, axis in enumerate(variable_axes[: len(request.ragged_sizes)]):
                    index[axis] = slice(0, request.ragged_sizes[k])
                part = part[tuple(index)]
            result[name] = part
    return results

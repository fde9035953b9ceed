"""Admission before a handler thread: refuse ModelInfer calls the queue cannot serve, in
grpcio's own polling thread, before the request is even received.

grpcio's synchronous server takes each new call in the one thread that polls the transport
(``_handle_call``): it finds the method's handler, refuses the call itself when
``maximum_concurrent_rpcs`` are in flight (one status batch, nothing read), or hands it to
the thread pool. For a server whose pool is an ``AdmittingPool``, a ModelInfer call is first
checked against ``refusal(deadline, arriving)`` (the served model's batcher: queue full, or a
wait past the call's deadline or ``--max-queue-wait-ms``, from the figures it keeps, counting
the calls admitted before it that still wait for a handler thread; see
``serving.batcher.DynamicBatcher.refusal``) and, when refused, answered RESOURCE_EXHAUSTED
with the reason in that same cheap way: no handler thread, no message read, no decoding.
Admitted calls go to the pool as before, and the batcher decides again, under its lock,
once the request is decoded (a check made without the lock may be off by a request or two).

Why not refuse in the handler threads: the handler pool is sized for the whole queue
(``--max-queue-size``), and at twice the peak a refusal per admitted request then wakes a
thread that competes for the GIL with the forward pass. Measured (resnet, 1 s deadlines,
2x the peak, the pool sized so but no early check): goodput fell to 0.23x (torch) and 0.30x
(tensorflow) of the peak, refusals took 383 / 990 ms at p99.

This wraps a private function of grpcio's ``_server`` module (and uses its ``_RPCState``
and ``_reject_rpc``), only where its signature is the one this was written for (grpcio
1.81); elsewhere ``AdmittingPool`` says so once and is a plain pool: the batcher then
refuses in the handler threads, correctly but dearer. ``tests/integration/test_admission.py``
fails if the early path is not taken.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

from grpc import _server as grpc_server
from grpc._cython import cygrpc  # type: ignore[attr-defined]

log = logging.getLogger(__name__)

#: (reason, message) of a refusal; see ``serving.metrics.REFUSAL_REASONS``.
Refusal = tuple[str, str]
#: ``refusal(deadline, arriving)`` -> a refusal or None. ``deadline``: time.time() seconds
#: (None: none); ``arriving``: calls admitted before it that no handler thread has taken yet
#: (invisible to the batcher's queue until decoded, but ahead of this call all the same).
Check = Callable[[float | None, int], Refusal | None]

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"

_HANDLE_CALL: Callable[..., Any] | None = getattr(grpc_server, "_handle_call", None)
_REJECT: Callable[..., Any] | None = getattr(grpc_server, "_reject_rpc", None)
_RPC_STATE: Callable[[], Any] | None = getattr(grpc_server, "_RPCState", None)


def _expected_hook() -> bool:
    """Whether this grpcio calls ``_handle_call`` as the one we wrap was written for."""
    if _HANDLE_CALL is None or _REJECT is None or _RPC_STATE is None or not hasattr(cygrpc, "StatusCode"):
        return False
    try:
        parameters = list(inspect.signature(_HANDLE_CALL).parameters)
    except (TypeError, ValueError):
        return False
    return parameters == ["rpc_event", "method_with_handler", "interceptor_pipeline", "thread_pool",
                          "concurrency_exceeded"]  # fmt: skip


SUPPORTED = _expected_hook()


class AdmittingPool(futures.ThreadPoolExecutor):
    """The gRPC handler pool of one server, carrying its ModelInfer admission (module
    docstring): ``admit(check)`` once the server is built; ``refused`` counts the calls
    refused before a handler thread."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "") -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self._check: Check | None = None
        self._over_cap: Callable[[], None] = lambda: None
        self.refused = 0
        self._wanted = 0  # threads asked of the spawner, not started yet
        self._spawn = threading.Condition()
        self._spawner: threading.Thread | None = None
        if not SUPPORTED:
            log.warning("this grpcio has no hook for early admission: requests are refused in handler threads")

    def admit(self, check: Check, over_cap: Callable[[], None] | None = None) -> None:
        """``check``: the admission rules; ``over_cap()``: told of each ModelInfer call that
        grpcio refuses for ``maximum_concurrent_rpcs`` (to count it)."""
        self._check = check
        if over_cap is not None:
            self._over_cap = over_cap

    def _adjust_thread_count(self) -> None:
        """A call was queued for the pool (grpcio's polling thread): with no idle thread, one
        more is started, but by the spawner thread, not here. ``Thread.start`` waits for the
        new thread to run, which on a busy core took the polling thread milliseconds per
        thread: a queue filling up (a thread per call) held every call behind it, refusals
        included (resnet at 2x the peak: refusals 60-116 ms at p99 while the pool grew)."""
        if self._idle_semaphore.acquire(timeout=0):
            return
        with self._spawn:
            self._wanted += 1
            if self._spawner is None:
                self._spawner = threading.Thread(target=self._spawn_threads, name="grpc-spawner", daemon=True)
                self._spawner.start()
            self._spawn.notify()

    def _spawn_threads(self) -> None:
        while True:
            with self._spawn:
                while not self._wanted:
                    self._spawn.wait()
                self._wanted -= 1
            if self._shutdown:
                return
            # Starts one unless a thread went idle meanwhile (or the pool is at its size).
            super()._adjust_thread_count()

    def screen(self, rpc_event: Any, method_with_handler: Any) -> Any:
        """grpcio's polling thread, a call just arrived: its refused state, or None to handle it."""
        check = self._check
        if check is None:
            return None
        method = method_with_handler.name() or rpc_event.call_details.method.decode()
        if method != MODEL_INFER:
            return None
        refusal = check(rpc_event.call_details.deadline, self._work_queue.qsize())
        if refusal is None:
            return None
        assert _RPC_STATE is not None
        assert _REJECT is not None
        state = _RPC_STATE()
        _REJECT(rpc_event, state, cygrpc.StatusCode.resource_exhausted, refusal[1].encode())
        self.refused += 1
        return state


def _handle_call(
    rpc_event: Any, method_with_handler: Any, interceptor_pipeline: Any, thread_pool: Any, concurrency_exceeded: bool
) -> tuple[Any, Any]:
    """grpcio's ``_handle_call``, with an ``AdmittingPool``'s admission first (polling thread)."""
    if isinstance(thread_pool, AdmittingPool) and rpc_event.success:
        if concurrency_exceeded:  # grpcio refuses it below; counted here
            if (method_with_handler.name() or rpc_event.call_details.method.decode()) == MODEL_INFER:
                thread_pool._over_cap()
        else:
            refused = thread_pool.screen(rpc_event, method_with_handler)
            if refused is not None:
                return refused, None
    assert _HANDLE_CALL is not None
    handled: tuple[Any, Any] = _HANDLE_CALL(
        rpc_event, method_with_handler, interceptor_pipeline, thread_pool, concurrency_exceeded
    )
    return handled


if SUPPORTED:
    grpc_server._handle_call = _handle_call


def wall_to_monotonic(deadline: float | None, margin: float, longest: float) -> float | None:
    """A call's deadline (time.time() seconds, as grpcio gives it) in time.monotonic()
    seconds, ``margin`` earlier; None when there is none (further than ``longest`` seconds)."""
    if deadline is None:
        return None
    left = deadline - time.time()
    if left > longest:
        return None
    return time.monotonic() + left - margin

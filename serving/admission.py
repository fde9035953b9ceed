"""Admission before a handler thread: refuse ModelInfer calls the queue cannot serve, in
grpcio's own polling thread, before the request is even received.

grpcio's synchronous server hands every call to its thread pool (``submit``) from the one
thread that polls the transport. ``AdmittingPool`` is that pool: for a ModelInfer call it
first asks ``refusal(deadline)`` (the served model's batcher: queue full, or a wait past the
call's deadline or ``--max-queue-wait-ms``, from the figures it keeps; see
``serving.batcher.DynamicBatcher.refusal``) and, when refused, answers RESOURCE_EXHAUSTED with
the reason right there: no handler thread, no message read, no decoding. Admitted calls go to
the pool as before, and the batcher decides again, under its lock, once the request is
decoded (a pre-check made without the lock may be off by a request or two either way).

Why not refuse in the handler threads: the handler pool is sized for the whole queue
(``--max-queue-size``), and at twice the peak a refusal per admitted request then wakes a
thread that competes for the GIL with the forward pass. Measured (resnet, 1 s deadlines,
2x the peak): goodput fell to 0.23x (torch) and 0.30x (tensorflow) of the peak, refusals
took 383 / 990 ms at p99. Refused in the polling thread: docs/serving.md#admission.

This leans on two private names of grpcio's ``_server`` module (the pooled unary handler
and ``_abort``). Where they are missing (another grpcio), ``AdmittingPool`` says so once and
is a plain pool: the batcher then refuses in the handler threads, correctly but dearer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

from grpc import _server as grpc_server
from grpc._cython import cygrpc  # type: ignore[attr-defined]

log = logging.getLogger(__name__)

#: (reason, message) of a refusal; see ``serving.metrics.REFUSAL_REASONS``.
Refusal = tuple[str, str]
#: ``refusal(deadline)``: deadline in time.time() seconds (None: none) -> a refusal or None.
Check = Callable[[float | None], Refusal | None]

_UNARY = getattr(grpc_server, "_unary_response_in_pool", None)
_ABORT = getattr(grpc_server, "_abort", None)
SUPPORTED = _UNARY is not None and _ABORT is not None and hasattr(cygrpc, "StatusCode")


class AdmittingPool(futures.ThreadPoolExecutor):
    """The gRPC handler pool, with ModelInfer's admission in front of it (module docstring).

    ``behavior``: the (guarded) ModelInfer function registered with the server; ``check``
    decides. Set both with ``admit`` once the server is built.
    """

    def __init__(self, max_workers: int, thread_name_prefix: str = "") -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self._behavior: object = None
        self._check: Check | None = None
        self.refused = 0
        if not SUPPORTED:
            log.warning("this grpcio has no hook for early admission: requests are refused in handler threads")

    def admit(self, behavior: object, check: Check) -> None:
        self._behavior = behavior
        self._check = check

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future[Any]:
        # grpcio: submit(context.run, _unary_response_in_pool, rpc_event, state, behavior, ...)
        if len(args) > 3 and args[0] is _UNARY and args[3] is self._behavior and self._check is not None:
            refused = self._refuse(args[1], args[2])
            if refused is not None:
                return refused
        return super().submit(fn, *args, **kwargs)

    def _refuse(self, rpc_event: Any, state: Any) -> futures.Future[Any] | None:
        assert self._check is not None
        assert _ABORT is not None
        deadline = rpc_event.call_details.deadline
        refusal = self._check(deadline)
        if refusal is None:
            return None
        # Under the call's condition already (grpcio holds it around submit); reentrant.
        with state.condition:
            _ABORT(state, rpc_event.call, cygrpc.StatusCode.resource_exhausted, refusal[1].encode())
        self.refused += 1
        done: futures.Future[Any] = futures.Future()
        done.set_result(None)
        return done


def wall_to_monotonic(deadline: float | None, margin: float, longest: float) -> float | None:
    """A call's deadline (time.time() seconds, as grpcio gives it) in time.monotonic()
    seconds, ``margin`` earlier; None when there is none (further than ``longest`` seconds)."""
    if deadline is None:
        return None
    left = deadline - time.time()
    if left > longest:
        return None
    return time.monotonic() + left - margin

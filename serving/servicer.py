"""GRPCInferenceService: a thin gRPC adapter over the served models' runtimes.

Each method reads what the transport knows (deadline, cancellation, the stream) and
hands the request to a ``ModelRuntime``; errors are raised as ``contract.errors`` and
turned into status codes by ``serving.rpc_boundary`` (installed around every method).
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from contract.errors import ModelNotFound, ServingError, Unavailable
from contract.protocol import inference_pb2 as pb
from contract.protocol import inference_pb2_grpc as pb_grpc
from serving.admission import Refusal, wall_to_monotonic
from serving.batcher import FINISHED, Request
from serving.rpc_boundary import status_of
from serving.runtime import ModelRuntime, ServedModel

log = logging.getLogger(__name__)

EXTENSIONS = ("model_configuration", "statistics")
SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
#: Deadlines further away than this (a year) count as none.
MAX_DEADLINE_S = 365 * 24 * 3600.0
#: A queued request gives up this long before its deadline, so its answer arrives in time.
DEADLINE_MARGIN_S = 0.005


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The Open Inference Protocol service over a set of model runtimes."""

    def __init__(self, server_name: str, server_version: str) -> None:
        self.server_name = server_name
        self.server_version = server_version
        self.models: dict[str, ServedModel] = {}
        #: Every model this server is to serve, loaded or not yet (UNAVAILABLE until loaded).
        self.configured: set[str] = set()
        #: Models whose artifact could not be loaded, and why (UNAVAILABLE, saying so).
        self.failed: dict[str, str] = {}
        self.draining = False
        #: Whether ModelInfer calls were admitted as they arrived (``refusal``, serving.admission).
        self.screened = False
        #: Whether the other workers of this server serve too (serving.workers); alone: yes.
        self.peers_ready: Callable[[], bool] = lambda: True

    def add(self, runtime: ModelRuntime) -> None:
        """Serve ``runtime`` as its model's version (the model's first, or one more)."""
        name = runtime.model.name
        served = self.models.get(name)
        if served is None:
            served = ServedModel(name)
            served.add(runtime)
            self.models = {**self.models, name: served}
        else:
            served.add(runtime)

    def runtimes(self) -> list[ModelRuntime]:
        """Every loaded version of every model."""
        return [runtime for served in self.models.values() for runtime in served.runtimes()]

    @property
    def ready(self) -> bool:
        return (
            bool(self.models)
            and not self.draining
            and all(runtime.ready for runtime in self.runtimes())
            and self.peers_ready()
        )

    def _served(self, name: str) -> ServedModel:
        served = self.models.get(name)
        if served is None:
            if name in self.failed:
                raise Unavailable(f"model {name!r} is not available: {self.failed[name]}")
            if name in self.configured:
                raise Unavailable(f"model {name!r} is not ready (still loading); retry later")
            raise ModelNotFound(f"unknown model {name!r}; this server serves {sorted(self.configured)}")
        return served

    def _model(self, name: str, version: str = "") -> ModelRuntime:
        return self._served(name).get(version)

    def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.ready)

    def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        runtime = self._model(request.name, request.version)
        return pb.ModelReadyResponse(ready=runtime.ready and not self.draining)

    def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=self.server_name, version=self.server_version, extensions=EXTENSIONS)

    def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        served = self._served(request.name)
        return served.get(request.version).metadata(served.versions)

    def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=self._model(request.name, request.version).config())

    def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> pb.ModelStatisticsResponse:
        # The versions of a model share its figures: one entry per model.
        if request.name:
            runtimes = [self._model(request.name, request.version)]
        else:
            runtimes = [served.latest for served in self.models.values()]
        return pb.ModelStatisticsResponse(model_stats=[runtime.metrics.statistics() for runtime in runtimes])

    def refusal(self, deadline: float | None, arriving: int = 0) -> Refusal | None:
        """Admission before a ModelInfer call is received (``serving.admission``): the refusal
        when every served model would refuse a one-row request due at ``deadline`` (time.time()
        seconds; None: none) behind ``arriving`` calls admitted before it and not decoded yet,
        so that whichever model it names, it would be refused. Lock-free. None while any model
        is not serving (its handler answers UNAVAILABLE, as usual)."""
        runtimes = []
        for served in self.models.values():
            runtime = served.newest
            # An empty queue admits a request (the common case: decided without a clock).
            if runtime is None or runtime.unavailable is not None or not (runtime.batcher.queue_depth or arriving):
                return None
            runtimes.append(runtime)
        started = time.perf_counter_ns()
        due = wall_to_monotonic(deadline, DEADLINE_MARGIN_S, MAX_DEADLINE_S)
        now = time.monotonic()
        first: tuple[ModelRuntime, Refusal] | None = None
        for runtime in runtimes:
            refused = runtime.batcher.refusal(1, due, now, arriving=arriving)
            if refused is None:
                return None
            if first is None:
                first = (runtime, refused)
        if first is None:
            return None
        runtime, refused = first
        runtime.metrics.refused_unseen(refused[0], time.perf_counter_ns() - started)
        return refused

    def over_cap(self) -> None:
        """grpcio refused a ModelInfer call: ``--grpc-threads`` calls in flight (``serving.admission``).
        Counted against the model the call most likely named (the first served)."""
        for served in self.models.values():
            runtime = served.newest
            if runtime is not None:
                runtime.metrics.refused_unseen("in_flight", 0)
                return

    def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.ServicerContext) -> pb.ModelInferResponse:
        runtime = self._served(request.model_name).acquire(request.model_version)

        def on_queued(queued: Request) -> None:
            # Called on every termination of the RPC; only a client's cancel finds it still queued.
            context.add_callback(functools.partial(runtime.batcher.cancel, queued))

        try:
            # With several models the early check refused only what every model would refuse.
            screened = self.screened and len(self.models) == 1
            return runtime.infer(request, time_left(context), on_queued, screened)
        finally:
            runtime.release()

    def ModelStreamInfer(
        self, request_iterator: Iterator[pb.ModelInferRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ModelStreamInferResponse]:
        """Requests of a stream are served concurrently (batched with everything else);
        each reply carries its request's id, errors arrive as ``error_message`` and the
        stream goes on. Replies come in completion order."""
        replies: queue.SimpleQueue[pb.ModelStreamInferResponse | None] = queue.SimpleQueue()
        sent = [0]
        pending: dict[Request, ModelRuntime] = {}  # queued, so to cancel if the stream ends
        lock = threading.Lock()

        def reply_to(
            request: pb.ModelInferRequest, queued: list[Request] | None = None, held: ModelRuntime | None = None
        ) -> Any:
            def reply(response: pb.ModelInferResponse | None, error: BaseException | None) -> None:
                if held is not None:
                    held.release()
                if queued:
                    with lock:
                        pending.pop(queued[0], None)
                replies.put(
                    pb.ModelStreamInferResponse(infer_response=response)
                    if error is None
                    else _stream_error(request, error)
                )

            return reply

        def read() -> None:
            try:
                for request in request_iterator:
                    sent[0] += 1
                    try:
                        runtime = self._served(request.model_name).acquire(request.model_version)
                    except ServingError as err:
                        reply_to(request)(None, err)
                        continue
                    holder: list[Request] = []
                    queued = runtime.submit(request, time_left(context), reply_to(request, holder, runtime))
                    if queued is not None:
                        holder.append(queued)
                        with lock:  # a request already answered is never pending
                            if queued.state != FINISHED:
                                pending[queued] = runtime
            except Exception as err:  # the client went away mid-stream
                log.debug("stream reader stopped: %r", err)
            finally:
                replies.put(None)

        def ended() -> None:
            # The stream is over (done, cancelled or expired): drop what it still has queued.
            with lock:
                left = list(pending.items())
            for queued, runtime in left:
                runtime.batcher.cancel(queued)
            replies.put(None)

        context.add_callback(ended)
        threading.Thread(target=read, name="stream-reader", daemon=True).start()
        received = 0
        reading = True
        while reading or received < sent[0]:
            reply = replies.get()
            if reply is None:
                if not context.is_active():
                    return
                reading = False
                continue
            received += 1
            yield reply


def time_left(context: grpc.ServicerContext) -> float | None:
    """Seconds the server has for the call: until its deadline less ``DEADLINE_MARGIN_S``, so
    that a request that expires queued is answered by us (DEADLINE_EXCEEDED, "not computed")
    before the transport's own timer fires. None when the client set no deadline (grpcio then
    reports the time left until one centuries away, too far for any timer)."""
    left = context.time_remaining()
    return None if left is None or left > MAX_DEADLINE_S else max(left - DEADLINE_MARGIN_S, 0.0)


def _stream_error(request: pb.ModelInferRequest, error: BaseException) -> pb.ModelStreamInferResponse:
    """A stream's in-band error reply: ``CODE: message``, the stream goes on."""
    code, message = status_of(error, request, "ModelStreamInfer")
    return pb.ModelStreamInferResponse(
        error_message=f"{code.name}: {message}",
        infer_response=pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        ),
    )

"""Blocking client for the Open Inference Protocol servers: numpy in, numpy out.

Every call has a deadline (the client's ``timeout`` unless the call passes its own; a
stream's covers the whole stream), failures raise ``client.errors.InferenceServerError``
subclasses, and a call that failed with UNAVAILABLE is retried when that cannot run it
twice (see ``client.RetryPolicy``). What each call sends, its tries and its errors come
from ``client._base.BaseInferenceClient``; this module only blocks on the network.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TypeVar

import grpc
import numpy as np

from client import _calls
from client._base import BaseInferenceClient
from client._calls import Call, InferEncoder, ModelMetadata, ServerMetadata, StreamRequests
from client._retry import ReadinessPoll
from client.errors import InferenceServerError, from_rpc_error
from contract.protocol import inference_pb2 as pb

T = TypeVar("T")


class InferenceClient(BaseInferenceClient[grpc.Channel]):
    """Talks to one server over gRPC channels (``channels``, default one); use as a context
    manager or call ``close()``. Arguments: ``BaseInferenceClient.__init__``.
    """

    def _open_channels(self) -> list[grpc.Channel]:
        return self._options.open_channels(grpc.secure_channel, grpc.insecure_channel)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _call(self, call: Call[T], timeout: float | None, *, wait_for_ready: bool | None = None) -> T:
        attempts, method = self._prepare(call, timeout)
        while True:
            try:
                response = method(
                    call.request,
                    timeout=attempts.timeout(),
                    metadata=self._metadata,
                    wait_for_ready=wait_for_ready,
                )
            except grpc.RpcError as err:
                error = from_rpc_error(err)
                delay = attempts.retry_after(error)
                if delay is None:
                    if error.code in call.fallback:
                        return call.fallback[error.code]
                    raise attempts.final(error) from err
                time.sleep(delay)
            else:
                return call.parse(response)

    def server_live(self, *, timeout: float | None = None) -> bool:
        return self._call(_calls.server_live(), timeout)

    def server_ready(self, *, timeout: float | None = None) -> bool:
        return self._call(_calls.server_ready(), timeout)

    def model_ready(self, model: str, version: str = "", *, timeout: float | None = None) -> bool:
        return self._call(_calls.model_ready(model, version), timeout)

    def server_metadata(self, *, timeout: float | None = None) -> ServerMetadata:
        return self._call(_calls.server_metadata(), timeout)

    def model_metadata(self, model: str, version: str = "", *, timeout: float | None = None) -> ModelMetadata:
        return self._call(_calls.model_metadata(model, version), timeout)

    def model_config(self, model: str, version: str = "", *, timeout: float | None = None) -> pb.ModelConfig:
        return self._call(_calls.model_config(model, version), timeout)

    def model_statistics(
        self, model: str = "", version: str = "", *, timeout: float | None = None
    ) -> list[pb.ModelStatistics]:
        """Statistics of one model, or of every model when ``model`` is empty."""
        return self._call(_calls.model_statistics(model, version), timeout)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """grpc.health.v1 status: SERVING, NOT_SERVING, or SERVICE_UNKNOWN for a service the server lacks."""
        return self._call(_calls.health(service), timeout)

    def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        *,
        version: str = "",
        request_id: str = "",
        timeout: float | None = None,
        raw: bool = True,
        datatypes: Mapping[str, str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Run one inference; returns the outputs by name (all of them when ``outputs`` is None).

        ``raw=False`` sends typed contents (not possible for FP16/BF16); ``datatypes``
        overrides the datatype inferred from an input's dtype (e.g. ``{"x": "BF16"}``).
        """
        encoder = InferEncoder(model, outputs, version, request_id, raw, datatypes)
        return self._call(_calls.infer(encoder, inputs), timeout)

    def stream_infer(
        self,
        model: str,
        requests: Iterable[Mapping[str, np.ndarray]],
        outputs: Sequence[str] | None = None,
        *,
        version: str = "",
        timeout: float | None = None,
        raw: bool = True,
        datatypes: Mapping[str, str] | None = None,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Send ``requests`` over one ModelStreamInfer call; yield their outputs in request order.

        Requests are pulled from ``requests`` as the stream goes and get ids the client
        chooses; replies that a concurrent server sends early are held back until their
        turn. The deadline covers the whole stream. A reply carrying ``error_message``
        raises the matching InferenceServerError in its turn (see
        ``client.errors.from_stream_error``) and ends the stream; an exception while
        producing or encoding a request is raised after the replies to the requests
        before it. Never retried.
        """
        source = StreamRequests(InferEncoder(model, outputs, version, "", raw, datatypes), requests)
        attempt, call = self._start_stream(source, timeout)
        try:
            for response in call:
                yield from source.replies(response)
        except grpc.RpcError as err:
            raise attempt.final(from_rpc_error(err)) from err
        finally:
            call.cancel()
        source.finish()

    def wait_until_ready(self, timeout: float = 30.0, *, model: str = "", interval: float = 0.1) -> None:
        """Poll ServerReady (or ModelReady of ``model``) until it says ready; DeadlineExceededError after ``timeout``.

        Polls wait for the channel to connect, so a server that is still starting is fine.
        """
        poll = ReadinessPoll(timeout, interval)
        call = self._readiness(model)
        while (remaining := poll.remaining()) > 0:
            try:
                if self._call(call, remaining, wait_for_ready=True):
                    return
                poll.last = "not ready"
            except InferenceServerError as error:
                poll.last = str(error)
            pause = poll.pause()
            if pause is None:
                break
            time.sleep(pause)
        raise poll.expired()

"""Blocking client for the Open Inference Protocol servers: numpy in, numpy out.

One channel per client. Every call has a deadline (the client's ``timeout`` unless the
call passes its own; a stream's covers the whole stream), failures raise
``client.errors.InferenceServerError`` subclasses, and a call that failed with UNAVAILABLE
is retried when that cannot run it twice (see ``client.RetryPolicy``).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2_grpc

from client import _common
from client._common import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TIMEOUT,
    Call,
    ClientOptions,
    InferEncoder,
    ModelMetadata,
    ReadinessPoll,
    RetryPolicy,
    ServerMetadata,
    StreamRequests,
)
from client.errors import InferenceServerError, from_rpc_error
from contract.protocol import inference_pb2 as pb
from contract.protocol import inference_pb2_grpc as pb_grpc

T = TypeVar("T")


class InferenceClient:
    """Talks to one server over one gRPC channel; use as a context manager or call ``close()``.

    Args:
        target: ``HOST:PORT``.
        timeout: deadline of every call that passes none of its own, seconds (every call has one).
        tls: use TLS (system roots unless ``root_certificates`` is given; giving it implies TLS).
        root_certificates: PEM roots to trust.
        token: sent as ``authorization: Bearer <token>`` metadata on every call.
        retry: when and how calls that failed with UNAVAILABLE are tried again
            (default ``RetryPolicy()``: 3 tries, backoff from 0.1 s; ``RetryPolicy(attempts=1)``
            never retries).
        max_message_bytes: largest message sent or received.
        client_certificate, client_key: PEM certificate chain and key this client presents
            (mutual TLS; implies TLS).
        channels: connections the calls take turns on; a server of several workers
            (``--workers``) spreads connections, not requests, so give it several.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        tls: bool = False,
        root_certificates: bytes | None = None,
        token: str | None = None,
        retry: RetryPolicy | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        client_certificate: bytes | None = None,
        client_key: bytes | None = None,
        channels: int = 1,
    ) -> None:
        self._options = ClientOptions(
            target,
            timeout,
            tls,
            root_certificates,
            token,
            retry or RetryPolicy(),
            max_message_bytes,
            client_certificate,
            client_key,
            channels,
        )
        self._channels = self._options.open_channels(grpc.secure_channel, grpc.insecure_channel)
        # Calls take turns on the channels (thread-safe: one C-level step per call).
        self._stubs: Iterator[dict[str, Any]] = itertools.cycle(
            [
                {
                    _common.INFERENCE: pb_grpc.GRPCInferenceServiceStub(channel),
                    _common.HEALTH: health_pb2_grpc.HealthStub(channel),
                }
                for channel in self._channels
            ]
        )

    @property
    def target(self) -> str:
        return self._options.target

    @property
    def timeout(self) -> float:
        """The default deadline of each call, seconds."""
        return self._options.timeout

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
        attempts = self._options.attempts(call, timeout)
        method = getattr(next(self._stubs)[call.service], call.method)
        while True:
            try:
                response = method(
                    call.request,
                    timeout=attempts.timeout(),
                    metadata=self._options.metadata,
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
        return self._call(_common.server_live(), timeout)

    def server_ready(self, *, timeout: float | None = None) -> bool:
        return self._call(_common.server_ready(), timeout)

    def model_ready(self, model: str, version: str = "", *, timeout: float | None = None) -> bool:
        return self._call(_common.model_ready(model, version), timeout)

    def server_metadata(self, *, timeout: float | None = None) -> ServerMetadata:
        return self._call(_common.server_metadata(), timeout)

    def model_metadata(self, model: str, version: str = "", *, timeout: float | None = None) -> ModelMetadata:
        return self._call(_common.model_metadata(model, version), timeout)

    def model_config(self, model: str, version: str = "", *, timeout: float | None = None) -> pb.ModelConfig:
        return self._call(_common.model_config(model, version), timeout)

    def model_statistics(
        self, model: str = "", version: str = "", *, timeout: float | None = None
    ) -> list[pb.ModelStatistics]:
        """Statistics of one model, or of every model when ``model`` is empty."""
        return self._call(_common.model_statistics(model, version), timeout)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """grpc.health.v1 status: SERVING, NOT_SERVING, or SERVICE_UNKNOWN for a service the server lacks."""
        return self._call(_common.health(service), timeout)

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
        return self._call(_common.infer(encoder, inputs), timeout)

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
        attempt = self._options.stream_attempt(timeout)
        call = next(self._stubs)[_common.INFERENCE].ModelStreamInfer(
            source, timeout=attempt.timeout(), metadata=self._options.metadata
        )
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
        call = dataclasses.replace(_common.model_ready(model, "") if model else _common.server_ready(), retry=False)
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

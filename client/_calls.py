"""Each RPC described once, transport-neutral: what it sends and how its reply is read.

A ``Call`` names the stub and method, carries the request, parses the reply and says
whether it only reads (may be retried); the clients only send it. Also here: the metadata
dataclasses, the inference request encoder, reply decoding, and streams (lazy request
encoding, replies put back in request order).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from client.errors import InvalidResponseError, from_stream_error
from contract.codec import build_request, response_outputs
from contract.datatypes import TensorSpec
from contract.errors import ServingError
from contract.protocol import inference_pb2 as pb

T = TypeVar("T")

#: The stubs a ``Call`` names: the inference service, and grpc.health.v1.
INFERENCE = "inference"
HEALTH = "health"


@dataclass(frozen=True)
class ServerMetadata:
    """What ServerMetadata reports: server name, version and protocol extensions."""

    name: str
    version: str
    extensions: tuple[str, ...]


@dataclass(frozen=True)
class ModelMetadata:
    """What ModelMetadata reports. Input shapes include the batch dimension (-1: variable).

    The protocol's metadata cannot say which inputs are optional: every spec has
    ``optional=False`` (ask ``model_config`` for that).
    """

    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class Call(Generic[T]):
    """One unary RPC, transport-neutral: send ``request`` with ``method`` of the ``service`` stub."""

    service: str
    method: str
    request: Any
    parse: Callable[[Any], T]
    #: The call only reads: running it twice changes nothing.
    idempotent: bool = True
    #: Whether the retry policy applies at all (readiness polls pace themselves).
    retry: bool = True
    # Results to return instead of raising for these status codes.
    fallback: Mapping[grpc.StatusCode, T] = field(default_factory=dict)


def _tensor_specs(tensors: Iterable[pb.ModelMetadataResponse.TensorMetadata]) -> tuple[TensorSpec, ...]:
    try:
        return tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in tensors)
    except ValueError as exc:
        raise InvalidResponseError(f"model metadata: {exc}") from exc


def _model_metadata(response: pb.ModelMetadataResponse) -> ModelMetadata:
    return ModelMetadata(
        name=response.name,
        versions=tuple(response.versions),
        platform=response.platform,
        inputs=_tensor_specs(response.inputs),
        outputs=_tensor_specs(response.outputs),
    )


def decode_outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """A reply's outputs as numpy arrays (raw or typed contents)."""
    try:
        return response_outputs(response)
    except (ServingError, ValueError, KeyError) as exc:
        raise InvalidResponseError(f"reply of model {response.model_name!r}: {exc}") from exc


def stream_outputs(response: pb.ModelStreamInferResponse) -> dict[str, np.ndarray]:
    """One stream reply's outputs, or its ``error_message`` raised as an InferenceServerError."""
    if response.error_message:
        raise from_stream_error(response.error_message)
    return decode_outputs(response.infer_response)


def server_live() -> Call[bool]:
    return Call(INFERENCE, "ServerLive", pb.ServerLiveRequest(), lambda r: bool(r.live))


def server_ready() -> Call[bool]:
    return Call(INFERENCE, "ServerReady", pb.ServerReadyRequest(), lambda r: bool(r.ready))


def model_ready(model: str, version: str) -> Call[bool]:
    return Call(INFERENCE, "ModelReady", pb.ModelReadyRequest(name=model, version=version), lambda r: bool(r.ready))


def server_metadata() -> Call[ServerMetadata]:
    return Call(
        INFERENCE,
        "ServerMetadata",
        pb.ServerMetadataRequest(),
        lambda r: ServerMetadata(r.name, r.version, tuple(r.extensions)),
    )


def model_metadata(model: str, version: str) -> Call[ModelMetadata]:
    return Call(INFERENCE, "ModelMetadata", pb.ModelMetadataRequest(name=model, version=version), _model_metadata)


def model_config(model: str, version: str) -> Call[pb.ModelConfig]:
    return Call(INFERENCE, "ModelConfig", pb.ModelConfigRequest(name=model, version=version), lambda r: r.config)


def model_statistics(model: str, version: str) -> Call[list[pb.ModelStatistics]]:
    return Call(
        INFERENCE,
        "ModelStatistics",
        pb.ModelStatisticsRequest(name=model, version=version),
        lambda r: list(r.model_stats),
    )


def health(service: str) -> Call[str]:
    """grpc.health.v1 Check; a service the server does not know reads as SERVICE_UNKNOWN."""
    return Call(
        HEALTH,
        "Check",
        health_pb2.HealthCheckRequest(service=service),
        lambda r: health_pb2.HealthCheckResponse.ServingStatus.Name(r.status),
        fallback={grpc.StatusCode.NOT_FOUND: "SERVICE_UNKNOWN"},
    )


@dataclass(frozen=True)
class InferEncoder:
    """Builds ModelInferRequests for one model with fixed options (one per call or per stream)."""

    model: str
    outputs: Sequence[str] | None = None
    version: str = ""
    request_id: str = ""
    raw: bool = True
    datatypes: Mapping[str, str] | None = None

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> pb.ModelInferRequest:
        return build_request(
            self.model,
            inputs,
            self.outputs,
            model_version=self.version,
            request_id=self.request_id,
            raw=self.raw,
            datatypes=self.datatypes,
        )


def infer(encoder: InferEncoder, inputs: Mapping[str, np.ndarray]) -> Call[dict[str, np.ndarray]]:
    return Call(INFERENCE, "ModelInfer", encoder(inputs), decode_outputs, idempotent=False)


class StreamRequests:
    """One ModelStreamInfer call's bookkeeping: requests out, replies back in request order.

    Requests are encoded lazily, as grpc pulls them, and numbered through their ``id``
    (``<stream prefix>-<index>``). Servers may answer a stream's requests concurrently,
    so ``replies`` buffers early answers and yields outputs in request order; a reply
    whose id is not ours (a server that does not echo ids) counts as the next in line.
    An error reply raises its InferenceServerError when its turn comes.

    grpc would swallow an exception raised while it pulls requests (it cancels the
    call and logs it), so a failure to produce or encode a request ends the request
    stream instead; ``finish`` raises it after the replies to the requests before it.
    """

    def __init__(self, encode: InferEncoder, requests: Iterable[Mapping[str, np.ndarray]]) -> None:
        self._encode = encode
        self._requests = iter(requests)
        self._prefix = f"{uuid.uuid4().hex[:12]}-"
        self._sent = 0
        self._received = 0
        self._next = 0
        self._early: dict[int, pb.ModelStreamInferResponse] = {}
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[pb.ModelInferRequest]:
        return self

    def __next__(self) -> pb.ModelInferRequest:
        if self.error is not None:
            raise StopIteration
        try:
            return self._numbered(next(self._requests))
        except StopIteration:
            raise
        except Exception as exc:
            self.error = exc
            raise StopIteration from None

    def _numbered(self, inputs: Mapping[str, np.ndarray]) -> pb.ModelInferRequest:
        request = self._encode(inputs)
        request.id = f"{self._prefix}{self._sent}"
        self._sent += 1
        return request

    def replies(self, response: pb.ModelStreamInferResponse) -> Iterator[dict[str, np.ndarray]]:
        """Outputs now due in request order (none while an earlier reply is missing)."""
        self._early[self._index(response.infer_response.id)] = response
        self._received += 1
        while self._next in self._early:
            due = self._early.pop(self._next)
            self._next += 1
            yield stream_outputs(due)

    def _index(self, request_id: str) -> int:
        if request_id.startswith(self._prefix) and request_id[len(self._prefix) :].isdigit():
            return int(request_id[len(self._prefix) :])
        return self._received

    def finish(self) -> None:
        """After the last reply: raise for unanswered requests, or the error that ended the requests."""
        if self._next < self._sent:
            raise InvalidResponseError(
                f"stream ended with {self._sent - self._next} of {self._sent} requests unanswered"
            )
        if self.error is not None:
            raise self.error


class AsyncStreamRequests(StreamRequests):
    """``StreamRequests`` fed by an async iterable of inputs."""

    def __init__(self, encode: InferEncoder, requests: AsyncIterable[Mapping[str, np.ndarray]]) -> None:
        super().__init__(encode, ())
        self._async_requests = aiter(requests)

    def __aiter__(self) -> AsyncIterator[pb.ModelInferRequest]:
        return self

    async def __anext__(self) -> pb.ModelInferRequest:
        if self.error is not None:
            raise StopAsyncIteration
        try:
            return self._numbered(await anext(self._async_requests))
        except StopAsyncIteration:
            raise
        except Exception as exc:
            self.error = exc
            raise StopAsyncIteration from None

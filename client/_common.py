"""What the sync and asyncio clients share: everything except waiting on the network.

Each RPC is described once as a ``Call`` (which stub and method, the request, how to
parse the reply, whether it may be retried); the two clients only send it. Also here:
channel settings, the auth metadata, the retry policy and deadline bookkeeping, the
metadata dataclasses, and streams (lazy request encoding, replies put back in request
order).
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from client.errors import (
    DeadlineExceededError,
    InferenceServerError,
    InvalidResponseError,
    UnavailableError,
    from_stream_error,
)
from client.security import auth_metadata, channel_credentials
from contract.codec import build_request, response_outputs
from contract.datatypes import TensorSpec
from contract.errors import ServingError
from contract.protocol import inference_pb2 as pb

C = TypeVar("C")
T = TypeVar("T")

DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

#: How grpc's own messages begin for a call that was never sent: no connection to the
#: target, or its name did not resolve.
_NOT_CONNECTED = ("failed to connect to all addresses", "errors resolving", "DNS resolution failed")
#: What our servers answer when they refuse an inference before accepting it: loading
#: (serving/runtime.py) or draining (serving/batcher.py, serving/server.py). Such a
#: request was never queued, so sending it again cannot run it twice.
_REFUSED = ("is not ready", "not accepting new requests")
#: grpc's own text for a deadline that passed on the client's side.
_LOCAL_DEADLINE = "Deadline Exceeded"

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
class RetryPolicy:
    """When a failed call is sent again, and how long the client waits before it does.

    Only UNAVAILABLE is retried, never another status code (INVALID_ARGUMENT, NOT_FOUND,
    RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED ... would fail again or may already have run).
    Calls that only read (health, readiness, metadata, config, statistics) are retried
    on any UNAVAILABLE. An inference is retried only when the failure shows that it was
    never run: the client could not connect to the server, or the server refused it
    before accepting it (loading or draining). An UNAVAILABLE that ends a call the server
    may have been computing (the connection dropped, the server stopped mid-call) is
    raised at once, unless ``retry_unsafe_infer`` accepts that it may run twice. Streams
    are never retried.

    The n-th retry waits ``backoff * multiplier**(n-1)`` seconds, capped at
    ``max_backoff``, less a random share of up to ``jitter`` of it (so that clients
    refused together do not come back together). Attempts stop after ``attempts`` tries
    or when the next pause would reach past the call's deadline: the deadline (the
    client's ``timeout`` unless the call passes its own) bounds all tries together.
    """

    #: Tries in all, the first included (1: never retry).
    attempts: int = 3
    #: Pause before the first retry, seconds.
    backoff: float = 0.1
    #: Longest pause between two tries, seconds.
    max_backoff: float = 2.0
    #: Each pause is this many times the previous one.
    multiplier: float = 2.0
    #: Share of each pause drawn at random: a pause of p lasts between p * (1 - jitter) and p.
    jitter: float = 0.5
    #: Also retry an inference after an UNAVAILABLE that may have ended it mid-run.
    retry_unsafe_infer: bool = False

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"retry attempts must be at least 1, got {self.attempts}")
        if self.backoff < 0 or self.max_backoff < self.backoff:
            raise ValueError(f"retry backoff must satisfy 0 <= backoff <= max_backoff, got {self}")
        if self.multiplier < 1:
            raise ValueError(f"retry multiplier must be at least 1, got {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"retry jitter must lie in [0, 1], got {self.jitter}")

    def pause(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first)."""
        full = min(self.backoff * self.multiplier ** (retry - 1), self.max_backoff)
        return full * (1.0 - self.jitter * (rng or random).random())

    def may_retry(self, error: InferenceServerError, call_reads_only: bool) -> bool:
        """Whether a call that failed with ``error`` may be sent again."""
        if error.code is not grpc.StatusCode.UNAVAILABLE:
            return False
        return call_reads_only or self.retry_unsafe_infer or never_ran(error)


NO_RETRY = RetryPolicy(attempts=1)


def never_ran(error: InferenceServerError) -> bool:
    """An UNAVAILABLE that proves the server did not run the call: it was never sent
    (no connection), or our server refused it before accepting it."""
    return error.message.startswith(_NOT_CONNECTED) or any(phrase in error.message for phrase in _REFUSED)


@dataclass(frozen=True)
class ClientOptions:
    """A client's validated settings, turned into what grpc wants."""

    target: str
    timeout: float = DEFAULT_TIMEOUT
    tls: bool = False
    root_certificates: bytes | None = None
    token: str | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    #: PEM certificate chain and private key this client presents (mutual TLS; implies TLS).
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    #: Connections the calls take turns on (a server of several workers gets connections spread).
    channels: int = 1

    def __post_init__(self) -> None:
        if not self.target:
            raise ValueError("target must be HOST:PORT")
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("a client certificate and its private key go together")
        if self.channels < 1:
            raise ValueError(f"channels must be at least 1, got {self.channels}")
        if self.timeout is None or not 0 < self.timeout < float("inf"):
            raise ValueError(f"timeout must be a positive number of seconds (every call has one), got {self.timeout}")
        if self.max_message_bytes <= 0:
            raise ValueError("max_message_bytes must be positive")

    @property
    def secure(self) -> bool:
        return self.tls or self.root_certificates is not None or self.certificate_chain is not None

    def credentials(self) -> grpc.ChannelCredentials:
        return channel_credentials(self.root_certificates, self.certificate_chain, self.private_key)

    def open_channels(self, secure: Callable[..., C], insecure: Callable[..., C]) -> list[C]:
        """``channels`` channels to the target, each with a connection of its own."""
        options = self.channel_options
        if self.secure:
            return [secure(self.target, self.credentials(), options=options) for _ in range(self.channels)]
        return [insecure(self.target, options=options) for _ in range(self.channels)]

    @property
    def channel_options(self) -> list[tuple[str, Any]]:
        # grpc waits 1 s (growing to 120 s) before reconnecting after a failed connection,
        # failing every call at once meanwhile: reconnect on the retry policy's schedule
        # instead, so that a retry can find a server that has just come up.
        backoff_ms = max(int(self.retry.backoff * 1000), 10)
        return [
            # A connection per channel: gRPC would otherwise share one between equal channels.
            ("grpc.use_local_subchannel_pool", 1 if self.channels > 1 else 0),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.initial_reconnect_backoff_ms", backoff_ms),
            ("grpc.min_reconnect_backoff_ms", backoff_ms),
            ("grpc.max_reconnect_backoff_ms", max(int(self.retry.max_backoff * 1000), backoff_ms)),
        ]

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Sent with every call. Without TLS a token travels in clear text."""
        return auth_metadata(self.token)

    def deadline(self, timeout: float | None) -> float:
        """The seconds a call may take: its own timeout, else the client's default."""
        if timeout is None:
            return self.timeout
        if not 0 < timeout < float("inf"):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
        return timeout

    def attempts(self, call: Call[Any], timeout: float | None) -> Attempts:
        policy = self.retry if call.retry else NO_RETRY
        return Attempts(self.target, call.method, self.deadline(timeout), policy, call.idempotent)

    def stream_attempt(self, timeout: float | None) -> Attempts:
        """A stream's one try (streams are never retried)."""
        return Attempts(self.target, "ModelStreamInfer", self.deadline(timeout), NO_RETRY, False)


class Attempts:
    """One call's tries: the time left for each, whether to try again, and its final error.

    See ``RetryPolicy``: only UNAVAILABLE, only when it cannot run a call twice, with
    exponential backoff and jitter, never past the call's deadline.
    """

    def __init__(self, target: str, method: str, timeout: float, policy: RetryPolicy, reads_only: bool) -> None:
        self._target = target
        self._method = method
        self._timeout = timeout
        self._policy = policy
        self._reads_only = reads_only
        self._started = time.monotonic()
        self._deadline = self._started + timeout
        self.tries = 0

    def timeout(self) -> float:
        """Seconds left for the next try (counts it)."""
        self.tries += 1
        return max(self._deadline - time.monotonic(), 0.0)

    def retry_after(self, error: InferenceServerError) -> float | None:
        """Seconds to wait before the next try, or None to give up (then raise ``final(error)``)."""
        if self.tries >= self._policy.attempts or not self._policy.may_retry(error, self._reads_only):
            return None
        delay = self._policy.pause(self.tries)
        if time.monotonic() + delay >= self._deadline:
            return None
        return delay

    def final(self, error: InferenceServerError) -> InferenceServerError:
        """The error to raise: a failure to reach the server, or a deadline that passed
        without a word from it, names the target, the tries and the time they took."""
        elapsed = time.monotonic() - self._started
        tries = f"{self.tries} attempt{'s' if self.tries != 1 else ''} over {elapsed:.1f} s"
        target = self._target
        if error.code is grpc.StatusCode.UNAVAILABLE and error.message.startswith(_NOT_CONNECTED):
            reason = error.message.rsplit(": ", 1)[-1].strip("[] ")
            return UnavailableError(
                f"cannot reach the server at {target}: {reason} ({tries})", details=error.details or error.message
            )
        if error.code is grpc.StatusCode.DEADLINE_EXCEEDED and error.message == _LOCAL_DEADLINE:
            return DeadlineExceededError(
                f"no reply from {target} to {self._method} within the deadline of {self._timeout:g} s ({tries})",
                details=error.details or error.message,
            )
        return error


class ReadinessPoll:
    """Bookkeeping for ``wait_until_ready``: time left, pause between polls, the final error."""

    def __init__(self, timeout: float, interval: float) -> None:
        if timeout <= 0 or interval <= 0:
            raise ValueError("timeout and interval must be positive")
        self._timeout = timeout
        self._deadline = time.monotonic() + timeout
        self._interval = interval
        self.last: str = "no answer"

    def remaining(self) -> float:
        return max(self._deadline - time.monotonic(), 0.0)

    def pause(self) -> float | None:
        """Seconds to sleep before polling again, or None when the time is up."""
        remaining = self.remaining()
        return min(self._interval, remaining) if remaining > 0 else None

    def expired(self) -> DeadlineExceededError:
        return DeadlineExceededError(f"not ready after {self._timeout:g} s (last: {self.last})")


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

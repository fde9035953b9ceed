"""What the sync and asyncio clients share: settings, channels, and every call's non-I/O part.

``ClientOptions`` validates a client's settings and turns them into what grpc wants;
``BaseInferenceClient`` (httpx's BaseClient pattern) holds them, the channels and their
stubs, and prepares each call (its tries, its stub method, a stream's request source);
``client.sync.InferenceClient`` and ``client.aio.AsyncInferenceClient`` only send and wait.
"""

from __future__ import annotations

import dataclasses
import itertools
from abc import ABC, abstractmethod
from collections.abc import AsyncIterable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2_grpc

from client import _calls
from client._calls import HEALTH, INFERENCE, Call
from client._retry import NO_RETRY, Attempts, RetryPolicy
from client.security import auth_metadata, channel_credentials
from client.targets import balancing_options, split_targets
from contract.protocol import inference_pb2_grpc as pb_grpc

C = TypeVar("C")
T = TypeVar("T")
#: A client's channel: grpc's, or grpc.aio's.
ChannelT = TypeVar("ChannelT", grpc.Channel, grpc.aio.Channel)

DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


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
        split_targets(self.target)  # raises ValueError for an empty server in a list
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
        """``channels`` channels to each server of the target (``client.targets``), each with a
        connection of its own (a resolver target's: one per address, sent to round-robin), in the
        order the calls take turns on them: every server once, then again."""
        opened = []
        for _ in range(self.channels):
            for target in split_targets(self.target):
                options = [*self.channel_options, *balancing_options(target)]
                if self.secure:
                    opened.append(secure(target, self.credentials(), options=options))
                else:
                    opened.append(insecure(target, options=options))
        return opened

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


class BaseInferenceClient(ABC, Generic[ChannelT]):
    """What ``InferenceClient`` and ``AsyncInferenceClient`` share: everything but the waiting.

    It holds the validated settings, the channels (opened by the subclass: grpc's or
    grpc.aio's) and their stubs, and prepares each call without sending it: the stub method
    on the next channel, the call's tries (deadline, retry policy, final error), its
    metadata, what ``wait_until_ready`` polls, a stream's call. The subclasses send, wait,
    sleep between tries and close, each in its own way (blocking or as coroutines).
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
        """A client of the server at ``target``; its channels connect on the first call.

        Args:
            target: ``HOST:PORT``; or ``dns:///NAME:PORT`` (e.g. a Kubernetes headless Service), every
                address the name resolves to, round-robin; or ``HOST:PORT,HOST:PORT,...``, the calls
                taking turns on the servers (``client.targets``).
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
        self._channels: list[ChannelT] = self._open_channels()
        # Calls take turns on the channels (thread-safe: one C-level step per call).
        self._stubs: Iterator[dict[str, Any]] = itertools.cycle(
            [
                {INFERENCE: pb_grpc.GRPCInferenceServiceStub(channel), HEALTH: health_pb2_grpc.HealthStub(channel)}
                for channel in self._channels
            ]
        )

    @abstractmethod
    def _open_channels(self) -> list[ChannelT]:
        """``self._options.open_channels`` with grpc's or grpc.aio's channel constructors."""

    @property
    def target(self) -> str:
        return self._options.target

    @property
    def timeout(self) -> float:
        """The default deadline of each call, seconds."""
        return self._options.timeout

    @property
    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return self._options.metadata

    def _prepare(self, call: Call[T], timeout: float | None) -> tuple[Attempts, Callable[..., Any]]:
        """``call``'s tries (within its deadline, under its retry policy) and the stub method
        that sends it, on the next channel."""
        return self._options.attempts(call, timeout), getattr(next(self._stubs)[call.service], call.method)

    @staticmethod
    def _readiness(model: str) -> Call[bool]:
        """What ``wait_until_ready`` polls: ModelReady of ``model``, else ServerReady. The poll
        paces itself, so the retry policy does not apply."""
        return dataclasses.replace(_calls.model_ready(model, "") if model else _calls.server_ready(), retry=False)

    def _start_stream(self, source: Iterable[Any] | AsyncIterable[Any], timeout: float | None) -> tuple[Attempts, Any]:
        """A ModelStreamInfer call on the next channel that pulls its requests from ``source``,
        and its one try (streams are never retried): the deadline covers the whole stream."""
        attempt = self._options.stream_attempt(timeout)
        call = next(self._stubs)[INFERENCE].ModelStreamInfer(source, timeout=attempt.timeout(), metadata=self._metadata)
        return attempt, call

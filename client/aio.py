"""asyncio client (grpc.aio): the same API as ``client.sync.InferenceClient``, as coroutines.

Requests, replies, errors, retries and metadata come from ``client._common``; this
module only awaits the network. Create it inside a running event loop, preferably as
``async with AsyncInferenceClient(...) as client:``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
import grpc.aio
import numpy as np
from grpc_health.v1 import health_pb2_grpc

from client import _common
from client._common import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TIMEOUT,
    AsyncStreamRequests,
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


class AsyncInferenceClient:
    """Talks to one server over one grpc.aio channel; ``async with`` it or ``await close()``.

    Arguments as for ``client.sync.InferenceClient``.
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
        self._channels = self._options.open_channels(grpc.aio.secure_channel, grpc.aio.insecure_channel)
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

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close(None)

    async def __aenter__(self) -> AsyncInferenceClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _call(self, call: Call[T], timeout: float | None, *, wait_for_ready: bool | None = None) -> T:
        attempts = self._options.attempts(call, timeout)
        method = getattr(next(self._stubs)[call.service], call.method)
        while True:
            try:
                response = await method(
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
                await asyncio.sleep(delay)
            else:
                return call.parse(response)

    async def server_live(self, *, timeout: float | None = None) -> bool:
        return await self._call(_common.server_live(), timeout)

    async def server_ready(self, *, timeout: float | None = None) -> bool:
        return await self._call(_common.server_ready(), timeout)

    async def model_ready(self, model: str, version: str = "", *, timeout: float | None = None) -> bool:
        return await self._call(_common.model_ready(model, version), timeout)

    async def server_metadata(self, *, timeout: float | None = None) -> ServerMetadata:
        return await self._call(_common.server_metadata(), timeout)

    async def model_metadata(self, model: str, version: str = "", *, timeout: float | None = None) -> ModelMetadata:
        return await self._call(_common.model_metadata(model, version), timeout)

    async def model_config(self, model: str, version: str = "", *, timeout: float | None = None) -> pb.ModelConfig:
        return await self._call(_common.model_config(model, version), timeout)

    async def model_statistics(
        self, model: str = "", version: str = "", *, timeout: float | None = None
    ) -> list[pb.ModelStatistics]:
        """Statistics of one model, or of every model when ``model`` is empty."""
        return await self._call(_common.model_statistics(model, version), timeout)

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """grpc.health.v1 status: SERVING, NOT_SERVING, or SERVICE_UNKNOWN for a service the server lacks."""
        return await self._call(_common.health(service), timeout)

    async def infer(
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
        """Run one inference; see ``InferenceClient.infer``."""
        encoder = InferEncoder(model, outputs, version, request_id, raw, datatypes)
        return await self._call(_common.infer(encoder, inputs), timeout)

    async def stream_infer(
        self,
        model: str,
        requests: Iterable[Mapping[str, np.ndarray]] | AsyncIterable[Mapping[str, np.ndarray]],
        outputs: Sequence[str] | None = None,
        *,
        version: str = "",
        timeout: float | None = None,
        raw: bool = True,
        datatypes: Mapping[str, str] | None = None,
    ) -> AsyncIterator[dict[str, np.ndarray]]:
        """Stream ``requests`` (sync or async iterable); ``async for`` the outputs.

        See ``InferenceClient.stream_infer``.
        """
        encoder = InferEncoder(model, outputs, version, "", raw, datatypes)
        source: StreamRequests | AsyncStreamRequests = (
            AsyncStreamRequests(encoder, requests)
            if isinstance(requests, AsyncIterable)
            else StreamRequests(encoder, requests)
        )
        attempt = self._options.stream_attempt(timeout)
        call = next(self._stubs)[_common.INFERENCE].ModelStreamInfer(
            source, timeout=attempt.timeout(), metadata=self._options.metadata
        )
        try:
            async for response in call:
                for reply in source.replies(response):
                    yield reply
        except grpc.RpcError as err:
            raise attempt.final(from_rpc_error(err)) from err
        finally:
            call.cancel()
        source.finish()

    async def wait_until_ready(self, timeout: float = 30.0, *, model: str = "", interval: float = 0.1) -> None:
        """Poll until ready; see ``InferenceClient.wait_until_ready``."""
        poll = ReadinessPoll(timeout, interval)
        call = dataclasses.replace(_common.model_ready(model, "") if model else _common.server_ready(), retry=False)
        while (remaining := poll.remaining()) > 0:
            try:
                if await self._call(call, remaining, wait_for_ready=True):
                    return
                poll.last = "not ready"
            except InferenceServerError as error:
                poll.last = str(error)
            pause = poll.pause()
            if pause is None:
                break
            await asyncio.sleep(pause)
        raise poll.expired()

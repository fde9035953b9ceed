"""asyncio client (grpc.aio): the same API as ``client.sync.InferenceClient``, as coroutines.

What each call sends, its tries, its metadata and its errors come from
``client._base.BaseInferenceClient``; this module only awaits the network. Create it
inside a running event loop, preferably as ``async with AsyncInferenceClient(...) as client:``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from types import TracebackType
from typing import TypeVar

import grpc
import grpc.aio
import numpy as np

from client import _calls
from client._base import BaseInferenceClient
from client._calls import AsyncStreamRequests, Call, InferEncoder, ModelMetadata, ServerMetadata, StreamRequests
from client._retry import ReadinessPoll
from client.errors import InferenceServerError, from_rpc_error
from contract.protocol import inference_pb2 as pb

T = TypeVar("T")


class AsyncInferenceClient(BaseInferenceClient[grpc.aio.Channel]):
    """Talks to one server over grpc.aio channels; ``async with`` it or ``await close()``.

    Arguments as for ``client.sync.InferenceClient`` (``BaseInferenceClient.__init__``).
    """

    def _open_channels(self) -> list[grpc.aio.Channel]:
        return self._options.open_channels(grpc.aio.secure_channel, grpc.aio.insecure_channel)

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
        attempts, method = self._prepare(call, timeout)
        while True:
            try:
                response = await method(
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
                await asyncio.sleep(delay)
            else:
                return call.parse(response)

    async def server_live(self, *, timeout: float | None = None) -> bool:
        return await self._call(_calls.server_live(), timeout)

    async def server_ready(self, *, timeout: float | None = None) -> bool:
        return await self._call(_calls.server_ready(), timeout)

    async def model_ready(self, model: str, version: str = "", *, timeout: float | None = None) -> bool:
        return await self._call(_calls.model_ready(model, version), timeout)

    async def server_metadata(self, *, timeout: float | None = None) -> ServerMetadata:
        return await self._call(_calls.server_metadata(), timeout)

    async def model_metadata(self, model: str, version: str = "", *, timeout: float | None = None) -> ModelMetadata:
        return await self._call(_calls.model_metadata(model, version), timeout)

    async def model_config(self, model: str, version: str = "", *, timeout: float | None = None) -> pb.ModelConfig:
        return await self._call(_calls.model_config(model, version), timeout)

    async def model_statistics(
        self, model: str = "", version: str = "", *, timeout: float | None = None
    ) -> list[pb.ModelStatistics]:
        """Statistics of one model, or of every model when ``model`` is empty."""
        return await self._call(_calls.model_statistics(model, version), timeout)

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """grpc.health.v1 status: SERVING, NOT_SERVING, or SERVICE_UNKNOWN for a service the server lacks."""
        return await self._call(_calls.health(service), timeout)

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
        return await self._call(_calls.infer(encoder, inputs), timeout)

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
        attempt, call = self._start_stream(source, timeout)
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
        call = self._readiness(model)
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

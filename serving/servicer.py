"""GRPCInferenceService over served models: proto in, numpy through the batcher, proto out.

Every RPC goes through one error wrapper (``_rpc``) that maps the domain errors of
serving.errors to gRPC status codes; any other exception is a bug, logged with a
request id and answered INTERNAL without its text.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from modelzoo.base import ModelDefinition
from serving import codec
from serving.backend import Backend
from serving.batcher import DynamicBatcher
from serving.datatypes import CONFIG_DATATYPES
from serving.errors import InvalidInput, ModelNotFound, ServingError, Unavailable
from serving.metrics import ModelMetrics
from serving.protocol import inference_pb2 as pb
from serving.protocol import inference_pb2_grpc as pb_grpc
from serving.settings import BatchingSettings
from serving.validation import validate_inputs, validate_outputs

log = logging.getLogger(__name__)

VERSION = "1"
EXTENSIONS = ("model_configuration", "statistics")
Response = TypeVar("Response")


class ModelRuntime:
    """One served model: its backend, batcher and metrics."""

    def __init__(
        self,
        model: ModelDefinition,
        backend: Backend,
        batching: BatchingSettings,
        metrics: ModelMetrics,
        framework: str,
        parameters: dict[str, str],
    ) -> None:
        self.model = model
        self.backend = backend
        self.batching = batching
        self.metrics = metrics
        self.framework = framework
        self.parameters = parameters
        self.ready = False
        self.batcher = DynamicBatcher(
            backend.predict, model.inputs, model.outputs, batching, metrics, pad_values=model.pad_values
        )
        self._output_datatypes = {spec.name: spec.datatype for spec in model.outputs}

    async def infer(self, request: pb.ModelInferRequest, timeout: float | None) -> pb.ModelInferResponse:
        if not self.ready:
            raise Unavailable(f"model {self.model.name!r} is not ready")
        arrays = codec.request_inputs(request)
        rows = validate_inputs(arrays, self.model.inputs, self.batching.max_batch_size)
        names = validate_outputs((output.name for output in request.outputs), self.model.outputs)
        try:
            self.model.check_inputs(arrays)
        except ValueError as err:
            raise InvalidInput(str(err)) from None
        outputs = await self.batcher.submit(self.model.complete_inputs(arrays), rows, timeout)
        return codec.build_response(request, VERSION, {name: outputs[name] for name in names}, self._output_datatypes)

    def metadata(self) -> pb.ModelMetadataResponse:
        def tensors(specs: Any) -> list[pb.ModelMetadataResponse.TensorMetadata]:
            return [
                pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape) for s in specs
            ]

        return pb.ModelMetadataResponse(
            name=self.model.name,
            versions=[VERSION],
            platform=self.backend.platform,
            inputs=tensors(self.model.inputs),
            outputs=tensors(self.model.outputs),
        )

    def config(self) -> pb.ModelConfig:
        batching = self.batching
        config = pb.ModelConfig(
            name=self.model.name,
            platform=self.backend.platform,
            backend=self.framework,
            max_batch_size=batching.max_batch_size,
            input=[
                pb.ModelInput(
                    name=s.name,
                    data_type=CONFIG_DATATYPES[s.datatype],  # type: ignore[arg-type]
                    dims=s.shape[1:],
                    optional=s.optional,
                    allow_ragged_batch=s.name in self.model.pad_values,
                )
                for s in self.model.inputs
            ],
            output=[
                pb.ModelOutput(name=s.name, data_type=CONFIG_DATATYPES[s.datatype], dims=s.shape[1:])  # type: ignore[arg-type]
                for s in self.model.outputs
            ],
            instance_group=[
                pb.ModelInstanceGroup(
                    name=self.model.name,
                    count=batching.instances,
                    kind=pb.ModelInstanceGroup.KIND_GPU
                    if self.backend.device.startswith("cuda")
                    else pb.ModelInstanceGroup.KIND_CPU,
                )
            ],
            parameters={key: pb.ModelParameter(string_value=value) for key, value in self.parameters.items()},
        )
        if batching.dynamic_batching:
            config.dynamic_batching.CopyFrom(
                pb.ModelDynamicBatching(
                    preferred_batch_size=batching.preferred_batch_sizes,
                    max_queue_delay_microseconds=batching.max_queue_delay_us,
                    default_queue_policy=pb.ModelQueuePolicy(max_queue_size=batching.max_queue_size),
                )
            )
        return config


def _rpc(method: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
    """The one place where errors become gRPC status codes (unary RPCs)."""

    @functools.wraps(method)
    async def wrapper(self: InferenceServicer, request: Any, context: grpc.aio.ServicerContext) -> Response:
        try:
            return await method(self, request, context)
        except ServingError as err:
            await context.abort(err.code, err.message)
        except Exception:
            request_id = _request_id(request)
            log.exception("internal error in %s (request id %s)", method.__name__, request_id)
            await context.abort(
                grpc.StatusCode.INTERNAL, f"internal error (request id {request_id}); see the server log"
            )
        raise AssertionError("unreachable: context.abort raises")

    return wrapper


def _request_id(request: Any) -> str:
    return getattr(request, "id", "") or uuid.uuid4().hex[:12]


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The Open Inference Protocol service over a set of model runtimes."""

    def __init__(self, server_name: str, server_version: str) -> None:
        self.server_name = server_name
        self.server_version = server_version
        self.models: dict[str, ModelRuntime] = {}
        self.draining = False

    def add(self, runtime: ModelRuntime) -> None:
        self.models[runtime.model.name] = runtime

    @property
    def ready(self) -> bool:
        return bool(self.models) and not self.draining and all(m.ready for m in self.models.values())

    def _model(self, name: str, version: str = "") -> ModelRuntime:
        runtime = self.models.get(name)
        if runtime is None:
            raise ModelNotFound(f"unknown model {name!r}; this server serves {sorted(self.models)}")
        if version not in ("", VERSION):
            raise ModelNotFound(f"model {name!r} has no version {version!r}; versions: [{VERSION!r}]")
        return runtime

    @_rpc
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @_rpc
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.ready)

    @_rpc
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        runtime = self._model(request.name, request.version)
        return pb.ModelReadyResponse(ready=runtime.ready and not self.draining)

    @_rpc
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=self.server_name, version=self.server_version, extensions=EXTENSIONS)

    @_rpc
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        return self._model(request.name, request.version).metadata()

    @_rpc
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=self._model(request.name, request.version).config())

    @_rpc
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> pb.ModelStatisticsResponse:
        runtimes = [self._model(request.name, request.version)] if request.name else list(self.models.values())
        return pb.ModelStatisticsResponse(model_stats=[runtime.metrics.statistics() for runtime in runtimes])

    @_rpc
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        return await self._infer(request, context.time_remaining())

    async def _infer(self, request: pb.ModelInferRequest, timeout: float | None) -> pb.ModelInferResponse:
        """Infer one request, recording its outcome in the model's metrics."""
        runtime = self._model(request.model_name, request.model_version)
        metrics = runtime.metrics
        started = time.perf_counter_ns()
        code = "UNKNOWN"
        metrics.inflight.inc()
        try:
            if self.draining:
                raise Unavailable("server is shutting down; not accepting new requests")
            response = await runtime.infer(request, timeout)
            code = "OK"
            return response
        except ServingError as err:
            code = err.code.name
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception:
            code = "INTERNAL"
            raise
        finally:
            metrics.inflight.dec()
            metrics.request_done(code, time.perf_counter_ns() - started)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests of a stream are served concurrently; each reply carries its
        request's id, errors arrive as ``error_message`` and the stream goes on."""
        replies: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()

        async def serve_one(request: pb.ModelInferRequest) -> None:
            try:
                response = await self._infer(request, context.time_remaining())
                reply = pb.ModelStreamInferResponse(infer_response=response)
            except ServingError as err:
                reply = _stream_error(request, f"{err.code.name}: {err.message}")
            except Exception:
                request_id = _request_id(request)
                log.exception("internal error in ModelStreamInfer (request id %s)", request_id)
                reply = _stream_error(request, f"INTERNAL: internal error (request id {request_id})")
            await replies.put(reply)

        async def read_all() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.get_running_loop().create_task(serve_one(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                while tasks:
                    await asyncio.gather(*tasks, return_exceptions=True)
            finally:
                await replies.put(None)

        reader = asyncio.get_running_loop().create_task(read_all())
        try:
            while (reply := await replies.get()) is not None:
                yield reply
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()


def _stream_error(request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
    return pb.ModelStreamInferResponse(
        error_message=message,
        infer_response=pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        ),
    )

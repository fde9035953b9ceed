"""ModelRuntime: one served model version's dataplane, free of any transport.

Request in, response out: decode and validate (``RequestDecoder``), compute through
the model's dynamic batcher, encode the reply (always raw contents, outputs in the
order asked for), and record the outcome in the model's metrics, once per request.
It also describes the model: ModelMetadata and Triton's ModelConfig.

``ServedModel`` holds every loaded version of one model: requests that name no version
go to the highest. Versions come and go while serving (``serving.loader``); a caller
holds the version it was routed to (``acquire``/``release``) until its answer is sent,
so a version taken out of service finishes everything routed to it before it closes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from contract.codec import array_to_raw
from contract.datatypes import CONFIG_DATATYPES, TensorSpec
from contract.errors import ModelNotFound, ServingError, Unavailable
from contract.protocol import inference_pb2 as pb
from contract.signature import ModelSignature
from serving.backend import Backend
from serving.batcher import DynamicBatcher, Request
from serving.metrics import ModelMetrics
from serving.settings import BatchingSettings
from serving.validation import RequestDecoder

#: The version of a model that has only one (every zoo export).
VERSION = "1"

#: Called with the reply of a streamed request, or the error it met.
Reply = Callable[[pb.ModelInferResponse | None, BaseException | None], None]


class ModelRuntime:
    """One served model version: its backend, batcher, request decoder and metrics (shared by
    the model's versions)."""

    def __init__(
        self,
        model: ModelSignature,
        backend: Backend,
        batching: BatchingSettings,
        metrics: ModelMetrics,
        framework: str,
        parameters: Mapping[str, str],
        version: str = VERSION,
    ) -> None:
        self.model = model
        self.version = version
        #: Callers routed to this version whose answer is not sent yet (see ``ServedModel``).
        self.active = 0
        self._idle = threading.Condition()
        self.backend = backend
        self.batching = batching
        self.metrics = metrics
        self.framework = framework
        self.parameters = dict(parameters)
        #: None while serving; otherwise why requests are refused (UNAVAILABLE).
        self.unavailable: str | None = f"model {model.name!r} is not ready"
        #: time.monotonic() of the last request refused as unavailable.
        self.last_refused = 0.0
        self.decoder = RequestDecoder(model, batching.max_batch_size)
        self.batcher = DynamicBatcher(
            backend.forward, model.inputs, model.outputs, batching, metrics, pad_values=model.pad_values
        )
        self._datatypes = {spec.name: spec.datatype for spec in model.outputs}

    @property
    def ready(self) -> bool:
        return self.unavailable is None

    def start(self) -> None:
        self.batcher.start()
        self.unavailable = None

    def hold(self) -> None:
        """A caller is routed here (``ServedModel.acquire``); ``release`` when its answer is sent."""
        with self._idle:
            self.active += 1

    def release(self) -> None:
        """A caller routed here by ``ServedModel.acquire`` is done."""
        with self._idle:
            self.active -= 1
            if not self.active:
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no caller holds this version; False if ``timeout`` ran out first."""
        with self._idle:
            return self._idle.wait_for(lambda: not self.active, timeout)

    def infer(
        self,
        request: pb.ModelInferRequest,
        timeout: float | None,
        on_queued: Callable[[Request], object] | None = None,
        screened: bool = False,
    ) -> pb.ModelInferResponse:
        """Answer one request; ``timeout``: seconds left until its deadline (None: none);
        ``screened``: admitted as it arrived (``DynamicBatcher.infer``)."""
        metrics = self.metrics
        started = time.perf_counter_ns()
        metrics.request_started()
        code = "INTERNAL"
        try:
            if self.unavailable is not None:
                self.last_refused = time.monotonic()
                raise Unavailable(self.unavailable)
            arrays, rows = self.decoder.inputs(request)
            names = self.decoder.outputs(request)
            outputs = self.batcher.infer(arrays, rows, timeout, on_queued, screened)
            response = self.encode(request, outputs, names)
            code = "OK"
            return response
        except ServingError as err:
            code = err.code.name
            raise
        finally:
            metrics.request_done(code, time.perf_counter_ns() - started)

    def submit(self, request: pb.ModelInferRequest, timeout: float | None, reply: Reply) -> Request | None:
        """Answer one request without waiting for it: ``reply(response, error)`` runs once
        (maybe before this returns: the calling thread may run the batch). Returns the queued
        request (to ``batcher.cancel`` it), or None when it was answered at once."""
        metrics = self.metrics
        started = time.perf_counter_ns()
        metrics.request_started()
        try:
            if self.unavailable is not None:
                raise Unavailable(self.unavailable)
            arrays, rows = self.decoder.inputs(request)
            names = self.decoder.outputs(request)
        except Exception as err:
            self._replied(started, err)
            reply(None, err)
            return None

        def finished(done: Request) -> None:
            error = done.error
            response = None
            if error is None:
                assert done.outputs is not None
                try:
                    response = self.encode(request, done.outputs, names)
                except Exception as err:
                    error = err
            self._replied(started, error)
            reply(response, error)

        try:
            return self.batcher.submit(arrays, rows, timeout, finished)
        except ServingError as err:
            self._replied(started, err)
            reply(None, err)
            return None

    def _replied(self, started: int, error: BaseException | None) -> None:
        code = "OK" if error is None else error.code.name if isinstance(error, ServingError) else "INTERNAL"
        self.metrics.request_done(code, time.perf_counter_ns() - started)

    def encode(
        self, request: pb.ModelInferRequest, outputs: Mapping[str, np.ndarray], names: Sequence[str]
    ) -> pb.ModelInferResponse:
        """The reply to ``request``: the named outputs in order, as raw contents."""
        response = pb.ModelInferResponse(model_name=request.model_name, model_version=self.version, id=request.id)
        add = response.outputs.add
        contents = response.raw_output_contents
        for name in names:
            array = outputs[name]
            datatype = self._datatypes[name]
            add(name=name, datatype=datatype, shape=array.shape)
            contents.append(array_to_raw(array, datatype))
        return response

    def metadata(self, versions: Sequence[str] = ()) -> pb.ModelMetadataResponse:
        """ModelMetadata; ``versions``: every version that may be asked for (default: this one)."""

        def tensors(specs: Sequence[TensorSpec]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
            return [
                pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape) for s in specs
            ]

        return pb.ModelMetadataResponse(
            name=self.model.name,
            versions=list(versions) or [self.version],
            platform=self.backend.platform,
            inputs=tensors(self.model.inputs),
            outputs=tensors(self.model.outputs),
        )

    def config(self) -> pb.ModelConfig:
        batching = self.batching
        datatype: Any = CONFIG_DATATYPES  # proto enum values, typed as plain ints here
        config = pb.ModelConfig(
            name=self.model.name,
            platform=self.backend.platform,
            backend=self.framework,
            max_batch_size=batching.max_batch_size,
            input=[
                pb.ModelInput(
                    name=s.name,
                    data_type=datatype[s.datatype],
                    dims=s.shape[1:],
                    optional=s.optional,
                    allow_ragged_batch=s.name in self.model.pad_values,
                )
                for s in self.model.inputs
            ],
            output=[
                pb.ModelOutput(name=s.name, data_type=datatype[s.datatype], dims=s.shape[1:])
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


class ServedModel:
    """Every loaded version of one model (see the module docstring). Readers never lock: the
    versions are an immutable mapping, replaced whole when one is added or removed."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._versions: dict[int, ModelRuntime] = {}
        self._latest: ModelRuntime | None = None
        self._lock = threading.Lock()

    @property
    def versions(self) -> list[str]:
        """Loaded versions, ascending."""
        return [str(version) for version in sorted(self._versions)]

    @property
    def latest(self) -> ModelRuntime:
        latest = self._latest
        if latest is None:
            raise Unavailable(f"model {self.name!r} has no version loaded")
        return latest

    @property
    def newest(self) -> ModelRuntime | None:
        """The version requests without one go to; None while none is loaded."""
        return self._latest

    def runtimes(self) -> list[ModelRuntime]:
        return list(self._versions.values())

    def get(self, version: str = "") -> ModelRuntime:
        """The runtime of ``version`` (empty: the highest); ``ModelNotFound`` when it is not loaded."""
        if not version:
            return self.latest
        runtime = self._versions.get(int(version)) if version.isdigit() else None
        if runtime is None:
            raise ModelNotFound(f"model {self.name!r} has no version {version!r}; versions: {self.versions}")
        return runtime

    def acquire(self, version: str = "") -> ModelRuntime:
        """``get``, held until ``release``: a version removed meanwhile waits for its callers."""
        with self._lock:
            runtime = self.get(version)
            runtime.hold()
        return runtime

    def add(self, runtime: ModelRuntime) -> None:
        with self._lock:
            versions = {**self._versions, int(runtime.version): runtime}
            self._versions = versions
            self._latest = versions[max(versions)]

    def remove(self, version: str) -> ModelRuntime | None:
        """Take ``version`` out of routing (requests already routed to it go on); returns it."""
        with self._lock:
            versions = dict(self._versions)
            runtime = versions.pop(int(version), None)
            self._versions = versions
            self._latest = versions[max(versions)] if versions else None
        return runtime

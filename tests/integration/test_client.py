"""The client library and CLI against an in-process fake server on 127.0.0.1, port 0,
and their resilience (retries, backoff, deadlines, unreachable servers) against the real
serving core too (``fake_server``: the framework-free ``double`` model behind it).

The fake speaks the real protocol over real gRPC: model "double" doubles every input
(BOOL: negated, BYTES: repeated), "fail:<CODE>" aborts with that status code, "slow"
outlives any short deadline, "typed-reply" answers with typed contents and
"broken-reply" with raw contents of the wrong length. An input named "error" makes
"double" fail with the status code named by its value (in a stream: as error_message).
"""

from __future__ import annotations

import asyncio
import http.server
import json
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.error
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from client import (
    AsyncInferenceClient,
    CancelledError,
    DeadlineExceededError,
    InferenceClient,
    InferenceServerError,
    InternalError,
    InvalidArgumentError,
    InvalidResponseError,
    ModelMetadata,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    RetryPolicy,
    ServerMetadata,
    TensorSpec,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    from_stream_error,
    metrics,
)
from client.cli import main
from contract import codec
from contract.protocol import inference_pb2 as pb
from contract.protocol import inference_pb2_grpc as pb_grpc
from tests.helpers.fakes import FakeFramework
from tests.helpers.servers import BackgroundServer

pytestmark = pytest.mark.timeout(30)

SPECS = (
    TensorSpec("x", "FP32", (-1, 4)),
    TensorSpec("ids", "INT64", (-1, -1)),
    TensorSpec("mask", "BOOL", (-1, 3)),
    TensorSpec("half", "FP16", (2,)),
    TensorSpec("text", "BYTES", (-1,)),
)
MODELS = ("double", "noconfig")
FAST_RETRY = RetryPolicy(backoff=0.01, max_backoff=0.05)
NO_RETRY = RetryPolicy(attempts=1)


class Failure(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def doubled(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.bool_:
        return ~array
    if array.dtype == object:
        return np.array([item + item for item in array.ravel()], dtype=object).reshape(array.shape)
    return array * 2


class FakeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.calls: Counter[str] = Counter()
            self.metadata_failures = 0
            self.ready = True
            self.last_metadata: dict[str, str | bytes] = {}
            self.last_request: pb.ModelInferRequest | None = None

    def _record(self, method: str, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.calls[method] += 1
            self.last_metadata = dict(context.invocation_metadata())

    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> pb.ServerLiveResponse:
        self._record("ServerLive", context)
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> pb.ServerReadyResponse:
        self._record("ServerReady", context)
        return pb.ServerReadyResponse(ready=self.ready)

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> pb.ModelReadyResponse:
        self._record("ModelReady", context)
        return pb.ModelReadyResponse(ready=request.name in MODELS)

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> pb.ServerMetadataResponse:
        self._record("ServerMetadata", context)
        with self.lock:
            fail = self.metadata_failures > 0
            self.metadata_failures -= 1
        if fail:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return pb.ServerMetadataResponse(name="fake", version="0.1", extensions=["model_configuration", "statistics"])

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> pb.ModelMetadataResponse:
        self._record("ModelMetadata", context)
        if request.name not in MODELS:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.name!r}")
        response = pb.ModelMetadataResponse(name=request.name, versions=["1"], platform="fake")
        for spec in SPECS:
            response.inputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
            response.outputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        return response

    def ModelConfig(self, request: Any, context: grpc.ServicerContext) -> pb.ModelConfigResponse:
        self._record("ModelConfig", context)
        if request.name != "double":
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "no configs here")
        config = pb.ModelConfig(name=request.name, platform="fake", max_batch_size=8)
        config.input.add(name="x", data_type=pb.TYPE_FP32, dims=[4])
        return pb.ModelConfigResponse(config=config)

    def ModelStatistics(self, request: Any, context: grpc.ServicerContext) -> pb.ModelStatisticsResponse:
        self._record("ModelStatistics", context)
        names = [request.name] if request.name else list(MODELS)
        return pb.ModelStatisticsResponse(
            model_stats=[pb.ModelStatistics(name=name, version="1", inference_count=7) for name in names]
        )

    def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.ServicerContext) -> pb.ModelInferResponse:
        self._record(f"ModelInfer:{request.model_name}", context)
        try:
            return self._compute(request, context)
        except Failure as failure:
            context.abort(failure.code, failure.message)
            raise

    def ModelStreamInfer(
        self, request_iterator: Iterator[pb.ModelInferRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ModelStreamInferResponse]:
        """Answers after the client half-closes, last request first (ids echoed), like a
        concurrent server; model "no-ids" answers in order without ids."""
        self._record("ModelStreamInfer", context)
        requests = list(request_iterator)
        in_order = bool(requests) and requests[0].model_name == "no-ids"
        for request in requests if in_order else reversed(requests):
            try:
                reply = pb.ModelStreamInferResponse(infer_response=self._compute(request, context))
            except Failure as failure:
                text = failure.message if failure.code is grpc.StatusCode.UNKNOWN else f"{failure.code.name}: {failure}"
                reply = pb.ModelStreamInferResponse(error_message=text)
                reply.infer_response.id = request.id
            if in_order:
                reply.infer_response.id = ""
            yield reply

    def _compute(self, request: pb.ModelInferRequest, context: grpc.ServicerContext) -> pb.ModelInferResponse:
        with self.lock:
            self.last_request = request
        model = request.model_name
        if model.startswith("fail:"):
            code = model.removeprefix("fail:")
            raise Failure(grpc.StatusCode[code], f"model failed with {code}")
        if model == "slow":
            stop = time.monotonic() + 5
            while context.is_active() and time.monotonic() < stop:
                time.sleep(0.01)
            raise Failure(grpc.StatusCode.INTERNAL, "too slow")
        if model not in ("double", "typed-reply", "broken-reply", "no-ids"):
            raise Failure(grpc.StatusCode.NOT_FOUND, f"unknown model {model!r}")
        inputs = codec.request_inputs(request)
        if "error" in inputs:
            code = inputs["error"].ravel()[0].decode()
            if code == "TEXT":
                raise Failure(grpc.StatusCode.UNKNOWN, "it broke")
            raise Failure(grpc.StatusCode[code], f"input asked for {code}")
        outputs = {name: doubled(array) for name, array in inputs.items()}
        wanted = [output.name for output in request.outputs]
        if wanted:
            outputs = {name: outputs[name] for name in wanted}
        datatypes = {tensor.name: tensor.datatype for tensor in request.inputs}
        response = codec.build_response(request, "1", outputs, datatypes)
        if model == "typed-reply":
            del response.raw_output_contents[:]
            for tensor, array in zip(response.outputs, outputs.values(), strict=True):
                codec.array_to_contents(array, tensor.datatype, tensor.contents)
        if model == "broken-reply":
            response.raw_output_contents[0] = response.raw_output_contents[0][:-1]
        return response


@dataclass
class Fake:
    target: str
    servicer: FakeServicer


def _start(
    servicer: FakeServicer, credentials: grpc.ServerCredentials | None = None, address: str = "127.0.0.1:0"
) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("inference.GRPCInferenceService", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("down", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if credentials is not None:
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    server.start()
    return server, port


@pytest.fixture(scope="module")
def server() -> Iterator[Fake]:
    servicer = FakeServicer()
    grpc_server, port = _start(servicer)
    yield Fake(f"127.0.0.1:{port}", servicer)
    grpc_server.stop(grace=None)


@pytest.fixture
def fake(server: Fake) -> Fake:
    server.servicer.reset()
    return server


@pytest.fixture
def client(fake: Fake) -> Iterator[InferenceClient]:
    with InferenceClient(fake.target, timeout=5.0, retry=FAST_RETRY) as c:
        yield c


def unused_target() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def expected(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        name: doubled(np.asarray(array, dtype=object) if array.dtype.kind in "SU" else array)
        for name, array in inputs.items()
    }


def assert_outputs_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for name, array in want.items():
        assert got[name].shape == array.shape, name
        if array.dtype == object:
            assert got[name].dtype == object
            assert [bytes(item) for item in got[name].ravel()] == [
                item.encode() if isinstance(item, str) else bytes(item) for item in array.ravel()
            ]
        else:
            assert got[name].dtype == array.dtype, name
            np.testing.assert_array_equal(got[name], array)


TYPED_ARRAYS: dict[str, np.ndarray] = {
    "fp32": np.arange(6, dtype=np.float32).reshape(2, 3) / 3,
    "fp64": np.linspace(-1, 1, 4),
    "int8": np.array([-3, 0, 60], dtype=np.int8),
    "int16": np.array([[-300, 2]], dtype=np.int16),
    "int32": np.array([1 << 20, -5], dtype=np.int32),
    "int64": np.array([[1 << 40, -(1 << 40)], [0, 1]], dtype=np.int64),
    "uint8": np.array([1, 2, 127], dtype=np.uint8),
    "uint32": np.array([1 << 30], dtype=np.uint32),
    "uint64": np.array([1 << 62], dtype=np.uint64),
    "bool": np.array([[True, False], [False, False]]),
    "bytes": np.array([b"ab", b"", b"\x00\xff"], dtype=object),
    "empty": np.zeros((0, 3), dtype=np.float32),
}
RAW_ARRAYS: dict[str, np.ndarray] = {
    **TYPED_ARRAYS,
    "fp16": np.array([0.5, -2.0, 65504.0 / 4], dtype=np.float16),
    "str": np.array(["hé"]),
}


# ---- sync client: inference ----


@pytest.mark.parametrize("name", sorted(RAW_ARRAYS))
def test_infer_raw_round_trip(client: InferenceClient, name: str) -> None:
    inputs = {name: RAW_ARRAYS[name]}
    assert_outputs_equal(client.infer("double", inputs), expected(inputs))


@pytest.mark.parametrize("name", sorted(TYPED_ARRAYS))
def test_infer_typed_round_trip(client: InferenceClient, fake: Fake, name: str) -> None:
    inputs = {name: TYPED_ARRAYS[name]}
    assert_outputs_equal(client.infer("double", inputs, raw=False), expected(inputs))
    assert fake.servicer.last_request is not None
    assert not fake.servicer.last_request.raw_input_contents


def test_infer_many_inputs_selected_outputs_and_request_fields(client: InferenceClient, fake: Fake) -> None:
    inputs: dict[str, np.ndarray] = {
        "a": np.ones((2, 2), np.float32),
        "b": np.array([3], np.int64),
        "c": np.array([True]),
    }
    outputs = client.infer("double", inputs, ["c", "a"], version="1", request_id="req-7")
    assert list(outputs) == ["c", "a"]
    np.testing.assert_array_equal(outputs["a"], 2 * inputs["a"])
    request = fake.servicer.last_request
    assert request is not None
    assert (request.model_version, request.id) == ("1", "req-7")


def test_infer_datatype_override_sends_bf16(client: InferenceClient, fake: Fake) -> None:
    words = np.array([0x3F80, 0x4000], dtype=np.uint16)
    outputs = client.infer("double", {"w": words}, datatypes={"w": "BF16"})
    assert fake.servicer.last_request is not None
    assert fake.servicer.last_request.inputs[0].datatype == "BF16"
    assert outputs["w"].dtype == np.uint16


def test_typed_fp16_is_refused_locally(client: InferenceClient, fake: Fake) -> None:
    with pytest.raises(TypeError, match="FP16"):
        client.infer("double", {"h": np.zeros(2, np.float16)}, raw=False)
    assert fake.servicer.calls["ModelInfer:double"] == 0


def test_typed_reply_is_decoded(client: InferenceClient) -> None:
    inputs: dict[str, np.ndarray] = {"x": np.array([1.5, 2.5], np.float32), "n": np.array([4], np.int64)}
    assert_outputs_equal(client.infer("typed-reply", inputs), expected(inputs))


def test_undecodable_reply_raises_invalid_response(client: InferenceClient) -> None:
    with pytest.raises(InvalidResponseError, match="broken-reply"):
        client.infer("broken-reply", {"x": np.ones(3, np.float32)})


# ---- errors ----

ERROR_CLASSES = {
    "INVALID_ARGUMENT": InvalidArgumentError,
    "NOT_FOUND": NotFoundError,
    "UNAVAILABLE": UnavailableError,
    "RESOURCE_EXHAUSTED": ResourceExhaustedError,
    "DEADLINE_EXCEEDED": DeadlineExceededError,
    "UNAUTHENTICATED": UnauthenticatedError,
    "PERMISSION_DENIED": PermissionDeniedError,
    "CANCELLED": CancelledError,
    "UNIMPLEMENTED": UnimplementedError,
    "INTERNAL": InternalError,
    "DATA_LOSS": InferenceServerError,
}


@pytest.mark.parametrize("code", sorted(ERROR_CLASSES))
def test_status_codes_map_to_exception_classes(client: InferenceClient, code: str) -> None:
    with pytest.raises(InferenceServerError) as caught:
        client.infer(f"fail:{code}", {"x": np.ones(1, np.float32)})
    error = caught.value
    assert type(error) is ERROR_CLASSES[code]
    assert error.code is grpc.StatusCode[code]
    assert error.message == f"model failed with {code}"
    assert str(error) == f"{code}: model failed with {code}"
    assert isinstance(error.__cause__, grpc.RpcError)


def test_unknown_model_is_not_found(client: InferenceClient) -> None:
    with pytest.raises(NotFoundError, match="unknown model 'nope'"):
        client.model_metadata("nope")


def test_unreachable_server_is_unavailable() -> None:
    with InferenceClient(unused_target(), retry=NO_RETRY, timeout=5.0) as c, pytest.raises(UnavailableError) as caught:
        c.server_live()
    assert caught.value.details


@pytest.mark.parametrize(
    ("text", "cls", "message"),
    [
        ("NOT_FOUND: no model 'x'", NotFoundError, "no model 'x'"),
        ("RESOURCE_EXHAUSTED:queue full", ResourceExhaustedError, "queue full"),
        ("something broke: badly", InferenceServerError, "something broke: badly"),
        ("OK: fine?", InferenceServerError, "OK: fine?"),
    ],
)
def test_stream_error_text_parsing(text: str, cls: type[InferenceServerError], message: str) -> None:
    error = from_stream_error(text)
    assert type(error) is cls
    assert error.message == message
    if cls is InferenceServerError:
        assert error.code is grpc.StatusCode.UNKNOWN


# ---- retries and deadlines ----


def test_metadata_is_retried_on_unavailable(client: InferenceClient, fake: Fake) -> None:
    fake.servicer.metadata_failures = 2
    assert client.server_metadata() == ServerMetadata("fake", "0.1", ("model_configuration", "statistics"))
    assert fake.servicer.calls["ServerMetadata"] == 3


def test_retries_are_bounded(fake: Fake) -> None:
    fake.servicer.metadata_failures = 5
    retry = RetryPolicy(attempts=2, backoff=0.01)
    with InferenceClient(fake.target, retry=retry) as c, pytest.raises(UnavailableError, match="warming"):
        c.server_metadata()
    assert fake.servicer.calls["ServerMetadata"] == 2


def test_infer_is_not_retried_by_default(client: InferenceClient, fake: Fake) -> None:
    with pytest.raises(UnavailableError):
        client.infer("fail:UNAVAILABLE", {"x": np.ones(1, np.float32)})
    assert fake.servicer.calls["ModelInfer:fail:UNAVAILABLE"] == 1


def test_infer_that_may_have_run_is_retried_only_when_asked(fake: Fake) -> None:
    retry = RetryPolicy(backoff=0.01, retry_unsafe_infer=True)
    with InferenceClient(fake.target, retry=retry) as c, pytest.raises(UnavailableError):
        c.infer("fail:UNAVAILABLE", {"x": np.ones(1, np.float32)})
    assert fake.servicer.calls["ModelInfer:fail:UNAVAILABLE"] == 3


def test_other_codes_are_not_retried(client: InferenceClient, fake: Fake) -> None:
    with pytest.raises(ResourceExhaustedError):
        client.infer("fail:RESOURCE_EXHAUSTED", {"x": np.ones(1, np.float32)})
    assert fake.servicer.calls["ModelInfer:fail:RESOURCE_EXHAUSTED"] == 1


def test_default_deadline_applies(fake: Fake) -> None:
    start = time.monotonic()
    with InferenceClient(fake.target, timeout=0.2) as c, pytest.raises(DeadlineExceededError):
        c.infer("slow", {"x": np.ones(1, np.float32)})
    assert time.monotonic() - start < 2


def test_per_call_timeout_overrides_default(client: InferenceClient) -> None:
    start = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        client.infer("slow", {"x": np.ones(1, np.float32)}, timeout=0.2)
    assert time.monotonic() - start < 2


def test_invalid_options_are_refused() -> None:
    with pytest.raises(ValueError, match="timeout"):
        InferenceClient("127.0.0.1:1", timeout=0)
    with pytest.raises(ValueError, match="timeout"):
        InferenceClient("127.0.0.1:1", timeout=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="attempts"):
        RetryPolicy(attempts=0)
    with pytest.raises(ValueError, match="backoff"):
        RetryPolicy(backoff=3.0, max_backoff=1.0)
    with pytest.raises(ValueError, match="jitter"):
        RetryPolicy(jitter=1.5)


# ---- metadata, health, readiness, auth ----


def test_liveness_readiness_metadata_config_statistics(client: InferenceClient) -> None:
    assert client.server_live() is True
    assert client.server_ready() is True
    assert client.model_ready("double") is True
    assert client.model_ready("nope") is False
    metadata = client.model_metadata("double")
    assert metadata == ModelMetadata("double", ("1",), "fake", SPECS, SPECS)
    config = client.model_config("double")
    assert isinstance(config, pb.ModelConfig)
    assert (config.name, config.max_batch_size, config.input[0].name) == ("double", 8, "x")
    stats = client.model_statistics()
    assert [s.name for s in stats] == list(MODELS)
    assert client.model_statistics("double")[0].inference_count == 7


def test_health_statuses(client: InferenceClient) -> None:
    assert client.health() == "SERVING"
    assert client.health("inference.GRPCInferenceService") == "SERVING"
    assert client.health("down") == "NOT_SERVING"
    assert client.health("nope") == "SERVICE_UNKNOWN"


def test_token_is_sent_as_bearer_metadata(fake: Fake) -> None:
    with InferenceClient(fake.target, token="s3cret") as c:
        c.infer("double", {"x": np.ones(1, np.float32)})
        assert fake.servicer.last_metadata.get("authorization") == "Bearer s3cret"
        c.server_live()
        assert fake.servicer.last_metadata.get("authorization") == "Bearer s3cret"
    with InferenceClient(fake.target) as c:
        c.server_live()
        assert "authorization" not in fake.servicer.last_metadata


def test_wait_until_ready(client: InferenceClient, fake: Fake) -> None:
    client.wait_until_ready(2.0)
    client.wait_until_ready(2.0, model="double")
    fake.servicer.ready = False
    start = time.monotonic()
    with pytest.raises(DeadlineExceededError, match="not ready"):
        client.wait_until_ready(0.3, interval=0.05)
    assert 0.25 < time.monotonic() - start < 2


def test_wait_until_ready_reports_unreachable_server() -> None:
    with InferenceClient(unused_target()) as c, pytest.raises(DeadlineExceededError, match=r"not ready after 0\.3"):
        c.wait_until_ready(0.3)


# ---- streaming ----


def test_stream_infer_keeps_order(client: InferenceClient) -> None:
    requests = ({"x": np.full((2,), i, np.float32)} for i in range(20))
    results = [out["x"] for out in client.stream_infer("double", requests)]
    assert [float(r[0]) for r in results] == [2.0 * i for i in range(20)]


def test_stream_infer_without_echoed_ids_keeps_arrival_order(client: InferenceClient, fake: Fake) -> None:
    results = [out["x"] for out in client.stream_infer("no-ids", [{"x": np.full(1, i, np.float32)} for i in range(5)])]
    assert [float(r[0]) for r in results] == [0.0, 2.0, 4.0, 6.0, 8.0]


def test_stream_infer_error_response_raises(client: InferenceClient) -> None:
    requests = [
        {"x": np.ones(1, np.float32)},
        {"x": np.ones(1, np.float32)},
        {"error": np.array([b"INVALID_ARGUMENT"], dtype=object)},
        {"x": np.ones(1, np.float32)},
    ]
    stream = client.stream_infer("double", requests)
    first, second = next(stream), next(stream)
    np.testing.assert_array_equal(first["x"], second["x"])
    with pytest.raises(InvalidArgumentError, match="input asked for INVALID_ARGUMENT"):
        next(stream)


def test_stream_infer_free_text_error_is_unknown(client: InferenceClient) -> None:
    with pytest.raises(InferenceServerError) as caught:
        list(client.stream_infer("double", [{"error": np.array([b"TEXT"], dtype=object)}]))
    assert caught.value.code is grpc.StatusCode.UNKNOWN
    assert caught.value.message == "it broke"


def test_stream_infer_request_error_surfaces_after_earlier_replies(client: InferenceClient) -> None:
    def requests() -> Iterator[dict[str, np.ndarray]]:
        yield {"x": np.ones(1, np.float32)}
        yield {"x": np.ones(1, np.float32)}
        raise RuntimeError("no more data")

    stream = client.stream_infer("double", requests())
    assert len([next(stream), next(stream)]) == 2
    with pytest.raises(RuntimeError, match="no more data"):
        next(stream)


def test_stream_infer_deadline(client: InferenceClient) -> None:
    with pytest.raises(DeadlineExceededError):
        list(client.stream_infer("slow", [{"x": np.ones(1, np.float32)}], timeout=0.2))


# ---- resilience: retries, backoff, deadlines, unreachable servers ----

ROW = {"x": np.ones((1, 4), np.float32)}


def handled(server: BackgroundServer, code: str | None = None) -> int:
    """Inference requests the real server answered (with ``code``), from its own metrics."""
    total = 0.0
    for family in server.registry.collect():
        for sample in family.samples:
            if sample.name == "inference_requests_total" and code in (None, sample.labels["code"]):
                total += sample.value
    return int(total)


def wait_until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_backoff_is_exponential_capped_and_jittered() -> None:
    policy = RetryPolicy(attempts=10, backoff=0.1, max_backoff=0.5, multiplier=2.0, jitter=0.5)
    rng = random.Random(7)
    for retry, full in enumerate([0.1, 0.2, 0.4, 0.5, 0.5], start=1):
        pauses = [policy.pause(retry, rng) for _ in range(500)]
        assert full * 0.5 <= min(pauses) <= max(pauses) <= full
        assert max(pauses) - min(pauses) > 0.4 * full  # spread over the jitter band
    assert RetryPolicy(backoff=0.1, jitter=0.0).pause(3) == pytest.approx(0.4)


def test_refused_inference_is_retried_counted_on_the_real_server(fake_server: BackgroundServer) -> None:
    """A draining server refuses new inference UNAVAILABLE before accepting it: the client
    tries again, each try reaching the server (its own count), up to ``attempts``."""
    controls = fake_server.framework.controls
    controls.gate.clear()
    controls.entered.clear()
    with futures.ThreadPoolExecutor(2) as pool, InferenceClient(fake_server.target, timeout=20) as busy:
        running = pool.submit(busy.infer, "double", ROW)
        try:
            assert controls.entered.wait(10)
            stopping = pool.submit(fake_server.stop, 20.0)
            wait_until(lambda: busy.health() == "NOT_SERVING")
            with InferenceClient(fake_server.target, timeout=0.5, retry=NO_RETRY) as probe:
                wait_until(lambda: _refused(probe))
            before = handled(fake_server, "UNAVAILABLE")
            retry = RetryPolicy(attempts=4, backoff=0.01, max_backoff=0.02)
            with (
                InferenceClient(fake_server.target, timeout=5, retry=retry) as c,
                pytest.raises(UnavailableError, match="not accepting new requests"),
            ):
                c.infer("double", ROW)
            assert handled(fake_server, "UNAVAILABLE") - before == 4
        finally:
            controls.gate.set()
        np.testing.assert_array_equal(running.result(10)["y"], 2 * ROW["x"])
        stopping.result(20)


def _refused(client: InferenceClient) -> bool:
    try:
        client.infer("double", ROW)
    except UnavailableError:
        return True
    except DeadlineExceededError:
        return False
    raise AssertionError("a draining server answered an inference")


def test_invalid_argument_and_queue_full_are_never_retried(tmp_path: Path) -> None:
    """Even with the most eager policy, each non-UNAVAILABLE failure reaches the real
    server exactly once (counted by the server)."""
    server = BackgroundServer(FakeFramework(), model=["double"], model_dir=tmp_path, max_batch_size=8,
                              max_queue_size=1)  # fmt: skip
    eager = RetryPolicy(attempts=5, backoff=0.01, retry_unsafe_infer=True)
    controls = server.framework.controls
    try:
        with InferenceClient(server.target, timeout=10, retry=eager) as c:
            with pytest.raises(InvalidArgumentError, match="shape"):
                c.infer("double", {"x": np.ones((1, 3), np.float32)})
            assert (handled(server), handled(server, "INVALID_ARGUMENT")) == (1, 1)
            controls.entered.clear()  # warm-up ran the model: wait for *this* request to enter it
            controls.gate.clear()
            with futures.ThreadPoolExecutor(2) as pool:
                running = [pool.submit(c.infer, "double", ROW)]
                assert controls.entered.wait(10)
                running.append(pool.submit(c.infer, "double", ROW))  # queued: the queue is full
                wait_until(lambda: server.registry.get_sample_value("inference_queue_depth", {"model": "double"}) == 1)
                with pytest.raises(ResourceExhaustedError, match="queue full"):
                    c.infer("double", ROW)
                assert handled(server, "RESOURCE_EXHAUSTED") == 1
                controls.gate.set()
                assert [len(f.result(10)["y"]) for f in running] == [1, 1]
            assert handled(server) == 4
    finally:
        controls.gate.set()
        server.stop()


@pytest.mark.parametrize("code", sorted(set(ERROR_CLASSES) - {"UNAVAILABLE"}))
def test_no_other_code_is_retried(fake: Fake, code: str) -> None:
    eager = RetryPolicy(attempts=5, backoff=0.01, retry_unsafe_infer=True)
    with InferenceClient(fake.target, retry=eager) as c, pytest.raises(InferenceServerError):
        c.infer(f"fail:{code}", ROW)
    assert fake.servicer.calls[f"ModelInfer:fail:{code}"] == 1


def test_inference_cut_off_mid_call_is_not_retried() -> None:
    """A server that stops while computing ends the call UNAVAILABLE: the request may have
    run, so it is not sent again (reads are)."""
    servicer = FakeServicer()
    grpc_server, port = _start(servicer)
    retry = RetryPolicy(attempts=5, backoff=0.01)
    threading.Timer(0.3, lambda: grpc_server.stop(grace=None)).start()
    with InferenceClient(f"127.0.0.1:{port}", timeout=5, retry=retry) as c, pytest.raises(UnavailableError) as caught:
        c.infer("slow", ROW)
    assert "cannot reach" not in caught.value.message  # not retried into the closed port
    assert servicer.calls["ModelInfer:slow"] == 1


def test_retries_reach_a_server_that_comes_up_late() -> None:
    """Connection refused: the call never left, so even inference is retried, and the
    channel reconnects on the policy's schedule (grpc alone would wait 1 s)."""
    target = unused_target()
    servicer = FakeServicer()
    started: list[grpc.Server] = []
    timer = threading.Timer(0.3, lambda: started.append(_start(servicer, address=target)[0]))
    # Pauses of 0.05 s then 0.1 s: 0.75 s in all, less than grpc's own 1 s (+-20 %) wait.
    retry = RetryPolicy(attempts=9, backoff=0.05, max_backoff=0.1, jitter=0.0)
    try:
        with InferenceClient(target, timeout=10, retry=retry) as c:
            timer.start()
            begun = time.monotonic()
            np.testing.assert_array_equal(c.infer("double", ROW)["x"], 2 * ROW["x"])
            assert time.monotonic() - begun < 1.5
        assert servicer.calls["ModelInfer:double"] == 1
    finally:
        timer.join()
        for grpc_server in started:
            grpc_server.stop(grace=None)


def test_retries_stop_after_attempts_and_at_the_deadline() -> None:
    target = unused_target()
    policy = RetryPolicy(attempts=4, backoff=0.1, max_backoff=0.2, jitter=0.5)
    begun = time.monotonic()
    with InferenceClient(target, timeout=10, retry=policy) as c, pytest.raises(UnavailableError) as caught:
        c.infer("double", ROW)
    elapsed = time.monotonic() - begun
    assert "(4 attempts over" in caught.value.message
    assert 0.05 + 0.1 + 0.1 <= elapsed < 0.1 + 0.2 + 0.2 + 1.0  # three pauses, each in [p/2, p]
    endless = RetryPolicy(attempts=10_000, backoff=0.05, max_backoff=0.05)
    begun = time.monotonic()
    with InferenceClient(target, timeout=0.6, retry=endless) as c, pytest.raises(UnavailableError) as caught:
        c.server_live()
    assert 0.4 < time.monotonic() - begun < 1.2  # the deadline bounds all tries together
    assert "attempts over 0." in caught.value.message


def test_server_down_is_one_clear_line_naming_the_target(capsys: pytest.CaptureFixture[str]) -> None:
    target = unused_target()
    retry = RetryPolicy(attempts=2, backoff=0.01)
    with InferenceClient(target, retry=retry) as c, pytest.raises(UnavailableError) as caught:
        c.infer("mlp", ROW)
    assert str(caught.value).startswith(
        f"UNAVAILABLE: cannot reach the server at {target}: Connection refused (2 attempts"
    )
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value.__cause__, grpc.RpcError)
    assert main(["--target", target, "--attempts", "2", "metadata"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: UNAVAILABLE: cannot reach the server at {target}: Connection refused (2 attempts")
    assert err.count("\n") == 1
    assert "Traceback" not in err

    async def scenario() -> None:
        async with AsyncInferenceClient(target, retry=NO_RETRY) as ac:
            with pytest.raises(UnavailableError, match=f"cannot reach the server at {target}: Connection refused"):
                await ac.infer("mlp", ROW)

    asyncio.run(scenario())


class Hang(grpc.GenericRpcHandler):
    """Accepts every call and never answers: only the client's deadline ends it."""

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        def hang(request: Any, context: grpc.ServicerContext) -> None:
            while context.is_active():
                time.sleep(0.01)

        def hang_stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[bytes]:
            hang(None, context)
            yield from ()

        if handler_call_details.method.endswith("/ModelStreamInfer"):
            return grpc.stream_stream_rpc_method_handler(hang_stream)
        return grpc.unary_unary_rpc_method_handler(hang)


@pytest.fixture
def hanging_target() -> Iterator[str]:
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), handlers=[Hang()])
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    yield f"127.0.0.1:{port}"
    grpc_server.stop(grace=None)


#: Every RPC of the client, as (name, call); the test checks that none is missing.
RPCS: list[tuple[str, Any]] = [
    ("server_live", lambda c: c.server_live()),
    ("server_ready", lambda c: c.server_ready()),
    ("model_ready", lambda c: c.model_ready("m")),
    ("server_metadata", lambda c: c.server_metadata()),
    ("model_metadata", lambda c: c.model_metadata("m")),
    ("model_config", lambda c: c.model_config("m")),
    ("model_statistics", lambda c: c.model_statistics()),
    ("health", lambda c: c.health()),
    ("infer", lambda c: c.infer("m", ROW)),
    ("stream_infer", lambda c: list(c.stream_infer("m", [ROW]))),
]


def test_every_call_has_the_default_deadline(hanging_target: str) -> None:
    public = {
        name for name in dir(InferenceClient) if not name.startswith("_") and callable(getattr(InferenceClient, name))
    }
    assert {name for name, _ in RPCS} == public - {"close", "wait_until_ready"}
    with InferenceClient(hanging_target, timeout=0.3, retry=FAST_RETRY) as c:
        for name, rpc in RPCS:
            begun = time.monotonic()
            with pytest.raises(
                DeadlineExceededError, match=f"no reply from {hanging_target} to .* within the deadline of 0.3 s"
            ):
                rpc(c)
            assert 0.25 < time.monotonic() - begun < 1.5, name


def test_every_async_call_has_the_default_deadline(hanging_target: str) -> None:
    async def scenario() -> None:
        async with AsyncInferenceClient(hanging_target, timeout=0.3, retry=FAST_RETRY) as c:
            calls: list[Any] = [c.server_live(), c.server_ready(), c.model_ready("m"), c.server_metadata(),
                                c.model_metadata("m"), c.model_config("m"), c.model_statistics(), c.health(),
                                c.infer("m", ROW), _drain(c.stream_infer("m", [ROW]))]  # fmt: skip
            for call in calls:
                begun = time.monotonic()
                with pytest.raises(DeadlineExceededError, match=r"within the deadline of 0\.3 s"):
                    await call
                assert 0.25 < time.monotonic() - begun < 1.5

    asyncio.run(scenario())


async def _drain(stream: AsyncIterator[dict[str, np.ndarray]]) -> None:
    async for _ in stream:
        pass


def test_deadline_honoured_by_the_real_server_path(fake_server: BackgroundServer) -> None:
    """A forward pass slower than the deadline: the call ends at the deadline, unary and
    streamed, sync and asyncio (the per-call timeout overrides the default)."""
    fake_server.framework.controls.delay_s = 2.0
    with InferenceClient(fake_server.target, timeout=0.3) as c:
        for call in (lambda: c.infer("double", ROW), lambda: list(c.stream_infer("double", [ROW]))):
            begun = time.monotonic()
            with pytest.raises(DeadlineExceededError):
                call()
            assert 0.25 < time.monotonic() - begun < 1.5
        begun = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            c.infer("double", ROW, timeout=0.15)
        assert 0.1 < time.monotonic() - begun < 1.5

    async def scenario() -> None:
        async with AsyncInferenceClient(fake_server.target, timeout=0.3) as ac:
            begun = time.monotonic()
            with pytest.raises(DeadlineExceededError):
                await ac.infer("double", ROW)
            assert 0.25 < time.monotonic() - begun < 1.5

    asyncio.run(scenario())
    fake_server.framework.controls.delay_s = 0.0


# ---- TLS ----


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    directory = tmp_path_factory.mktemp("tls")
    key, cert = directory / "key.pem", directory / "cert.pem"
    try:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
             "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
            check=True,
            capture_output=True,
            timeout=20,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"openssl cannot make a test certificate: {exc}")
    return key.read_bytes(), cert.read_bytes()


def test_tls_with_root_certificates(certificate: tuple[bytes, bytes]) -> None:
    key, cert = certificate
    grpc_server, port = _start(FakeServicer(), grpc.ssl_server_credentials([(key, cert)]))
    try:
        with InferenceClient(f"127.0.0.1:{port}", tls=True, root_certificates=cert) as c:
            assert c.server_live() is True
            out = c.infer("double", {"x": np.ones(2, np.float32)})
            np.testing.assert_array_equal(out["x"], [2, 2])
        with InferenceClient(f"127.0.0.1:{port}", retry=NO_RETRY) as plain, pytest.raises(UnavailableError):
            plain.server_live()
    finally:
        grpc_server.stop(grace=None)


# ---- asyncio client ----


def test_async_client_essentials(fake: Fake) -> None:
    async def scenario() -> None:
        async with AsyncInferenceClient(fake.target, token="tok", retry=FAST_RETRY, timeout=5.0) as c:
            assert await c.server_live() is True
            assert await c.server_ready() is True
            assert await c.model_ready("double") is True
            assert await c.health() == "SERVING"
            assert await c.health("nope") == "SERVICE_UNKNOWN"
            assert (await c.model_metadata("double")).inputs == SPECS
            assert (await c.model_config("double")).max_batch_size == 8
            assert len(await c.model_statistics()) == 2
            for raw in (True, False):
                inputs = {name: TYPED_ARRAYS[name] for name in ("int64", "bool", "bytes", "fp32")}
                assert_outputs_equal(await c.infer("double", inputs, raw=raw), expected(inputs))
            half = {"h": RAW_ARRAYS["fp16"]}
            assert_outputs_equal(await c.infer("double", half), expected(half))
            assert fake.servicer.last_metadata.get("authorization") == "Bearer tok"
            with pytest.raises(NotFoundError) as caught:
                await c.infer("nope", {"x": np.ones(1, np.float32)})
            assert caught.value.code is grpc.StatusCode.NOT_FOUND
            assert isinstance(caught.value.__cause__, grpc.RpcError)
            await c.wait_until_ready(2.0)

    asyncio.run(scenario())


def test_async_retries_and_deadline(fake: Fake) -> None:
    async def scenario() -> None:
        async with AsyncInferenceClient(fake.target, retry=FAST_RETRY, timeout=0.3) as c:
            fake.servicer.metadata_failures = 2
            assert (await c.server_metadata()).name == "fake"
            assert fake.servicer.calls["ServerMetadata"] == 3
            with pytest.raises(UnavailableError):
                await c.infer("fail:UNAVAILABLE", {"x": np.ones(1, np.float32)})
            assert fake.servicer.calls["ModelInfer:fail:UNAVAILABLE"] == 1
            with pytest.raises(DeadlineExceededError):
                await c.infer("slow", {"x": np.ones(1, np.float32)})
            fake.servicer.ready = False
            with pytest.raises(DeadlineExceededError, match="not ready"):
                await c.wait_until_ready(0.2, interval=0.05)

    asyncio.run(scenario())


def test_async_stream_infer(fake: Fake) -> None:
    async def numbers() -> AsyncIterator[dict[str, np.ndarray]]:
        for i in range(10):
            yield {"x": np.full((1,), i, np.float32)}
            await asyncio.sleep(0)

    async def scenario() -> None:
        async with AsyncInferenceClient(fake.target) as c:
            got = [float(out["x"][0]) async for out in c.stream_infer("double", numbers())]
            assert got == [2.0 * i for i in range(10)]
            got = [float(out["x"][0]) async for out in c.stream_infer("double", [{"x": np.ones(1, np.float32)}])]
            assert got == [2.0]
            bad = [{"x": np.ones(1, np.float32)}, {"error": np.array([b"RESOURCE_EXHAUSTED"], dtype=object)}]
            stream = c.stream_infer("double", bad)
            assert float((await anext(stream))["x"][0]) == 2.0
            with pytest.raises(ResourceExhaustedError):
                await anext(stream)

    asyncio.run(scenario())


# ---- CLI ----


def test_cli_health(fake: Fake, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--target", fake.target, "health"]) == 0
    assert capsys.readouterr().out.splitlines() == ["health: SERVING", "live: true", "ready: true"]
    assert main(["--target", fake.target, "health", "--service", "down"]) == 1
    assert "health(down): NOT_SERVING" in capsys.readouterr().out


def test_cli_error_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--target", unused_target(), "--timeout", "2", "health"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: UNAVAILABLE: ")
    assert "Traceback" not in captured.err


def test_cli_metadata(fake: Fake, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--target", fake.target, "metadata"]) == 0
    assert "name: fake\nversion: 0.1\nextensions: model_configuration, statistics" in capsys.readouterr().out
    assert main(["--target", fake.target, "metadata", "--model", "double"]) == 0
    out = capsys.readouterr().out
    assert "model: double" in out
    assert "  x  FP32  [-1, 4]" in out
    assert "config:" in out
    assert "max_batch_size: 8" in out
    assert main(["--target", fake.target, "metadata", "--model", "double", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["inputs"][0] == {"name": "x", "datatype": "FP32", "shape": [-1, 4]}
    assert document["config"]["max_batch_size"] == 8
    assert main(["--target", fake.target, "metadata", "--model", "noconfig"]) == 0
    assert "config: not available (UNIMPLEMENTED: no configs here)" in capsys.readouterr().out
    assert main(["--target", fake.target, "metadata", "--model", "nope"]) == 2
    assert capsys.readouterr().err == "error: NOT_FOUND: unknown model 'nope'\n"


def test_cli_infer_random_json_and_save(fake: Fake, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--target", fake.target, "infer", "--model", "double", "--random", "--batch-size", "3"]
    argv += ["--dim", "ids=1:5", "--seed", "1", "--save", str(tmp_path), "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "BYTES input 'text'" in captured.err
    document = json.loads(captured.out)
    shapes = {name: output["shape"] for name, output in document["outputs"].items()}
    assert shapes == {"x": [3, 4], "ids": [3, 5], "mask": [3, 3], "half": [2]}
    assert document["outputs"]["half"]["datatype"] == "FP16"
    assert document["latency_ms"] > 0
    ids = np.load(tmp_path / "ids.npy")
    assert ids.dtype == np.int64
    assert ids.min() >= 0
    assert ids.max() < 200
    assert (ids % 2 == 0).all()
    request = fake.servicer.last_request
    assert request is not None
    assert [t.datatype for t in request.inputs] == ["FP32", "INT64", "BOOL", "FP16"]


def test_cli_infer_input_files_and_text_output(fake: Fake, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "x.npy", np.arange(8, dtype=np.float32).reshape(2, 4))
    np.save(tmp_path / "text.npy", np.array([b"hi"]))
    argv = ["--target", fake.target, "--token", "t", "infer", "--model", "double"]
    argv += ["--input", f"x={tmp_path / 'x.npy'}", "--input", f"text={tmp_path / 'text.npy'}", "--output", "x"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "x  dtype=float32 (FP32)  shape=(2, 4)" in out
    assert "[[ 0.,  2.,  4.,  6.]," in out
    assert "text" not in out
    assert "latency: " in out
    assert out.rstrip().endswith(" ms")
    assert fake.servicer.last_metadata.get("authorization") == "Bearer t"
    big = np.zeros((100, 100), np.float32)
    np.save(tmp_path / "big.npy", big)
    assert main(["--target", fake.target, "infer", "--model", "double", "--input", f"x={tmp_path / 'big.npy'}"]) == 0
    assert "..." in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "double", "--typed", "--input", "h=HALF"], "error: datatype FP16 has no typed contents field"),
        (["--model", "double", "--random", "--dim", "x=0"], "error: --dim 'x=0': expected NAME=AXIS:SIZE"),
        (["--model", "double", "--random", "--dim", "x=1:3"], "axis 1 of [-1, 4] is not variable"),
        (["--model", "double", "--random", "--dim", "zz=1:3"], "unknown inputs ['zz']"),
        (["--model", "double", "--input", "x=/no/such.npy"], "error: "),
        (["--model", "fail:INVALID_ARGUMENT", "--input", "h=HALF"], "error: INVALID_ARGUMENT: model failed with"),
    ],
)
def test_cli_infer_errors(
    fake: Fake, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    half = tmp_path / "half.npy"
    np.save(half, np.ones(2, np.float16))
    argv = ["--target", fake.target, "infer", *(arg.replace("HALF", str(half)) for arg in extra)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_cli_usage_errors_return_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["health"]) == 2
    assert "--target" in capsys.readouterr().err
    assert main(["--help"]) == 0


def test_python_dash_m_client(fake: Fake) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "client", "--target", fake.target, "health"],
        check=False,
        capture_output=True,
        text=True,
        timeout=20,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr
    assert "health: SERVING" in result.stdout


def test_metrics_scrape_reads_one_model_and_says_when_the_endpoint_is_silent() -> None:
    """``client.metrics.scrape``: the one reader of a server's metrics endpoint (the load suite
    and the GPU check use it) keeps ``model``'s series, and raises OSError when nobody answers."""
    text = (
        b"# TYPE inference_rows counter\n"
        b'inference_rows_total{model="mlp"} 12.0\n'
        b'inference_rows_total{model="other"} 5.0\n'
        b"# TYPE process_gpu_memory_framework_bytes gauge\n"
        b"process_gpu_memory_framework_bytes 1024.0\n"
    )

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)

        def log_message(self, *args: Any) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metrics) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
        assert metrics.scrape(url, "mlp", timeout=5.0) == {
            "inference_rows_total": 12.0,
            "process_gpu_memory_framework_bytes": 1024.0,
        }
        server.shutdown()
    assert metrics.scrape(None, "mlp") == {}
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(urllib.error.URLError):  # an OSError: the load suite's sampler skips the tick
        metrics.scrape(f"http://127.0.0.1:{port}/metrics", "mlp", timeout=1.0)

"""Bad input and overload: each error class gets its documented status code, the
message is one line without internals, and the server keeps serving afterwards."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from contract import codec
from contract.protocol import inference_pb2 as pb
from contract.protocol import inference_pb2_grpc as pb_grpc
from tests.helpers.fakes import FakeFramework
from tests.helpers.servers import BackgroundServer

X = np.arange(8, dtype=np.float32).reshape(2, 4)


@pytest.fixture
def stub(fake_server: BackgroundServer) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(fake_server.target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def assert_still_serving(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    reply = stub.ModelInfer(codec.build_request("double", {"x": X[:1]}), timeout=10)
    np.testing.assert_array_equal(codec.response_outputs(reply)["y"], X[:1] * 2)


def request_with(mutate: Callable[[pb.ModelInferRequest], None]) -> pb.ModelInferRequest:
    request = codec.build_request("double", {"x": X})
    mutate(request)
    return request


def _set_shape(shape: list[int]) -> Callable[[pb.ModelInferRequest], None]:
    def mutate(request: pb.ModelInferRequest) -> None:
        del request.inputs[0].shape[:]
        request.inputs[0].shape.extend(shape)

    return mutate


def _set(field: str, value: object) -> Callable[[pb.ModelInferRequest], None]:
    return lambda request: setattr(request.inputs[0], field, value)


def _truncate(request: pb.ModelInferRequest) -> None:
    request.raw_input_contents[0] = request.raw_input_contents[0][:-1]


def _lengthen(request: pb.ModelInferRequest) -> None:
    request.raw_input_contents[0] = request.raw_input_contents[0] + X[:1, :1].tobytes()  # one element too many


def _add_unknown_input(request: pb.ModelInferRequest) -> None:
    request.inputs.add(name="bogus", datatype="FP32", shape=[2, 4])
    request.raw_input_contents.append(X.tobytes())


def _drop_input(request: pb.ModelInferRequest) -> None:
    del request.inputs[:]
    del request.raw_input_contents[:]


BAD_INPUTS = {
    "wrong shape": (_set_shape([1, 8]), "shape [1, 8], expected [-1, 4]"),
    "wrong rank": (_set_shape([8]), "shape"),
    "wrong datatype": (_set("datatype", "INT32"), "datatype INT32, expected FP32"),
    "unknown datatype": (_set("datatype", "FLOAT"), "unknown datatype"),
    "byte length, short": (_truncate, "31 bytes of raw contents, expected 32"),
    "byte length, long": (_lengthen, "36 bytes of raw contents, expected 32"),
    "missing input": (_drop_input, "missing required input"),
    "unknown input": (_add_unknown_input, "unknown input"),
    "unknown output": (lambda r: r.outputs.add(name="nope"), "unknown output"),
    "batch too large": (_set_shape([16, 4]), "max_batch_size 8"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_invalid_argument(stub: pb_grpc.GRPCInferenceServiceStub, case: str) -> None:
    mutate, message = BAD_INPUTS[case]
    request = request_with(mutate)
    if case == "batch too large":
        request.raw_input_contents[0] = np.zeros((16, 4), np.float32).tobytes()
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details() or ""
    assert message in details
    assert "\n" not in details
    assert_still_serving(stub)


def test_unknown_request_parameters_are_ignored(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = codec.build_request("double", {"x": X})
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    request.inputs[0].parameters["binary_data_size"].int64_param = 32
    reply = stub.ModelInfer(request, timeout=10)
    assert [o.name for o in reply.outputs] == ["y", "sum"]


def test_typed_contents_accepted_and_reply_is_raw(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    reply = stub.ModelInfer(codec.build_request("double", {"x": X}, ["sum"], raw=False), timeout=10)
    assert [o.name for o in reply.outputs] == ["sum"]
    assert len(reply.raw_output_contents) == 1
    np.testing.assert_allclose(codec.response_outputs(reply)["sum"], X.sum(axis=1, keepdims=True))


@pytest.mark.parametrize(("model", "version"), [("nope", ""), ("double", "7")])
def test_unknown_model_or_version_is_not_found(
    stub: pb_grpc.GRPCInferenceServiceStub, model: str, version: str
) -> None:
    for call in (
        lambda: stub.ModelInfer(codec.build_request(model, {"x": X}, model_version=version), timeout=10),
        lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name=model, version=version), timeout=10),
        lambda: stub.ModelConfig(pb.ModelConfigRequest(name=model, version=version), timeout=10),
        lambda: stub.ModelReady(pb.ModelReadyRequest(name=model, version=version), timeout=10),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert_still_serving(stub)


def test_internal_error_hides_details(fake_server: BackgroundServer, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    controls = fake_server.framework.controls
    controls.fail = True
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(codec.build_request("double", {"x": X}, request_id="req-42"), timeout=10)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    details = info.value.details() or ""
    assert "req-42" in details
    assert "secret" not in details
    assert "Traceback" not in details
    controls.fail = False
    assert_still_serving(stub)


def test_message_too_large_is_resource_exhausted(tmp_path: Path) -> None:
    server = BackgroundServer(FakeFramework(), model=["double"], model_dir=tmp_path, max_message_bytes=1024)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            big = np.zeros((8, 4), np.float32)
            request = codec.build_request("double", {"x": big})
            request.id = "x" * 2000
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(request, timeout=10)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert_still_serving(stub)
    finally:
        server.stop()


def test_full_queue_is_resource_exhausted(tmp_path: Path) -> None:
    server = BackgroundServer(
        FakeFramework(), model=["double"], model_dir=tmp_path, max_batch_size=1, max_queue_size=2, max_queue_delay_us=0
    )
    controls = server.framework.controls
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            controls.entered.clear()
            controls.gate.clear()
            one = codec.build_request("double", {"x": X[:1]})
            held = [stub.ModelInfer.future(one, timeout=20)]
            assert controls.entered.wait(10)  # first request is computing
            held += [stub.ModelInfer.future(one, timeout=20) for _ in range(2)]
            time.sleep(0.2)  # both queued
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(one, timeout=10)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            controls.gate.set()
            for future in held:
                assert future.result().outputs[0].name == "y"
            assert_still_serving(stub)
    finally:
        controls.gate.set()
        server.stop()


def test_deadline_expired_in_queue_is_never_computed(fake_server: BackgroundServer) -> None:
    controls = fake_server.framework.controls
    with grpc.insecure_channel(fake_server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        controls.entered.clear()
        controls.gate.clear()
        blocker = stub.ModelInfer.future(codec.build_request("double", {"x": X[:1]}), timeout=20)
        assert controls.entered.wait(10)
        batches_before = len(controls.batches)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(codec.build_request("double", {"x": np.ones((3, 4), np.float32)}), timeout=0.2)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The server's own answer, not the client's timer: it says where the time went.
        assert "in the queue; not computed" in (info.value.details() or "")
        controls.gate.set()
        blocker.result()
        assert_still_serving(stub)
        # The expired 3-row request never reached the model.
        assert 3 not in controls.batches[batches_before:]


def test_request_without_deadline_waits_for_its_batch(fake_server: BackgroundServer) -> None:
    """grpcio reports "no deadline" as a deadline centuries away: a queued request must
    still wait for its turn, not fail on a timer it cannot set."""
    controls = fake_server.framework.controls
    with grpc.insecure_channel(fake_server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        controls.entered.clear()
        controls.gate.clear()
        leader = stub.ModelInfer.future(codec.build_request("double", {"x": X[:1]}), timeout=20)
        assert controls.entered.wait(10)
        follower = stub.ModelInfer.future(codec.build_request("double", {"x": X}))  # no deadline
        deadline = time.monotonic() + 10
        while fake_server.server.servicer.models["double"].latest.batcher.queue_depth < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        controls.gate.set()
        leader.result(timeout=10)
        np.testing.assert_array_equal(codec.response_outputs(follower.result(timeout=10))["y"], X * 2)


def test_auth_token_required_but_health_open(tmp_path: Path) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = BackgroundServer(FakeFramework(), model=["double"], model_dir=tmp_path, auth_token="s3cret")
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for metadata in ((), (("authorization", "Bearer wrong"),)):
                with pytest.raises(grpc.RpcError) as info:
                    stub.ServerReady(pb.ServerReadyRequest(), timeout=10, metadata=metadata)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            good = (("authorization", "Bearer s3cret"),)
            assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10, metadata=good).ready
            reply = stub.ModelInfer(codec.build_request("double", {"x": X}), timeout=10, metadata=good)
            assert reply.outputs[0].name == "y"
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop()


def test_not_ready_while_loading_is_unavailable(tmp_path: Path) -> None:
    framework = FakeFramework()
    framework.controls.load_gate.clear()
    server = BackgroundServer(framework, load=False, model=["double"], model_dir=tmp_path)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
            assert not stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(codec.build_request("double", {"x": X}), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # not NOT_FOUND: it is coming
            assert "not ready" in (info.value.details() or "")
            framework.controls.load_gate.set()
            server.loading.result(30)
            assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
            assert_still_serving(stub)
    finally:
        framework.controls.load_gate.set()
        server.stop()


def test_concurrent_bad_and_good_requests(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    errors: list[grpc.StatusCode] = []
    results: list[np.ndarray] = []

    def worker(i: int) -> None:
        if i % 2:
            try:
                stub.ModelInfer(request_with(_truncate), timeout=10)
            except grpc.RpcError as err:
                errors.append(err.code())
        else:
            x = np.full((1, 4), i, np.float32)
            results.append(
                codec.response_outputs(stub.ModelInfer(codec.build_request("double", {"x": x}), timeout=10))["y"]
            )

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [grpc.StatusCode.INVALID_ARGUMENT] * 10
    assert sorted(float(r[0, 0]) for r in results) == [2.0 * i for i in range(0, 20, 2)]

"""Server lifecycle and observability on the framework-free model: health
transitions, graceful drain, metrics and ModelStatistics, reflection, settings."""

from __future__ import annotations

import argparse
import concurrent.futures
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from contract import codec
from contract.protocol import inference_pb2 as pb
from contract.protocol import inference_pb2_grpc as pb_grpc
from serving.settings import add_arguments, from_namespace
from tests.helpers.fakes import FakeFramework
from tests.helpers.servers import BackgroundServer

SERVICE = "inference.GRPCInferenceService"
X = np.ones((2, 4), np.float32)


def health_status(channel: grpc.Channel, service: str = "") -> int:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    return int(reply.status)


def test_health_not_serving_until_loaded_then_serving(tmp_path: Path) -> None:
    framework = FakeFramework()
    framework.controls.load_gate.clear()
    server = BackgroundServer(framework, load=False, model=["double"], model_dir=tmp_path)
    try:
        with grpc.insecure_channel(server.target) as channel:
            for service in ("", SERVICE):
                assert health_status(channel, service) == health_pb2.HealthCheckResponse.NOT_SERVING
            framework.controls.load_gate.set()
            server.loading.result(30)
            for service in ("", SERVICE):
                assert health_status(channel, service) == health_pb2.HealthCheckResponse.SERVING
    finally:
        framework.controls.load_gate.set()
        server.stop()


def test_drain_finishes_in_flight_and_refuses_new(tmp_path: Path) -> None:
    framework = FakeFramework()
    server = BackgroundServer(framework, model=["double"], model_dir=tmp_path, max_queue_delay_us=0)
    controls = framework.controls
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        controls.entered.clear()
        controls.gate.clear()
        in_flight = stub.ModelInfer.future(codec.build_request("double", {"x": X}), timeout=30)
        assert controls.entered.wait(10)
        stop = concurrent.futures.ThreadPoolExecutor(1).submit(server.server.stop, 10)
        deadline = time.monotonic() + 10
        while health_status(channel) != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(codec.build_request("double", {"x": X}), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # All the while the request is still in flight, health keeps answering, and says NOT_SERVING:
        # a transport already shutting down would answer UNAVAILABLE instead.
        asked_until = time.monotonic() + 1.0
        while time.monotonic() < asked_until:
            for service in ("", SERVICE):
                assert health_status(channel, service) == health_pb2.HealthCheckResponse.NOT_SERVING
            time.sleep(0.05)
        with grpc.insecure_channel(server.target) as fresh:  # a prober's new connection too
            assert health_status(fresh) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert not in_flight.done()
        assert not stop.done()
        controls.gate.set()
        reply = in_flight.result()
        np.testing.assert_array_equal(codec.response_outputs(reply)["y"], X * 2)
        stop.result(20)
    assert controls.closed
    server.stop()  # already stopped: a no-op


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_and_statistics_after_known_requests(fake_server: BackgroundServer) -> None:
    with grpc.insecure_channel(fake_server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(3):
            stub.ModelInfer(codec.build_request("double", {"x": X}), timeout=10)
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(codec.build_request("double", {"x": np.ones((2, 3), np.float32)}), timeout=10)
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="double"), timeout=10).model_stats[0]
    samples = scrape(fake_server.metrics_url)
    model = (("model", "double"),)
    assert samples[("inference_requests_total", (("code", "OK"), *model))] == 3
    assert samples[("inference_requests_total", (("code", "INVALID_ARGUMENT"), *model))] == 1
    assert samples[("inference_rows_total", model)] == 6
    executions = samples[("inference_executions_total", model)]
    assert 1 <= executions <= 3
    assert samples[("inference_batch_size_count", model)] == executions
    assert samples[("inference_batch_size_sum", model)] == 6
    assert samples[("inference_request_duration_seconds_count", model)] == 4
    assert samples[("inference_queue_duration_seconds_count", model)] == 3
    assert samples[("inference_queue_depth", model)] == 0
    assert samples[("inference_inflight_requests", model)] == 0
    assert samples[("process_resident_memory_bytes", ())] > 0
    # ModelStatistics is fed by the same events.
    assert stats.inference_count == 6
    assert stats.execution_count == executions
    assert stats.inference_stats.success.count == 3
    assert stats.inference_stats.fail.count == 1
    assert stats.inference_stats.queue.count == 3
    assert stats.inference_stats.compute_infer.count == 3
    assert sum(b.compute_infer.count for b in stats.batch_stats) == executions
    assert stats.last_inference > 0
    success_s = stats.inference_stats.success.ns / 1e9
    assert success_s <= samples[("inference_request_duration_seconds_sum", model)] + 1e-9


def test_metadata_config_and_reflection(fake_server: BackgroundServer) -> None:
    with grpc.insecure_channel(fake_server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        meta = stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10)
        assert meta.name == "fake_server"
        assert "statistics" in meta.extensions
        model = stub.ModelMetadata(pb.ModelMetadataRequest(name="double"), timeout=10)
        assert (model.name, list(model.versions), model.platform) == ("double", ["1"], "fake_numpy")
        assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [("x", "FP32", [-1, 4])]
        config = stub.ModelConfig(pb.ModelConfigRequest(name="double"), timeout=10).config
        assert config.max_batch_size == 8
        assert list(config.input[0].dims) == [4]
        assert config.dynamic_batching.max_queue_delay_microseconds == 0
        assert config.dynamic_batching.default_queue_policy.max_queue_size == 1024
        assert config.instance_group[0].count == 1
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(
            reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        )
        services = {s.name for s in replies[0].list_services_response.service}
        assert {SERVICE, "grpc.health.v1.Health"} <= services
        replies = list(
            reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)])
            )
        )
        assert replies[0].file_descriptor_response.file_descriptor_proto


def test_batching_off_is_reported_in_config(tmp_path: Path) -> None:
    server = BackgroundServer(FakeFramework(), model=["double"], model_dir=tmp_path, dynamic_batching=False)
    try:
        with grpc.insecure_channel(server.target) as channel:
            config = pb_grpc.GRPCInferenceServiceStub(channel).ModelConfig(pb.ModelConfigRequest(name="double")).config
            assert not config.HasField("dynamic_batching")
    finally:
        server.stop()


def test_settings_precedence_flag_env_default() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    env = {"X_MAX_BATCH_SIZE": "16", "X_PORT": "9000", "X_DYNAMIC_BATCHING": "false", "X_THREADS": "3"}
    settings = from_namespace(parser.parse_args(["--port", "9100"]), "X_", env, defaults={"port": 1})
    assert (settings.port, settings.max_batch_size, settings.dynamic_batching, settings.threads) == (9100, 16, False, 3)
    settings = from_namespace(parser.parse_args([]), "X_", {}, defaults={"port": 1})
    assert (settings.port, settings.max_batch_size, settings.dynamic_batching) == (1, 32, True)
    with pytest.raises(ValueError, match="--preferred-batch-sizes"):
        from_namespace(parser.parse_args(["--preferred-batch-sizes", "64"]), "X_", {})
    with pytest.raises(ValueError, match="X_MAX_BATCH_SIZE"):
        from_namespace(parser.parse_args([]), "X_", {"X_MAX_BATCH_SIZE": "many"})


def test_stream_errors_are_in_band_and_a_cancelled_stream_leaves_nothing_behind(tmp_path: Path) -> None:
    framework = FakeFramework()
    server = BackgroundServer(framework, model=["double"], model_dir=tmp_path, max_batch_size=8)
    controls = framework.controls
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            requests = [
                codec.build_request("double", {"x": X}, request_id="good"),
                codec.build_request("double", {"x": np.ones((2, 3), np.float32)}, request_id="bad-shape"),
                codec.build_request("nope", {"x": X}, request_id="bad-model"),
            ]
            replies = {r.infer_response.id: r for r in stub.ModelStreamInfer(iter(requests), timeout=10)}
            assert replies["good"].error_message == ""
            assert replies["bad-shape"].error_message.startswith("INVALID_ARGUMENT: ")
            assert replies["bad-model"].error_message.startswith("NOT_FOUND: ")
            # A stream cancelled while its requests wait: they are dropped, nothing stays in flight.
            controls.entered.clear()
            controls.gate.clear()
            blocker = stub.ModelInfer.future(codec.build_request("double", {"x": X}), timeout=20)
            assert controls.entered.wait(10)
            stream = stub.ModelStreamInfer(
                iter([codec.build_request("double", {"x": X}, request_id=str(i)) for i in range(3)]), timeout=20
            )
            runtime = server.server.servicer.models["double"].latest
            deadline = time.monotonic() + 10
            while runtime.batcher.queue_depth < 3:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            stream.cancel()
            while runtime.batcher.queue_depth:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            controls.gate.set()
            blocker.result(10)
            samples = scrape(server.metrics_url)
            assert samples[("inference_inflight_requests", (("model", "double"),))] == 0
            assert samples[("inference_requests_total", (("code", "CANCELLED"), ("model", "double")))] == 3
            computed = sum(controls.batches)
            reply = stub.ModelInfer(codec.build_request("double", {"x": X}), timeout=10)
            assert codec.response_outputs(reply)["y"].shape == X.shape
            assert sum(controls.batches) == computed + X.shape[0]  # the cancelled rows never ran
    finally:
        controls.gate.set()
        server.stop()


def test_response_larger_than_the_send_limit_is_resource_exhausted(tmp_path: Path) -> None:
    # 8 rows x 4 floats in (~160 bytes); 8 x 4 floats and 8 float64 sums out, over a 200-byte limit.
    server = BackgroundServer(FakeFramework(), model=["double"], model_dir=tmp_path, max_message_bytes=200)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            request = codec.build_request("double", {"x": np.ones((8, 4), np.float32)})
            assert request.ByteSize() < 200
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(request, timeout=10)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            reply = stub.ModelInfer(codec.build_request("double", {"x": np.ones((1, 4), np.float32)}), timeout=10)
            assert reply.outputs[0].name == "y"  # still serving
    finally:
        server.stop()


def test_two_instances_compute_two_batches_at_once(tmp_path: Path) -> None:
    framework = FakeFramework()
    framework.controls.delay_s = 0.2
    server = BackgroundServer(framework, model=["double"], model_dir=tmp_path, max_batch_size=1, instances=2)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            config = stub.ModelConfig(pb.ModelConfigRequest(name="double"), timeout=10).config
            assert config.instance_group[0].count == 2
            started = time.monotonic()
            futures = [
                stub.ModelInfer.future(codec.build_request("double", {"x": X[:1] * i}), timeout=10) for i in range(4)
            ]
            for i, future in enumerate(futures):
                np.testing.assert_array_equal(codec.response_outputs(future.result())["y"], X[:1] * i * 2)
            # Four one-row batches of 200 ms on two instances: about 0.4 s, not 0.8 s.
            assert time.monotonic() - started < 0.7
    finally:
        server.stop()

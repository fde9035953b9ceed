"""The comparison's sampler reads a real server's ModelStatistics (the serving core in this process, over gRPC)."""

from __future__ import annotations

import time
from concurrent import futures

import grpc
import numpy as np
import pytest

from contract import codec
from contract.protocol import inference_pb2_grpc as pb_grpc
from loadtest import breakdown
from loadtest.sampling import Endpoint, Sampler, StatisticsReader
from tests.helpers.servers import BackgroundServer

X = np.arange(8, dtype=np.float32).reshape(2, 4)


def test_statistics_reader_feeds_the_breakdown_from_a_serving_server(fake_server: BackgroundServer) -> None:
    endpoint = Endpoint("fake", fake_server.target, fake_server.metrics_url, "double")
    with StatisticsReader(endpoint, timeout=5.0) as reader:
        before = reader.read()
        with grpc.insecure_channel(fake_server.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            started = time.perf_counter()
            for _ in range(5):
                stub.ModelInfer(codec.build_request("double", {"x": X}), timeout=10)
            client_ms = (time.perf_counter() - started) * 1000 / 5
        after = reader.read()
    deltas = breakdown.statistics_deltas(before, after)
    assert deltas["success_count"] == 5
    assert deltas["queue_count"] == deltas["compute_infer_count"] == 5
    figures = {key: value for key, value in breakdown.time_breakdown(client_ms, deltas).items() if value is not None}
    assert set(figures) == set(breakdown.KEYS)  # every figure measured
    assert 0 < figures["server_ms"] < client_ms
    assert figures["compute_infer_ms"] > 0
    for part in ("queue_ms", "compute_input_ms", "compute_output_ms", "network_serialization_ms"):
        assert figures[part] >= 0, part
    assert sum(figures[part] for part in breakdown.PARTS) == pytest.approx(client_ms)


def test_the_sampler_puts_the_statistics_in_each_tick(fake_server: BackgroundServer) -> None:
    endpoint = Endpoint("fake", fake_server.target, fake_server.metrics_url, "double")
    with StatisticsReader(endpoint, timeout=5.0) as reader, Sampler(endpoint, 0.05, reader.read) as sampler:
        time.sleep(0.3)
    assert len(sampler.ticks) >= 3
    assert all(tick.statistics.keys() >= {"success_count", "queue_ns", "compute_infer_ns"} for tick in sampler.ticks)


class Unimplemented(grpc.GenericRpcHandler):
    """Implements nothing (every call UNIMPLEMENTED) and counts the calls."""

    def __init__(self) -> None:
        self.calls = 0

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> None:
        self.calls += 1


def test_a_server_without_model_statistics_is_asked_once() -> None:
    handler = Unimplemented()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with StatisticsReader(Endpoint("bare", f"127.0.0.1:{port}", None, "mlp"), timeout=5.0) as reader:
            assert [reader.read() for _ in range(3)] == [{}, {}, {}]
        assert handler.calls == 1
    finally:
        server.stop(None)

"""Several worker processes behind one port (--workers): one server from outside."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from client import InferenceClient
from contract import codec
from contract.protocol import inference_pb2 as pb
from contract.protocol import inference_pb2_grpc as pb_grpc
from loadtest.servers import ROOT, ServerProcess

CHANNELS = 16  # the kernel spreads connections: 16 of them land on both workers but for 2 x 2^-16
X = np.ones((1, 64), np.float32)
OK_REQUESTS = ("inference_requests_total", (("code", "OK"), ("model", "mlp")))
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def channels(target: str) -> list[grpc.Channel]:
    """Channels with a connection each (gRPC would otherwise share one between them)."""
    return [grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(CHANNELS)]


def counters(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def health(channel: grpc.Channel) -> int:
    return int(health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status)


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[ServerProcess]:
    args = ["--workers", "2", "--threads", "1", "--device", "cpu", "--model-dir", str(tmp_path)]
    with ServerProcess("torch", "mlp", args) as server:
        yield server


def test_two_workers_answer_as_one_server(two_workers: ServerProcess) -> None:
    opened = channels(two_workers.target)
    try:
        stubs = [pb_grpc.GRPCInferenceServiceStub(channel) for channel in opened]
        for stub in stubs:
            for _ in range(5):
                assert codec.response_outputs(stub.ModelInfer(codec.build_request("mlp", {"input": X}), timeout=10))
        time.sleep(0.5)  # every worker has published its figures
        samples = counters(two_workers.metrics_url or "")
        model = (("model", "mlp"),)
        per_worker = [samples[("inference_worker_requests_total", (*model, ("worker", str(i))))] for i in (0, 1)]
        assert all(count > 0 for count in per_worker), per_worker  # both workers served
        assert sum(per_worker) == samples[("inference_requests_total", (("code", "OK"), *model))] == 5 * CHANNELS
        # Whichever worker answers ModelStatistics, it reports the totals of both.
        counts = {stub.ModelStatistics(pb.ModelStatisticsRequest(name="mlp"), timeout=10).model_stats[0].inference_count
                  for stub in stubs}  # fmt: skip
        assert counts == {5 * CHANNELS}
        # Our client spreads its calls when given several channels.
        with InferenceClient(two_workers.target, channels=CHANNELS) as client:
            for _ in range(2 * CHANNELS):
                client.infer("mlp", {"input": X})
        time.sleep(0.5)
        now = counters(two_workers.metrics_url or "")
        spread = [
            now[("inference_worker_requests_total", (*model, ("worker", str(i))))] - per_worker[i] for i in (0, 1)
        ]
        assert sum(spread) == 2 * CHANNELS
        assert all(count > 0 for count in spread), spread
        config = stubs[0].ModelConfig(pb.ModelConfigRequest(name="mlp"), timeout=10).config
        assert config.parameters["workers"].string_value == "2"
        assert all(health(channel) == SERVING for channel in opened)
    finally:
        for channel in opened:
            channel.close()


def test_a_killed_worker_is_restarted_and_nothing_is_forgotten(two_workers: ServerProcess, tmp_path: Path) -> None:
    opened = channels(two_workers.target)
    try:
        stubs = [pb_grpc.GRPCInferenceServiceStub(channel) for channel in opened]
        for stub in stubs:
            stub.ModelInfer(codec.build_request("mlp", {"input": X}), timeout=10)
        time.sleep(0.5)
        before = counters(two_workers.metrics_url or "")[
            ("inference_requests_total", (("code", "OK"), ("model", "mlp")))
        ]
        pids = json.loads(two_workers.port_file.read_text())["pids"]
        os.kill(pids[1], signal.SIGKILL)
        seen: list[int] = []
        deadline = time.monotonic() + 120
        with grpc.insecure_channel(two_workers.target) as channel:
            while time.monotonic() < deadline and not (NOT_SERVING in seen and seen[-1] == SERVING):
                with contextlib.suppress(grpc.RpcError):  # this connection was the dead worker's
                    seen.append(health(channel))
                time.sleep(0.05)
        assert NOT_SERVING in seen  # said so while a worker was missing
        assert seen[-1] == SERVING  # and serves again
        assert "restarting it" in two_workers.log_tail(400)
        fresh = channels(two_workers.target)
        try:
            for channel in fresh:
                reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                    codec.build_request("mlp", {"input": X}), timeout=30
                )
                assert reply.outputs[0].name == "logits"
        finally:
            for channel in fresh:
                channel.close()
        time.sleep(0.5)
        after = counters(two_workers.metrics_url or "")[
            ("inference_requests_total", (("code", "OK"), ("model", "mlp")))
        ]
        assert after == before + CHANNELS  # the dead worker's answers still count
    finally:
        for channel in opened:
            channel.close()


def test_a_worker_that_cannot_load_fails_the_whole_start(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tests.fake_server", "serve", "--model", "double", "--workers", "2", "--host",
         "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--model-dir", str(tmp_path), "--no-warmup"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "FAKE_FAIL_WORKER": "1"}, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    failures = [line for line in result.stderr.splitlines() if "failed to start" in line]
    assert len(failures) == 1
    assert "worker 1 of 2" in failures[0]
    assert "cannot read its model" in failures[0]
    assert "Traceback" not in result.stderr


def test_worker_memory_per_process_with_gpu_memory_from_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each worker holds its own CUDA context and model copy: its GPU memory is reported
    apart (NVML faked: no GPU here), beside its resident memory and the server's totals."""
    me = os.getpid()

    class FakeNvml:
        @staticmethod
        def nvmlInit() -> None:
            pass

        @staticmethod
        def nvmlDeviceGetCount() -> int:
            return 1

        @staticmethod
        def nvmlDeviceGetHandleByIndex(index: int) -> str:
            return f"gpu{index}"

        @staticmethod
        def nvmlDeviceGetComputeRunningProcesses(handle: str) -> list[object]:
            process = type("Process", (), {"pid": me, "usedGpuMemory": 3 << 30})
            other = type("Process", (), {"pid": 1, "usedGpuMemory": 1 << 30})  # not a worker
            return [process, other]

    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml)
    from prometheus_client import CollectorRegistry, generate_latest

    from serving.workers import WorkerProcesses

    registry = CollectorRegistry()
    registry.register(WorkerProcesses(lambda: [(0, me)]))
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
    }
    assert samples[("worker_gpu_memory_used_bytes", (("worker", "0"),))] == 3 << 30
    assert samples[("worker_resident_memory_bytes", (("worker", "0"),))] > 0
    assert (
        samples[("process_resident_memory_bytes", ())] >= samples[("worker_resident_memory_bytes", (("worker", "0"),))]
    )

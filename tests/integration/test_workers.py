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
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from client import InferenceClient
from contract import codec
from contract.protocol import inference_pb2 as pb
from contract.protocol import inference_pb2_grpc as pb_grpc
from loadtest.servers import ROOT, ServerProcess
from serving import nvml
from serving.metrics import MetricsTable, ServerMetrics
from serving.workers import WorkerProcesses
from tests.helpers.fakes import FakeGpu, FakeNvml

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
        [sys.executable, "-m", "tests.helpers.fake_server", "serve", "--model", "double", "--workers", "2", "--host",
         "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--model-dir", str(tmp_path), "--no-warmup"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "FAKE_FAIL_WORKER": "1"}, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    failures = [line for line in result.stderr.splitlines() if "failed to start" in line]
    assert len(failures) == 1
    assert "worker 1 of 2" in failures[0]
    assert "cannot read its model" in failures[0]
    assert "Traceback" not in result.stderr


def metric_samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
    }


WORKER_0 = (("worker", "0"),)


def test_worker_memory_per_process_with_gpu_memory_from_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each worker holds its own CUDA context and model copy: its GPU memory is reported
    apart (NVML faked: no GPU here), beside its resident memory and the server's totals."""
    me = os.getpid()
    gpu = FakeGpu(processes=[(me, 3 << 30), (1, 1 << 30)])  # pid 1: not a worker
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([gpu]))
    monkeypatch.setattr(nvml, "in_host_pid_namespace", lambda: True)
    registry = CollectorRegistry()
    registry.register(WorkerProcesses(lambda: [(0, me)]))
    samples = metric_samples(registry)
    assert samples[("worker_gpu_memory_used_bytes", WORKER_0)] == 3 << 30
    assert samples[("worker_resident_memory_bytes", WORKER_0)] > 0
    assert samples[("process_resident_memory_bytes", ())] >= samples[("worker_resident_memory_bytes", WORKER_0)]


@pytest.mark.parametrize(
    "listed",
    [
        [(os.getpid(), 1 << 30), (4_194_305, 3 << 30)],  # an older driver: host pids, one equal to ours by chance
        [(os.getpid(), None)],  # a driver that translates pids: ours, without a figure
    ],
    ids=["host-pids", "no-figure"],
)
def test_in_a_container_worker_gpu_memory_is_never_a_wrong_figure(
    monkeypatch: pytest.MonkeyPatch, listed: list[tuple[int, int | None]]
) -> None:
    """In a PID namespace of its own NVML gives no figure for a worker: the series is absent
    (it read another process's memory, or 0)."""
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([FakeGpu(processes=listed)]))
    monkeypatch.setattr(nvml, "in_host_pid_namespace", lambda: False)
    registry = CollectorRegistry()
    registry.register(WorkerProcesses(lambda: [(0, os.getpid())]))
    samples = metric_samples(registry)
    assert ("worker_gpu_memory_used_bytes", WORKER_0) not in samples
    assert samples[("worker_resident_memory_bytes", WORKER_0)] > 0


def test_a_worker_reports_its_framework_gpu_memory_through_the_shared_table(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """What holds in a container: each worker publishes what its framework holds, and the
    supervisor exports it per worker."""
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([FakeGpu(processes=[(4_194_305, 3 << 30)])]))
    monkeypatch.setattr(nvml, "in_host_pid_namespace", lambda: False)
    path = tmp_path / "metrics.table"
    supervisor_table = MetricsTable(["double"], 8, workers=3, path=path)
    readers: list[Callable[[], int | None]] = [lambda: 5 << 30, lambda: None]  # worker 1: nothing to report
    for index, read in enumerate(readers):
        worker = ServerMetrics(CollectorRegistry(), MetricsTable(["double"], 8, workers=3, path=path), worker=index)
        worker.for_model("double", max_batch_size=8)
        worker.bind_gpu_memory(read)
        worker.publish()
    registry = CollectorRegistry()
    registry.register(WorkerProcesses(lambda: [(0, os.getpid()), (1, os.getpid())], supervisor_table))
    samples = metric_samples(registry)
    assert samples[("worker_gpu_memory_framework_bytes", WORKER_0)] == 5 << 30
    assert ("worker_gpu_memory_framework_bytes", (("worker", "1"),)) not in samples
    assert ("worker_gpu_memory_used_bytes", WORKER_0) not in samples


def test_gpu_metrics_are_exported_once_by_a_server_of_several_workers(tmp_path: Path) -> None:
    """--workers 2 on a GPU: the supervisor's metrics port exports the device's figures once
    (workers have no metrics port). NVML is faked in the server's processes."""
    fakes = tmp_path / "fake_nvml"
    fakes.mkdir()
    (fakes / "pynvml.py").write_text(
        "import sys\n"
        "from tests.helpers.fakes import FakeGpu, FakeNvml\n"
        "sys.modules[__name__] = FakeNvml([FakeGpu(uuid='GPU-0', used=1 << 30), FakeGpu(uuid='GPU-1', used=2 << 30)])\n"
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("CUDA_")}
    env.update(PYTHONPATH=os.pathsep.join([str(fakes), str(ROOT)]), CUDA_VISIBLE_DEVICES="1,0")
    port_file = tmp_path / "ports.json"
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.fake_server", "serve", "--model", "double", "--workers", "2", "--device",
         "cuda:0", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--port-file", str(port_file),
         "--model-dir", str(tmp_path / "models"), "--no-warmup"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists() and server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert port_file.exists(), "the server did not start"
        metrics_port = json.loads(port_file.read_text())["metrics_port"]
        samples = counters(f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=60)
    gpu = [(name, labels) for name, labels in samples if name.startswith("gpu_")]
    assert sorted(name for name, _ in gpu) == [
        "gpu_info", "gpu_memory_total_bytes", "gpu_memory_used_bytes", "gpu_utilization_ratio",
    ], stderr.decode()  # fmt: skip
    assert samples[("gpu_memory_used_bytes", (("device", "0"),))] == 2 << 30  # cuda:0 is NVML's GPU 1
    assert server.returncode == 0, stderr.decode()


def test_settings_import_neither_workers_nor_server() -> None:
    """Settings are the bottom of the serving core: workers and server import them, never the
    other way round (an import cycle dodged by imports inside functions was here before)."""
    code = (
        "import json, sys; from serving.settings import ServerSettings; ServerSettings(workers='2').validate(); "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('serving.'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(done.stdout) == ["serving.settings"]

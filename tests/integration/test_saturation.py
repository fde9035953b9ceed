"""A saturated server still answers health checks promptly (real processes, loopback only)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loadtest.sampling import scrape
from loadtest.servers import ROOT, ServerProcess
from loadtest.stats import metric_deltas

CALLERS = 64
HEALTH_P99_LIMIT_S = 0.050


def health_latencies_under_load(model_dir: Path, server_args: list[str]) -> tuple[list[float], dict, dict]:
    """(health Check latencies, the load driver's result, the server's metrics over the load)."""
    args = ["--threads", "1", "--device", "cpu", "--model-dir", str(model_dir), *server_args]
    with ServerProcess("torch", "resnet", args) as server:
        before = scrape(server.metrics_url, "resnet")
        driver = subprocess.Popen(
            [sys.executable, "-m", "loadtest.driver", "--target", server.target, "--model", "resnet",
             "--concurrency", str(CALLERS), "--seconds", "3", "--warmup", "1"],
            stdout=subprocess.PIPE, cwd=ROOT,
        )  # fmt: skip
        time.sleep(1.5)  # the callers are connected and the model busy
        latencies = []
        with grpc.insecure_channel(server.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            stop = time.monotonic() + 2.0
            while time.monotonic() < stop:
                started = time.perf_counter()
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                latencies.append(time.perf_counter() - started)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                time.sleep(0.01)
        output, _ = driver.communicate(timeout=60)
        after = scrape(server.metrics_url, "resnet")
    return latencies, json.loads(output), metric_deltas(before, after)


@pytest.mark.slow
def test_health_answers_within_50ms_while_64_callers_saturate_the_model(tmp_path: Path) -> None:
    latencies, load, server = health_latencies_under_load(tmp_path, [])
    assert load["requests"] > 0
    assert not load["errors"]
    # Saturated: the callers queued behind a busy model, so batches were large.
    assert server["batch_size_mean"] is not None
    assert server["batch_size_mean"] > 8
    assert len(latencies) > 50
    assert float(np.percentile(latencies, 99)) <= HEALTH_P99_LIMIT_S

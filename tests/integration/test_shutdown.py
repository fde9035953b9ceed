"""Graceful shutdown of real server processes: SIGTERM under load loses nothing; a hung
forward pass cannot keep the process alive past the grace period."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from contract import codec
from contract.protocol import inference_pb2_grpc as pb_grpc
from loadtest.servers import ROOT, ServerProcess

CALLERS = 64
GRACE_S = 20.0


async def keep_sending(
    target: str, stop: threading.Event, outcomes: collections.Counter[str], connections: int = 1
) -> None:
    """CALLERS callers sending mlp requests back to back until ``stop``, or until refused,
    spread over ``connections`` channels (each its own connection)."""
    request = codec.build_request("mlp", {"input": np.ones((1, 64), np.float32)})
    options = [("grpc.use_local_subchannel_pool", 1)]
    opened = [grpc.aio.insecure_channel(target, options=options) for _ in range(connections)]
    stubs = [pb_grpc.GRPCInferenceServiceStub(channel) for channel in opened]

    async def caller(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
        while not stop.is_set():
            try:
                await stub.ModelInfer(request, timeout=30)  # type: ignore[misc]  # stubs type the sync call
                outcomes["OK"] += 1
            except grpc.aio.AioRpcError as err:
                outcomes[err.code().name] += 1
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    return  # refused: the server is going away

    try:
        await asyncio.gather(*(caller(stubs[i % connections]) for i in range(CALLERS)))
    finally:
        for channel in opened:
            await channel.close(None)


def health_status(target: str) -> str:
    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.RpcError as err:
        return f"error:{err.code().name}"


@pytest.mark.parametrize(("framework", "workers"), [("torch", 1), ("tensorflow", 1), ("torch", 2)])
def test_sigterm_under_load_finishes_or_refuses_every_request(framework: str, workers: int, tmp_path: Path) -> None:
    # A 300 ms batching window keeps requests queued when the signal arrives.
    args = ["--threads", "1", "--device", "cpu", "--model-dir", str(tmp_path), "--max-queue-delay-us", "300000",
            "--grace-period-s", str(GRACE_S), "--workers", str(workers)]  # fmt: skip
    with ServerProcess(framework, "mlp", args) as server:
        stop = threading.Event()
        outcomes: collections.Counter[str] = collections.Counter()
        sending = keep_sending(server.target, stop, outcomes, connections=8 * workers)
        load = threading.Thread(target=asyncio.run, args=(sending,))
        load.start()
        time.sleep(1.5)
        served_before = outcomes["OK"]
        assert served_before > 0
        assert server.process is not None
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        # Health while the server drains: the signal reaches a lone server at once, the workers of a
        # supervisor a few milliseconds later (forwarded), so sample until it answers NOT_SERVING twice.
        statuses: list[tuple[float, str]] = []
        while server.process.poll() is None and sum(s == "NOT_SERVING" for _, s in statuses) < 2:
            statuses.append((time.monotonic() - signalled, health_status(server.target)))
        exit_code = server.process.wait(GRACE_S + 5)
        took = time.monotonic() - signalled
        stop.set()
        load.join(60)
    print(  # shown by pytest -rP
        f"{framework}, {workers} worker(s): {dict(outcomes)}, {outcomes['OK'] - served_before} OK from just before "
        f"the signal on; health after the signal {statuses}; exit {exit_code} after {took:.2f} s"
    )
    # Health says so first, while requests finish: NOT_SERVING soon after the signal and before the
    # process ends, and never SERVING again.
    said = [status for _, status in statuses]
    assert "NOT_SERVING" in said, statuses
    first = said.index("NOT_SERVING")
    assert statuses[first][0] < 1.0, statuses
    assert "SERVING" not in said[first:], statuses
    assert exit_code == 0
    assert took < GRACE_S
    # Every request either completed or was refused before anything of it was computed.
    assert set(outcomes) <= {"OK", "UNAVAILABLE"}, outcomes
    assert outcomes["OK"] > served_before  # the queued ones finished after the signal
    assert outcomes["UNAVAILABLE"] >= 1


def test_a_hung_forward_pass_exits_one_second_after_the_grace_period(tmp_path: Path) -> None:
    grace = 2.0
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.fake_server", "serve", "--model", "double", "--host", "127.0.0.1",
         "--port", "0", "--metrics-port", "-1", "--model-dir", str(tmp_path), "--no-warmup",
         "--grace-period-s", str(grace), "--port-file", str(tmp_path / "ports.json")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "FAKE_FORWARD_S": "inf"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "ports.json").exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        port = int(json.loads((tmp_path / "ports.json").read_text())["port"])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            hung = stub.ModelInfer.future(codec.build_request("double", {"x": np.ones((1, 4), np.float32)}))
            time.sleep(0.3)  # the forward pass is running (and never returns)
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=grace + 10)
            took = time.monotonic() - signalled
            with pytest.raises(grpc.RpcError):
                hung.result(timeout=5)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1
    assert grace <= took <= grace + 1.5
    errors = [line for line in stderr.splitlines() if " ERROR " in line]
    assert any("forward pass still running" in line for line in errors), stderr
    assert "Traceback" not in stderr

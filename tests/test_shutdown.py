"""Graceful shutdown of a real server process: SIGTERM with requests in flight."""

from __future__ import annotations

import concurrent.futures
import signal
import time

import numpy as np
import pytest

from client import InferenceClient
from client.errors import InferenceServerError
from loadtest.servers import ServerProcess


def test_sigterm_finishes_in_flight_requests_and_exits_zero() -> None:
    # A long batching window keeps requests queued when the signal arrives.
    args = ["--threads", "1", "--device", "cpu", "--max-queue-delay-us", "1500000", "--grace-period-s", "20"]
    with ServerProcess("torch", "mlp", args) as server:
        x = np.ones((1, 64), np.float32)
        with InferenceClient(server.target, timeout=30) as client:
            expected = client.infer("mlp", {"input": x})["logits"]
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                in_flight = [pool.submit(client.infer, "mlp", {"input": x}) for _ in range(4)]
                time.sleep(0.3)  # queued, waiting for their batch
                assert server.process is not None
                server.process.send_signal(signal.SIGTERM)
                results = [future.result(timeout=30) for future in in_flight]
            for result in results:
                np.testing.assert_allclose(result["logits"], expected, rtol=1e-5, atol=1e-5)
            # After the drain the server is gone: new calls fail, the process exited 0.
            assert server.process.wait(30) == 0
            with pytest.raises(InferenceServerError):
                client.infer("mlp", {"input": x}, timeout=2)

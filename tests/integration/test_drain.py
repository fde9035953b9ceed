"""The drain scenario against a real server process (the fake model behind the real serving core):
SIGTERM under steady open-loop load loses no call, and readiness flips before the process exits."""

from __future__ import annotations

import sys
from pathlib import Path

from loadtest.compare import drain
from loadtest.servers import ServerProcess

GRACE_S = 10.0


class FakeServerProcess(ServerProcess):
    """``python -m tests.helpers.fake_server serve --model double`` as a ServerProcess (no metrics port)."""

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "tests.helpers.fake_server", "serve", "--model", self.model, "--host", self.host,
                "--port", "0", "--metrics-port", "-1", "--port-file", str(self.port_file), *self.args]  # fmt: skip


def test_sigterm_under_steady_load_loses_no_call_and_flips_readiness_before_exit(tmp_path: Path) -> None:
    # Each forward pass takes 20 ms, so calls are queued and running when the signal comes.
    args = ["--model-dir", str(tmp_path), "--no-warmup", "--grace-period-s", str(GRACE_S)]
    server = FakeServerProcess("torch", "double", args, env={"FAKE_FORWARD_S": "0.02"})
    try:
        server.start(timeout=60)
        found = drain.drain_run(server, "double", 200.0, grace_s=GRACE_S, deadline_s=2.0, steady_s=1.0)
    finally:
        server.close()
    print(found)  # shown by pytest -rP
    assert found["exit_code"] == 0
    assert found["lost_calls"] == 0, found["statuses"]
    assert set(found["statuses"]) <= {"OK", "UNAVAILABLE"}
    assert found["statuses"]["OK"] > 100  # a second of steady load was served
    assert found["statuses"].get("UNAVAILABLE", 0) > 0  # arrivals after the signal were refused, not lost
    assert found["served_after_signal"] > 0  # what was in flight at the signal was finished
    assert found["readiness_flip_ms"] is not None
    assert found["exit_s"] is not None
    assert 0 <= found["readiness_flip_ms"] < found["exit_s"] * 1000
    assert found["exit_s"] < GRACE_S

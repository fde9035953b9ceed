"""The drain scenario against a real server process (the fake model behind the real serving core):
SIGTERM under steady open-loop load loses no call, and readiness flips before the process exits."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from loadtest.compare import drain
from loadtest.servers import ServerProcess

GRACE_S = 10.0


class FakeServerProcess(ServerProcess):
    """``python -m tests.helpers.fake_server serve --model double`` as a ServerProcess (no metrics port)."""

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "tests.helpers.fake_server", "serve", "--model", self.model, "--host", self.host,
                "--port", "0", "--metrics-port", "-1", "--port-file", str(self.port_file), *self.args]  # fmt: skip


#: Tries of the scenario: see the test's docstring.
TRIES = 3


def drain_fake_server(model_dir: Path) -> dict[str, Any]:
    # Each forward pass takes 20 ms, so calls are queued and running when the signal comes.
    args = ["--model-dir", str(model_dir), "--no-warmup", "--grace-period-s", str(GRACE_S)]
    server = FakeServerProcess("torch", "double", args, env={"FAKE_FORWARD_S": "0.02"})
    try:
        server.start(timeout=60)
        return drain.drain_run(server, "double", 200.0, grace_s=GRACE_S, deadline_s=2.0, steady_s=1.0)
    finally:
        server.close()


def test_sigterm_under_steady_load_loses_no_call_and_flips_readiness_before_exit(tmp_path: Path) -> None:
    """Every call is served or refused (UNAVAILABLE), NOT_SERVING shows within milliseconds, the
    process exits 0 well before its grace period.

    One race is known and allowed a retry: the server refuses the callers that keep coming for up
    to 2 s after its queues emptied, then closes its transport, and a call that arrives at that
    instant comes back CANCELLED (about 1 run in 12 at 200 req/s here). Each try's lost calls must
    be just that (CANCELLED, at the close: within 0.2 s of the exit); one try must lose none."""
    tries = []
    for attempt in range(TRIES):
        found = drain_fake_server(tmp_path / str(attempt))
        tries.append(found)
        print(found)  # shown by pytest -rP
        assert found["exit_code"] == 0
        assert found["exit_s"] is not None
        assert found["exit_s"] < GRACE_S
        assert found["lost_before_signal"] == 0, found["statuses"]
        if found["lost_calls"]:
            assert {lost["status"] for lost in found["lost_examples"]} == {"CANCELLED"}, found["lost_examples"]
            first, last = found["lost_window_s"]
            assert found["exit_s"] - 0.2 <= first <= last <= found["exit_s"], (found["lost_window_s"], found["exit_s"])
        assert set(found["statuses"]) <= {"OK", "UNAVAILABLE", "CANCELLED"}
        assert found["statuses"]["OK"] > 100  # a second of steady load was served
        assert found["statuses"].get("UNAVAILABLE", 0) > 0  # arrivals after the signal were refused, not lost
        assert found["served_after_signal"] > 0  # what was in flight at the signal was finished
        assert found["readiness_flip_ms"] is not None
        assert 0 <= found["readiness_flip_ms"] < found["exit_s"] * 1000
        if found["lost_calls"] == 0:
            break
    assert tries[-1]["lost_calls"] == 0, tries

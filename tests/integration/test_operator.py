"""Operator errors: a server started wrongly says so in one line naming the option, and
exits non-zero; nothing it can repair (a damaged cached artifact) stops it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from client import InferenceClient
from loadtest.servers import ROOT, ServerProcess
from serving.server import run
from serving.settings import ServerSettings
from tests.helpers.fakes import ZOO, FakeFramework


def serve(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``torch_server serve`` (of the zoo's mlp unless ``args`` name models)."""
    model = () if "--model" in args else ("--model", "mlp")
    return subprocess.run(
        [sys.executable, "-m", "torch_server", "serve", "--host", "127.0.0.1", *model, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        check=False,
    )


def assert_refused(result: subprocess.CompletedProcess[str], *names: str) -> None:
    """Exit status 2 and exactly one line on stderr, naming every one of ``names``."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    for name in names:
        assert name in lines[0]
    assert "Traceback" not in result.stderr


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


@pytest.mark.parametrize(
    ("args", "env", "names"),
    [
        (["--port", "99999"], {}, ["--port 99999"]),
        (["--metrics-port", "-5"], {}, ["--metrics-port -5"]),
        (["--model", "nosuch"], {}, ["nosuch"]),
        (["--model-arg", "hidden=oops"], {}, ["hidden"]),
        (["--max-batch-size", "0"], {}, ["--max-batch-size"]),
        ([], {"TORCH_SERVER_MAX_BATCH_SIZE": "many"}, ["TORCH_SERVER_MAX_BATCH_SIZE"]),
        (["--device", "cuda"], {}, ["--device cuda"]),
        (["--tls-cert", "/nonexistent/cert.pem", "--tls-key", "/nonexistent/key.pem"], {}, ["--tls-cert"]),
        (["--auth-token", "x", "--auth-token-file", "/etc/hostname"], {}, ["--auth-token"]),
    ],
    ids=["port", "metrics-port", "model", "model-arg", "max-batch-size", "env", "device", "tls-file", "token-twice"],
)
def test_bad_setting_is_one_line_and_exit_2(args: list[str], env: dict[str, str], names: list[str]) -> None:
    assert_refused(serve(*args, env=env), *names)


def test_grpc_port_in_use(busy_port: int, tmp_path: Path) -> None:
    result = serve("--port", str(busy_port), "--metrics-port", "-1", "--model-dir", str(tmp_path))
    assert_refused(result, f"--port {busy_port}", "in use")


def test_metrics_port_in_use(busy_port: int, tmp_path: Path) -> None:
    result = serve("--port", "0", "--metrics-port", str(busy_port), "--model-dir", str(tmp_path))
    assert_refused(result, f"--metrics-port {busy_port}", "in use")


def test_model_dir_that_cannot_be_written(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert_refused(serve("--model-dir", str(blocker / "models")), "--model-dir", "mlp")


def test_tls_files_that_are_not_pem(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    assert_refused(serve("--tls-cert", str(junk), "--tls-key", str(junk)), "--tls-cert", "--tls-key")


def test_other_frameworks_repository_is_refused_not_overwritten(tmp_path: Path) -> None:
    identity = tmp_path / "mlp" / "zoo.json"
    (tmp_path / "mlp" / "1").mkdir(parents=True)
    identity.write_text(json.dumps({"framework": "tensorflow", "model": "mlp"}))
    assert_refused(serve("--model-dir", str(tmp_path)), "--model-dir", "tensorflow")
    assert json.loads(identity.read_text())["framework"] == "tensorflow"


@pytest.mark.slow
def test_damaged_cached_artifact_is_exported_again(tmp_path: Path) -> None:
    args = ["--threads", "1", "--device", "cpu", "--model-dir", str(tmp_path)]
    x = np.ones((1, 64), np.float32)
    with ServerProcess("torch", "mlp", args) as server, InferenceClient(server.target, timeout=30) as client:
        expected = client.infer("mlp", {"input": x})["logits"]
    artifact = tmp_path / "mlp" / "1" / "model.pt2"
    artifact.write_bytes(artifact.read_bytes()[:-100])  # truncated, as a full disk would leave it
    with ServerProcess("torch", "mlp", args) as server, InferenceClient(server.target, timeout=30) as client:
        np.testing.assert_array_equal(client.infer("mlp", {"input": x})["logits"], expected)
        log = server.log_tail(200)
    warnings = [line for line in log.splitlines() if "cannot be reused" in line]
    assert len(warnings) == 1
    assert str(artifact) in warnings[0]


def test_sigterm_while_loading_exits_zero_without_traceback(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "torch_server", "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
         "--model", "encoder", "--model-dir", str(tmp_path), "--threads", "1", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    assert process.stdout is not None
    assert "listening on port" in process.stdout.readline()  # bound; exporting the encoder now
    process.send_signal(signal.SIGTERM)
    started = time.monotonic()
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert time.monotonic() - started < 15
    assert "Traceback" not in stderr


def test_load_failure_exits_1_with_one_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    framework = FakeFramework()
    framework.controls.load_error = OSError("the artifact vanished")
    settings = ServerSettings(model=["double"], model_dir=tmp_path, host="127.0.0.1", port=0, metrics_port=-1)
    assert run(settings, framework, zoo=ZOO) == 1
    failures = [record for record in caplog.records if record.levelname == "ERROR"]
    assert len(failures) == 1
    assert "the artifact vanished" in failures[0].getMessage()
    assert failures[0].exc_info is None  # one line, no stack trace

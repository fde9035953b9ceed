"""Start a server as a local process, measure its cold start, stop it gracefully.

Used by the comparison runner, the benchmark and the tests. A server is launched
with ``--port 0 --metrics-port 0 --port-file F``; it writes F once SERVING, so
cold start = spawn to F (process start, imports, export if needed, load, warm-up).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

MODULES = {"torch": "torch_server", "tensorflow": "tf_server", "tf": "tf_server", "bare": "loadtest.tools.bare"}
ROOT = Path(__file__).resolve().parent.parent


#: Pins itself to the cores in argv[1], then becomes the command after them (when taskset is missing).
_PIN_SHIM = (
    "import os, sys; os.sched_setaffinity(0, map(int, sys.argv[1].split(','))); os.execvp(sys.argv[2], sys.argv[2:])"
)


def pinned(command: Sequence[str], cpus: Sequence[int] | None) -> list[str]:
    """``command`` started on ``cpus`` only (None: as it is).

    Pinned by ``taskset`` (or a Python shim) that execs the command, not by a ``preexec_fn``: that
    makes subprocess fork instead of vfork, and a fork while this process has gRPC threads running (a
    channel open in a sampler or a health poller) let gRPC's fork handlers abort the child before its
    exec ("epoll_wait error: Bad file descriptor", exit -6)."""
    if not cpus:
        return list(command)
    cores = ",".join(str(cpu) for cpu in cpus)
    taskset = shutil.which("taskset")
    if taskset:
        return [taskset, "-c", cores, *command]
    return [sys.executable, "-c", _PIN_SHIM, cores, *command]


class ServerStartError(RuntimeError):
    """The server exited or did not report SERVING in time; carries its log tail."""


class ServerProcess:
    """One ``python -m <server> serve`` child process on free local ports."""

    def __init__(
        self,
        framework: str,
        model: str = "mlp",
        args: Sequence[str] = (),
        *,
        env: dict[str, str] | None = None,
        cpus: Sequence[int] | None = None,
        log_path: Path | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        if framework not in MODULES:
            raise ValueError(f"unknown framework {framework!r}; expected one of {sorted(MODULES)}")
        self.framework = "tensorflow" if framework == "tf" else framework
        self.module = MODULES[framework]
        self.model = model
        self.args = list(args)
        self.env = env
        self.cpus = list(cpus) if cpus else None
        self.host = host
        self._tmp = tempfile.TemporaryDirectory(prefix=f"{self.module}-")
        self.log_path = log_path or Path(self._tmp.name) / "server.log"
        self.port_file = Path(self._tmp.name) / "ports.json"
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.metrics_port: int | None = None
        self.cold_start_s: float | None = None
        self.exit_code: int | None = None

    @property
    def command(self) -> list[str]:
        if self.framework == "bare":  # the identity server: no subcommand, no metrics
            return [sys.executable, "-m", self.module, "--model", self.model, "--host", self.host, "--port", "0",
                    "--port-file", str(self.port_file), *self.args]  # fmt: skip
        return [
            sys.executable, "-m", self.module, "serve",
            "--model", self.model,
            "--host", self.host,
            "--port", "0",
            "--metrics-port", "0",
            "--port-file", str(self.port_file),
            *self.args,
        ]  # fmt: skip

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def metrics_url(self) -> str | None:
        return None if self.metrics_port is None else f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("server not started")
        return self.process.pid

    def start(self, timeout: float = 300.0) -> ServerProcess:
        env = {**os.environ, **(self.env or {})}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
        log = self.log_path.open("wb")
        started = time.perf_counter()
        self.process = subprocess.Popen(
            pinned(self.command, self.cpus),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
        log.close()
        deadline = started + timeout
        while time.perf_counter() < deadline:
            if self.port_file.exists():
                self.cold_start_s = time.perf_counter() - started
                ports = json.loads(self.port_file.read_text())
                self.port = int(ports["port"])
                self.metrics_port = ports.get("metrics_port")
                return self
            if self.process.poll() is not None:
                raise ServerStartError(f"{self.module} exited with {self.process.returncode}:\n{self.log_tail()}")
            time.sleep(0.02)
        self.stop(timeout=5)
        raise ServerStartError(f"{self.module} not SERVING after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then wait up to ``timeout`` (SIGKILL after it). The exit code."""
        if self.process is None or self.exit_code is not None:
            return self.exit_code
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.exit_code = self.process.returncode
        return self.exit_code

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

"""``make deploy-check``: the compose deployment, proven on a real engine the way an operator runs it.

``python -m scripts.deploy_check [--keep] [--toolchain] [--locust-workers N] [--project NAME]`` (needs a
Docker engine).

The CPU variant (docker-compose.yml + docker-compose.cpu.yml, then docker-compose.tls.yml), under
its own project name and free host ports, from a clean state to ``down -v``. Each stage prints
its duration and what it saw; the first failure prints the failing services' log tails and
exits 1; the stack is taken down whatever happens (``--keep`` leaves it up).

  engine      docker and compose answer; torch's CPU wheel is in docker/wheelhouse
  clean       down -v of an earlier run of this project
  build       the three CPU images (a second run reuses the build cache)
  images      sizes within budget, non-root, each holds its own framework only and no CUDA library;
              a bind-mounted model repository: written as the invoking uid, a one-line refusal when unwritable
  up          torch_server, tf_server, prometheus; healthy by their grpc.health.v1 probe
  traffic     our client from the host: both answer, with the same numbers; bad input gets its status
  prometheus  the targets API says both servers are up
  dashboard   every PromQL query of the Grafana dashboard returns series for both servers
  locust      headless Locust master + N workers: the master sees N, every request succeeds
  compare     the comparison job refuses a report folder it cannot write, then reports with valid steps
  drain       ``docker compose stop`` under load: every call ends OK or UNAVAILABLE, each server exits 0
  own         your own models from host repositories mounted read-only (docker-compose.repository.yml):
              served alike by both, and a new version written there is switched to
  tls         the TLS + token override: healthy, token enforced, our client and Locust over TLS
  toolchain   (--toolchain only: a 450 MB image and a compilation) the slim torch image refuses
              ``--compile on`` at start naming the missing compiler; the TORCH_TOOLCHAIN=1 image compiles
              (AOTInductor) as its non-root user and serves the compiled model
  down        ``docker compose down -v``
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from client import (
    AsyncInferenceClient,
    InferenceClient,
    InferenceServerError,
    InvalidArgumentError,
    NotFoundError,
    RetryPolicy,
    UnauthenticatedError,
    UnavailableError,
)
from scripts.dashboard import Query, dashboard_queries

ROOT = Path(__file__).resolve().parent.parent

BASE = ["docker-compose.yml", "docker-compose.cpu.yml"]
TLS = [*BASE, "docker-compose.tls.yml"]
OWN = [*BASE, "docker-compose.repository.yml"]
SERVERS = ("torch_server", "tf_server")
#: Image size budgets (bytes, as docker counts them) by compose service.
BUDGETS = {"torch_server": 1.5e9, "tf_server": 1.8e9, "locust-master": 0.6e9}
#: The extras each image was built with (docker-compose.cpu.yml; loadtest from docker-compose.yml).
EXTRAS = {"torch_server": "torch", "tf_server": "tf", "locust-master": "loadtest"}
#: Host ports, by the compose variable that publishes them.
PORTS = ("TORCH_GRPC_PORT", "TORCH_METRICS_PORT", "TF_GRPC_PORT", "TF_METRICS_PORT", "PROMETHEUS_PORT", "LOCUST_PORT",
         "GRAFANA_PORT")  # fmt: skip
#: The "invoking user" whose uid the containers get: ours, unless we are root (a root container proves
#: nothing about permissions), then a uid that exists nowhere.
HOST_UID = os.getuid() or 23456
TOKEN = "deploy-check-token"
PARITY_ATOL = 1e-4
MODEL_INPUT = (1, 64)
DRAIN_CALLERS = 32


class CheckFailed(Exception):
    """A stage saw what it must not; ``services`` are the ones whose logs explain it."""

    def __init__(self, message: str, services: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.services = list(services)


def log(message: str) -> None:
    print(message, flush=True)


@dataclass
class Compose:
    """``docker compose`` for one project, files and environment."""

    project: str
    env: dict[str, str]
    files: list[str] = field(default_factory=lambda: list(BASE))

    def command(self, *args: str, files: Sequence[str] | None = None) -> list[str]:
        chosen = self.files if files is None else files
        return ["docker", "compose", "-p", self.project, *(part for f in chosen for part in ("-f", f)), *args]

    def run(
        self, *args: str, timeout: float, check: bool = True, files: Sequence[str] | None = None,
        env: dict[str, str] | None = None, services: Sequence[str] = (),
    ) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """Run a compose command to completion; ``CheckFailed`` (naming ``services``) when it fails and ``check``."""
        command = self.command(*args, files=files)
        try:
            done = subprocess.run(
                command, cwd=ROOT, env=self.env | (env or {}), capture_output=True, text=True, timeout=timeout,
                check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired as err:
            raise CheckFailed(f"`{' '.join(command)}` did not finish in {timeout:.0f} s", services) from err
        if check and done.returncode != 0:
            raise CheckFailed(f"`{' '.join(command)}` exited {done.returncode}:\n{_tail(done.stdout + done.stderr)}",
                              services)  # fmt: skip
        return done

    def logs(self, services: Sequence[str], lines: int = 40) -> str:
        done = self.run("logs", "--no-color", "--tail", str(lines), *services, timeout=60, check=False)
        return done.stdout + done.stderr

    def state(self, service: str) -> dict[str, Any]:
        """``docker compose ps -a`` of one service's (first) container."""
        done = self.run("ps", "-a", "--format", "json", service, timeout=60)
        rows = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
        if not rows:
            raise CheckFailed(f"no container for {service}", [service])
        return dict(rows[0])


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("0.0.0.0", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_for(what: str, probe: Callable[[], str | None], timeout: float, interval: float = 2.0,
             services: Sequence[str] = ()) -> None:  # fmt: skip
    """Poll ``probe`` (None: satisfied, else why not yet) until ``timeout``; ``CheckFailed`` with the last reason."""
    deadline = time.monotonic() + timeout
    while (reason := probe()) is not None:
        if time.monotonic() > deadline:
            raise CheckFailed(f"{what}: not within {timeout:.0f} s: {reason}", services)
        time.sleep(interval)


def http_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return json.loads(reply.read())


# ---------------------------------------------------------------- the run


class DeployCheck:
    """The stages, in order, sharing one project, its ports and a scratch folder."""

    def __init__(self, args: argparse.Namespace, scratch: Path) -> None:
        self.args = args
        self.scratch = scratch
        cpus = sorted(os.sched_getaffinity(0))
        ports = dict(zip(PORTS, free_ports(len(PORTS)), strict=True))
        self.ports = ports
        env = dict(os.environ)
        for name in ("COMPOSE_FILE", "COMPOSE_PROJECT_NAME", "COMPOSE_PROFILES"):
            env.pop(name, None)
        env |= {name: str(port) for name, port in ports.items()} | {
            "MODEL": "mlp",
            "SERVER_CPUS": str(cpus[0]),
            "LOADTEST_CPUS": str(cpus[1] if len(cpus) > 1 else cpus[0]),
            "REPORTS_DIR": str(scratch / "reports"),
            "TLS_DIR": str(scratch / "certs"),
        }
        self.compose = Compose(args.project, env)
        self.traffic: Traffic | None = None

    def target(self, server: str) -> str:
        return f"127.0.0.1:{self.ports['TORCH_GRPC_PORT' if server == 'torch_server' else 'TF_GRPC_PORT']}"

    # ---- stages

    def engine(self) -> str:
        if shutil.which("docker") is None:
            raise CheckFailed("no docker command: run ../shared/tools/container-engine.sh (or install Docker)")
        server = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"], capture_output=True,
                                text=True, timeout=30, check=False)  # fmt: skip
        if server.returncode != 0:
            raise CheckFailed(f"no Docker engine answers: {_tail(server.stderr, 3)}")
        compose = self.compose.run("version", "--short", timeout=30, files=[])
        # Every variant parses on this compose, the GPU one included (its images are not built here: CUDA).
        repositories = {"TORCH_REPOSITORY": str(self.scratch), "TF_REPOSITORY": str(self.scratch)}
        for files in (["docker-compose.yml"], BASE, TLS, OWN, ["docker-compose.yml", "docker-compose.tls.yml"]):
            self.compose.run("--profile", "compare", "config", "--quiet", timeout=60, files=files, env=repositories)
        wheel = subprocess.run([str(ROOT / "docker" / "wheelhouse.sh")], capture_output=True, text=True, timeout=900,
                               check=False)  # fmt: skip
        if wheel.returncode != 0:
            raise CheckFailed(f"docker/wheelhouse.sh failed:\n{_tail(wheel.stderr)}")
        return (f"engine {server.stdout.strip()}, compose {compose.stdout.strip()}, every compose variant parses; "
                f"{_tail(wheel.stderr, 1)}")  # fmt: skip

    def clean(self) -> str:
        self.compose.run("--profile", "compare", "down", "-v", "--remove-orphans", timeout=180, files=TLS)
        return f"project {self.args.project}: nothing left of an earlier run"

    def build(self) -> str:
        done = self.compose.run("build", "--progress", "plain", "torch_server", "tf_server", "locust-master",
                                timeout=3600)  # fmt: skip
        steps = re.findall(r"^#\d+ (CACHED|DONE)", done.stdout + done.stderr, re.MULTILINE)
        return f"{steps.count('CACHED')} of {len(steps)} build steps from the cache"

    def images(self) -> str:
        config = json.loads(self.compose.run("config", "--format", "json", timeout=60).stdout)
        seen = []
        for service, budget in BUDGETS.items():
            image = config["services"][service]["image"]
            inspect = json.loads(subprocess.run(["docker", "image", "inspect", image], capture_output=True, text=True,
                                                timeout=60, check=True).stdout)[0]  # fmt: skip
            size, user = inspect["Size"], inspect["Config"]["User"]
            if size > budget:
                raise CheckFailed(f"{image} is {size / 1e9:.2f} GB, over its {budget / 1e9:.1f} GB budget")
            if user.split(":")[0] in ("", "0", "root"):
                raise CheckFailed(f"{image} runs as root (USER {user!r})")
            verify = subprocess.run(["docker", "run", "--rm", image, "python", "/build/image_requirements.py",
                                     "verify", EXTRAS[service], "/build/requirements.txt"], capture_output=True,
                                    text=True, timeout=300, check=False)  # fmt: skip
            if verify.returncode != 0:
                raise CheckFailed(f"{image}: {_tail(verify.stderr, 5)}")
            seen.append(f"{image} {size / 1e9:.2f} GB (budget {budget / 1e9:.1f}), user {user}")
        return "; ".join(seen) + "; " + self._bind_mounted_repository(config["services"]["torch_server"]["image"])

    def _bind_mounted_repository(self, image: str) -> str:
        """A host folder as the model repository: the invoking user's uid writes it; the image's own uid on a
        root-owned folder is refused at start in one line naming the option (exit 2), not a traceback."""
        owned = self.scratch / "repo-owned"
        owned.mkdir()
        if os.getuid() == 0:
            os.chown(owned, HOST_UID, 0)
        export = ["docker", "run", "--rm", "--user", f"{HOST_UID}:0", "-v", f"{owned}:/models", image,
                  "python", "-m", "torch_server", "export", "--model", "mlp", "--out", "/models/torch"]  # fmt: skip
        done = subprocess.run(export, capture_output=True, text=True, timeout=300, check=False)
        artifacts = list(owned.rglob("*.pt2"))
        if done.returncode != 0 or not artifacts:
            raise CheckFailed(f"export into a bind mount as uid {HOST_UID} failed:\n{_tail(done.stdout + done.stderr)}")
        if {path.stat().st_uid for path in owned.rglob("*")} != {HOST_UID}:
            raise CheckFailed(f"files in the bind-mounted repository are not all owned by uid {HOST_UID}")
        not_ours = self.scratch / "repo-not-ours"  # ours (root's, or the invoking user's): not uid 10001's
        not_ours.mkdir(mode=0o755)
        serve = ["docker", "run", "--rm", "-v", f"{not_ours}:/models", image, "python", "-m", "torch_server", "serve",
                 "--model", "mlp", "--model-dir", "/models/torch", "--device", "cpu"]  # fmt: skip
        refused = subprocess.run(serve, capture_output=True, text=True, timeout=300, check=False)
        lines = refused.stderr.strip().splitlines()
        if refused.returncode != 2 or not lines or "Traceback" in refused.stderr or "model-dir" not in lines[-1]:
            raise CheckFailed(f"a bind mount uid 10001 cannot write: expected one line naming --model-dir (exit 2), "
                              f"got exit {refused.returncode}:\n{_tail(refused.stdout + refused.stderr)}")  # fmt: skip
        return (f"bind-mounted repository written as uid {HOST_UID} ({len(artifacts)} artifact); "
                f"one uid 10001 cannot write refused: {lines[-1]!r}")  # fmt: skip

    def up(self) -> str:
        started = time.monotonic()
        self.compose.run("up", "-d", "--wait", "--wait-timeout", "300", *SERVERS, "prometheus", timeout=420,
                         services=[*SERVERS, "prometheus"])  # fmt: skip
        states = {server: self.compose.state(server)["Health"] for server in SERVERS}
        if set(states.values()) != {"healthy"}:
            raise CheckFailed(f"health: {states}", SERVERS)
        return f"healthy after {time.monotonic() - started:.1f} s: {states}"

    def traffic_stage(self) -> str:
        x = np.random.default_rng(7).standard_normal((4, MODEL_INPUT[1])).astype(np.float32)
        outputs = {}
        for server in SERVERS:
            with InferenceClient(self.target(server), timeout=10) as client:
                if client.health() != "SERVING" or not client.server_ready():
                    raise CheckFailed(f"{server} is not SERVING from the host", [server])
                outputs[server] = client.infer("mlp", {"input": x})
                for bad, expected in (
                    (lambda c: c.infer("mlp", {"input": x[:, :7]}), InvalidArgumentError),
                    (lambda c: c.infer("no-such-model", {"input": x}), NotFoundError),
                ):
                    try:
                        bad(client)
                    except expected:
                        continue
                    except InferenceServerError as err:
                        raise CheckFailed(f"{server}: bad input got {err.code.name}, not {expected.__name__}",
                                          [server]) from err  # fmt: skip
                    raise CheckFailed(f"{server}: bad input was accepted", [server])
        diff = max(float(np.abs(outputs["torch_server"][name] - outputs["tf_server"][name]).max())
                   for name in outputs["torch_server"])  # fmt: skip
        if diff > PARITY_ATOL:
            raise CheckFailed(f"the servers disagree: max |diff| {diff:.2e} > {PARITY_ATOL}", SERVERS)
        self.traffic = Traffic([self.target(server) for server in SERVERS])
        self.traffic.start()
        return f"both answer, max |torch - tf| {diff:.1e}; bad input refused; steady traffic (1 in 10 bad) running"

    def prometheus(self) -> str:
        url = f"http://127.0.0.1:{self.ports['PROMETHEUS_PORT']}/api/v1/targets"

        def targets() -> str | None:
            try:
                active = http_json(url)["data"]["activeTargets"]
            except OSError as err:
                return str(err)
            health = {target["labels"]["job"]: target["health"] for target in active}
            return None if health == dict.fromkeys(SERVERS, "up") else f"targets {health}"

        wait_for("Prometheus targets up", targets, 90, services=["prometheus"])
        return "torch_server and tf_server: up"

    def dashboard(self) -> str:
        queries = dashboard_queries(ROOT / "docker" / "grafana" / "dashboards" / "serving.json")
        base = f"http://127.0.0.1:{self.ports['PROMETHEUS_PORT']}/api/v1/query?"
        checked, skipped = [], []
        for query in queries:
            if query.gpu_only:
                skipped.append(query.title)
                continue

            def jobs(query: Query = query) -> str | None:
                reply = http_json(base + urllib.parse.urlencode({"query": query.promql()}))
                if reply.get("status") != "success":
                    return f"{reply.get('errorType')}: {reply.get('error')}"
                found = {series["metric"].get("job") for series in reply["data"]["result"]}
                missing = set(SERVERS) - found
                return f"no series for {sorted(missing)}" if missing else None

            wait_for(f"dashboard panel {query.title!r} ({query.expr})", jobs, 90, interval=5, services=["prometheus"])
            checked.append(query.title)
            log(f"    ok  {query.title}: {query.promql()}")
        for title in skipped:
            log(f"    --  {title}: GPU metrics, exported only on GPU hosts (names checked by test_deploy.py)")
        return f"{len(checked)} queries return series for both servers; {len(skipped)} GPU-only skipped"

    def locust(self, files: Sequence[str] | None = None, workers: int | None = None, seconds: int = 15) -> str:
        if self.traffic is not None:
            self.traffic.stop()
        workers = workers or self.args.locust_workers
        env = {"LOCUST_HEADLESS": "true", "LOCUST_USERS": "8", "LOCUST_SPAWN_RATE": "8",
               "LOCUST_RUN_TIME": f"{seconds}s", "LOCUST_EXPECT_WORKERS": str(workers),
               "LOCUST_EXPECT_WORKERS_MAX_WAIT": "120"}  # fmt: skip
        services = ["locust-master", "locust-worker"]
        done = self.compose.run("up", "--scale", f"locust-worker={workers}", "--exit-code-from", "locust-master",
                                "--no-log-prefix", *services, timeout=seconds + 240, env=env, files=files,
                                check=False, services=services)  # fmt: skip
        output = done.stdout + done.stderr
        self.compose.run("rm", "-f", "-s", *services, timeout=120, files=files)
        aggregated = re.findall(r"^\s+Aggregated\s+(\d+)\s+(\d+)\(", output, re.MULTILINE)
        if done.returncode != 0 or not aggregated:
            raise CheckFailed(f"Locust master exited {done.returncode}:\n{_tail(output)}", services)
        if f"to {workers} ready workers" not in output:
            raise CheckFailed(f"the master did not send its users to {workers} workers:\n{_tail(output)}", services)
        requests, failures = map(int, aggregated[-1])
        if requests == 0 or failures:
            raise CheckFailed(f"Locust: {requests} requests, {failures} failures", services)
        return f"master saw {workers} workers; {requests} requests in {seconds} s, 0 failures"

    def compare(self) -> str:
        reports = self.scratch / "reports"
        reports.mkdir(mode=0o755)  # owned by root: the image's uid 10001 cannot write it
        short = ["--model", "mlp", "--concurrency", "1,8", "--rate-fractions", "0.5", "--overload", "0",
                 "--repeats", "1", "--step-seconds", "2", "--warmup-seconds", "1"]  # fmt: skip
        refused = self.compose.run("--profile", "compare", "run", "--rm", "compare", *short, timeout=180, check=False,
                                   services=["compare"])  # fmt: skip
        message = _tail(refused.stderr, 1)
        if refused.returncode != 2 or "cannot write the report" not in message or "HOST_UID" not in message:
            raise CheckFailed(f"an unwritable report folder: expected one line naming HOST_UID (exit 2), got exit "
                              f"{refused.returncode}:\n{_tail(refused.stdout + refused.stderr)}")  # fmt: skip
        if os.getuid() == 0:
            os.chown(reports, HOST_UID, HOST_UID)
        owner = {"HOST_UID": str(HOST_UID), "HOST_GID": str(os.getgid() or HOST_UID)}
        done = self.compose.run("--profile", "compare", "run", "--rm", "compare", *short, timeout=600, env=owner,
                                services=["compare", *SERVERS])  # fmt: skip
        results = list(reports.glob("*/results.json"))
        if len(results) != 1:
            raise CheckFailed(f"expected one report in {reports}, found {results}:\n{_tail(done.stderr)}")
        folder = results[0].parent
        missing = [name for name in ("report.html", "report.md") if not (folder / name).is_file()]
        data = json.loads(results[0].read_text())
        steps = {name: record["steps"] for name, record in data["servers"].items()}
        problems = [f"missing {name}" for name in missing] + [f"failures: {data['failures']}"] * bool(data["failures"])
        for name, recorded in steps.items():
            # A step the runner could not trust (a busy host) is flagged invalid, as it should be: what this
            # proves is that each server is measured in both phases, so each needs a valid step in each.
            valid = {step["mode"] for step in recorded if step["valid"]}
            if valid != {"closed", "open"}:
                problems.append(f"{name}: valid steps only in {sorted(valid)}")
            for step in recorded:
                if not step["valid"]:
                    log(f"    {name} {step['mode']} step invalid: {step['invalid_reasons']}")
        if sorted(steps) != ["tensorflow", "torch"] or problems:
            raise CheckFailed(f"comparison report {folder}: {'; '.join(problems) or sorted(steps)}", ["compare"])
        counts = ", ".join(
            f"{name} {sum(step['valid'] for step in recorded)} of {len(recorded)}" for name, recorded in steps.items()
        )
        return f"unwritable folder refused ({message!r}); report {folder.name} as uid {HOST_UID}, valid steps: {counts}"

    def drain(self) -> str:
        outcomes = {server: collections.Counter[str]() for server in SERVERS}
        stop_s: list[float] = []

        async def load() -> None:
            async def stop_soon() -> None:
                await asyncio.sleep(3)
                started = time.monotonic()
                await asyncio.to_thread(self.compose.run, "stop", *SERVERS, timeout=120, services=SERVERS)
                stop_s.append(time.monotonic() - started)

            await asyncio.gather(*(keep_calling(self.target(s), outcomes[s]) for s in SERVERS), stop_soon())

        asyncio.run(load())
        exits = {server: self.compose.state(server)["ExitCode"] for server in SERVERS}
        text = "; ".join(f"{s}: {dict(outcomes[s])}, exit {exits[s]}" for s in SERVERS)
        for server in SERVERS:
            other = set(outcomes[server]) - {"OK", "UNAVAILABLE"}
            if other or outcomes[server]["OK"] == 0 or exits[server] != 0:
                raise CheckFailed(f"drain: {text}", [server])
        return f"stopped in {stop_s[0]:.1f} s; {text}"

    def own(self) -> str:
        own = self.scratch / "own"
        example = [sys.executable, str(ROOT / "examples" / "own_model.py"), "--out", str(own)]
        subprocess.run(example, cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
        # MODEL empty: every model of the repositories (the rest of the check serves the zoo's mlp).
        env = {"TORCH_REPOSITORY": str(own / "torch"), "TF_REPOSITORY": str(own / "tf"), "MODEL": ""}
        self.compose.run("up", "-d", "--wait", "--wait-timeout", "300", *SERVERS, timeout=420, files=OWN, env=env,
                         services=SERVERS)  # fmt: skip
        rng = np.random.default_rng(3)
        inputs: dict[str, np.ndarray] = {
            "features": rng.standard_normal((4, 16)).astype(np.float32),
            "item": rng.integers(0, 1000, 4),
        }
        answers = {}
        for server in SERVERS:
            with InferenceClient(self.target(server), timeout=10) as client:
                ranges = client.model_config("ranker").parameters["range.item"].string_value
                if ranges != "0,999":
                    raise CheckFailed(f"{server}: ranker's config.json was not read (range.item {ranges!r})", [server])
                answers[server] = client.infer("ranker", inputs)
        diff = max(float(np.abs(answers["torch_server"][k] - answers["tf_server"][k]).max()) for k in ("score",
                   "embedding"))  # fmt: skip
        if diff > PARITY_ATOL:
            raise CheckFailed(f"the servers disagree on ranker: max |diff| {diff:.2e}", SERVERS)
        started = time.monotonic()
        subprocess.run([*example, "--version", "2", "--seed", "1"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, check=True)  # fmt: skip

        def switched() -> str | None:
            seen = {}
            for server in SERVERS:
                with InferenceClient(self.target(server), timeout=10) as client:
                    seen[server] = client.model_metadata("ranker").versions
            return None if set(seen.values()) == {("2",)} else f"versions {seen}"

        wait_for("version 2 of ranker served", switched, 90, interval=1, services=SERVERS)
        return (f"ranker from read-only host repositories: both agree (max |diff| {diff:.1e}); version 2 written "
                f"there served by both {time.monotonic() - started:.1f} s later")  # fmt: skip

    def tls(self) -> str:
        certs = self.scratch / "certs"
        make_pki(certs)
        self.compose.run("up", "-d", "--wait", "--wait-timeout", "300", *SERVERS, timeout=420, files=TLS,
                         services=SERVERS)  # fmt: skip
        ca = (certs / "ca.pem").read_bytes()
        x = np.ones(MODEL_INPUT, np.float32)
        for server in SERVERS:
            with InferenceClient(self.target(server), root_certificates=ca, token=TOKEN, timeout=10) as client:
                client.infer("mlp", {"input": x})
            with InferenceClient(self.target(server), root_certificates=ca, timeout=10) as client:
                try:
                    client.infer("mlp", {"input": x})
                    raise CheckFailed(f"{server} answered without the token", [server])
                except UnauthenticatedError:
                    pass
            with InferenceClient(self.target(server), timeout=3, retry=RetryPolicy(attempts=1)) as plain:
                try:
                    plain.health()
                    raise CheckFailed(f"{server} answered plaintext", [server])
                except UnavailableError:
                    pass
            probe = subprocess.run([sys.executable, "-m", "client", "--target", self.target(server), "--root-certs",
                                    str(certs / "ca.pem"), "health"], cwd=ROOT, capture_output=True, text=True,
                                   timeout=60, check=False)  # fmt: skip
            if probe.returncode != 0:
                raise CheckFailed(
                    f"`python -m client health` without the token: {probe.stdout}{probe.stderr}", [server]
                )
        states = {server: self.compose.state(server)["Health"] for server in SERVERS}
        locust = self.locust(files=TLS, workers=1, seconds=8)
        return f"healthy {states}; token enforced, plaintext refused, CLI health without token ok; Locust: {locust}"

    def toolchain(self) -> str:
        forward = ["python", "-m", "torch_server", "forward", "--model", "mlp", "--device", "cpu", "--threads", "1",
                   "--compile", "on", "--batch-sizes", "1,4", "--seconds", "0.2"]  # fmt: skip
        slim = self.compose.run("run", "--rm", "--no-deps", "torch_server", *forward, timeout=300, check=False)
        if (
            slim.returncode == 0
            or "--compile on: torch's AOTInductor cannot compile here; missing a C++ compiler"
            not in (slim.stdout + slim.stderr)
        ):
            raise CheckFailed(f"the slim torch image did not refuse --compile on:\n{_tail(slim.stdout + slim.stderr)}")
        toolchain = {"TORCH_TOOLCHAIN": "1"}
        self.compose.run("build", "torch_server", timeout=3600, env=toolchain)
        done = self.compose.run("run", "--rm", "--no-deps", "torch_server", *forward, timeout=900, env=toolchain)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        if result["compile"] != "on" or not result["timings"].get("compile_s"):
            raise CheckFailed(f"the toolchain image did not compile: {result}")
        rates = ", ".join(f"batch {r['batch_size']} {r['median_us']:.0f} µs" for r in result["results"])
        return (f"slim image refuses at start; toolchain image compiled in {result['timings']['compile_s']:.1f} s, "
                f"serves {rates}")  # fmt: skip

    def down(self) -> str:
        self.compose.run("--profile", "compare", "down", "-v", "--remove-orphans", timeout=300, files=TLS)
        return "containers, network and volumes removed"

    def stages(self) -> list[tuple[str, Callable[[], str]]]:
        return [("engine", self.engine), ("clean", self.clean), ("build", self.build), ("images", self.images),
                ("up", self.up), ("traffic", self.traffic_stage), ("prometheus", self.prometheus),
                ("dashboard", self.dashboard), ("locust", self.locust), ("compare", self.compare),
                ("drain", self.drain), ("own", self.own), ("tls", self.tls),
                *([("toolchain", self.toolchain)] if self.args.toolchain else [])]  # fmt: skip


async def keep_calling(target: str, outcomes: collections.Counter[str]) -> None:
    """DRAIN_CALLERS callers sending back to back until the server refuses them (UNAVAILABLE: it is going away)."""
    x = np.ones(MODEL_INPUT, np.float32)
    async with AsyncInferenceClient(target, timeout=30, retry=RetryPolicy(attempts=1)) as client:

        async def caller() -> None:
            while True:
                try:
                    await client.infer("mlp", {"input": x})
                    outcomes["OK"] += 1
                except InferenceServerError as err:
                    outcomes[err.code.name] += 1
                    if err.code.name == "UNAVAILABLE":
                        return

        await asyncio.wait_for(asyncio.gather(*(caller() for _ in range(DRAIN_CALLERS))), timeout=120)


class Traffic:
    """Steady requests from the host to every target (one bad in ten), in a thread, until ``stop``:
    what the dashboard's queries need to return series for both servers."""

    def __init__(self, targets: Sequence[str]) -> None:
        self.targets = list(targets)
        self.stopping = threading.Event()
        self.counts: collections.Counter[str] = collections.Counter()
        self.thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=30)

    def _run(self) -> None:
        good, bad = np.ones(MODEL_INPUT, np.float32), np.ones((1, 3), np.float32)
        clients = [InferenceClient(target, timeout=5, retry=RetryPolicy(attempts=1)) for target in self.targets]
        try:
            sent = 0
            while not self.stopping.wait(0.01):
                for client in clients:
                    with contextlib.suppress(InferenceServerError):
                        client.infer("mlp", {"input": bad if sent % 10 == 9 else good})
                sent += 1
        finally:
            for client in clients:
                client.close()


def make_pki(directory: Path) -> None:
    """A CA, a server certificate for every name the servers are reached by, and the token, readable in the
    containers (test material: world-readable keys)."""
    directory.mkdir(mode=0o755)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60, cwd=directory)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=deploy-check-ca",
            "-keyout", "ca.key", "-out", "ca.pem")  # fmt: skip
    (directory / "server.ext").write_text("subjectAltName=DNS:localhost,DNS:torch_server,DNS:tf_server,IP:127.0.0.1\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=oip-serving", "-keyout", "server.key",
            "-out", "server.csr")  # fmt: skip
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
            "-extfile", "server.ext", "-out", "server.pem")  # fmt: skip
    (directory / "token").write_text(TOKEN + "\n")
    for path in directory.iterdir():
        path.chmod(0o644)


@contextlib.contextmanager
def stage(name: str, durations: list[tuple[str, float, str]]) -> Iterator[None]:
    log(f"[deploy-check] {name} ...")
    started = time.monotonic()
    status = "FAILED"
    try:
        yield
        status = "ok"
    finally:
        durations.append((name, time.monotonic() - started, status))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.deploy_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", default="oip-deploy-check", help="compose project name (%(default)s)")
    parser.add_argument("--locust-workers", type=int, default=2, help="Locust workers to scale to (%(default)s)")
    parser.add_argument("--keep", action="store_true", help="leave the stack up at the end (no down -v)")
    parser.add_argument("--toolchain", action="store_true", help="also build and check the compile-capable torch image")
    args = parser.parse_args(argv)
    durations: list[tuple[str, float, str]] = []
    started = time.monotonic()
    failed = False
    with tempfile.TemporaryDirectory(prefix="deploy-check-") as tmp:
        scratch = Path(tmp)
        scratch.chmod(0o755)
        check = DeployCheck(args, scratch)
        try:
            for name, run in check.stages():
                with stage(name, durations):
                    summary = run()
                log(f"[deploy-check] {name}: ok in {durations[-1][1]:.1f} s: {summary}")
        except CheckFailed as err:
            failed = True
            log(f"[deploy-check] {durations[-1][0]}: FAILED after {durations[-1][1]:.1f} s: {err}")
            if err.services:
                log(f"[deploy-check] last log lines of {', '.join(err.services)}:")
                log(check.compose.logs(err.services))
        except Exception as err:
            failed = True
            log(f"[deploy-check] {durations[-1][0] if durations else 'start'}: FAILED: {type(err).__name__}: {err}")
            log(check.compose.logs([*SERVERS]))
        finally:
            if check.traffic is not None:
                check.traffic.stop()
            if not args.keep:
                with stage("down", durations):
                    try:
                        log(f"[deploy-check] down: ok: {check.down()}")
                    except CheckFailed as err:
                        failed = True
                        log(f"[deploy-check] down: FAILED: {err}")
    log("[deploy-check] stages: " + ", ".join(f"{name} {seconds:.1f} s{'' if ok == 'ok' else ' ' + ok}"
                                              for name, seconds, ok in durations))  # fmt: skip
    log(f"[deploy-check] {'FAILED' if failed else 'passed'} in {time.monotonic() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

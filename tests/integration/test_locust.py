"""Load-test suite: Locust against both servers, the open-loop proof (a lagging generator too),
several Locust processes, the input pool, the latency files, the overhead tool.

Locust only ever runs in child processes: importing it monkey-patches the interpreter
with gevent, which must not leak into the rest of the pytest session. The input pool
and the latency files (``loadtest.workload``, ``loadtest.users.latency_file``) are free of
gevent and are tested here directly, against small in-process OIP servers.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest

from contract.codec import request_inputs
from contract.datatypes import CONFIG_DATATYPES, TensorSpec
from contract.protocol import inference_pb2 as pb
from contract.protocol import inference_pb2_grpc as pb_grpc
from loadtest import stats
from loadtest.compare import plan
from loadtest.servers import ServerProcess
from loadtest.users.latency_file import UNSENT_ID, LatencyRecorder, Samples, read_latencies
from loadtest.users.security import TOKEN_ENV, ChannelSecurity
from loadtest.workload import InputPool, LoadSettings
from tests.helpers.fakes import FakeFramework
from tests.helpers.pki import Pki
from tests.helpers.servers import BackgroundServer

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = str(ROOT / "loadtest" / "locustfile.py")
CHILD_ENV = {
    **{name: value for name, value in os.environ.items() if name != TOKEN_ENV},
    "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests" / "helpers")]),
}
SERVICE_S = 0.020

# ---- small in-process OIP servers ----

INPUTS = [  # (name, datatype, metadata shape, optional in ModelConfig)
    ("input", "FP32", [-1, 4], False),
    ("ids", "INT64", [-1, -1], False),
    ("flags", "BOOL", [-1, 3], False),
    ("attention_mask", "INT64", [-1, -1], True),
]


class SlowModel:
    """Model "slow": one request at a time, ``service_s`` each (capacity 1 / service_s req/s)."""

    def __init__(self, service_s: float) -> None:
        self.service_s = service_s
        self.lock = threading.Lock()

    def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=request.name,
            versions=["1"],
            platform="test",
            inputs=[tensor(name=name, datatype=datatype, shape=shape) for name, datatype, shape, _ in INPUTS],
            outputs=[tensor(name="output", datatype="FP32", shape=[-1, 1])],
        )

    def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        inputs = [
            pb.ModelInput(name=name, data_type=CONFIG_DATATYPES[datatype], dims=shape[1:], optional=optional)  # type: ignore[arg-type]
            for name, datatype, shape, optional in INPUTS
        ]
        return pb.ModelConfigResponse(config=pb.ModelConfig(name=request.name, max_batch_size=8, input=inputs))

    def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        with self.lock:
            time.sleep(self.service_s)
        rows = request.inputs[0].shape[0]
        response = pb.ModelInferResponse(model_name=request.model_name)
        response.outputs.add(name="output", datatype="FP32", shape=[rows, 1])
        response.raw_output_contents.append(bytes(4 * rows))
        return response


def serve(
    model: SlowModel, methods: tuple[str, ...] = ("ModelMetadata", "ModelConfig", "ModelInfer")
) -> tuple[grpc.Server, str]:
    """A gRPC server of ``methods`` of the OIP service (any other answers UNIMPLEMENTED)."""
    messages: dict[str, tuple[Any, Any]] = {
        "ModelMetadata": (pb.ModelMetadataRequest, pb.ModelMetadataResponse),
        "ModelConfig": (pb.ModelConfigRequest, pb.ModelConfigResponse),
        "ModelInfer": (pb.ModelInferRequest, pb.ModelInferResponse),
    }
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(model, name),
            request_deserializer=messages[name][0].FromString,
            response_serializer=messages[name][1].SerializeToString,
        )
        for name in methods
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("inference.GRPCInferenceService", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def slow_target() -> Iterator[str]:
    server, target = serve(SlowModel(SERVICE_S))
    yield target
    server.stop(grace=None)


@pytest.fixture(scope="module")
def fast_target() -> Iterator[str]:
    server, target = serve(SlowModel(0.0))
    yield target
    server.stop(grace=None)


@pytest.fixture(scope="module")
def no_config_target() -> Iterator[str]:
    server, target = serve(SlowModel(0.0), ("ModelMetadata", "ModelInfer"))
    yield target
    server.stop(grace=None)


# ---- running Locust ----


def run_locust(
    target: str, prefix: Path, *args: str, timeout: float = 60, locustfile: str = LOCUSTFILE, ok: bool = True
) -> subprocess.CompletedProcess[str]:
    """Headless locustfile run writing ``prefix``_stats.csv, ``prefix``.json and latency files
    (that exits 0 unless ``ok`` is False)."""
    command = [
        sys.executable, "-m", "locust", "-f", locustfile,
        "--headless", "--only-summary", "--host", target, "--csv", str(prefix),
        "--json-file", str(prefix), "--latency-file", f"{prefix}-lat", *args,
    ]  # fmt: skip
    result = subprocess.run(
        command, check=False, cwd=ROOT, env=CHILD_ENV, capture_output=True, text=True, timeout=timeout
    )
    if ok:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def csv_totals(prefix: Path) -> dict[str, str]:
    with open(f"{prefix}_stats.csv", newline="") as file:
        return next(row for row in csv.DictReader(file) if row["Name"] == "Aggregated")


def locust_count(prefix: Path) -> int:
    """Requests Locust counted at the end (its CSV is rewritten once a second; the JSON is final)."""
    return sum(entry["num_requests"] for entry in json.loads(Path(f"{prefix}.json").read_text()))


def latencies(prefix: Path) -> Samples:
    """The latency files of a run, merged and sorted by start time (the runner's own reader)."""
    return read_latencies(f"{prefix}-lat")


# ---- (a) both servers, closed loop ----


@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_headless_run_against_server(framework: str, tmp_path: Path) -> None:
    with ServerProcess(framework, "mlp", ["--threads", "1"]) as server:
        run_locust(server.target, tmp_path / "run", "-u", "4", "-r", "4", "-t", "4s")
    totals = csv_totals(tmp_path / "run")
    assert int(totals["Request Count"]) > 0
    assert int(totals["Failure Count"]) == 0
    samples = latencies(tmp_path / "run")
    assert len(samples) == locust_count(tmp_path / "run") >= int(totals["Request Count"])
    assert samples.ok.all()
    assert (samples.latency_us > 0).all()
    assert samples.metas[0]["mode"] == "closed"


# ---- (b) open loop shows the backlog, closed loop hides it ----


def test_open_loop_latency_grows_with_backlog(slow_target: str, tmp_path: Path) -> None:
    # Offered 150 req/s for 2 s to a server that serves 50 req/s: the queue grows all along.
    arrivals = ["--arrival-rate", "150", "--arrival", "fixed", "--arrival-users", "2"]
    run_locust(
        slow_target, tmp_path / "open", "--model", "slow", "--load-shape", "rate", *arrivals,
        "--deadline-ms", "30000", "-t", "2s",
    )  # fmt: skip
    run_locust(slow_target, tmp_path / "closed", "--model", "slow", "-u", "1", "-r", "1", "-t", "2s")

    open_loop = latencies(tmp_path / "open")
    assert len(open_loop) == locust_count(tmp_path / "open") >= 250
    assert open_loop.ok.all()
    open_ms = open_loop.latency_us / 1000
    quarter = len(open_ms) // 4
    assert np.percentile(open_ms, 99) > 5 * SERVICE_S * 1000
    assert np.median(open_ms[-quarter:]) > 3 * np.median(open_ms[:quarter])
    summary = open_loop.metas[0]["openloop"]
    assert summary["offered_rps"] > 120
    assert summary["achieved_rps"] < 60

    closed_loop = latencies(tmp_path / "closed")
    closed_ms = closed_loop.latency_us / 1000
    assert closed_loop.ok.all()
    assert len(closed_ms) == locust_count(tmp_path / "closed") > 20
    assert np.median(closed_ms) < 2 * SERVICE_S * 1000


# ---- (c) a generator that lags: late sends are measured, counted from the schedule, and flagged ----


def test_open_loop_with_a_lagging_generator(fast_target: str, tmp_path: Path) -> None:
    # tests/helpers/lag_injector.py stalls the Locust process's hub for 60 ms every 200 ms, as a generator short
    # of CPU would; the server answers at once. 2 fixed streams of 100 req/s for 2 s.
    arrivals = ["--arrival-rate", "200", "--arrival", "fixed", "--arrival-users", "2"]
    locustfile = f"{LOCUSTFILE},{ROOT / 'tests' / 'helpers' / 'lag_injector.py'}"
    run_locust(fast_target, tmp_path / "lag", "--model", "slow", "--load-shape", "rate", *arrivals, "-t", "2s",
               locustfile=locustfile)  # fmt: skip
    run = latencies(tmp_path / "lag")
    assert run.ok.all()
    lag_ms, latency_ms = run.lag_us / 1000, run.latency_us / 1000
    assert lag_ms.max() > 40  # the stalls delayed sends...
    assert np.mean(lag_ms > 5) > 0.1
    assert (latency_ms >= lag_ms).all()  # ...and each delay is in its request's latency (from the schedule)
    late = lag_ms > 20
    assert np.median(latency_ms[late]) > 20
    # The schedule itself did not slip: the stalled arrivals were sent late, not dropped or postponed.
    assert len(run) >= 0.9 * 200 * 2 - 10
    # No hole in the schedule either: a stall postpones sends, never the arrivals after it (each stream
    # is due every 10 ms whatever happened, so no two consecutive arrivals are further apart).
    assert np.diff(run.start_s).max() < 0.0105
    assert run.metas[0]["openloop"]["late"] > 0.1 * len(run)
    # The runner reads this window as invalid: the generator, not the server, set the latency.
    start = float(run.start_s.min()) + 0.2
    figures = stats.window_stats(run, start, start + 1.5, batch_size=1, deadline_s=1.0)
    step = figures | {"mode": "open", "offered_rps": 200.0, "window_target_s": 1.5, "generator_exit_code": 0,
                      "generator_processes": 1, "generator_cpu_pct": {"mean": 30.0},
                      "other_cpu_pct": {"mean": 0.0}, "resource_window_s": 1.5}  # fmt: skip
    reasons = plan.invalid_reasons(step)
    assert any(reason.startswith("generator send lag p99") for reason in reasons), reasons


# ---- (d) several Locust processes share one open-loop rate ----


def test_open_loop_over_several_processes(fast_target: str, tmp_path: Path) -> None:
    arrivals = ["--arrival-rate", "200", "--arrival", "fixed", "--arrival-users", "4"]
    run_locust(fast_target, tmp_path / "multi", "--model", "slow", "--load-shape", "rate", *arrivals, "-t", "2s",
               "--processes", "2")  # fmt: skip
    run = latencies(tmp_path / "multi")
    workers = {meta["pid"] for meta in run.metas}
    assert len(workers) == 2  # one latency file per worker, merged
    assert run.ok.all()
    loops = [meta["openloop"] for meta in run.metas]
    assert sum(loop["target_rps"] for loop in loops) == pytest.approx(200.0)  # the rate split between them
    assert len(run) == sum(loop["scheduled"] for loop in loops) > 100
    for loop in loops:  # each worker kept its share of the schedule while it ran
        assert loop["offered_rps"] == pytest.approx(loop["target_rps"], rel=0.15)
        assert loop["sent"] == loop["scheduled"]


# ---- (d2) failures are recorded by status ----


class RefusingModel(SlowModel):
    """Model "slow" that refuses every third request (RESOURCE_EXHAUSTED, with the serving core's reason) and
    holds every third one past any short deadline; the rest it answers at once."""

    def __init__(self) -> None:
        super().__init__(0.0)
        self.calls = itertools.count()

    def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        turn = next(self.calls)
        if turn % 3 == 0:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"queue full ({turn} requests waiting); retry later")
        if turn % 3 == 1:
            time.sleep(0.2)
        return super().ModelInfer(request, context)


def test_failures_are_recorded_with_their_status(tmp_path: Path) -> None:
    server, target = serve(RefusingModel())
    try:
        run_locust(target, tmp_path / "fail", "--model", "slow", "-u", "3", "-r", "3", "-t", "2s",
                   "--deadline-ms", "50", ok=False)  # fmt: skip
    finally:
        server.stop(grace=None)
    run = latencies(tmp_path / "fail")
    status, labels = run.outcomes()
    outcome = np.array(labels)[status]
    assert set(outcome[run.ok]) == {"OK"}
    assert set(outcome[~run.ok]) == {"RESOURCE_EXHAUSTED: queue full (N requests waiting)", "DEADLINE_EXCEEDED"}
    figures = stats.window_stats(run, float(run.start_s.min()), float(run.end_s.max()) + 1, 1, 0.05)
    by_status = figures["errors_by_status"]
    assert sum(by_status.values()) == figures["errors"] == int((~run.ok).sum()) > 10
    assert by_status["RESOURCE_EXHAUSTED"] >= by_status["DEADLINE_EXCEEDED"] / 2  # a third of the calls each


# ---- (e) the input pool and the latency files ----


def _pool(target: str, **settings: Any) -> InputPool:
    with grpc.insecure_channel(target) as channel:
        return InputPool.from_server(channel, LoadSettings(model="slow", **settings))


def test_input_pool_from_metadata(slow_target: str) -> None:
    pool = _pool(slow_target, batch_size=3, seq_len=(5, 5), pool_size=4)
    assert len(pool.requests) == len(pool.payloads) == 4
    request = pool.next()
    assert [t.name for t in request.inputs] == ["input", "ids", "flags"]  # the optional mask is left out
    assert [t.datatype for t in request.inputs] == ["FP32", "INT64", "BOOL"]
    assert [list(t.shape) for t in request.inputs] == [[3, 4], [3, 5], [3, 3]]
    assert [len(raw) for raw in request.raw_input_contents] == [3 * 4 * 4, 3 * 5 * 8, 3 * 3]
    arrays = request_inputs(request)
    assert arrays["input"].dtype == np.float32
    assert arrays["ids"].min() >= 1
    assert arrays["ids"].max() < 1000
    assert [pool.next() for _ in range(4)][-1] is request  # round robin
    payloads = pool.payload_cycle()
    assert [pb.ModelInferRequest.FromString(next(payloads)) for _ in range(4)] == pool.requests


def test_input_pool_typed_encoding(slow_target: str) -> None:
    raw = _pool(slow_target, batch_size=2, pool_size=2)
    typed = _pool(slow_target, batch_size=2, pool_size=2, encoding="typed")
    request = typed.next()
    assert not request.raw_input_contents
    assert len(request.inputs[0].contents.fp32_contents) == 2 * 4
    assert len(request.inputs[1].contents.int64_contents) == 2 * 16
    for name, array in request_inputs(raw.next()).items():
        np.testing.assert_array_equal(request_inputs(request)[name], array)


def test_input_pool_without_model_config(no_config_target: str) -> None:
    pool = _pool(no_config_target, batch_size=2, seq_len=(8, 32), pool_size=16)
    assert pool.batched
    lengths = set()
    for request in pool.requests:
        arrays = request_inputs(request)
        assert list(arrays) == ["input", "ids", "flags", "attention_mask"]  # no config: every input
        assert (arrays["attention_mask"] == 1).all()
        assert arrays["ids"].shape == arrays["attention_mask"].shape
        lengths.add(arrays["ids"].shape[1])
    assert min(lengths) >= 8
    assert max(lengths) <= 32
    assert len(lengths) > 1


def test_input_pool_rejects_invalid_settings(slow_target: str) -> None:
    for settings in ({"batch_size": 9}, {"encoding": "json"}):
        with pytest.raises(ValueError):  # noqa: PT011 - each names its own problem
            _pool(slow_target, **settings)
    with pytest.raises(ValueError, match="FP16/BF16"):
        InputPool("m", [TensorSpec("x", "FP16", (-1, 2))], encoding="typed")


@pytest.mark.parametrize("name", ["lat", "torch[precision=bf16,compile=on]-closed*?"])
def test_latency_file_round_trip(tmp_path: Path, name: str) -> None:
    prefix = tmp_path / name  # glob characters in a name are its own, not a pattern
    recorder = LatencyRecorder()
    now = time.perf_counter()
    recorder.record((now + 0.002, 0.0015, True, 0.0, 0))
    recorder.record((now, 0.25, False, 0.001, recorder.status_id("DEADLINE_EXCEEDED", "Deadline Exceeded")))
    recorder.record((now + 0.001, -1.0, False, -1.0, UNSENT_ID))
    recorder.save(prefix, {"mode": "open"})
    full = recorder.status_id("RESOURCE_EXHAUSTED", "queue full (1024 requests waiting); retry later")
    recorder.record((now + 0.003, 0.0005, True, 0.0, 0))
    recorder.record((now + 0.004, 0.0001, False, 0.0, full))
    recorder.save(prefix, {"mode": "open"})
    run = read_latencies(prefix)
    assert [meta["pid"] for meta in run.metas] == [os.getpid()] * 2
    assert run.latency_us.tolist() == [250000, -1, 1500, 500, 100]
    assert run.ok.tolist() == [False, False, True, True, False]
    assert run.sent.tolist() == [True, False, True, True, True]
    assert run.lag_us.tolist() == [1000, -1, 0, 0, 0]
    status, labels = run.outcomes()
    assert [labels[i] for i in status] == [
        "DEADLINE_EXCEEDED", "UNSENT", "OK", "OK", "RESOURCE_EXHAUSTED: queue full (N requests waiting)"
    ]  # fmt: skip
    assert abs(run.start_s[0] - time.time()) < 5


# ---- (f) the generator-overhead tool ----


def test_overhead_tool_runs_against_the_bare_server() -> None:
    command = [sys.executable, "-m", "loadtest", "overhead", "--seconds", "1", "--rounds", "1", "--users", "2",
               "--rates", "100"]  # fmt: skip
    result = subprocess.run(command, check=False, cwd=ROOT, env=CHILD_ENV, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stderr.splitlines()  # for people, on stderr
    assert lines[0].startswith("target 127.0.0.1:")
    assert "bare identity server" in lines[0]
    assert [line.split(":")[0].strip() for line in lines[1:4]] == ["GrpcUser", "minimal", "open loop 100/s"]
    assert "us CPU/request" in lines[1]
    assert lines[-1].startswith("median: GrpcUser")
    summary = json.loads(result.stdout)  # the result, alone on stdout
    assert summary["target"].startswith("127.0.0.1:")
    assert [len(summary["closed_loop"][name]) for name in ("GrpcUser", "minimal")] == [1, 1]
    assert summary["open_loop"][0]["name"] == "open 100/s"
    assert summary["median_cpu_us_per_request"]["GrpcUser"] > 0


# ---- (g) a server behind TLS, mutual TLS and a bearer token ----

TOKEN = "load-test-token"


@pytest.fixture(scope="module")
def secured(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BackgroundServer, Path]]:
    """The fake ``double`` model behind TLS, mutual TLS (clients of the test CA) and a token; and the token's file."""
    directory = tmp_path_factory.mktemp("secured")
    token_file = directory / "token"
    token_file.write_text(TOKEN + "\n")
    server = BackgroundServer(
        FakeFramework(), model=["double"], model_dir=directory, max_batch_size=8, tls_cert=pki.server_cert,
        tls_key=pki.server_key, tls_client_ca=pki.ca, auth_token_file=token_file,
    )  # fmt: skip
    yield server, token_file
    server.stop()


def _tls_options(pki: Pki) -> list[str]:
    # The target is 127.0.0.1; --tls-server-name checks the certificate against its other name.
    return ["--tls-ca", str(pki.ca), "--tls-client-cert", str(pki.client_cert),
            "--tls-client-key", str(pki.client_key), "--tls-server-name", "localhost"]  # fmt: skip


def test_headless_run_with_tls_mutual_tls_and_token(
    secured: tuple[BackgroundServer, Path], pki: Pki, tmp_path: Path
) -> None:
    server, token_file = secured
    run_locust(server.target, tmp_path / "run", "--model", "double", *_tls_options(pki),
               "--auth-token-file", str(token_file), "-u", "2", "-r", "2", "-t", "2s")  # fmt: skip
    totals = csv_totals(tmp_path / "run")
    assert int(totals["Request Count"]) > 0
    assert int(totals["Failure Count"]) == 0
    samples = latencies(tmp_path / "run")
    assert len(samples) == locust_count(tmp_path / "run")
    assert samples.ok.all()


def test_headless_run_without_the_token_is_refused(
    secured: tuple[BackgroundServer, Path], pki: Pki, tmp_path: Path
) -> None:
    # The same run without --auth-token-file: the server refuses it (so the run above passed the token).
    server, _ = secured
    result = run_locust(server.target, tmp_path / "run", "--model", "double", *_tls_options(pki),
                        "-u", "2", "-r", "2", "-t", "1s", ok=False)  # fmt: skip
    assert result.returncode != 0
    totals = csv_totals(tmp_path / "run")
    assert int(totals["Request Count"]) == int(totals["Failure Count"])  # nothing succeeded
    # The users' set-up (ModelMetadata, before any ModelInfer) was refused for the token, and only for it.
    with open(f"{tmp_path / 'run'}_exceptions.csv", newline="") as file:
        errors = [row["Message"] for row in csv.DictReader(file)]
    assert errors
    assert all("UNAUTHENTICATED" in error and "missing or invalid bearer token" in error for error in errors), errors


def test_bad_security_options_stop_locust_at_start_with_one_line(pki: Pki, tmp_path: Path) -> None:
    # A key without its certificate, over 2 worker processes: one line from the parent, no traceback, no run.
    result = run_locust("127.0.0.1:1", tmp_path / "run", "--tls-ca", str(pki.ca), "--tls-client-key",
                        str(pki.client_key), "--processes", "2", "-t", "5s", ok=False, timeout=30)  # fmt: skip
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert lines == ["locust: error: --tls-client-key needs --tls-client-cert (mutual TLS presents both)"]
    assert "Traceback" not in result.stderr


def test_channel_security_from_options(pki: Pki, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(" tok3n \nsecond line\n")
    options = SimpleNamespace(tls_ca=str(pki.ca), tls_client_cert=str(pki.client_cert),
                              tls_client_key=str(pki.client_key), tls_server_name="localhost",
                              auth_token_file=str(token_file))  # fmt: skip
    security = ChannelSecurity.from_options(options, environ={})
    assert security.tls
    assert security.root_certificates == pki.ca.read_bytes()
    assert security.metadata == (("authorization", "Bearer tok3n"),)
    assert ("grpc.ssl_target_name_override", "localhost") in security.channel_options()
    assert "tok3n" not in repr(security)
    assert ChannelSecurity.from_options(SimpleNamespace(), environ={TOKEN_ENV: "t"}).metadata == (
        ("authorization", "Bearer t"),
    )
    assert ChannelSecurity.from_options(SimpleNamespace(), environ={}) == ChannelSecurity()
    (tmp_path / "empty").write_text("\n")
    bad = {
        "--tls-ca /nonexistent.pem: no such file": {"tls_ca": "/nonexistent.pem"},
        "--tls-client-key needs --tls-client-cert": {"tls_client_key": str(pki.client_key)},
        "--tls-client-cert needs --tls-client-key": {"tls_client_cert": str(pki.client_cert)},
        "--tls-server-name needs TLS": {"tls_server_name": "localhost"},
        "not a usable PEM certificate and key": {"tls_client_cert": str(pki.client_cert),
                                                 "tls_client_key": str(pki.stranger_key)},
        "--tls-ca .*: not PEM certificates": {"tls_ca": str(token_file)},
        "--auth-token-file .*: empty": {"auth_token_file": str(tmp_path / "empty")},
        f"--auth-token-file and {TOKEN_ENV}": {"auth_token_file": str(token_file), TOKEN_ENV: "t"},
    }  # fmt: skip
    for message, values in bad.items():
        environ = {TOKEN_ENV: values.pop(TOKEN_ENV)} if TOKEN_ENV in values else {}
        with pytest.raises(ValueError, match=message):
            ChannelSecurity.from_options(SimpleNamespace(**values), environ=environ)


def test_channel_security_checks_the_server_name(secured: tuple[BackgroundServer, Path], pki: Pki) -> None:
    server, _ = secured
    client: dict[str, Any] = {
        "root_certificates": pki.ca.read_bytes(),
        "certificate_chain": pki.client_cert.read_bytes(),
        "private_key": pki.client_key.read_bytes(),
        "token": TOKEN,
    }
    request = pb.ModelMetadataRequest(name="double")
    for name, code in (("localhost", None), ("", None), ("elsewhere.example", grpc.StatusCode.UNAVAILABLE)):
        security = ChannelSecurity(server_name=name, **client)
        with security.open_channel(server.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            if code is None:
                assert stub.ModelMetadata(request, timeout=10, metadata=security.metadata).name == "double"
            else:
                with pytest.raises(grpc.RpcError) as info:
                    stub.ModelMetadata(request, timeout=10, metadata=security.metadata)
                assert info.value.code() == code, name


# ---- (h) Locust always exits ----


@pytest.mark.timeout(120)
@pytest.mark.parametrize("connections", ["1", "4"])
def test_locust_exits_while_spin_threads_hold_the_channel_lock(
    fast_target: str, tmp_path: Path, connections: str
) -> None:
    # tests/helpers/spin_lock_holder.py: once the test stops, gRPC's spin threads hold the channel lock 50 ms
    # per event, so the stopped users' cancellations find it held by another thread. With grpc's own
    # (gevent) channel lock, a greenlet woken by a spin thread's release was never resumed: Locust hung
    # after "Shape test stopping" (a race, about 1 run in 30 under CPU load; certain here).
    locustfile = f"{LOCUSTFILE},{ROOT / 'tests' / 'helpers' / 'spin_lock_holder.py'}"
    started = time.monotonic()
    run_locust(fast_target, tmp_path / "stop", "--model", "slow", "-u", "16", "-r", "16", "-t", "2s",
               "--connections", connections, locustfile=locustfile, timeout=40)  # fmt: skip
    assert time.monotonic() - started < 30
    totals = csv_totals(tmp_path / "stop")
    assert int(totals["Request Count"]) > 0
    assert int(totals["Failure Count"]) == 0

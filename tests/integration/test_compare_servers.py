"""The comparison against real servers: its refusal before measuring, and a whole run end to end."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from contract.protocol import inference_pb2 as pb
from loadtest import sampling
from loadtest.cli import available_cpus
from loadtest.compare import capacity as capacity_search
from loadtest.compare import drain, plan, prepare
from loadtest.compare import run as compare
from loadtest.servers import ServerProcess
from tests.helpers.fakes import FAKE_DEFAULT_THREADS, FakeFramework
from tests.helpers.servers import BackgroundServer
from tests.helpers.synthetic import check_report_folder

ROOT = Path(__file__).resolve().parents[2]
#: How a capacity search may end.
ENDINGS = {
    capacity_search.FOUND,
    capacity_search.NONE_PASSES,
    capacity_search.INCONCLUSIVE,
    capacity_search.BUDGET_EXHAUSTED,
    capacity_search.ABOVE_CEILING,
}


class ConfigOnly:
    """ServerMetadata and ModelConfig of a model "mlp" with the given parameters (nothing else)."""

    def __init__(self, **parameters: str) -> None:
        self.parameters = {"device": "cpu", "threads": "1", "precision": "fp32", "compile": "off"} | parameters

    def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="fake", version="0")

    def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        params = {key: pb.ModelParameter(string_value=value) for key, value in self.parameters.items()}
        batching = pb.ModelDynamicBatching(default_queue_policy=pb.ModelQueuePolicy(max_queue_size=1024))
        config = pb.ModelConfig(name=request.name, max_batch_size=32, parameters=params, dynamic_batching=batching)
        config.instance_group.add(count=1)
        return pb.ModelConfigResponse(config=config)


@pytest.fixture
def fake_pair() -> Iterator[tuple[str, str]]:
    servers = []
    for service in (ConfigOnly(device="cpu"), ConfigOnly(device="cuda:0")):
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                getattr(service, name),
                request_deserializer=getattr(pb, f"{name}Request").FromString,
                response_serializer=getattr(pb, f"{name}Response").SerializeToString,
            )
            for name in ("ServerMetadata", "ModelConfig")
        }
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("inference.GRPCInferenceService",
                                                                              handlers)])  # fmt: skip
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append((server, f"127.0.0.1:{port}"))
    yield servers[0][1], servers[1][1]
    for server, _ in servers:
        server.stop(grace=None)


def test_comparison_refuses_servers_on_different_devices_before_measuring(
    fake_pair: tuple[str, str], tmp_path: Path
) -> None:
    opts = plan.Options(torch_target=fake_pair[0], tf_target=fake_pair[1], out=tmp_path / "out")
    with pytest.raises(prepare.ComparisonRefused, match=r"device: torch_server cpu, tf_server cuda:0"):
        compare.run_comparison(opts)
    assert not list((tmp_path / "out" / "logs").iterdir())  # no Locust run, no server log


@pytest.mark.skipif(
    not (importlib.util.find_spec("torch") and importlib.util.find_spec("tensorflow")),
    reason="needs both frameworks installed",
)
@pytest.mark.slow
@pytest.mark.timeout(660)
def test_compare_end_to_end_on_mlp_with_a_reference_server(tmp_path: Path) -> None:
    out = tmp_path / "report"
    with ServerProcess("bare", "mlp", ["--mode", "sync"]) as bare:
        command = [
            sys.executable, "-m", "loadtest", "compare", "--model", "mlp", "--concurrency", "2",
            "--rates", "150", "--step-seconds", "1.5", "--warmup-seconds", "0.5", "--repeats", "2",
            "--capacity-max-probes", "3", "--target", f"bare={bare.target}", "--out", str(out),
        ]  # fmt: skip
        # Its own process group: if it overruns, the servers it started go down with it.
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)  # fmt: skip
        try:
            _, stderr = process.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            _, stderr = process.communicate()
            pytest.fail(f"compare did not finish in 600 s:\n{stderr[-3000:]}")
    assert process.returncode == 0, stderr[-3000:]
    assert "report: " in stderr
    results = check_report_folder(out)
    assert set(results["servers"]) == {"torch", "tensorflow", "bare"}
    assert results["failures"] == []
    forward, backward = ["torch", "tensorflow", "bare"], ["bare", "tensorflow", "torch"]
    drained = ["torch", "tensorflow", "tensorflow", "torch"]  # the servers it started, not the reference
    # closed, capacity search, open, drain
    assert [entry["arm"] for entry in results["order"]] == (forward + backward) * 3 + drained
    for name in ("torch", "tensorflow", "bare"):
        capacity = results["servers"][name]["capacity"]
        assert capacity["slo_ms"] == results["settings"]["slo_ms"]
        assert len(capacity["repeats"]) == 2, name
        for entry in capacity["repeats"]:
            assert entry["status"] in ENDINGS, (name, entry)
            assert 1 <= len(entry["probes"]) <= 3, (name, entry)
            assert all(probe["rate"] > 0 and probe["pass"] in (True, False, None) for probe in entry["probes"])
            if entry["status"] == capacity_search.FOUND:  # the highest rate that passed, of those probed
                passed = [probe["rate"] for probe in entry["probes"] if probe["pass"]]
                assert entry["found"] == max(passed), (name, entry)
        assert capacity["values"] == [e["found"] for e in capacity["repeats"] if e["found"] is not None], name
    views = [plan.settings_view(results["servers"][fw]["model_config"]) for fw in ("torch", "tensorflow")]
    assert views[0] == views[1]
    assert views[0]["device"] == "cpu"
    assert views[0]["threads"] == "1"
    steps = [(name, step) for name, server in results["servers"].items() for step in server["steps"]]
    for name in ("torch", "tensorflow"):
        server = results["servers"][name]
        assert server["prepare"]["first_start_s"] > 0
        assert server["prepare"]["export_s"] is not None
        assert [(s["phase"], s["repeat"]) for s in server["starts"]] == [(p, r) for p in ("closed", "capacity", "open")
                                                                         for r in (0, 1)]  # fmt: skip
        assert all(start["cold_start_s"] > 0 and start["idle_rss_bytes"] > 0 for start in server["starts"])
    # At 2 users and 150 req/s nothing should strain the generator or the servers: every step is valid
    # unless another process on this (shared) host was busy, which is the one reason a test cannot control.
    # A step it was busy in may also have found the generator late (it shares the cores): nothing more.
    for name, step in steps:
        reasons = step["invalid_reasons"]
        neighbours = any(reason.startswith("other processes used") for reason in reasons) and all(
            reason.startswith(("other processes used", "generator send lag", "generator behind schedule"))
            for reason in reasons
        )
        assert step["valid"] or neighbours, (name, reasons)
        assert step["valid"] == (not step["invalid_reasons"])
    # A disturbed step is flagged, not discarded: its figures are measured all the same.
    for name, step in steps:
        assert step["throughput_rps"] > 0, name
        assert step["error_rate"] == 0.0, name
        assert step["errors_by_status"] == {}, name
        assert 0 < step["latency_ms"]["p50"] <= step["latency_ms"]["p99"], name
        assert step["generator_cpu_pct"]["mean"] is not None, name
        assert step["breakdown"]["client_ms"] > 0, name
        if name != "bare":
            assert step["server_cpu_pct"]["mean"] is not None, name
            assert step["server_metrics"]["batch_size_mean"] >= 1, name
            # Where the time goes, from the server's ModelStatistics inside the window.
            assert 0 < step["breakdown"]["compute_infer_ms"] < step["breakdown"]["server_ms"], name
        if step["mode"] == "open":
            assert step["offered_rps"] == 150.0
            if not any(reason.startswith("generator behind schedule") for reason in step["invalid_reasons"]):
                assert step["sent_rps"] == pytest.approx(150.0, rel=0.35), name
    # SIGTERM under steady load: readiness off before the process is gone, a clean exit, and every call
    # accounted for. Whether the server loses calls is what the drain row measures, not what this test
    # asserts: the servers can lose a few (CANCELLED as the transport closes; tests/integration/test_drain.py).
    for name in ("torch", "tensorflow"):
        found = results["servers"][name]["drain"]
        assert found["repeat"] == [0, 1], name
        assert found["lost_before_signal"] == [0, 0], (name, found["statuses"])
        for calls, statuses, lost in zip(found["calls"], found["statuses"], found["lost_calls"], strict=True):
            assert sum(statuses.values()) == calls > 0, (name, statuses)
            assert sum(n for status, n in statuses.items() if drain.classify(status) == "lost") == lost, statuses
        assert found["exit_code"] == [0, 0], name
        assert all(0 <= flip < 1000 * exit_s for flip, exit_s in zip(found["readiness_flip_ms"], found["exit_s"],
                                                                       strict=True)), name  # fmt: skip
    assert "drain" not in results["servers"]["bare"]
    assert results["fidelity"]["verdict"] == "agree"
    rows = results["verdict"]
    assert {row["variant"] for row in rows} == {"as set"}
    assert all(set(row["values"]) == {"torch", "tensorflow"} for row in rows)
    cold = next(row for row in rows if row["characteristic"].startswith("cold start"))
    assert len(cold["values"]["torch"]) == 6  # closed, capacity and open starts, 2 repeats each
    assert cold["p_value"] == pytest.approx(2 / 924)  # every torch start ahead: 2 of C(12, 6) orders


def test_a_server_left_to_its_thread_default_reports_the_count_it_runs_with(tmp_path: Path) -> None:
    """Without --threads a server reports its framework's resolved thread count, never a placeholder
    ("default" once stood beside the other server's number and the comparison refused them), so the
    like-for-like check compares numbers; and it stays strict where the numbers differ."""
    framework = FakeFramework()
    framework.configure(2, "cpu")
    servers = {
        "defaulted": BackgroundServer(FakeFramework(), model=["double"], model_dir=tmp_path / "a"),
        "configured": BackgroundServer(framework, model=["double"], model_dir=tmp_path / "b", threads=2),
    }
    try:
        configs = {name: sampling.Endpoint(name, s.target, None, "double").describe() for name, s in servers.items()}
    finally:
        for server in servers.values():
            server.stop()
    assert configs["defaulted"]["parameters"]["threads"] == str(FAKE_DEFAULT_THREADS)
    assert configs["configured"]["parameters"]["threads"] == "2"
    assert plan.check_settings({"a": configs["defaulted"], "b": configs["defaulted"]}) == []
    assert plan.check_settings(configs) == [f"threads: defaulted {FAKE_DEFAULT_THREADS}, configured 2"]


@pytest.mark.skipif(
    not (importlib.util.find_spec("torch") and importlib.util.find_spec("tensorflow")),
    reason="needs both frameworks installed",
)
@pytest.mark.slow
def test_servers_started_without_thread_flags_report_the_same_effective_threads(tmp_path: Path) -> None:
    """The new user's case: both servers started by hand without --threads, on the same core, then compared
    as running targets. Each reports the thread count its framework resolved (torch: its own count,
    TensorFlow: its pool size for 0 = unset), so the settings check passes; it refused with
    "threads: torch_server 1, tf_server default" when tf_server reported its unset value."""
    core = available_cpus()[:1]
    configs = {}
    for framework, label in (("torch", "torch_server"), ("tensorflow", "tf_server")):
        args = ["--device", "cpu", "--model-dir", str(tmp_path / framework)]
        with ServerProcess(framework, "mlp", args, cpus=core) as server:
            configs[label] = sampling.Endpoint(label, server.target, server.metrics_url, "mlp").describe()
    assert [config["parameters"]["threads"] for config in configs.values()] == ["1", "1"]
    assert plan.check_settings(configs) == []

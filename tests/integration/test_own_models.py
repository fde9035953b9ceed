"""The user's own models (tests/helpers/own_models.py: written here, no zoo identity) served from a model
repository by both real servers: metadata from the artifacts, the same numbers, precise refusals,
versions switched under load, corrupt artifacts reported while the others serve."""

from __future__ import annotations

import collections
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from client import InferenceClient, InvalidArgumentError, NotFoundError, UnavailableError
from contract import codec
from contract.datatypes import TensorSpec, bf16_to_float32, float32_to_bf16
from contract.protocol import inference_pb2_grpc as pb_grpc
from loadtest.servers import ROOT
from serving import artifacts
from serving.artifacts import ArtifactError, ArtifactModel, ArtifactSignature, ModelConfigFile, VersionPolicy
from serving.cli import main as server_main
from tests.helpers import own_models
from tests.helpers.servers import BackgroundServer, framework_for

FRAMEWORKS = ("torch", "tensorflow")
REPOSITORIES = {"torch": own_models.torch_repository, "tensorflow": own_models.tf_repository}


@pytest.fixture(scope="module")
def repositories(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {name: build(tmp_path_factory.mktemp(name)) for name, build in REPOSITORIES.items()}


@pytest.fixture(scope="module")
def own_servers(repositories: dict[str, Path]) -> Iterator[dict[str, BackgroundServer]]:
    servers: dict[str, BackgroundServer] = {}
    try:
        for name in FRAMEWORKS:
            servers[name] = BackgroundServer(framework_for(name), model_dir=repositories[name], repository_poll_s=0)
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def multi_inputs(rows: int = 3, length: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((rows, length, 4)).astype(np.float32),
        "ids": rng.integers(0, own_models.VOCAB, (rows, length)).astype(np.int64),
    }


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_metadata_and_config_come_from_the_artifact(own_servers: dict[str, BackgroundServer], framework: str) -> None:
    with InferenceClient(own_servers[framework].target) as client:
        metadata = client.model_metadata("multi")
        assert metadata.versions == ("1",)
        assert {spec.name: (spec.datatype, spec.shape) for spec in metadata.inputs} == {
            "x": ("FP32", (-1, -1, 4)),
            "ids": ("INT64", (-1, -1)),
        }
        assert {spec.name: (spec.datatype, spec.shape) for spec in metadata.outputs} == {
            "hidden": ("FP32", (-1, -1, 3)),
            "pooled": ("FP32", (-1, 3)),
        }
        config = client.model_config("multi")
        assert config.max_batch_size == 8  # config.json's, below the server's 32
        assert config.parameters["range.ids"].string_value == "0,9"
        dtypes = client.model_metadata("dtypes")
        assert {spec.name: spec.datatype for spec in dtypes.inputs} == {
            "a": "FP16",
            "b": "BF16",
            "flag": "BOOL",
            "n": "INT32",
        }
        assert {spec.name: spec.datatype for spec in dtypes.outputs} == {
            "doubled": "FP16",
            "chosen": "BF16",
            "next": "INT32",
        }  # torch's tuple named by config.json; TensorFlow's own names


def test_both_servers_give_the_same_numbers(own_servers: dict[str, BackgroundServer]) -> None:
    inputs = multi_inputs()
    expected = own_models.multi_reference(inputs["x"], inputs["ids"])
    rng = np.random.default_rng(1)
    dtypes_in = {
        "a": rng.standard_normal((5, 2)).astype(np.float16),
        "b": float32_to_bf16(rng.standard_normal((5, 2)).astype(np.float32)),
        "flag": rng.integers(0, 2, (5, 1)).astype(bool),
        "n": rng.integers(-100, 100, (5, 1)).astype(np.int32),
    }
    b = bf16_to_float32(dtypes_in["b"])
    for server in own_servers.values():
        with InferenceClient(server.target) as client:
            outputs = client.infer("multi", inputs)
            for name, want in expected.items():
                np.testing.assert_allclose(outputs[name], want, rtol=1e-5, atol=1e-6)
            typed = client.infer("dtypes", dtypes_in, datatypes={"b": "BF16"})
            assert typed["doubled"].dtype == np.float16
            np.testing.assert_array_equal(typed["doubled"], dtypes_in["a"] * 2)
            np.testing.assert_array_equal(bf16_to_float32(typed["chosen"]), np.where(dtypes_in["flag"], b, -b))
            np.testing.assert_array_equal(typed["next"], dtypes_in["n"] + 1)


def test_tritonclient_reads_and_calls_an_own_model(own_servers: dict[str, BackgroundServer]) -> None:
    import tritonclient.grpc as triton

    inputs = multi_inputs(rows=2, length=3)
    expected = own_models.multi_reference(inputs["x"], inputs["ids"])
    for server in own_servers.values():
        client = triton.InferenceServerClient(server.target)
        try:
            assert client.is_model_ready("multi")
            tensors = []
            for name, array in inputs.items():
                tensor = triton.InferInput(name, list(array.shape), "FP32" if name == "x" else "INT64")
                tensor.set_data_from_numpy(array)
                tensors.append(tensor)
            result = client.infer("multi", tensors)
            np.testing.assert_allclose(result.as_numpy("pooled"), expected["pooled"], rtol=1e-5, atol=1e-6)
        finally:
            client.close()


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_bad_input_gets_a_precise_status_and_the_server_serves_on(
    own_servers: dict[str, BackgroundServer], framework: str
) -> None:
    good = multi_inputs(rows=1, length=4)
    cases: list[tuple[dict[str, np.ndarray], str]] = [
        ({**good, "ids": good["ids"].astype(np.int32)}, "input 'ids': datatype INT32, expected INT64"),
        ({**good, "x": np.zeros((1, 4, 5), np.float32)}, "input 'x': shape [1, 4, 5], expected [-1, -1, 4]"),
        ({**good, "ids": np.full((1, 4), 10)}, "input 'ids': values must lie in [0, 9]"),
        (multi_inputs(rows=9), "batch of 9 rows exceeds max_batch_size 8"),
    ]
    if framework == "torch":  # the exported program ties the two lengths together
        cases.append(({**good, "ids": np.zeros((1, 5), np.int64)}, "the model ties them"))
    with InferenceClient(own_servers[framework].target) as client:
        for inputs, message in cases:
            with pytest.raises(InvalidArgumentError) as info:
                client.infer("multi", inputs)
            assert message in info.value.message
            assert "\n" not in info.value.message
        assert client.health() == "SERVING"
        client.infer("multi", good)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_corrupt_artifact_is_one_line_and_the_other_models_serve(
    framework: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "repo"
    shutil.copytree(_multi_only(framework, tmp_path), root)
    broken = root / "broken" / "1"
    broken.mkdir(parents=True)
    junk = np.random.default_rng(0).bytes(4096)
    (broken / ("model.pt2" if framework == "torch" else "saved_model.pb")).write_bytes(junk)
    with caplog.at_level(logging.ERROR, logger="serving.loader"):
        server = BackgroundServer(framework_for(framework), model_dir=root, repository_poll_s=0)
    try:
        errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
        about = [message for message in errors if "broken" in message]
        assert len(about) == 1, errors
        assert about[0].startswith("model broken cannot be served: version 1: ")
        assert "\n" not in about[0]
        assert str(broken) in about[0]
        with InferenceClient(server.target, timeout=10) as client:
            assert client.health() == "SERVING"
            client.infer("multi", multi_inputs(rows=1))
            with pytest.raises(UnavailableError) as info:
                client.model_metadata("broken")
            assert info.value.message.startswith("model 'broken' is not available: version 1: ")
    finally:
        server.stop()


def _multi_only(framework: str, tmp_path: Path) -> Path:
    root = tmp_path / "multi-only"
    if framework == "torch":
        own_models.save_torch_multi(root / "multi" / "1", seed=1)
    else:
        own_models.save_tf_multi(root / "multi" / "1", seed=1)
    own_models.write_config(root / "multi", own_models.MULTI_CONFIG)
    return root


def _publish_version(framework: str, root: Path, version: int, seed: int) -> None:
    """Write a version elsewhere, then rename it into the repository whole (as TF Serving asks)."""
    staging = root / f".staging-{version}"
    if framework == "torch":
        own_models.save_torch_multi(staging, seed=seed)
    else:
        own_models.save_tf_multi(staging, seed=seed)
    staging.rename(root / "multi" / str(version))


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_new_version_is_switched_to_under_load_without_a_failed_request(framework: str, tmp_path: Path) -> None:
    root = _multi_only(framework, tmp_path)
    server = BackgroundServer(framework_for(framework), model_dir=root, repository_poll_s=0.1)
    inputs = multi_inputs(rows=1, length=4)
    expected = {
        version: own_models.multi_reference(inputs["x"], inputs["ids"], seed=version)["pooled"] for version in (1, 2)
    }
    answers: collections.Counter[str] = collections.Counter()
    failures: list[str] = []
    wrong: list[str] = []
    stop = threading.Event()

    request = codec.build_request("multi", inputs)

    def call() -> None:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while not stop.is_set():
                try:
                    response = stub.ModelInfer(request, timeout=30)
                except grpc.RpcError as err:
                    failures.append(f"{err.code().name}: {err.details()}")
                    continue
                version = response.model_version
                answers[version] += 1
                pooled = codec.response_outputs(response)["pooled"]
                if not np.allclose(pooled, expected[int(version)], rtol=1e-5, atol=1e-6):
                    wrong.append(version)

    callers = [threading.Thread(target=call) for _ in range(4)]
    try:
        for caller in callers:
            caller.start()
        time.sleep(1.0)
        _publish_version(framework, root, 2, seed=2)
        deadline = time.monotonic() + 120
        while answers["2"] < 50 and time.monotonic() < deadline and not failures:
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        stop.set()
        for caller in callers:
            caller.join(60)
    with InferenceClient(server.target) as client:
        metadata = client.model_metadata("multi")
        with pytest.raises(NotFoundError, match="no version '1'"):
            client.infer("multi", inputs, version="1")
        assert client.infer("multi", inputs, version="2")["pooled"] == pytest.approx(expected[2], rel=1e-5, abs=1e-6)
    server.stop()
    print(f"{framework}: answers by version {dict(answers)}, failures {len(failures)}")  # shown by pytest -rP
    assert failures == []
    assert wrong == []
    assert answers["1"] > 0
    assert answers["2"] >= 50
    assert metadata.versions == ("2",)  # the default policy serves the latest version only


def test_a_broken_new_version_is_reported_once_and_the_old_one_serves_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _multi_only("torch", tmp_path)
    server = BackgroundServer(framework_for("torch"), model_dir=root, repository_poll_s=0.05)
    try:
        with caplog.at_level(logging.ERROR, logger="serving.loader"):
            broken = root / ".staging"
            broken.mkdir()
            (broken / "model.pt2").write_bytes(b"not a program")
            broken.rename(root / "multi" / "2")
            time.sleep(1.0)  # about 20 polls
        reports = [r.getMessage() for r in caplog.records if "version 2 cannot be served" in r.getMessage()]
        assert len(reports) == 1, reports
        with InferenceClient(server.target) as client:
            assert client.model_metadata("multi").versions == ("1",)
            client.infer("multi", multi_inputs(rows=1))
    finally:
        server.stop()


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_zoo_export_without_its_identity_is_an_artifact_like_any(framework: str, tmp_path: Path) -> None:
    import modelzoo

    impl = framework_for(framework)
    model = modelzoo.get("mlp")
    version_dir = tmp_path / "repo" / "tabular" / "3"
    version_dir.mkdir(parents=True)
    impl.export(model, version_dir)  # no zoo.json: nothing says where it came from
    server = BackgroundServer(impl, model_dir=tmp_path / "repo", repository_poll_s=0)
    try:
        with InferenceClient(server.target) as client:
            metadata = client.model_metadata("tabular")
            assert metadata.versions == ("3",)
            assert [(s.name, s.datatype, s.shape) for s in metadata.inputs] == [("input", "FP32", (-1, 64))]
            x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
            assert client.infer("tabular", {"input": x})["logits"].shape == (2, 10)
    finally:
        server.stop()


# ---- the repository and config.json, without a framework


def test_versions_and_models_of_a_repository(tmp_path: Path) -> None:
    for path in ("m/1", "m/10", "m/2", "m/derived", "m/0", "m/.3-tmp", "empty", ".hidden/1", "n/7"):
        (tmp_path / path).mkdir(parents=True)
    assert artifacts.versions(tmp_path / "m") == [1, 2, 10]
    assert artifacts.discover(tmp_path) == ["m", "n"]
    assert VersionPolicy().select([1, 2, 10]) == [10]
    assert VersionPolicy("latest", 2).select([10, 1, 2]) == [2, 10]
    assert VersionPolicy("all").select([2, 1]) == [1, 2]
    assert VersionPolicy("specific", versions=(1, 7)).select([1, 2, 10]) == [1]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"max_batch": 4}, "unknown key(s) ['max_batch']"),
        ({"max_batch_size": 0}, "max_batch_size 0: a positive integer"),
        ({"inputs": {"x": {"range": [5, 1]}}}, "inputs.x.range [5, 1]"),
        ({"inputs": {"x": {"pad": 0}}}, "inputs.x: unknown key(s) ['pad']"),
        ({"outputs": ["a", "a"]}, "a name appears twice"),
        ({"version_policy": {"latest": 0}}, "version_policy.latest 0"),
        ({"version_policy": {"newest": 1}}, "version_policy: unknown key(s) ['newest']"),
    ],
)
def test_config_json_is_checked(tmp_path: Path, config: dict[str, Any], message: str) -> None:
    own_models.write_config(tmp_path, config)
    with pytest.raises(ArtifactError) as info:
        ModelConfigFile.read(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / 'config.json'}: ")
    assert message in str(info.value)


def _signature(*inputs: TensorSpec, named: bool = True) -> ArtifactSignature:
    return ArtifactSignature(tuple(inputs), (TensorSpec("y", "FP32", (-1, 2)),), named_outputs=named)


@pytest.mark.parametrize(
    ("signature", "config", "message"),
    [
        (_signature(TensorSpec("text", "BYTES", (-1,))), {}, "'text' is a string (BYTES) tensor"),
        (_signature(TensorSpec("x", "FP32", (1, 4))), {}, "'x' has dimension 0 fixed at 1"),
        (_signature(TensorSpec("x", "FP32", (-1, 4))), {"inputs": {"z": {}}}, "config.json names input(s) ['z']"),
        (_signature(TensorSpec("x", "FP32", (-1, 4))), {"inputs": {"x": {"range": [0, 1]}}}, "a range is for integer"),
        (_signature(TensorSpec("x", "FP32", (-1, 4))), {"inputs": {"x": {"pad_value": 0}}}, "no dynamic non-batch"),
        (_signature(TensorSpec("x", "FP32", (-1, -1))), {"inputs": {"x": {"warmup_dims": [2, 3]}}}, "warmup_dims"),
        (_signature(TensorSpec("x", "FP32", (-1, 4))), {"outputs": ["a"]}, "names its outputs itself"),
        (_signature(TensorSpec("x", "FP32", (-1, 4)), named=False), {"outputs": ["a", "b"]}, "returns 1"),
    ],
)
def test_what_an_artifact_model_refuses(
    tmp_path: Path, signature: ArtifactSignature, config: dict[str, Any], message: str
) -> None:
    with pytest.raises(ArtifactError) as info:
        ArtifactModel("m", signature, ModelConfigFile.parse(config), tmp_path)
    assert message in str(info.value)


def test_example_inputs_respect_ranges_and_tied_dimensions(tmp_path: Path) -> None:
    signature = ArtifactSignature(
        (TensorSpec("x", "FP32", (-1, -1, 4)), TensorSpec("ids", "INT64", (-1, -1)), TensorSpec("n", "INT8", (-1,))),
        (TensorSpec("y", "FP32", (-1, 2)),),
        dim_groups=((("x", 1), ("ids", 1)),),
    )
    config = ModelConfigFile.parse({"inputs": {"ids": {"range": [3, 5], "warmup_dims": [7]}}})
    model = ArtifactModel("m", signature, config, tmp_path)
    example = model.example_inputs(2, np.random.default_rng(0))
    assert example["x"].shape == (2, 7, 4)  # tied to ids, whose size config.json gives
    assert example["ids"].shape == (2, 7)
    assert example["ids"].min() >= 3
    assert example["ids"].max() <= 5
    assert set(np.unique(example["n"])) <= {0, 1}
    assert model.example_inputs(1, np.random.default_rng(0), seq_len=11)["ids"].shape == (1, 11)


def test_operator_errors_of_a_repository(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch_framework = framework_for("torch")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert server_main(torch_framework, ["serve", "--model-repository", str(empty), "--port", "0"]) == 2
    assert capsys.readouterr().err.startswith(f"error: --model-repository {empty}: no <model>/<version>/ folders")
    repo = tmp_path / "repo"
    (repo / "own" / "1").mkdir(parents=True)
    argv = ["serve", "--model-repository", str(repo), "--precision", "bf16", "--port", "0"]
    assert server_main(torch_framework, argv) == 2
    assert "--precision bf16: own are artifacts of your own" in capsys.readouterr().err
    assert server_main(torch_framework, ["serve", "--model-repository", str(repo), "--model", "nosuch"]) == 2
    assert "unknown model 'nosuch'" in capsys.readouterr().err


def test_a_string_input_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    import tensorflow as tf

    class Texts(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
        def serve(self, text: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"length": tf.strings.length(text)}

    module = Texts()
    version_dir = tmp_path / "texts" / "1"
    tf.saved_model.save(module, str(version_dir), signatures={"serving_default": module.serve.get_concrete_function()})
    own_models.save_tf_multi(tmp_path / "multi" / "1", seed=1)
    own_models.write_config(tmp_path / "multi", own_models.MULTI_CONFIG)
    server = BackgroundServer(framework_for("tensorflow"), model_dir=tmp_path, repository_poll_s=0)
    try:
        with InferenceClient(server.target) as client:
            with pytest.raises(UnavailableError, match=r"'text' is a string \(BYTES\) tensor"):
                client.model_metadata("texts")
            client.infer("multi", multi_inputs(rows=1))
    finally:
        server.stop()


def test_the_grpc_status_of_an_unavailable_model(own_servers: dict[str, BackgroundServer]) -> None:
    # A model that is not there at all is NOT_FOUND, whatever the repository holds.
    with grpc.insecure_channel(own_servers["torch"].target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(codec.build_request("absent", {"x": np.ones((1, 1), np.float32)}), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def _compare(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "loadtest", "compare", *args]
    # Its own process group: if it overruns, the servers it started go down with it.
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.mark.slow
@pytest.mark.timeout(660)
def test_compare_runs_end_to_end_on_an_own_model(repositories: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = _compare(
        "--model", "multi", "--torch-repository", str(repositories["torch"]),
        "--tf-repository", str(repositories["tensorflow"]), "--concurrency", "2", "--rates", "100",
        "--step-seconds", "1", "--warmup-seconds", "0.5", "--repeats", "1", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["failures"] == []
    (gate,) = results["parity"]
    assert {item["output"] for item in gate["outputs"]} == {"hidden", "pooled"}
    assert all(item["within"] for item in gate["outputs"])
    for name in ("torch", "tensorflow"):
        config = results["servers"][name]["model_config"]
        assert config["max_batch_size"] == 8
        steps = results["servers"][name]["steps"]
        assert {step["mode"] for step in steps} == {"closed", "open"}
        assert all(step["errors"] == 0 for step in steps), name
    assert all(item["top1_rows"] for item in gate["outputs"])  # both outputs have a last axis to take argmax over
    assert results["fidelity"]["verdict"] == "agree"
    assert "## Fidelity" in (out / "report.md").read_text()


@pytest.mark.slow
def test_compare_refuses_servers_that_disagree(tmp_path: Path) -> None:
    torch_root, tf_root = tmp_path / "torch", tmp_path / "tf"
    own_models.save_torch_multi(torch_root / "multi" / "1", seed=1)
    own_models.save_tf_multi(tf_root / "multi" / "1", seed=2)  # other weights: another model
    for root in (torch_root, tf_root):
        own_models.write_config(root / "multi", own_models.MULTI_CONFIG)
    argv = ["--model", "multi", "--torch-repository", str(torch_root), "--tf-repository", str(tf_root),
            "--concurrency", "1", "--repeats", "1", "--out", str(tmp_path / "report")]  # fmt: skip
    result = _compare(*argv, timeout=300)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "refusing to compare: the servers' outputs differ on the same inputs" in result.stderr
    assert "output 'pooled'" in result.stderr
    assert "max |diff|" in result.stderr
    assert " c=1: " not in result.stderr  # nothing was timed


def test_the_readme_example_writes_repositories_both_servers_serve_alike(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("own_model_example", ROOT / "examples" / "own_model.py")
    assert spec is not None
    assert spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main(["--out", str(tmp_path)]) == 0
    rng = np.random.default_rng(0)
    inputs: dict[str, np.ndarray] = {
        "features": rng.standard_normal((4, example.FEATURES)).astype(np.float32),
        "item": rng.integers(0, example.ITEMS, 4).astype(np.int64),
    }
    answers = {}
    for framework, folder in (("torch", "torch"), ("tensorflow", "tf")):
        server = BackgroundServer(framework_for(framework), model_dir=tmp_path / folder, repository_poll_s=0)
        try:
            with InferenceClient(server.target) as client:
                assert client.model_config("ranker").parameters["range.item"].string_value == "0,999"
                answers[framework] = client.infer("ranker", inputs)
        finally:
            server.stop()
    for name in ("score", "embedding"):
        np.testing.assert_allclose(answers["torch"][name], answers["tensorflow"][name], rtol=1e-5, atol=1e-5)
    with pytest.raises(SystemExit, match="versions are never rewritten"):
        example.main(["--out", str(tmp_path)])

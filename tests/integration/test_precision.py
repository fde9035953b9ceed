"""Precision and compilation on both servers, on CPU: the options, parity of every precision
CPU runs with the fp32 reference of each zoo model (within ``serving.backend.TOLERANCES``),
compiled graphs (torch's AOTInductor package, TF's XLA), warm-up that compiles every shape
the batcher can produce, the start-up report, and the GPU metrics against a fake NVML.

The reference is the zoo model's torch module in fp32 on CPU (``torch_server.model.build``).
Compilation is slow on this box (an AOTInductor package takes 10-15 s), so compiled tests
use small model parameters and few batch sizes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

import modelzoo
from client import InferenceClient
from modelzoo.base import ModelDefinition
from serving import repository
from serving.backend import TOLERANCES, Backend, BackendOptions, Framework
from serving.cli import main
from serving.metrics import register_gpu_collector
from serving.settings import add_arguments, from_namespace
from tests.helpers.fakes import FakeGpu, FakeNvml
from tests.helpers.servers import BackgroundServer
from tf_server.framework import FRAMEWORK as TF
from torch_server.framework import FRAMEWORK as TORCH
from torch_server.model import build

FRAMEWORKS = (TORCH, TF)
#: The sizes the tolerances were measured at (as tests/unit/test_models.py serves them).
MODELS: dict[str, dict[str, Any]] = {"mlp": {}, "resnet": {"image_size": 32}, "encoder": {}}
#: Small enough to compile in seconds.
SMALL: dict[str, dict[str, Any]] = {
    "mlp": {"hidden": [32, 32]},
    "resnet": {"image_size": 16, "widths": [8, 16]},
    "encoder": {"hidden": 32, "heads": 4, "layers": 1, "ffn": 64, "max_len": 32},
}
#: A precision below fp32 must change the outputs at least this much, or it did not run.
LOW_PRECISION_FLOOR = 1e-4


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("precision-repo")


def loaded(framework: Framework, model: ModelDefinition, root: Path, precision: str, compile: str) -> Backend:
    version_dir = repository.ensure(framework, model, root / framework.name)
    backend = framework.create_backend(model, version_dir, BackendOptions("cpu", precision, compile))
    backend.load()
    return backend


#: In the encoder's batch of 8, this row has every key masked (no token at all).
MASKED_ROW = 3


def batches(model: ModelDefinition) -> Iterator[dict[str, np.ndarray]]:
    """Batches of 1, 8 and 33 rows (encoder: sequences of 5, 16 and the longest allowed, and
    one row of the batch of 8 wholly masked)."""
    for rows, seed in ((1, 1), (8, 2), (33, 3)):
        kwargs = {"seq_len": {1: 5, 8: 16, 33: model.params["max_len"]}[rows]} if model.pad_values else {}
        inputs = model.complete_inputs(model.example_inputs(rows, np.random.default_rng(seed), **kwargs))
        if model.pad_values and rows == 8:
            inputs["attention_mask"][MASKED_ROW] = 0
        yield inputs


def reference(model: ModelDefinition, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with torch.inference_mode():
        outputs = build(model)(*(torch.from_numpy(inputs[spec.name]) for spec in model.inputs))
    return {name: tensor.numpy() for name, tensor in outputs.items()}


def assert_parity(model: ModelDefinition, backend: Backend, precision: str) -> float:
    """Every output finite, in the contract's dtype and shape, and within the precision's
    tolerance of the fp32 reference; returns the largest difference seen.

    A wholly masked row attends to nothing real: in fp32 and bf16 its keys' scores all round
    to the mask value (-1e9), so it attends uniformly, as the reference does; fp16 cannot hold
    -1e9 (its mask value is -32752, whose rounding keeps some score differences), so there
    that row is only held finite."""
    tolerance, largest = TOLERANCES[precision], 0.0
    for inputs in batches(model):
        actual, expected = backend.predict(inputs), reference(model, inputs)
        assert actual.keys() == expected.keys()
        attends = inputs.get("attention_mask", np.ones((1, 1))).any(axis=1)  # rows with a token
        for spec in model.outputs:
            got, want = actual[spec.name], expected[spec.name]
            assert got.dtype == spec.numpy_dtype, spec.name
            assert got.shape == want.shape, spec.name
            assert np.all(np.isfinite(got)), spec.name
            if precision == "fp16" and not attends.all():
                got, want = got[attends], want[attends]
            error, relative = tolerance.errors(got, want)
            assert tolerance.holds(got, want), (
                f"{backend.name} {precision}: {spec.name} max abs {error:.3g} ({relative:.3g} of the largest) is "
                f"beyond atol {tolerance.atol:g} + rtol {tolerance.rtol:g}"
            )
            largest = max(largest, error)
    return largest


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("framework", FRAMEWORKS, ids=lambda f: f.name)
def test_low_precision_parity(repo: Path, framework: Framework, name: str, precision: str) -> None:
    model = modelzoo.get(name, **MODELS[name])
    backend = loaded(framework, model, repo, precision, "off")
    try:
        error = assert_parity(model, backend, precision)
    finally:
        backend.close()
    assert error > LOW_PRECISION_FLOOR, f"{precision} outputs equal fp32's to {error:.2g}: was it fp32?"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SMALL))
@pytest.mark.parametrize("framework", FRAMEWORKS, ids=lambda f: f.name)
def test_compiled_bf16_parity(repo: Path, framework: Framework, name: str) -> None:
    model = modelzoo.get(name, **SMALL[name])
    backend = loaded(framework, model, repo, "bf16", "on")
    try:
        error = assert_parity(model, backend, "bf16")
        if framework is TORCH:
            assert backend.package_path().is_file()  # type: ignore[attr-defined]
        else:
            assert backend.shapes, "XLA compiled nothing"  # type: ignore[attr-defined]
        assert backend.timings["compile_s"] > 0
    finally:
        backend.close()
    assert error > LOW_PRECISION_FLOOR


def test_compiled_package_is_cached_per_precision(repo: Path) -> None:
    model = modelzoo.get("mlp", **SMALL["mlp"])
    first = loaded(TORCH, model, repo, "fp16", "on")
    package = first.package_path()  # type: ignore[attr-defined]
    built = package.stat().st_mtime_ns
    assert "fp16" in package.parts
    assert torch.__version__ in str(package)
    first.close()
    second = loaded(TORCH, model, repo, "fp16", "on")
    assert package.stat().st_mtime_ns == built, "the cached package was compiled again"
    assert_parity(model, second, "fp16")
    second.close()


@pytest.mark.parametrize(
    ("framework", "model", "params"),
    [(TORCH, "mlp", SMALL["mlp"]), (TF, "encoder", SMALL["encoder"])],
    ids=["torch-mlp", "tensorflow-encoder"],
)
def test_served_compiled_model(tmp_path: Path, framework: Framework, model: str, params: dict[str, Any]) -> None:
    """Over gRPC: ModelConfig reports device, precision, compile mode and start-up times;
    warm-up compiled every shape the batcher can produce, so serving compiles nothing (XLA
    compiles per shape; torch's package covers every shape at once); outputs, cut back from
    their padded batch and sequence buckets, match the fp32 reference."""
    model_arg = ",".join(f"{key}={value}" for key, value in params.items()).replace(" ", "")
    server = BackgroundServer(
        framework,
        model=[model],
        model_arg=model_arg,
        model_dir=tmp_path,
        max_batch_size=5,
        preferred_batch_sizes=[2, 4],
        compile="on",
    )
    try:
        runtime = server.server.servicer.models[model].latest
        with InferenceClient(server.target, timeout=60) as client:
            parameters = {key: value.string_value for key, value in client.model_config(model).parameters.items()}
            assert (parameters["device"], parameters["precision"], parameters["compile"]) == ("cpu", "fp32", "on")
            assert float(parameters["compile_s"]) > 0
            assert float(parameters["warmup_s"]) == 0  # warm-up is compile time when compiling
            assert {"export_s", "load_s"} <= parameters.keys()
            definition = runtime.model
            assert isinstance(definition, ModelDefinition)  # a zoo model, not a user artifact
            shapes = list(getattr(runtime.backend, "shapes", []))
            if framework is TF:  # XLA: every batch size times every sequence bucket
                assert runtime.backend.buckets == [8, 16, 32]  # type: ignore[attr-defined]
                assert {shape[0] for shape in shapes} >= {(rows, seq) for rows in (2, 4, 5) for seq in (8, 16, 32)}
            rng = np.random.default_rng(9)
            for rows in range(1, 6):  # padded to 2, 4; 5 is above the largest preferred size
                for seq_len in (1, 8, 9, 32) if definition.pad_values else (None,):
                    kwargs = {} if seq_len is None else {"seq_len": seq_len}
                    inputs = definition.example_inputs(rows, rng, **kwargs)
                    outputs = client.infer(model, inputs)
                    expected = reference(definition, definition.complete_inputs(inputs))
                    for name, array in expected.items():
                        assert TOLERANCES["fp32"].holds(outputs[name], array), name
            assert list(getattr(runtime.backend, "shapes", [])) == shapes, "a shape was compiled while serving"
    finally:
        server.stop()


def test_tf_placement_logged_once(repo: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = modelzoo.get("mlp", **SMALL["mlp"])
    with caplog.at_level("INFO", logger="tf_server.backend"):
        loaded(TF, model, repo, "fp32", "off").close()
    placed = [record.getMessage() for record in caplog.records if "placement" in record.getMessage()]
    assert len(placed) == 1
    assert placed[0].startswith("mlp: placement: variables on ")
    assert placed[0].endswith("device:CPU:0")


def test_settings_precision_and_compile() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    settings = from_namespace(parser.parse_args([]), "X_", {})
    assert (settings.precision, settings.compile) == ("fp32", "off")
    settings = from_namespace(parser.parse_args(["--compile", "on"]), "X_", {"X_PRECISION": "bf16"})
    assert (settings.precision, settings.compile) == ("bf16", "on")
    with pytest.raises(ValueError, match="--precision fp64"):
        from_namespace(parser.parse_args(["--precision", "fp64"]), "X_", {})
    with pytest.raises(ValueError, match="--compile yes"):
        from_namespace(parser.parse_args([]), "X_", {"X_COMPILE": "yes"})
    with pytest.raises(ValueError, match="--precision tf32"):
        from_namespace(parser.parse_args(["--precision", "tf32", "--device", "cpu"]), "X_", {})


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA host tf32 is a valid choice")
@pytest.mark.parametrize("framework", FRAMEWORKS, ids=lambda f: f.name)
def test_serve_refuses_what_it_cannot_run(framework: Framework, capsys: pytest.CaptureFixture[str]) -> None:
    """--device auto resolves to the CPU here, where tf32 means nothing: one line, exit 2."""
    assert main(framework, ["serve", "--precision", "tf32", "--port", "0", "--metrics-port", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --precision tf32")
    assert len(err.splitlines()) == 1


def test_gpu_metrics_from_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    second = FakeGpu(uuid="GPU-22222222-0000-4000-8000-000000000000")
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([FakeGpu(used=1 << 30), second]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    registry = CollectorRegistry()
    assert not register_gpu_collector(registry, "cpu")
    assert register_gpu_collector(registry, "cuda:1")
    labels = {"device": "1"}
    assert registry.get_sample_value("gpu_info", {**labels, "uuid": second.uuid, "name": second.name}) == 1
    assert registry.get_sample_value("gpu_utilization_ratio", labels) == pytest.approx(0.37)
    assert registry.get_sample_value("gpu_memory_used_bytes", labels) == 3 << 30
    assert registry.get_sample_value("gpu_memory_total_bytes", labels) == 80 << 30


def test_gpu_metrics_absent_without_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(fail=True))
    registry = CollectorRegistry()
    assert not register_gpu_collector(registry, "cuda:0")
    assert registry.get_sample_value("gpu_memory_used_bytes", {"device": "0"}) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh covers it there)")
@pytest.mark.parametrize("compile", ["off", "on"])
def test_cuda_data_path_matches_cpu(repo: Path, compile: str) -> None:
    """Concurrent forward passes on two instances (two lanes: streams and pinned buffers)
    give the CPU's answers, batch after batch."""
    import concurrent.futures

    model = modelzoo.get("encoder", **SMALL["encoder"])
    version_dir = repository.ensure(TORCH, model, repo / "torch")
    backend = TORCH.create_backend(model, version_dir, BackendOptions("cuda", "fp32", compile, instances=2))
    backend.load()
    inputs = list(batches(model)) * 4
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(backend.predict, inputs))
    backend.close()
    for batch, outputs in zip(inputs, results, strict=True):
        for name, array in reference(model, batch).items():
            assert TOLERANCES["tf32"].holds(outputs[name], array), name

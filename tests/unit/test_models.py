"""Zoo models across both frameworks: export, load, parity, contract shapes, padding invariance.

Every model is exported once per framework (module-scoped fixture) and served on CPU, where
both frameworks compute in strict fp32, so the parity tolerances below are meaningful.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import modelzoo
from modelzoo.base import ModelDefinition
from modelzoo.mlp import MLP
from serving.backend import Backend, BackendOptions, Framework
from tf_server.framework import FRAMEWORK as TF
from torch_server.framework import FRAMEWORK as TORCH

#: Zoo models under test, with small parameters so the file stays fast.
MODELS: dict[str, dict[str, int]] = {"mlp": {}, "resnet": {"image_size": 32}, "encoder": {}}
FRAMEWORKS = (TORCH, TF)
MAX_ABS_DIFF = 1e-4
RTOL, ATOL = 1e-4, 1e-5

Served = dict[str, tuple[ModelDefinition, dict[str, Backend]]]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Every model exported by both frameworks into ``<framework>/<model>/1`` and loaded on CPU."""
    root = tmp_path_factory.mktemp("artifacts")
    result: Served = {}
    for name, params in MODELS.items():
        model = modelzoo.get(name, **params)
        backends: dict[str, Backend] = {}
        for framework in FRAMEWORKS:
            version_dir = root / framework.name / name / "1"
            version_dir.mkdir(parents=True)
            framework.export(model, version_dir)
            backend = framework.create_backend(model, version_dir, BackendOptions())
            backend.load()
            backends[framework.name] = backend
        result[name] = (model, backends)
    yield result
    for _, backends in result.values():
        for backend in backends.values():
            backend.close()


def assert_parity(actual: np.ndarray, expected: np.ndarray, max_abs: float = MAX_ABS_DIFF) -> None:
    """Both an absolute bound on the largest difference and an elementwise relative check."""
    assert actual.shape == expected.shape
    diff = float(np.max(np.abs(actual - expected))) if actual.size else 0.0
    assert diff <= max_abs, f"max abs diff {diff:.3g} > {max_abs:g}"
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)


def assert_matches_spec(model: ModelDefinition, outputs: dict[str, np.ndarray], inputs: dict[str, np.ndarray]) -> None:
    assert set(outputs) == {spec.name for spec in model.outputs}
    batch = next(iter(inputs.values())).shape[0]
    for spec in model.outputs:
        array = outputs[spec.name]
        assert array.dtype == spec.numpy_dtype, spec.name
        assert spec.accepts_shape(array.shape), (spec.name, array.shape, spec.shape)
        assert array.shape[0] == batch
        assert array.flags.c_contiguous
        assert np.all(np.isfinite(array))


@pytest.mark.parametrize("batch_size", [1, 5])
@pytest.mark.parametrize("name", list(MODELS))
def test_torch_and_tf_agree(served: Served, name: str, batch_size: int) -> None:
    model, backends = served[name]
    inputs = model.complete_inputs(model.example_inputs(batch_size, np.random.default_rng(batch_size)))
    torch_out = backends["torch"].predict(inputs)
    tf_out = backends["tensorflow"].predict(inputs)
    assert_matches_spec(model, torch_out, inputs)
    assert_matches_spec(model, tf_out, inputs)
    for spec in model.outputs:
        assert_parity(tf_out[spec.name], torch_out[spec.name])


def test_mlp_matches_numpy_reference(served: Served) -> None:
    model, backends = served["mlp"]
    assert isinstance(model, MLP)
    inputs = model.example_inputs(4, np.random.default_rng(7))
    x = inputs["input"].astype(np.float64)
    for i in range(model.num_layers):
        x = x @ model.weights[f"dense{i}.kernel"] + model.weights[f"dense{i}.bias"]
        if i < model.num_layers - 1:
            x = np.maximum(x, 0.0)
    np.testing.assert_allclose(backends["torch"].predict(inputs)["logits"], x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_encoder_padding_does_not_change_valid_outputs(served: Served, framework: str) -> None:
    model, backends = served["encoder"]
    backend = backends[framework]
    rng = np.random.default_rng(11)
    lengths = (5, 9, 12)
    rows = [model.example_inputs(1, rng, seq_len=n)["input_ids"][0] for n in lengths]
    width = max(lengths) + 3  # every row padded, even the longest
    ids = np.full((len(rows), width), model.pad_values["input_ids"], dtype=np.int64)
    mask = np.full((len(rows), width), model.pad_values["attention_mask"], dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    batched = backend.predict({"input_ids": ids, "attention_mask": mask})
    for i, row in enumerate(rows):
        single = backend.predict(model.complete_inputs({"input_ids": row[None, :]}))
        assert_parity(batched["last_hidden_state"][i, : len(row)], single["last_hidden_state"][0])
        assert_parity(batched["pooled"][i], single["pooled"][0])


@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_read_only_inputs(served: Served, framework: str) -> None:
    """The codec hands zero-copy read-only views of the request bytes: the backend computes on
    them as they are, without a warning (torch warns once per process when it wraps a
    read-only array; the backend takes that warning at load) and without writing to them."""
    model, backends = served["resnet"]
    inputs = model.example_inputs(2, np.random.default_rng(5))
    read_only = {
        name: np.frombuffer(array.tobytes(), array.dtype).reshape(array.shape) for name, array in inputs.items()
    }
    assert not any(array.flags.writeable for array in read_only.values())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = backends[framework].predict(read_only)
    assert [str(warning.message) for warning in caught] == []
    np.testing.assert_array_equal(outputs["logits"], backends[framework].predict(inputs)["logits"])
    for name, array in inputs.items():
        np.testing.assert_array_equal(read_only[name], array)


@pytest.mark.parametrize("name", list(MODELS))
def test_outputs_are_order_one(served: Served, name: str) -> None:
    model, backends = served[name]
    inputs = model.complete_inputs(model.example_inputs(8, np.random.default_rng(3)))
    for output, array in backends["torch"].predict(inputs).items():
        assert 0.05 < float(array.std()) < 50.0, (output, float(array.std()))


@pytest.mark.parametrize("name", list(MODELS))
def test_weights_are_deterministic(name: str) -> None:
    first, second = modelzoo.get(name, **MODELS[name]), modelzoo.get(name, **MODELS[name])
    assert first.fingerprint == second.fingerprint
    assert first.weights.keys() == second.weights.keys()
    assert all(first.weights[key].dtype == np.float32 for key in first.weights)
    assert first.fingerprint != modelzoo.get(name, **MODELS[name], **_other_params(name)).fingerprint


def _other_params(name: str) -> dict[str, int]:
    return {"mlp": {"out_features": 3}, "resnet": {"num_classes": 3}, "encoder": {"vocab_size": 50}}[name]


@pytest.mark.parametrize("name", list(MODELS))
def test_unknown_param_raises(name: str) -> None:
    with pytest.raises(ValueError, match="no parameter"):
        modelzoo.get(name, no_such_param=1)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("mlp", {"hidden": [256, 0]}),
        ("resnet", {"widths": []}),
        ("resnet", {"image_size": 0}),
        ("encoder", {"hidden": 10, "heads": 4}),
        ("encoder", {"layers": 0}),
    ],
)
def test_invalid_params_raise(name: str, params: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=name):
        modelzoo.get(name, **params)


@pytest.mark.parametrize("name", list(MODELS))
def test_example_inputs_match_contract(name: str) -> None:
    model = modelzoo.get(name, **MODELS[name])
    inputs = model.example_inputs(3, np.random.default_rng(0), unknown_option=True)
    required = {spec.name for spec in model.inputs if not spec.optional}
    assert set(inputs) == required
    completed = model.complete_inputs(inputs)
    for spec in model.inputs:
        assert completed[spec.name].dtype == spec.numpy_dtype
        assert spec.accepts_shape(completed[spec.name].shape)


def test_encoder_contract() -> None:
    model = modelzoo.get("encoder")
    assert [(spec.name, spec.optional, spec.value_range) for spec in model.inputs] == [
        ("input_ids", False, (0, model.params["vocab_size"] - 1)),
        ("attention_mask", True, (0, 1)),
    ]
    assert model.pad_values == {"input_ids": 0, "attention_mask": 0}
    ids = model.example_inputs(2, np.random.default_rng(0), seq_len=7)["input_ids"]
    assert ids.shape == (2, 7)
    assert ids.min() >= 1
    assert ids.max() < model.params["vocab_size"]
    np.testing.assert_array_equal(model.complete_inputs({"input_ids": ids})["attention_mask"], np.ones_like(ids))
    with pytest.raises(ValueError, match="seq_len"):
        model.example_inputs(1, np.random.default_rng(0), seq_len=model.params["max_len"] + 1)


def test_artifact_layout(served: Served) -> None:
    _, backends = served["mlp"]
    assert (backends["torch"].artifact_dir / "model.pt2").is_file()
    assert (backends["tensorflow"].artifact_dir / "saved_model.pb").is_file()
    assert backends["torch"].platform == "pytorch_torch_export"
    assert backends["tensorflow"].platform == "tensorflow_savedmodel"


def test_framework_identity() -> None:
    assert (TORCH.name, TORCH.server_name, TORCH.env_prefix) == ("torch", "torch_server", "TORCH_SERVER_")
    assert (TF.name, TF.server_name, TF.env_prefix) == ("tensorflow", "tf_server", "TF_SERVER_")
    import tensorflow as tf
    import torch

    assert TORCH.info("cpu").version == torch.__version__
    assert TF.info("cpu").version == tf.__version__
    assert TORCH.info("cpu").extra["device"] == TF.info("cpu").extra["device"] == "cpu"


@pytest.mark.parametrize("framework", FRAMEWORKS, ids=lambda f: f.name)
def test_resolve_device(framework: Framework) -> None:
    import tensorflow as tf
    import torch

    resolve = framework.resolve_device
    has_gpu = torch.cuda.is_available() if framework is TORCH else bool(tf.config.get_visible_devices("GPU"))
    assert resolve("cpu") == "cpu"
    assert resolve("auto") == ("cuda:0" if has_gpu else "cpu")
    if has_gpu:
        assert resolve("cuda") == resolve("gpu") == resolve("cuda:0") == "cuda:0"
    else:
        for device in ("cuda", "cuda:0", "gpu"):
            with pytest.raises(ValueError, match="requested"):
                resolve(device)
    for device in ("tpu", "cuda:x", "cuda:999"):
        with pytest.raises(ValueError, match="device"):
            resolve(device)


def test_configure_after_initialization(served: Served) -> None:
    """TF's runtime is up (the fixture ran models): a new thread count fails loudly."""
    import tensorflow as tf
    import torch

    TORCH.configure(torch.get_num_threads(), "cpu")  # already fixed inter-op pool: tolerated
    current = tf.config.threading.get_intra_op_parallelism_threads()
    with pytest.raises(RuntimeError, match="before the first TensorFlow op"):
        TF.configure(current + 1, "cpu")


@pytest.mark.parametrize("framework", FRAMEWORKS, ids=lambda framework: framework.name)
def test_a_repository_path_with_glob_characters_loads(served: Served, framework: Framework, tmp_path: Path) -> None:
    """TensorFlow's checkpoint reader takes the variables' path as a file pattern: a model
    directory named like ``models/tf[precision=bf16]`` (the comparison's matrix made them)
    must still load, and serve the same numbers."""
    model, backends = served["mlp"]
    version_dir = tmp_path / "x[precision=fp32,compile=off]*?" / "mlp" / "1"
    version_dir.mkdir(parents=True)
    framework.export(model, version_dir)
    backend = framework.create_backend(model, version_dir, BackendOptions())
    backend.load()
    try:
        inputs = model.example_inputs(4, np.random.default_rng(0))
        expected = backends[framework.name].predict(inputs)["logits"]
        np.testing.assert_array_equal(backend.predict(inputs)["logits"], expected)
    finally:
        backend.close()

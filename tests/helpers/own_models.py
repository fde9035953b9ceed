"""Models of "the user's own", written here in both frameworks from one set of numpy weights and
saved as a user would: a ``torch.export`` program and a TensorFlow SavedModel, in a repository
laid out ``<model>/<version>/`` (no zoo identity anywhere).

``multi``: ``x`` FP32 [-1, -1, 4] and ``ids`` INT64 [-1, -1] (the same dynamic length), ->
``hidden`` FP32 [-1, -1, 3] = relu((x + embed[ids]) @ w + b) and ``pooled`` FP32 [-1, 3], its mean
over the length. ``dtypes``: ``a`` FP16 [-1, 2], ``b`` BF16 [-1, 2], ``flag`` BOOL [-1, 1], ``n``
INT32 [-1, 1] -> ``doubled`` FP16 = 2a, ``chosen`` BF16 = where(flag, b, -b), ``next`` INT32 = n + 1;
the torch program returns a tuple, named by config.json.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

VOCAB = 10


def weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "embed": rng.standard_normal((VOCAB, 4)).astype(np.float32),
        "w": (rng.standard_normal((4, 3)) * 0.5).astype(np.float32),
        "b": (rng.standard_normal(3) * 0.1).astype(np.float32),
    }


MULTI_CONFIG = {
    "max_batch_size": 8,
    "inputs": {"ids": {"range": [0, VOCAB - 1], "warmup_dims": [5]}, "x": {"warmup_dims": [5]}},
}
DTYPES_CONFIG = {"outputs": ["doubled", "chosen", "next"]}


def save_torch_multi(version_dir: Path, seed: int) -> None:
    import torch
    from torch.export import Dim

    w = weights(seed)

    class Multi(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Parameter(torch.from_numpy(w["embed"]), requires_grad=False)
            self.w = torch.nn.Parameter(torch.from_numpy(w["w"]), requires_grad=False)
            self.b = torch.nn.Parameter(torch.from_numpy(w["b"]), requires_grad=False)

        def forward(self, x: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
            hidden = torch.relu((x + self.embed[ids]) @ self.w + self.b)
            return {"hidden": hidden, "pooled": hidden.mean(dim=1)}

    batch, length = Dim("batch", min=1, max=64), Dim("length", min=1, max=256)
    example = (torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.int64))
    program = torch.export.export(
        Multi().eval(), example, dynamic_shapes={"x": {0: batch, 1: length}, "ids": {0: batch, 1: length}}
    )
    version_dir.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(version_dir / "model.pt2"))


def save_tf_multi(version_dir: Path, seed: int) -> None:
    import tensorflow as tf

    w = weights(seed)

    class Multi(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = tf.Variable(w["embed"], trainable=False)
            self.w = tf.Variable(w["w"], trainable=False)
            self.b = tf.Variable(w["b"], trainable=False)

        @tf.function(
            input_signature=[
                tf.TensorSpec([None, None, 4], tf.float32, name="x"),
                tf.TensorSpec([None, None], tf.int64, name="ids"),
            ]
        )
        def serve(self, x: tf.Tensor, ids: tf.Tensor) -> dict[str, tf.Tensor]:
            hidden = tf.nn.relu(tf.einsum("btf,fo->bto", x + tf.gather(self.embed, ids), self.w) + self.b)
            return {"hidden": hidden, "pooled": tf.reduce_mean(hidden, axis=1)}

    module = Multi()
    tf.saved_model.save(module, str(version_dir), signatures={"serving_default": module.serve.get_concrete_function()})


def save_torch_dtypes(version_dir: Path) -> None:
    import torch
    from torch.export import Dim

    class Dtypes(torch.nn.Module):
        def forward(
            self, a: torch.Tensor, b: torch.Tensor, flag: torch.Tensor, n: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return a * 2, torch.where(flag, b, -b), n + 1

    batch = Dim("batch", min=1, max=64)
    example = (
        torch.zeros(2, 2, dtype=torch.float16),
        torch.zeros(2, 2, dtype=torch.bfloat16),
        torch.zeros(2, 1, dtype=torch.bool),
        torch.zeros(2, 1, dtype=torch.int32),
    )
    program = torch.export.export(Dtypes(), example, dynamic_shapes=({0: batch},) * 4)
    version_dir.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(version_dir / "model.pt2"))


def save_tf_dtypes(version_dir: Path) -> None:
    import tensorflow as tf

    class Dtypes(tf.Module):
        @tf.function(
            input_signature=[
                tf.TensorSpec([None, 2], tf.float16, name="a"),
                tf.TensorSpec([None, 2], tf.bfloat16, name="b"),
                tf.TensorSpec([None, 1], tf.bool, name="flag"),
                tf.TensorSpec([None, 1], tf.int32, name="n"),
            ]
        )
        def serve(self, a: tf.Tensor, b: tf.Tensor, flag: tf.Tensor, n: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"doubled": a * 2, "chosen": tf.where(flag, b, -b), "next": n + 1}

    module = Dtypes()
    tf.saved_model.save(module, str(version_dir), signatures={"serving_default": module.serve.get_concrete_function()})


def write_config(model_root: Path, config: Mapping[str, object]) -> None:
    model_root.mkdir(parents=True, exist_ok=True)
    (model_root / "config.json").write_text(json.dumps(config))


def torch_repository(root: Path) -> Path:
    """``multi`` (version 1) and ``dtypes`` as torch programs, with their config.json."""
    save_torch_multi(root / "multi" / "1", seed=1)
    write_config(root / "multi", MULTI_CONFIG)
    save_torch_dtypes(root / "dtypes" / "1")
    write_config(root / "dtypes", DTYPES_CONFIG)
    return root


def tf_repository(root: Path) -> Path:
    """``multi`` (version 1) and ``dtypes`` as SavedModels (they name their outputs themselves)."""
    save_tf_multi(root / "multi" / "1", seed=1)
    write_config(root / "multi", MULTI_CONFIG)
    save_tf_dtypes(root / "dtypes" / "1")
    return root


def multi_reference(x: np.ndarray, ids: np.ndarray, seed: int = 1) -> dict[str, np.ndarray]:
    """``multi`` in numpy."""
    w = weights(seed)
    hidden = np.maximum((x + w["embed"][ids]) @ w["w"] + w["b"], 0)
    return {"hidden": hidden, "pooled": hidden.mean(axis=1)}

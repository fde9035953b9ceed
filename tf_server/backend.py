"""TFBackend: serves a SavedModel's ``serving_default`` signature on CPU or GPU."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from modelzoo.base import ModelDefinition
from serving.backend import Backend


def tf_device_name(device: str) -> str:
    """TF's name for a resolved device: ``"cpu"`` -> ``"/CPU:0"``, ``"cuda:N"`` -> ``"/GPU:N"``."""
    if device == "cpu":
        return "/CPU:0"
    kind, _, index = device.partition(":")
    if kind != "cuda" or not index.isdigit():
        raise ValueError(f"not a resolved device: {device!r} (expected cpu or cuda:N)")
    return f"/GPU:{index}"


class TFBackend(Backend):
    """One SavedModel; the version directory is the SavedModel directory (TF Serving layout)."""

    platform = "tensorflow_savedmodel"

    def __init__(self, model: ModelDefinition, artifact_dir: Path, device: str = "cpu") -> None:
        super().__init__(model, artifact_dir, device)
        self._tf_device = tf_device_name(device)
        self._saved_model: Any = None
        self._signature: Any = None
        self._input_dtypes = {spec.name: spec.numpy_dtype for spec in model.inputs}

    def load(self) -> None:
        with tf.device(self._tf_device):
            self._saved_model = tf.saved_model.load(str(self.artifact_dir))
        self._signature = self._saved_model.signatures["serving_default"]

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        signature = self._signature
        if signature is None:
            raise RuntimeError(f"model {self.name!r} is not loaded")
        feed = {name: np.asarray(inputs[name], dtype=dtype) for name, dtype in self._input_dtypes.items()}
        with tf.device(self._tf_device):
            outputs = signature(**feed)
        return {name: np.asarray(tensor.numpy(), dtype=np.float32) for name, tensor in outputs.items()}

    def close(self) -> None:
        self._signature = None
        self._saved_model = None

"""Tabular MLP: dense layers with ReLU between them (serving overhead dominates).

Weights: ``dense{i}.kernel`` ``[in, out]`` and ``dense{i}.bias`` ``[out]`` for each layer,
He-scaled so activations stay O(1); no activation after the last layer.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import numpy as np

from contract.datatypes import TensorSpec
from modelzoo.base import ModelDefinition


class MLP(ModelDefinition):
    """``input`` FP32 ``[-1, in_features]`` -> ``logits`` FP32 ``[-1, out_features]``."""

    name = "mlp"
    defaults: Mapping[str, Any] = {"in_features": 64, "hidden": [256, 256], "out_features": 10}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        if min(self.layer_sizes) < 1:
            raise ValueError(f"mlp: layer sizes must be positive, got {self.layer_sizes}")

    @property
    def layer_sizes(self) -> list[int]:
        """Feature count at every layer boundary: ``[in_features, *hidden, out_features]``."""
        return [self.params["in_features"], *self.params["hidden"], self.params["out_features"]]

    @property
    def num_layers(self) -> int:
        """Number of dense layers (``dense0`` .. ``dense{num_layers - 1}``)."""
        return len(self.layer_sizes) - 1

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("input", "FP32", (-1, self.params["in_features"])),)

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("logits", "FP32", (-1, self.params["out_features"])),)

    def build_weights(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        weights: dict[str, np.ndarray] = {}
        sizes = self.layer_sizes
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
            # He scaling before a ReLU; Xavier-like (gain 1) for the final, linear layer.
            gain = 2.0 if i < self.num_layers - 1 else 1.0
            weights[f"dense{i}.kernel"] = (rng.standard_normal((fan_in, fan_out)) * np.sqrt(gain / fan_in)).astype(
                np.float32
            )
            weights[f"dense{i}.bias"] = (rng.standard_normal(fan_out) * 0.01).astype(np.float32)
        return weights

    def example_inputs(self, batch_size: int, rng: np.random.Generator, **kwargs: Any) -> dict[str, np.ndarray]:
        return {"input": rng.standard_normal((batch_size, self.params["in_features"])).astype(np.float32)}

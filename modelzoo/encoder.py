"""BERT-style transformer encoder with variable sequence length (padding, dynamic shapes).

Token + learned position embeddings -> LayerNorm -> ``layers`` post-LN transformer layers
(multi-head self-attention, then an exact-erf GELU feed-forward network) -> outputs:
``last_hidden_state`` and ``pooled``, the mean of ``last_hidden_state`` over the positions
where ``attention_mask == 1`` (so right-padding never changes either output at valid positions).

Both builders must use the module constants below: ``LAYER_NORM_EPS`` for every LayerNorm and
``MASK_VALUE`` added to the attention scores of padded keys.

Weights: ``embeddings.token`` ``[vocab, hidden]``, ``embeddings.position`` ``[max_len, hidden]``,
``embeddings.ln.{gamma,beta}``; per layer ``layer{i}.attention.{query,key,value,output}.{kernel,bias}``,
``layer{i}.attention.ln.{gamma,beta}``, ``layer{i}.ffn.{intermediate,output}.{kernel,bias}``,
``layer{i}.ffn.ln.{gamma,beta}``. Dense kernels are ``[in, out]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from contract.datatypes import TensorSpec
from modelzoo.base import ModelDefinition

#: LayerNorm epsilon (BERT's), set explicitly on both sides.
LAYER_NORM_EPS = 1e-12
#: Additive attention-score bias of padded keys (mask == 0), identical on both sides.
MASK_VALUE = -1e9


class Encoder(ModelDefinition):
    """``input_ids`` INT64 ``[-1, -1]`` (+ optional ``attention_mask``) -> hidden states and pooled vector."""

    name = "encoder"
    defaults: Mapping[str, Any] = {
        "vocab_size": 1000,
        "hidden": 64,
        "heads": 4,
        "layers": 2,
        "ffn": 256,
        "max_len": 128,
    }
    pad_values: Mapping[str, int | float] = {"input_ids": 0, "attention_mask": 0}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        for key, value in self.params.items():
            if value < 1:
                raise ValueError(f"encoder: {key} must be positive, got {value}")
        if self.params["hidden"] % self.params["heads"]:
            raise ValueError(f"encoder: hidden ({self.params['hidden']}) must be a multiple of heads")
        if self.params["vocab_size"] < 2:
            raise ValueError("encoder: vocab_size must be at least 2 (id 0 is padding)")

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return (
            TensorSpec("input_ids", "INT64", (-1, -1), value_range=(0, self.params["vocab_size"] - 1)),
            TensorSpec("attention_mask", "INT64", (-1, -1), optional=True, value_range=(0, 1)),
        )

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        hidden = self.params["hidden"]
        return (
            TensorSpec("last_hidden_state", "FP32", (-1, -1, hidden)),
            TensorSpec("pooled", "FP32", (-1, hidden)),
        )

    def check_inputs(self, inputs: Mapping[str, np.ndarray]) -> None:
        length = inputs["input_ids"].shape[1]
        if length > self.params["max_len"]:
            raise ValueError(f"sequence of {length} tokens exceeds the encoder's max_len {self.params['max_len']}")

    def complete_inputs(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        completed = dict(inputs)
        if "attention_mask" not in completed:
            completed["attention_mask"] = np.ones_like(completed["input_ids"], dtype=np.int64)
        return completed

    def build_weights(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        p = self.params
        hidden, ffn = p["hidden"], p["ffn"]
        weights = {
            "embeddings.token": rng.standard_normal((p["vocab_size"], hidden)),
            "embeddings.position": 0.5 * rng.standard_normal((p["max_len"], hidden)),
            **_layer_norm(rng, "embeddings.ln", hidden),
        }
        for i in range(p["layers"]):
            prefix = f"layer{i}"
            for name in ("query", "key", "value", "output"):
                weights.update(_dense(rng, f"{prefix}.attention.{name}", hidden, hidden))
            weights.update(_layer_norm(rng, f"{prefix}.attention.ln", hidden))
            weights.update(_dense(rng, f"{prefix}.ffn.intermediate", hidden, ffn, gain=2.0))
            weights.update(_dense(rng, f"{prefix}.ffn.output", ffn, hidden))
            weights.update(_layer_norm(rng, f"{prefix}.ffn.ln", hidden))
        return {key: value.astype(np.float32) for key, value in weights.items()}

    def example_inputs(
        self, batch_size: int, rng: np.random.Generator, seq_len: int | None = None, **kwargs: Any
    ) -> dict[str, np.ndarray]:
        """Token ids in ``[1, vocab)``; ``seq_len`` defaults to a random length in [8, 32] (capped at max_len)."""
        max_len = self.params["max_len"]
        if seq_len is None:
            seq_len = min(int(rng.integers(8, 33)), max_len)
        if not 1 <= seq_len <= max_len:
            raise ValueError(f"encoder: seq_len must be in [1, {max_len}], got {seq_len}")
        ids = rng.integers(1, self.params["vocab_size"], size=(batch_size, seq_len), dtype=np.int64)
        return {"input_ids": ids}


def fused_qkv(weights: Mapping[str, np.ndarray], layer: int) -> tuple[np.ndarray, np.ndarray]:
    """Layer ``layer``'s query, key and value projections as one ``[hidden, 3 * hidden]`` kernel and
    ``[3 * hidden]`` bias (q, k, v in that order): one matmul instead of three, in both builders."""
    names = [f"layer{layer}.attention.{name}" for name in ("query", "key", "value")]
    kernel = np.concatenate([weights[f"{name}.kernel"] for name in names], axis=1)
    bias = np.concatenate([weights[f"{name}.bias"] for name in names])
    return kernel, bias


def _dense(
    rng: np.random.Generator, prefix: str, fan_in: int, fan_out: int, gain: float = 1.0
) -> dict[str, np.ndarray]:
    return {
        f"{prefix}.kernel": rng.standard_normal((fan_in, fan_out)) * np.sqrt(gain / fan_in),
        f"{prefix}.bias": rng.standard_normal(fan_out) * 0.02,
    }


def _layer_norm(rng: np.random.Generator, prefix: str, size: int) -> dict[str, np.ndarray]:
    return {
        f"{prefix}.gamma": 1.0 + 0.1 * rng.standard_normal(size),
        f"{prefix}.beta": 0.1 * rng.standard_normal(size),
    }

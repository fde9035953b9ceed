"""ResNet-style CNN on NHWC images (compute dominates).

stem conv3x3 (stride 1) + ReLU -> stages of BasicBlocks -> global average pool -> dense.
A BasicBlock is ``relu(conv2(relu(conv1(x))) + shortcut(x))`` with 3x3 convolutions
(zero padding 1 on every side) and an identity shortcut, or a 1x1 projection (no padding)
when the stride or the width changes. The first block of every stage after the first
has stride 2.

Weights (BatchNorm folded in, inference mode): ``stem.{kernel,bias}``,
``stage{s}.block{b}.conv1.{kernel,bias}``, ``...conv2.{kernel,bias}``,
``...shortcut.{kernel,bias}`` (projection blocks only), ``head.{kernel,bias}``.
Conv kernels are HWIO ``[kh, kw, in, out]`` and are padded by ``kh // 2`` on every side.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from contract.datatypes import TensorSpec
from modelzoo.base import ModelDefinition

#: BatchNorm epsilon used when folding the simulated BatchNorm statistics.
BATCHNORM_EPS = 1e-5


@dataclass(frozen=True)
class BasicBlock:
    """One residual block: its weight-name prefix, widths, stride and shortcut kind."""

    prefix: str
    in_channels: int
    out_channels: int
    stride: int

    @property
    def projection(self) -> bool:
        """True when the shortcut is a 1x1 (strided) convolution, not the identity."""
        return self.stride != 1 or self.in_channels != self.out_channels


class ResNet(ModelDefinition):
    """``image`` FP32 ``[-1, S, S, 3]`` (NHWC) -> ``logits`` FP32 ``[-1, num_classes]``."""

    name = "resnet"
    defaults: Mapping[str, Any] = {"image_size": 32, "widths": [16, 32, 64], "blocks_per_stage": 1, "num_classes": 10}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        widths = self.params["widths"]
        if not widths or min(widths) < 1:
            raise ValueError(f"resnet: widths must be a non-empty list of positive ints, got {widths!r}")
        for key in ("image_size", "blocks_per_stage", "num_classes"):
            if self.params[key] < 1:
                raise ValueError(f"resnet: {key} must be positive, got {self.params[key]}")

    @property
    def blocks(self) -> list[BasicBlock]:
        """Every residual block in forward order."""
        widths = self.params["widths"]
        blocks = []
        in_channels = widths[0]
        for s, width in enumerate(widths):
            for b in range(self.params["blocks_per_stage"]):
                stride = 2 if s > 0 and b == 0 else 1
                blocks.append(BasicBlock(f"stage{s}.block{b}", in_channels, width, stride))
                in_channels = width
        return blocks

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        size = self.params["image_size"]
        return (TensorSpec("image", "FP32", (-1, size, size, 3)),)

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("logits", "FP32", (-1, self.params["num_classes"])),)

    def build_weights(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        widths = self.params["widths"]
        blocks = self.blocks
        # Down-scale the last conv of each residual branch so the sum over blocks stays O(1).
        branch_scale = 0.5 / np.sqrt(len(blocks))
        weights = _conv(rng, "stem", 3, 3, widths[0])
        for block in blocks:
            weights.update(_conv(rng, f"{block.prefix}.conv1", 3, block.in_channels, block.out_channels))
            weights.update(
                _conv(rng, f"{block.prefix}.conv2", 3, block.out_channels, block.out_channels, scale=branch_scale)
            )
            if block.projection:
                weights.update(_conv(rng, f"{block.prefix}.shortcut", 1, block.in_channels, block.out_channels))
        fan_in, classes = widths[-1], self.params["num_classes"]
        weights["head.kernel"] = (rng.standard_normal((fan_in, classes)) / np.sqrt(fan_in)).astype(np.float32)
        weights["head.bias"] = (rng.standard_normal(classes) * 0.01).astype(np.float32)
        return weights

    def example_inputs(self, batch_size: int, rng: np.random.Generator, **kwargs: Any) -> dict[str, np.ndarray]:
        size = self.params["image_size"]
        return {"image": rng.standard_normal((batch_size, size, size, 3)).astype(np.float32)}


def _conv(
    rng: np.random.Generator, prefix: str, k: int, in_ch: int, out_ch: int, *, scale: float = 1.0
) -> dict[str, np.ndarray]:
    """He-initialised HWIO conv followed by a near-identity BatchNorm, folded into kernel + bias."""
    kernel = rng.standard_normal((k, k, in_ch, out_ch)) * np.sqrt(2.0 / (k * k * in_ch)) * scale
    bias = rng.standard_normal(out_ch) * 0.01
    gamma = 1.0 + 0.1 * rng.standard_normal(out_ch)
    beta = 0.05 * rng.standard_normal(out_ch)
    mean = 0.05 * rng.standard_normal(out_ch)
    var = 1.0 + 0.1 * np.abs(rng.standard_normal(out_ch))
    factor = gamma / np.sqrt(var + BATCHNORM_EPS)
    return {
        f"{prefix}.kernel": (kernel * factor).astype(np.float32),
        f"{prefix}.bias": ((bias - mean) * factor + beta).astype(np.float32),
    }

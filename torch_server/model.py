"""PyTorch builders of the zoo models from their canonical (framework-neutral) weights.

Every module's ``forward`` takes the contract inputs positionally, in contract order, and
returns a dict keyed by the contract output names. Canonical layouts are adapted here:
dense ``[in, out]`` -> Linear ``[out, in]``; conv HWIO -> OIHW; NHWC images are permuted to
NCHW at the entry (a zero-copy view with channels_last strides), so clients send the same
tensor to both servers.

``build(model, precision)`` runs the weights and computation in that precision's dtype
(``DTYPES``) behind ``AtPrecision``, which casts floating inputs on the way in and outputs
back to their contract dtypes on the way out, so the wire contract never changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

from modelzoo.base import ModelDefinition
from modelzoo.encoder import LAYER_NORM_EPS, MASK_VALUE, Encoder, fused_qkv
from modelzoo.mlp import MLP
from modelzoo.resnet import BasicBlock, ResNet

Weights = Mapping[str, np.ndarray]

#: The dtype of weights and computation of each ``--precision`` (tf32 stores fp32; only
#: CUDA matmul/convolution math changes, by torch.backends flags).
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "tf32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def mask_value(dtype: torch.dtype) -> float:
    """``MASK_VALUE``, or half the most negative finite value of ``dtype`` where it does not
    fit (fp16: -1e9 would round to -inf, and TensorFlow refuses it): the same value as
    tf_server's ``mask_value``, so both servers mask alike in every precision."""
    return max(MASK_VALUE, float(torch.finfo(dtype).min) / 2)


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _parameter(array: np.ndarray) -> nn.Parameter:
    return nn.Parameter(_tensor(array), requires_grad=False)


def _linear(weights: Weights, prefix: str) -> nn.Linear:
    kernel = weights[f"{prefix}.kernel"]
    layer = nn.Linear(kernel.shape[0], kernel.shape[1])
    layer.weight = _parameter(kernel.T)
    layer.bias = _parameter(weights[f"{prefix}.bias"])
    return layer


def _conv(weights: Weights, prefix: str, stride: int = 1) -> nn.Conv2d:
    kernel = weights[f"{prefix}.kernel"]
    kh, kw, in_ch, out_ch = kernel.shape
    layer = nn.Conv2d(in_ch, out_ch, (kh, kw), stride=stride, padding=(kh // 2, kw // 2))
    layer.weight = _parameter(kernel.transpose(3, 2, 0, 1))
    layer.bias = _parameter(weights[f"{prefix}.bias"])
    return layer


def _layer_norm(weights: Weights, prefix: str) -> nn.LayerNorm:
    gamma = weights[f"{prefix}.gamma"]
    layer = nn.LayerNorm(gamma.shape[0], eps=LAYER_NORM_EPS)
    layer.weight = _parameter(gamma)
    layer.bias = _parameter(weights[f"{prefix}.beta"])
    return layer


class TorchMLP(nn.Module):
    """Dense layers with ReLU between them."""

    def __init__(self, model: MLP) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_linear(model.weights, f"dense{i}") for i in range(model.num_layers))

    def forward(self, input: torch.Tensor) -> dict[str, torch.Tensor]:
        x = input
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return {"logits": self.layers[-1](x)}


class TorchBasicBlock(nn.Module):
    """``relu(conv2(relu(conv1(x))) + shortcut(x))``."""

    def __init__(self, weights: Weights, block: BasicBlock) -> None:
        super().__init__()
        self.conv1 = _conv(weights, f"{block.prefix}.conv1", block.stride)
        self.conv2 = _conv(weights, f"{block.prefix}.conv2")
        self.shortcut = _conv(weights, f"{block.prefix}.shortcut", block.stride) if block.projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.shortcut is None else self.shortcut(x)
        return F.relu(self.conv2(F.relu(self.conv1(x))) + residual)


class TorchResNet(nn.Module):
    """Stem conv, residual stages, global average pool, dense head; NHWC input."""

    def __init__(self, model: ResNet) -> None:
        super().__init__()
        weights = model.weights
        self.stem = _conv(weights, "stem")
        self.blocks = nn.Sequential(*(TorchBasicBlock(weights, block) for block in model.blocks))
        self.head = _linear(weights, "head")

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        x = image.permute(0, 3, 1, 2)  # NHWC -> NCHW view, channels_last in memory
        x = self.blocks(F.relu(self.stem(x)))
        return {"logits": self.head(x.mean(dim=(2, 3)))}


class TorchEncoderLayer(nn.Module):
    """Post-LN transformer layer: fused-QKV self-attention, then an exact-GELU FFN."""

    def __init__(self, weights: Weights, index: int, heads: int) -> None:
        super().__init__()
        prefix = f"layer{index}"
        self.heads = heads
        kernel, bias = fused_qkv(weights, index)
        self.qkv = _linear({"qkv.kernel": kernel, "qkv.bias": bias}, "qkv")
        self.attention_output = _linear(weights, f"{prefix}.attention.output")
        self.attention_ln = _layer_norm(weights, f"{prefix}.attention.ln")
        self.intermediate = _linear(weights, f"{prefix}.ffn.intermediate")
        self.ffn_output = _linear(weights, f"{prefix}.ffn.output")
        self.ffn_ln = _layer_norm(weights, f"{prefix}.ffn.ln")

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        head_dim = x.shape[-1] // self.heads
        # [B, S, 3 * hidden] -> [3, B, heads, S, head_dim]
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, head_dim)).permute(2, 0, 3, 1, 4)
        context = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=additive_mask)
        x = self.attention_ln(x + self.attention_output(context.transpose(1, 2).flatten(2)))
        return self.ffn_ln(x + self.ffn_output(F.gelu(self.intermediate(x), approximate="none")))


class TorchEncoder(nn.Module):
    """Embeddings + LayerNorm, transformer layers, masked mean pooling."""

    def __init__(self, model: Encoder) -> None:
        super().__init__()
        weights = model.weights
        self.token = nn.Embedding.from_pretrained(_tensor(weights["embeddings.token"]), freeze=True)
        self.position = _parameter(weights["embeddings.position"])
        self.embeddings_ln = _layer_norm(weights, "embeddings.ln")
        self.layers = nn.ModuleList(
            TorchEncoderLayer(weights, i, model.params["heads"]) for i in range(model.params["layers"])
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.embeddings_ln(self.token(input_ids) + self.position[: input_ids.shape[1]])
        mask = attention_mask.to(x.dtype)
        additive_mask = ((1.0 - mask) * mask_value(x.dtype))[:, None, None, :]  # [B, 1, 1, S] over keys
        for layer in self.layers:
            x = layer(x, additive_mask)
        weights = mask.unsqueeze(-1)
        pooled = (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        return {"last_hidden_state": x, "pooled": pooled}


class AtPrecision(nn.Module):
    """``module`` (already in ``dtype``) behind casts at its edges: floating inputs to
    ``dtype``, each output back to its contract dtype."""

    def __init__(self, module: nn.Module, dtype: torch.dtype, output_dtypes: Mapping[str, torch.dtype]) -> None:
        super().__init__()
        self.module = module
        self.dtype = dtype
        self.output_dtypes = dict(output_dtypes)

    def forward(self, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        cast = [x.to(self.dtype) if x.is_floating_point() else x for x in inputs]
        outputs = self.module(*cast)
        return {name: tensor.to(self.output_dtypes[name]) for name, tensor in outputs.items()}


_BUILDERS: dict[str, Callable[[Any], nn.Module]] = {"mlp": TorchMLP, "resnet": TorchResNet, "encoder": TorchEncoder}


def build(model: ModelDefinition, precision: str = "fp32") -> nn.Module:
    """The torch module of a zoo model, in eval mode, with its canonical weights, computing
    in ``precision``'s dtype (fp32 and tf32: the plain module)."""
    try:
        builder = _BUILDERS[model.name]
    except KeyError:
        raise ValueError(f"torch_server cannot build model {model.name!r}; it knows {sorted(_BUILDERS)}") from None
    module = builder(model).eval()
    module.requires_grad_(False)
    dtype = DTYPES[precision]
    if dtype == torch.float32:
        return module
    output_dtypes = {spec.name: torch.from_numpy(np.empty(0, spec.numpy_dtype)).dtype for spec in model.outputs}
    return AtPrecision(module.to(dtype), dtype, output_dtypes).eval()


def export_args(model: ModelDefinition) -> tuple[tuple[torch.Tensor, ...], tuple[dict[int, Dim], ...]]:
    """Example arguments (batch of 2: torch specializes size-1 dims) and their dynamic dims.

    The batch dimension is dynamic for every input; for the encoder the sequence dimension
    is too, shared by ``input_ids`` and ``attention_mask`` and bounded by ``max_len``.
    """
    rng = np.random.default_rng(0)
    axes = {0: Dim("batch", min=1)}
    kwargs = {}
    if model.name == "encoder":
        axes[1] = Dim("seq", min=1, max=model.params["max_len"])
        kwargs["seq_len"] = max(2, min(8, model.params["max_len"]))
    example = model.complete_inputs(model.example_inputs(2, rng, **kwargs))
    args = tuple(torch.from_numpy(example[spec.name]) for spec in model.inputs)
    dims = tuple({axis: axes[axis] for axis, size in enumerate(spec.shape) if size == -1} for spec in model.inputs)
    return args, dims


def export_program(model: ModelDefinition, precision: str = "fp32") -> torch.export.ExportedProgram:
    """``torch.export`` of ``build(model, precision)`` with the dynamic dims of ``export_args``."""
    args, dims = export_args(model)
    module = build(model, precision)
    # AtPrecision takes its inputs as ``*inputs``: their dims go under that one name.
    dynamic_shapes = {"inputs": dims} if isinstance(module, AtPrecision) else dims
    return torch.export.export(module, args, dynamic_shapes=dynamic_shapes)

"""TensorFlow builders of the zoo models from their canonical (framework-neutral) weights.

Raw TF ops only (``tf.matmul``, ``tf.nn.conv2d``, ...), so every numeric choice is explicit:
canonical layouts are TF's own (dense ``[in, out]``, conv HWIO, NHWC images); convolutions
zero-pad explicitly with ``tf.pad`` and run ``VALID`` (TF ``SAME`` with stride 2 pads
asymmetrically, torch ``padding=1`` symmetrically); GELU is exact (erf); LayerNorm uses the
zoo's epsilon. Each module's ``__call__`` takes the contract inputs positionally, in contract
order, and returns a dict keyed by the contract output names.

``build(model, precision)`` keeps the weights as variables of that precision's dtype
(``DTYPES``) and computes in it, casting floating inputs on the way in and outputs back to
their contract dtypes on the way out. In bf16 and fp16, LayerNorm statistics and the
attention softmax are computed in fp32 and rounded back, as torch's kernels do internally.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from contract.signature import ModelSignature
from modelzoo.base import ModelDefinition
from modelzoo.encoder import LAYER_NORM_EPS, MASK_VALUE, Encoder, fused_qkv
from modelzoo.mlp import MLP
from modelzoo.resnet import ResNet

#: The dtype of weights and computation of each ``--precision`` (tf32 stores fp32; only
#: CUDA matmul/convolution math changes, by TensorFlow's TF32 switch).
DTYPES: dict[str, tf.DType] = {"fp32": tf.float32, "tf32": tf.float32, "bf16": tf.bfloat16, "fp16": tf.float16}


def mask_value(dtype: tf.DType) -> float:
    """``MASK_VALUE``, or half the most negative finite value of ``dtype`` where it does not
    fit (fp16: TensorFlow refuses -1e9 as an fp16 constant; as -inf, a row whose keys are
    all masked would softmax to NaN)."""
    return max(MASK_VALUE, float(dtype.min) / 2)


def _variables(weights: Mapping[str, np.ndarray], dtype: tf.DType = tf.float32) -> dict[str, tf.Variable]:
    return {
        key: tf.Variable(
            tf.cast(np.asarray(value, dtype=np.float32), dtype), trainable=False, name=key.replace(".", "/")
        )
        for key, value in weights.items()
    }


def _in_fp32(function: Any, x: tf.Tensor, *args: tf.Tensor) -> tf.Tensor:
    """``function`` computed in fp32 on ``x`` (and ``args``), the result in ``x``'s dtype."""
    if x.dtype == tf.float32:
        return function(x, *args)
    return tf.cast(function(tf.cast(x, tf.float32), *(tf.cast(arg, tf.float32) for arg in args)), x.dtype)


def _dense(x: tf.Tensor, kernel: tf.Variable, bias: tf.Variable) -> tf.Tensor:
    """``x @ kernel + bias`` over the last axis of a rank-2 or higher ``x``."""
    if x.shape.rank == 2:
        return tf.nn.bias_add(tf.matmul(x, kernel), bias)
    flat = tf.reshape(x, [-1, kernel.shape[0]])
    y = tf.nn.bias_add(tf.matmul(flat, kernel), bias)
    return tf.reshape(y, tf.concat([tf.shape(x)[:-1], [kernel.shape[1]]], axis=0))


def _conv(x: tf.Tensor, kernel: tf.Variable, bias: tf.Variable, stride: int = 1) -> tf.Tensor:
    """NHWC conv with symmetric zero padding ``k // 2`` (as torch's ``padding=k // 2``), then VALID."""
    kh, kw = kernel.shape[0], kernel.shape[1]
    if kh > 1 or kw > 1:
        x = tf.pad(x, [[0, 0], [kh // 2, kh // 2], [kw // 2, kw // 2], [0, 0]])
    return tf.nn.bias_add(tf.nn.conv2d(x, kernel, strides=stride, padding="VALID"), bias)


def _layer_norm(x: tf.Tensor, gamma: tf.Variable, beta: tf.Variable) -> tf.Tensor:
    def normalize(x: tf.Tensor, gamma: tf.Tensor, beta: tf.Tensor) -> tf.Tensor:
        mean = tf.reduce_mean(x, axis=-1, keepdims=True)
        centered = x - mean
        variance = tf.reduce_mean(tf.square(centered), axis=-1, keepdims=True)
        return centered * tf.math.rsqrt(variance + LAYER_NORM_EPS) * gamma + beta

    return _in_fp32(normalize, x, gamma, beta)


def _float_inputs(inputs: tuple[tf.Tensor, ...], dtype: tf.DType) -> list[tf.Tensor]:
    return [tf.cast(x, dtype) if x.dtype.is_floating else x for x in inputs]


def _float32_outputs(outputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Every zoo model's outputs are FP32 in the contract."""
    return {name: tf.cast(tensor, tf.float32) for name, tensor in outputs.items()}


class TFMLP(tf.Module):
    """Dense layers with ReLU between them."""

    def __init__(self, model: MLP, dtype: tf.DType = tf.float32) -> None:
        super().__init__(name="mlp")
        self.num_layers = model.num_layers
        self.compute_dtype = dtype
        self.params = _variables(model.weights, dtype)

    def __call__(self, inputs: tf.Tensor) -> dict[str, tf.Tensor]:
        (x,) = _float_inputs((inputs,), self.compute_dtype)
        for i in range(self.num_layers):
            x = _dense(x, self.params[f"dense{i}.kernel"], self.params[f"dense{i}.bias"])
            if i < self.num_layers - 1:
                x = tf.nn.relu(x)
        return _float32_outputs({"logits": x})


class TFResNet(tf.Module):
    """Stem conv, residual stages, global average pool, dense head; NHWC throughout."""

    def __init__(self, model: ResNet, dtype: tf.DType = tf.float32) -> None:
        super().__init__(name="resnet")
        self.blocks = [(block.prefix, block.stride, block.projection) for block in model.blocks]
        self.compute_dtype = dtype
        self.params = _variables(model.weights, dtype)

    def _conv(self, x: tf.Tensor, prefix: str, stride: int = 1) -> tf.Tensor:
        return _conv(x, self.params[f"{prefix}.kernel"], self.params[f"{prefix}.bias"], stride)

    def __call__(self, image: tf.Tensor) -> dict[str, tf.Tensor]:
        (image,) = _float_inputs((image,), self.compute_dtype)
        x = tf.nn.relu(self._conv(image, "stem"))
        for prefix, stride, projection in self.blocks:
            residual = self._conv(x, f"{prefix}.shortcut", stride) if projection else x
            branch = self._conv(tf.nn.relu(self._conv(x, f"{prefix}.conv1", stride)), f"{prefix}.conv2")
            x = tf.nn.relu(branch + residual)
        pooled = tf.reduce_mean(x, axis=[1, 2])
        return _float32_outputs({"logits": _dense(pooled, self.params["head.kernel"], self.params["head.bias"])})


class TFEncoder(tf.Module):
    """Embeddings + LayerNorm, post-LN transformer layers (fused QKV), masked mean pooling."""

    def __init__(self, model: Encoder, dtype: tf.DType = tf.float32) -> None:
        super().__init__(name="encoder")
        self.compute_dtype = dtype
        self.num_layers = model.params["layers"]
        self.heads = model.params["heads"]
        self.hidden = model.params["hidden"]
        weights = {key: value for key, value in model.weights.items() if not key.endswith(_UNFUSED_QKV)}
        for i in range(self.num_layers):
            weights[f"layer{i}.attention.qkv.kernel"], weights[f"layer{i}.attention.qkv.bias"] = fused_qkv(
                model.weights, i
            )
        self.params = _variables(weights, dtype)

    def _dense(self, x: tf.Tensor, prefix: str) -> tf.Tensor:
        return _dense(x, self.params[f"{prefix}.kernel"], self.params[f"{prefix}.bias"])

    def _layer_norm(self, x: tf.Tensor, prefix: str) -> tf.Tensor:
        return _layer_norm(x, self.params[f"{prefix}.gamma"], self.params[f"{prefix}.beta"])

    def _attention(self, x: tf.Tensor, additive_mask: tf.Tensor, prefix: str) -> tf.Tensor:
        shape = tf.shape(x)
        batch, seq = shape[0], shape[1]
        head_dim = self.hidden // self.heads
        qkv = tf.reshape(self._dense(x, f"{prefix}.qkv"), [batch, seq, 3, self.heads, head_dim])
        qkv = tf.transpose(qkv, [2, 0, 3, 1, 4])  # [3, B, heads, S, head_dim]
        query, key, value = qkv[0] * (1.0 / float(np.sqrt(head_dim))), qkv[1], qkv[2]
        scores = tf.matmul(query, key, transpose_b=True) + additive_mask
        context = tf.matmul(_in_fp32(tf.nn.softmax, scores), value)  # [B, heads, S, head_dim]
        context = tf.reshape(tf.transpose(context, [0, 2, 1, 3]), [batch, seq, self.hidden])
        return self._dense(context, f"{prefix}.output")

    def __call__(self, input_ids: tf.Tensor, attention_mask: tf.Tensor) -> dict[str, tf.Tensor]:
        seq = tf.shape(input_ids)[1]
        x = tf.gather(self.params["embeddings.token"], input_ids) + self.params["embeddings.position"][:seq]
        x = self._layer_norm(x, "embeddings.ln")
        mask = tf.cast(attention_mask, self.compute_dtype)
        additive_mask = ((1.0 - mask) * mask_value(self.compute_dtype))[:, None, None, :]  # [B, 1, 1, S] over keys
        for i in range(self.num_layers):
            prefix = f"layer{i}"
            x = self._layer_norm(x + self._attention(x, additive_mask, f"{prefix}.attention"), f"{prefix}.attention.ln")
            hidden = tf.nn.gelu(self._dense(x, f"{prefix}.ffn.intermediate"), approximate=False)
            x = self._layer_norm(x + self._dense(hidden, f"{prefix}.ffn.output"), f"{prefix}.ffn.ln")
        weights = mask[:, :, None]
        pooled = tf.reduce_sum(x * weights, axis=1) / tf.maximum(tf.reduce_sum(weights, axis=1), 1.0)
        return _float32_outputs({"last_hidden_state": x, "pooled": pooled})


_UNFUSED_QKV = tuple(f".attention.{name}.{part}" for name in ("query", "key", "value") for part in ("kernel", "bias"))

_BUILDERS: dict[str, Callable[..., tf.Module]] = {"mlp": TFMLP, "resnet": TFResNet, "encoder": TFEncoder}


def build(model: ModelDefinition, precision: str = "fp32") -> tf.Module:
    """The tf.Module of a zoo model, with its canonical weights as (non-trainable) variables,
    computing in ``precision``'s dtype."""
    try:
        builder = _BUILDERS[model.name]
    except KeyError:
        raise ValueError(f"tf_server cannot build model {model.name!r}; it knows {sorted(_BUILDERS)}") from None
    return builder(model, DTYPES[precision])


def save(model: ModelDefinition, directory: str, precision: str = "fp32") -> None:
    """Write a SavedModel of ``build(model, precision)`` with a ``serving_default`` signature whose
    inputs and outputs carry the contract names and datatypes (batch and sequence dims None)."""
    module = build(model, precision)
    module.serve = tf.function(module.__call__, input_signature=input_signature(model))
    tf.saved_model.save(module, directory, signatures={"serving_default": module.serve.get_concrete_function()})


def sequence_limit(model: ModelSignature) -> int | None:
    """The longest sequence the model accepts (None: it has no sequence dimension)."""
    return int(model.params["max_len"]) if isinstance(model, Encoder) else None


def input_signature(model: ModelSignature) -> list[tf.TensorSpec]:
    """The serving signature's inputs: contract names and dtypes, -1 dims as None."""
    return [
        tf.TensorSpec(
            shape=[None if size == -1 else size for size in spec.shape],
            dtype=tf.bfloat16 if spec.datatype == "BF16" else tf.as_dtype(spec.numpy_dtype),
            name=spec.name,
        )
        for spec in model.inputs
    ]

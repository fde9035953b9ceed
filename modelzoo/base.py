"""ModelDefinition: one model's contract, parameters and canonical weights.

Weight layout conventions (each framework builder adapts to its own):
- dense kernels are ``[in, out]`` (y = x @ W + b);
- conv kernels are ``[kh, kw, in, out]`` (HWIO), images are NHWC in the contract;
- BatchNorm is folded into the preceding convolution (inference mode).
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from functools import cached_property
from typing import Any

import numpy as np

from contract.datatypes import TensorSpec

#: Seed of every canonical weight set.
SEED = 20261126


class ModelDefinition(ABC):
    """A zoo model. Subclasses set ``name`` and ``defaults`` and build the rest."""

    name: str = ""
    #: Parameter names and their default values (JSON-serialisable).
    defaults: Mapping[str, Any] = {}

    def __init__(self, **params: Any) -> None:
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise ValueError(
                f"model {self.name!r} has no parameter(s) {sorted(unknown)}; known: {sorted(self.defaults)}"
            )
        self.params: dict[str, Any] = {}
        for key, value in {**self.defaults, **params}.items():
            try:
                self.params[key] = _coerce(self.defaults[key], value)
            except (TypeError, ValueError) as err:
                raise ValueError(f"model {self.name!r}: parameter {key}={value!r} is not valid ({err})") from None

    @property
    @abstractmethod
    def inputs(self) -> tuple[TensorSpec, ...]:
        """Contract inputs, batch dimension first (-1)."""

    @property
    @abstractmethod
    def outputs(self) -> tuple[TensorSpec, ...]:
        """Contract outputs, batch dimension first (-1)."""

    @abstractmethod
    def build_weights(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Canonical weights (float32), scaled so activations stay O(1) with depth."""

    @abstractmethod
    def example_inputs(self, batch_size: int, rng: np.random.Generator, **kwargs: Any) -> dict[str, np.ndarray]:
        """Valid random inputs (required ones only) for a batch of ``batch_size`` rows."""

    def complete_inputs(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Fill omitted optional inputs with their defaults. Default: none optional."""
        return dict(inputs)

    def check_inputs(self, inputs: Mapping[str, np.ndarray]) -> None:
        """Model-specific limits beyond the TensorSpecs (e.g. a longest sequence);
        raises ValueError with a one-line reason. Default: none."""

    #: Pad value per input for dimensions marked -1 beyond the batch dimension;
    #: the dynamic batcher pads shorter requests with it. None: no ragged inputs.
    pad_values: Mapping[str, int | float] = {}

    @cached_property
    def weights(self) -> dict[str, np.ndarray]:
        return self.build_weights(np.random.default_rng(SEED))

    def identity(self) -> dict[str, Any]:
        """What an exported artifact must match to be reused: name, params, seed."""
        return {"model": self.name, "params": self.params, "seed": SEED, "fingerprint": self.fingerprint}

    @cached_property
    def fingerprint(self) -> str:
        digest = hashlib.sha256(json.dumps({"model": self.name, "params": self.params}, sort_keys=True).encode())
        for key in sorted(self.weights):
            digest.update(key.encode())
            digest.update(np.ascontiguousarray(self.weights[key]).tobytes())
        return digest.hexdigest()[:16]


def _coerce(default: Any, value: Any) -> Any:
    """A parameter value in its default's type; strings (from flags) are parsed."""
    if isinstance(default, (list, tuple)):
        if isinstance(value, str):
            value = json.loads(value) if value.strip().startswith("[") else value.split(",")
        return [type(default[0])(item) if default else item for item in value]
    if isinstance(default, bool) and isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return type(default)(value)

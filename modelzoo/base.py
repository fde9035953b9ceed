"""ModelDefinition: one model's contract, parameters and canonical weights.

Weight layout conventions (each framework builder adapts to its own):
- dense kernels are ``[in, out]`` (y = x @ W + b);
- conv kernels are ``[kh, kw, in, out]`` (HWIO), images are NHWC in the contract;
- BatchNorm is folded into the preceding convolution (inference mode).
"""

from __future__ import annotations

import hashlib
import json
from abc import abstractmethod
from collections.abc import Mapping
from functools import cached_property
from typing import Any

import numpy as np

from contract.signature import ModelSignature

#: Seed of every canonical weight set.
SEED = 20261126


class ModelDefinition(ModelSignature):
    """A zoo model: a ModelSignature defined here, with parameters and canonical weights.
    Subclasses set ``name`` and ``defaults`` and build the rest."""

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

    @abstractmethod
    def build_weights(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Canonical weights (float32), scaled so activations stay O(1) with depth."""

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

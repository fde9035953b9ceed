"""Framework-neutral model definitions with canonical weights from a fixed seed.

``modelzoo.get("mlp")`` returns a ModelDefinition: its contract (inputs, outputs),
its parameters and its weights as numpy arrays. torch_server and tf_server each
build the same network from those weights; nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from modelzoo.base import ModelDefinition
from modelzoo.encoder import Encoder
from modelzoo.mlp import MLP
from modelzoo.resnet import ResNet

#: Every zoo model by name.
MODELS: dict[str, type[ModelDefinition]] = {"mlp": MLP, "resnet": ResNet, "encoder": Encoder}


def names() -> list[str]:
    return sorted(MODELS)


def lookup(name: str, zoo: Mapping[str, type[ModelDefinition]] = MODELS) -> type[ModelDefinition]:
    """The class of model ``name`` in ``zoo`` (the model zoo by default)."""
    try:
        return zoo[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; the zoo has {sorted(zoo)}") from None


def get(name: str, **params: Any) -> ModelDefinition:
    """A zoo model by name, with optional parameter overrides."""
    return lookup(name)(**params)


__all__ = ["MODELS", "ModelDefinition", "get", "lookup", "names"]

"""ModelSignature: what a served model looks like to the serving core, whoever built it.

A zoo model (``modelzoo.ModelDefinition``: defined here, weights from a seed) and a model
read from a user's artifact (``serving.artifacts.ArtifactModel``: a SavedModel's
``serving_default`` signature or an exported program's, plus an optional ``config.json``)
are both one: a name, input and output TensorSpecs (the batch dimension first, -1 for any
size), pad values for inputs whose variable dimensions the batcher may pad, and three
hooks: example inputs (warm-up and load-time checks), the model's own input limits, and
defaults for omitted optional inputs.

Inputs that have pad values are ragged: requests of different lengths merge into one batch,
each padded to the longest, and the k-th variable dimension of every ragged input is one
axis (a sequence and its mask), which requests must agree on. Outputs' variable dimensions
then follow the first ragged input's, and each request's outputs are cut back to its own
lengths. Without pad values, only requests of identical shapes share a batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import numpy as np

from contract.datatypes import TensorSpec


class ModelSignature(ABC):
    """A served model's contract (see the module docstring). Subclasses set ``name`` and the specs."""

    name: str = ""
    #: Pad value per ragged input (see the module docstring); empty: no ragged inputs.
    pad_values: Mapping[str, int | float] = {}
    #: Other variable dimensions that must be equal, as groups of (input, axis); requests that break
    #: one are refused (e.g. the sequence of two inputs an exported program ties together).
    dim_groups: tuple[tuple[tuple[str, int], ...], ...] = ()

    @property
    @abstractmethod
    def inputs(self) -> tuple[TensorSpec, ...]:
        """Inputs, batch dimension first (-1)."""

    @property
    @abstractmethod
    def outputs(self) -> tuple[TensorSpec, ...]:
        """Outputs, batch dimension first (-1)."""

    @abstractmethod
    def example_inputs(self, batch_size: int, rng: np.random.Generator, **kwargs: Any) -> dict[str, np.ndarray]:
        """Valid random inputs (required ones only) for a batch of ``batch_size`` rows; ``seq_len``
        (where given) sizes the variable dimensions."""

    def complete_inputs(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Fill omitted optional inputs with their defaults. Default: none optional."""
        return dict(inputs)

    def check_inputs(self, inputs: Mapping[str, np.ndarray]) -> None:
        """Model-specific limits beyond the TensorSpecs (e.g. a longest sequence); raises
        ValueError with a one-line reason. Default: none."""

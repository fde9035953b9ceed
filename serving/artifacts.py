"""The user's own models: artifacts in a model repository, described by their own signatures.

A repository holds ``<model>/<version>/`` folders, as TF Serving and Triton lay them out:
for tf_server a SavedModel (``saved_model.pb``, ``variables/``) and for torch_server a
``model.pt2`` written by ``torch.export.save``. Versions are positive integers; what is
served of them follows the model's version policy (default: the highest only).

What a model takes and returns comes from the artifact (``Framework.signature``): input and
output names, datatypes and shapes (dynamic dimensions -1; dimension 0 must be dynamic, the
batch). What an artifact cannot say comes from an optional ``<model>/config.json``::

    {
      "max_batch_size": 16,                   # at most this many rows per request and batch
                                              # (and at most the server's --max-batch-size)
      "outputs": ["logits", "pooled"],        # names of a torch program's outputs, in order,
                                              # when it returns a tuple (default output_0, ...)
      "inputs": {
        "ids": {"range": [0, 999],            # integer values the model accepts (inclusive):
                                              # refused outside, and load tests stay inside
                "pad_value": 0,               # ragged: requests of different lengths share a
                                              # batch, padded with this (see contract.signature)
                "warmup_dims": [16]}          # sizes of its dynamic non-batch dimensions in
      },                                      # warm-up and load-time checks (default 8)
      "version_policy": {"latest": 1}         # or {"all": {}} or {"specific": [1, 3]}
    }

Every key is optional; an unknown one is refused (a typo must not pass silently).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from contract.datatypes import TensorSpec
from contract.random_tensors import random_array
from contract.signature import ModelSignature

CONFIG_FILE = "config.json"
#: Size of a dynamic non-batch dimension in example inputs, unless config.json says otherwise.
DEFAULT_WARMUP_DIM = 8
#: Integer values of example inputs without a configured range: [0, 2) fits any index or flag.
DEFAULT_INT_RANGE = (0, 2)


class ArtifactError(ValueError):
    """An artifact or its config.json cannot be served; the message is one line naming the file."""


@dataclass(frozen=True)
class ArtifactSignature:
    """What an artifact says of itself: its inputs and outputs, in the order it takes and returns them."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    #: Whether the artifact names its outputs (a SavedModel signature, a program returning a dict);
    #: if not they are called output_0, output_1 ..., and config.json may name them.
    named_outputs: bool = True
    #: Dynamic non-batch dimensions the artifact ties together, as groups of (input, axis) that must
    #: be equal (an exported program's shared symbols); requests that break one are refused.
    dim_groups: tuple[tuple[tuple[str, int], ...], ...] = ()


@dataclass(frozen=True)
class InputConfig:
    range: tuple[int, int] | None = None
    pad_value: int | float | None = None
    warmup_dims: tuple[int, ...] = ()


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions are served: the ``latest`` N, ``all``, or ``specific`` ones."""

    kind: str = "latest"
    count: int = 1
    versions: tuple[int, ...] = ()

    def select(self, available: Sequence[int]) -> list[int]:
        """The versions to serve among ``available`` (ascending)."""
        ordered = sorted(available)
        if self.kind == "all":
            return ordered
        if self.kind == "specific":
            return [version for version in ordered if version in self.versions]
        return ordered[-self.count :]


@dataclass(frozen=True)
class ModelConfigFile:
    """A model's ``config.json`` (see the module docstring); all defaults when there is none."""

    max_batch_size: int | None = None
    outputs: tuple[str, ...] = ()
    inputs: Mapping[str, InputConfig] = field(default_factory=dict)
    version_policy: VersionPolicy = VersionPolicy()

    @classmethod
    def read(cls, model_root: Path) -> ModelConfigFile:
        path = model_root / CONFIG_FILE
        if not path.exists():
            return cls()
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ArtifactError(f"{path}: not readable JSON ({err})") from None
        try:
            return cls.parse(data)
        except (TypeError, ValueError) as err:
            raise ArtifactError(f"{path}: {err}") from None

    @classmethod
    def parse(cls, data: Any) -> ModelConfigFile:
        _keys(data, {"max_batch_size", "outputs", "inputs", "version_policy"}, "the file")
        max_batch_size = data.get("max_batch_size")
        if max_batch_size is not None and (not isinstance(max_batch_size, int) or max_batch_size < 1):
            raise ValueError(f"max_batch_size {max_batch_size!r}: a positive integer")
        outputs = data.get("outputs", [])
        if not isinstance(outputs, list) or not all(isinstance(name, str) and name for name in outputs):
            raise ValueError(f"outputs {outputs!r}: a list of names")
        if len(set(outputs)) != len(outputs):
            raise ValueError(f"outputs {outputs!r}: a name appears twice")
        inputs = {}
        given = data.get("inputs", {})
        _keys(given, None, "inputs")
        for name, spec in given.items():
            _keys(spec, {"range", "pad_value", "warmup_dims"}, f"inputs.{name}")
            value_range = spec.get("range")
            if value_range is not None and not (
                isinstance(value_range, list)
                and len(value_range) == 2
                and all(isinstance(bound, int) for bound in value_range)
                and value_range[0] <= value_range[1]
            ):
                raise ValueError(f"inputs.{name}.range {value_range!r}: [low, high] integers, low <= high")
            pad = spec.get("pad_value")
            if pad is not None and (isinstance(pad, bool) or not isinstance(pad, (int, float))):
                raise ValueError(f"inputs.{name}.pad_value {pad!r}: a number")
            dims = spec.get("warmup_dims", [])
            if not isinstance(dims, list) or not all(isinstance(d, int) and d > 0 for d in dims):
                raise ValueError(f"inputs.{name}.warmup_dims {dims!r}: a list of positive integers")
            inputs[name] = InputConfig(None if value_range is None else tuple(value_range), pad, tuple(dims))
        return cls(max_batch_size, tuple(outputs), inputs, _policy(data.get("version_policy", {"latest": 1})))


def _keys(data: Any, allowed: set[str] | None, where: str) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: a JSON object expected")
    if allowed is not None and (unknown := sorted(set(data) - allowed)):
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(allowed)}")


def _policy(data: Any) -> VersionPolicy:
    _keys(data, {"latest", "all", "specific"}, "version_policy")
    if len(data) != 1:
        raise ValueError(f"version_policy {data!r}: one of latest, all, specific")
    ((kind, value),) = data.items()
    if kind == "latest":
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"version_policy.latest {value!r}: a positive integer")
        return VersionPolicy("latest", value)
    if kind == "specific":
        if not isinstance(value, list) or not value or not all(isinstance(v, int) and v > 0 for v in value):
            raise ValueError(f"version_policy.specific {value!r}: a list of positive version numbers")
        return VersionPolicy("specific", versions=tuple(value))
    return VersionPolicy("all")


def versions(model_root: Path) -> list[int]:
    """The version folders of a model (positive integer names), ascending."""
    try:
        entries = list(model_root.iterdir())
    except OSError:
        return []
    return sorted(int(entry.name) for entry in entries if entry.is_dir() and entry.name.isdigit() and int(entry.name))


def discover(root: Path) -> list[str]:
    """The models of a repository: its folders that hold at least one version folder."""
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return []
    return [entry.name for entry in entries if entry.is_dir() and not entry.name.startswith(".") and versions(entry)]


class ArtifactModel(ModelSignature):
    """A model served from the user's artifact: its signature, completed by its config.json."""

    def __init__(self, name: str, signature: ArtifactSignature, config: ModelConfigFile, source: Path) -> None:
        self.name = name
        self.source = source
        self.config = config
        known = {spec.name for spec in signature.inputs}
        if unknown := sorted(set(config.inputs) - known):
            raise ArtifactError(f"{source}: config.json names input(s) {unknown}; the artifact takes {sorted(known)}")
        outputs = signature.outputs
        if config.outputs:
            if signature.named_outputs:
                raise ArtifactError(f"{source}: the artifact names its outputs itself; drop outputs from config.json")
            if len(config.outputs) != len(outputs):
                raise ArtifactError(
                    f"{source}: config.json names {len(config.outputs)} outputs, the artifact returns {len(outputs)}"
                )
            outputs = tuple(replace(spec, name=new) for spec, new in zip(outputs, config.outputs, strict=True))
        inputs = []
        for spec in signature.inputs:
            given = config.inputs.get(spec.name, InputConfig())
            if given.range is not None and spec.numpy_dtype.kind not in "iu":
                raise ArtifactError(f"{source}: input {spec.name!r} is {spec.datatype}; a range is for integer inputs")
            variable = sum(1 for dim in spec.shape[1:] if dim == -1)
            if given.warmup_dims and len(given.warmup_dims) != variable:
                raise ArtifactError(
                    f"{source}: input {spec.name!r} has {variable} dynamic non-batch dimension(s); config.json's "
                    f"warmup_dims gives {len(given.warmup_dims)}"
                )
            inputs.append(replace(spec, value_range=given.range) if given.range is not None else spec)
        for spec in (*inputs, *outputs):
            _check_servable(spec, source)
        self._inputs = tuple(inputs)
        self._outputs = outputs
        self.dim_groups = signature.dim_groups
        self.pad_values = {key: given.pad_value for key, given in config.inputs.items() if given.pad_value is not None}
        for spec in inputs:
            if spec.name in self.pad_values and -1 not in spec.shape[1:]:
                raise ArtifactError(f"{source}: input {spec.name!r} has no dynamic non-batch dimension to pad")

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    def example_inputs(self, batch_size: int, rng: np.random.Generator, **kwargs: Any) -> dict[str, np.ndarray]:
        """Random inputs within each input's range (integers without one in ``DEFAULT_INT_RANGE``); dynamic
        dimensions from ``seq_len`` if given, else config.json's warmup_dims, else ``DEFAULT_WARMUP_DIM``.
        Dimensions the model ties together (``dim_groups``; the k-th of every ragged input) get one size."""
        seq_len = kwargs.get("seq_len")
        tied = {member: index for index, group in enumerate(self.dim_groups) for member in group}
        # Each dynamic dimension: (input, axis) -> its key (tied ones share one) and configured size.
        keys: dict[tuple[str, int], object] = {}
        sizes: dict[object, int] = {}
        for spec in self._inputs:
            configured = self.config.inputs.get(spec.name, InputConfig()).warmup_dims
            variable = [axis for axis, dim in enumerate(spec.shape) if axis and dim == -1]
            for k, axis in enumerate(variable):
                key: object = ("ragged", k) if spec.name in self.pad_values else tied.get((spec.name, axis))
                key = (spec.name, axis) if key is None else key
                keys[(spec.name, axis)] = key
                if configured and key not in sizes:
                    sizes[key] = configured[k]
        arrays = {}
        for spec in self._inputs:
            dims = [batch_size]
            for axis, dim in enumerate(spec.shape[1:], start=1):
                dims.append(dim if dim != -1 else seq_len or sizes.get(keys[(spec.name, axis)], DEFAULT_WARMUP_DIM))
            low, high = spec.value_range or (DEFAULT_INT_RANGE[0], DEFAULT_INT_RANGE[1] - 1)
            arrays[spec.name] = random_array(spec.datatype, dims, rng, int_range=(low, high + 1))
        return arrays


def _check_servable(spec: TensorSpec, source: Path) -> None:
    if spec.datatype == "BYTES":
        raise ArtifactError(
            f"{source}: {spec.name!r} is a string (BYTES) tensor; these servers serve numeric and BOOL tensors only"
        )
    if not spec.shape or spec.shape[0] != -1:
        fixed = "no dimensions" if not spec.shape else f"dimension 0 fixed at {spec.shape[0]}"
        raise ArtifactError(
            f"{source}: {spec.name!r} has {fixed}; the servers batch along dimension 0, so export it with a dynamic "
            "first dimension"
        )
    if any(dim < -1 or dim == 0 for dim in spec.shape):
        raise ArtifactError(f"{source}: {spec.name!r} has shape {list(spec.shape)}")


def batch_limit(server_max: int, config: ModelConfigFile) -> int:
    """The model's max batch size: the server's, or config.json's where that is smaller."""
    return min(server_max, config.max_batch_size or server_max)

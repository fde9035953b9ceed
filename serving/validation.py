"""Validation of decoded request inputs against a model's TensorSpecs.

Checks, each answered INVALID_ARGUMENT with a one-line message: unknown and missing
inputs, datatypes, ranks and fixed dimensions, an empty or over-large batch, inputs
that disagree on the batch size or on a shared variable dimension (the k-th -1
dimension of every input is one axis, e.g. the sequence of ids and of their mask),
integer values outside a spec's ``value_range``, and unknown requested outputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from serving.datatypes import TensorSpec, datatype_of
from serving.errors import InvalidInput


def validate_inputs(arrays: Mapping[str, np.ndarray], specs: Sequence[TensorSpec], max_batch_size: int) -> int:
    """Check every input; return the request's batch size (rows)."""
    by_name = {spec.name: spec for spec in specs}
    unknown = sorted(set(arrays) - set(by_name))
    if unknown:
        raise InvalidInput(f"unknown input(s) {unknown}; the model takes {sorted(by_name)}")
    missing = [spec.name for spec in specs if not spec.optional and spec.name not in arrays]
    if missing:
        raise InvalidInput(f"missing required input(s) {missing}")
    rows: int | None = None
    shared: dict[int, tuple[str, int]] = {}
    for name, array in arrays.items():
        spec = by_name[name]
        datatype = _datatype(array, spec)
        if datatype != spec.datatype:
            raise InvalidInput(f"input {name!r}: datatype {datatype}, expected {spec.datatype}")
        if not spec.accepts_shape(array.shape):
            raise InvalidInput(f"input {name!r}: shape {list(array.shape)}, expected {list(spec.shape)} (-1: any size)")
        if array.shape[0] == 0:
            raise InvalidInput(f"input {name!r}: empty batch (0 rows)")
        if array.shape[0] > max_batch_size:
            raise InvalidInput(f"batch of {array.shape[0]} rows exceeds max_batch_size {max_batch_size}")
        if rows is None:
            rows = array.shape[0]
        elif array.shape[0] != rows:
            raise InvalidInput(f"input {name!r} has {array.shape[0]} rows, other inputs {rows}")
        variable = [axis for axis in range(1, len(spec.shape)) if spec.shape[axis] == -1]
        for k, axis in enumerate(variable):
            size = array.shape[axis]
            if size == 0:
                raise InvalidInput(f"input {name!r}: dimension {axis} is empty")
            if k in shared and shared[k][1] != size:
                other, other_size = shared[k]
                raise InvalidInput(
                    f"input {name!r}: dimension {axis} is {size} but {other!r} has {other_size}; they must match"
                )
            shared.setdefault(k, (name, size))
        if spec.value_range is not None and array.size:
            low, high = spec.value_range
            if array.min() < low or array.max() > high:
                raise InvalidInput(f"input {name!r}: values must lie in [{low}, {high}]")
    if rows is None:
        raise InvalidInput("request has no inputs")
    return rows


def _datatype(array: np.ndarray, spec: TensorSpec) -> str:
    # BF16 arrives as raw uint16 words, indistinguishable by dtype: trust the request.
    if spec.datatype == "BF16" and array.dtype == np.dtype("<u2"):
        return "BF16"
    return datatype_of(array)


def validate_outputs(requested: Iterable[str], specs: Sequence[TensorSpec]) -> list[str]:
    """The output names to return, in request order (all, in model order, if none)."""
    names = [spec.name for spec in specs]
    wanted = list(requested)
    if not wanted:
        return names
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        raise InvalidInput(f"unknown output(s) {unknown}; the model has {names}")
    if len(set(wanted)) != len(wanted):
        raise InvalidInput("an output is requested twice")
    return wanted

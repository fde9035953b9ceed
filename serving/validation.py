"""Decode and validate a ModelInferRequest against one model's TensorSpecs, in one pass.

``RequestDecoder(model, max_batch_size)`` precomputes what each input must look like,
so the common request (raw contents, known inputs) costs a few attribute reads and one
``np.frombuffer`` per input. Every check answers INVALID_ARGUMENT with a one-line
message, and nothing is allocated from a declared shape before its byte length (or
value count) matched it: unknown, duplicate and missing inputs, unknown datatypes and
datatypes other than the spec's, ranks and fixed dimensions, negative dimensions, an
empty or over-large batch, inputs that disagree on the batch size or on a shared
variable dimension (the k-th -1 dimension of every ragged input, one with a pad value, is
one axis, e.g. the sequence of ids and of their mask), raw contents of the wrong length or beside typed
ones, integer values outside a spec's ``value_range``, the model's own limits
(``ModelSignature.check_inputs``), and unknown or repeated requested outputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from contract.codec import contents_to_array, raw_to_array
from contract.datatypes import NUMPY_DTYPES, TensorSpec
from contract.errors import InvalidInput
from contract.protocol import inference_pb2 as pb
from contract.signature import ModelSignature


class _Input:
    """What one input must look like, precomputed from its TensorSpec."""

    __slots__ = ("datatype", "dtype", "fixed", "itemsize", "name", "rank", "shared", "spec", "value_range", "variable")

    def __init__(self, spec: TensorSpec, ragged: bool) -> None:
        self.spec = spec
        self.name = spec.name
        self.datatype = spec.datatype
        self.dtype = spec.numpy_dtype
        #: Bytes per element of raw contents; 0 for BYTES (length-prefixed elements).
        self.itemsize = 0 if spec.datatype == "BYTES" else spec.numpy_dtype.itemsize
        self.rank = len(spec.shape)
        self.fixed = tuple((axis, size) for axis, size in enumerate(spec.shape) if axis and size != -1)
        self.variable = tuple(axis for axis, size in enumerate(spec.shape) if axis and size == -1)
        self.value_range = spec.value_range
        #: A ragged input (it has a pad value): its k-th variable dimension is every ragged input's k-th.
        self.shared = ragged and bool(self.variable)


class RequestDecoder:
    """Turns requests for one model into validated numpy inputs (see the module docstring)."""

    def __init__(self, model: ModelSignature, max_batch_size: int) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self._inputs = {spec.name: _Input(spec, spec.name in model.pad_values) for spec in model.inputs}
        self._required = tuple(spec.name for spec in model.inputs if not spec.optional)
        self._outputs = tuple(spec.name for spec in model.outputs)
        self._dim_groups = model.dim_groups
        self._output_set = frozenset(self._outputs)
        # Only models that override them pay for the model's own checks and defaults.
        self._checks = type(model).check_inputs is not ModelSignature.check_inputs
        self._completes = type(model).complete_inputs is not ModelSignature.complete_inputs

    def inputs(self, request: pb.ModelInferRequest) -> tuple[dict[str, np.ndarray], int]:
        """The request's inputs, validated and completed (defaults of omitted optional
        inputs filled in), and its batch size (rows)."""
        tensors = request.inputs
        raw = request.raw_input_contents
        if raw and len(raw) != len(tensors):
            raise InvalidInput(f"{len(raw)} raw_input_contents for {len(tensors)} inputs: send one per input, in order")
        known = self._inputs
        arrays: dict[str, np.ndarray] = {}
        rows = -1
        shared: tuple[int, ...] | None = None
        shared_by = ""
        for index, tensor in enumerate(tensors):
            name = tensor.name
            spec = known.get(name)
            if spec is None:
                unknown = sorted({t.name for t in tensors} - set(known))
                raise InvalidInput(f"unknown input(s) {unknown}; the model takes {sorted(known)}")
            if name in arrays:
                raise InvalidInput(f"input {name!r} appears twice")
            datatype = tensor.datatype
            if datatype != spec.datatype:
                if datatype not in NUMPY_DTYPES:
                    raise InvalidInput(f"unknown datatype {datatype!r}")
                raise InvalidInput(f"input {name!r}: datatype {datatype}, expected {spec.datatype}")
            shape = tuple(tensor.shape)
            if len(shape) != spec.rank or any(shape[axis] != size for axis, size in spec.fixed):
                _check_negative(shape)
                raise InvalidInput(
                    f"input {name!r}: shape {list(shape)}, expected {list(spec.spec.shape)} (-1: any size)"
                )
            batch = shape[0]
            if batch < 1:
                _check_negative(shape)
                raise InvalidInput(f"input {name!r}: empty batch (0 rows)")
            if batch > self.max_batch_size:
                raise InvalidInput(f"batch of {batch} rows exceeds max_batch_size {self.max_batch_size}")
            if rows == -1:
                rows = batch
            elif batch != rows:
                raise InvalidInput(f"input {name!r} has {batch} rows, other inputs {rows}")
            if spec.variable:
                sizes = tuple(shape[axis] for axis in spec.variable)
                if min(sizes) < 1:
                    _check_negative(shape)
                    axis = spec.variable[sizes.index(0)]
                    raise InvalidInput(f"input {name!r}: dimension {axis} is empty")
                if spec.shared and shared is None:
                    shared, shared_by = sizes, name
                elif spec.shared and shared is not None:
                    common = min(len(sizes), len(shared))
                    if sizes[:common] != shared[:common]:
                        k = next(k for k in range(common) if sizes[k] != shared[k])
                        raise InvalidInput(
                            f"input {name!r}: dimension {spec.variable[k]} is {sizes[k]} but {shared_by!r} has "
                            f"{shared[k]}; they must match"
                        )
                    if len(sizes) > len(shared):
                        shared = sizes
            if raw:
                if tensor.HasField("contents") and tensor.contents.ByteSize():
                    raise InvalidInput(f"input {name!r} has both raw and typed contents")
                data = raw[index]
                if spec.itemsize:
                    expected = math.prod(shape) * spec.itemsize
                    if len(data) != expected:
                        raise InvalidInput(
                            f"input {name!r}: {len(data)} bytes of raw contents, expected {expected} "
                            f"for {datatype} {list(shape)}"
                        )
                    array = np.frombuffer(data, dtype=spec.dtype).reshape(shape)
                else:
                    array = raw_to_array(data, datatype, shape, name)
            else:
                array = contents_to_array(tensor.contents, datatype, shape, name)
            if spec.value_range is not None:
                low, high = spec.value_range
                if array.size and (array.min() < low or array.max() > high):
                    raise InvalidInput(f"input {name!r}: values must lie in [{low}, {high}]")
            arrays[name] = array
        if len(arrays) < len(self._required):
            missing = [name for name in self._required if name not in arrays]
            if missing:
                raise InvalidInput(f"missing required input(s) {missing}")
        if rows == -1:
            raise InvalidInput("request has no inputs")
        for group in self._dim_groups:
            _check_tied(arrays, group)
        if self._checks:
            try:
                self.model.check_inputs(arrays)
            except ValueError as err:
                raise InvalidInput(str(err)) from None
        if self._completes:
            arrays = self.model.complete_inputs(arrays)
        return arrays, rows

    def outputs(self, request: pb.ModelInferRequest) -> Sequence[str]:
        """The output names to return, in request order (all, in model order, if none named)."""
        requested = request.outputs
        if not requested:
            return self._outputs
        wanted = [output.name for output in requested]
        unknown = sorted(set(wanted) - self._output_set)
        if unknown:
            raise InvalidInput(f"unknown output(s) {unknown}; the model has {list(self._outputs)}")
        if len(set(wanted)) != len(wanted):
            raise InvalidInput("an output is requested twice")
        return wanted


def _check_negative(shape: Sequence[int]) -> None:
    if shape and min(shape) < 0:
        raise InvalidInput(f"shape {list(shape)} has a negative dimension")


def _check_tied(arrays: dict[str, np.ndarray], group: Sequence[tuple[str, int]]) -> None:
    """Refuse inputs whose dimensions in ``group`` (the model ties them together) differ."""
    present = [(name, axis, int(arrays[name].shape[axis])) for name, axis in group if name in arrays]
    if len({size for _, _, size in present}) < 2:
        return
    first, first_axis, want = present[0]
    name, axis, got = next(item for item in present if item[2] != want)
    raise InvalidInput(
        f"input {name!r}: dimension {axis} is {got} but {first!r} has {want} in dimension {first_axis}; the model "
        "ties them, they must match"
    )

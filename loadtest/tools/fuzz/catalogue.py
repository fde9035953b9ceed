"""The fuzz case catalogue: valid ModelInfer requests for a served zoo model, the mutations that
break them, and the status each case is owed (``loadtest.tools.fuzz``'s docstring lists them).

``cases`` is a hypothesis strategy: a valid request (random batch, sequence length, values, raw
or typed contents, input order, outputs asked for...) with zero to three mutations drawn, none of
which can repair another. ``huge_shape_cases`` and ``oversized_case`` are the fixed cases beside
them. Nothing here talks to a server: ``loadtest.tools.fuzz.runner`` sends the cases and checks
the answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from google.protobuf import text_format
from hypothesis import strategies as st

from contract.codec import CONTENTS_FIELDS, array_to_contents, array_to_raw
from contract.datatypes import NUMPY_DTYPES, TensorSpec
from contract.protocol import inference_pb2 as pb

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
TOO_LARGE = grpc.StatusCode.RESOURCE_EXHAUSTED

#: The servers' default limit on a message (``--max-message-bytes``).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DATATYPES = sorted(NUMPY_DTYPES)
BAD_DATATYPES = ["", "fp32", "FLOAT", "INT128", "TYPE_FP32", "FP32 ", "BYTES\x00"]

# Mutations that change the data, applied before encoding; the relational ones only alone.
DATA_MUTATIONS = ("batch_too_large", "too_long", "out_of_range")
RELATIONAL_MUTATIONS = ("batch_mismatch", "length_mismatch")
# Mutations of one tensor of the encoded request (each on a different tensor).
TENSOR_MUTATIONS = (
    "unknown_name",
    "wrong_datatype",
    "rank",
    "fixed_dim",
    "negative_dim",
    "zero_dim",
    "huge_dim",
    "byte_length",
    "both_contents",
    "wrong_field",
    "duplicate",
    "missing",
)
# Mutations of the request as a whole.
REQUEST_MUTATIONS = ("extra_raw", "unknown_output", "repeated_output")


@dataclass(frozen=True)
class ModelInfo:
    """What the fuzzer must know of a served model to build valid requests and break them."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    #: Longest variable (sequence) dimension the model accepts; None: no limit.
    max_len: int | None

    @property
    def variable_axes(self) -> int:
        """How many variable dimensions beyond the batch the inputs share."""
        return max(sum(1 for size in spec.shape[1:] if size == -1) for spec in self.inputs)


@dataclass
class Case:
    """One fuzzed request, the status it is owed, and the mutations that made it."""

    model: ModelInfo
    request: pb.ModelInferRequest
    expected: grpc.StatusCode
    mutations: list[str]
    #: For an OK case: output name -> expected shape.
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def describe(self) -> str:
        text = text_format.MessageToString(self.request, as_one_line=True)
        if len(text) > 2000:
            text = text[:2000] + "..."
        return f"mutations {self.mutations} owed {self.expected.name}: {text}"


# ---- building cases ----


def _values(spec: TensorSpec, shape: Sequence[int], rng: np.random.Generator, nonfinite: bool) -> np.ndarray:
    dtype = spec.numpy_dtype
    if spec.datatype in ("FP16", "FP32", "FP64"):
        array = rng.standard_normal(shape).astype(dtype)
        if nonfinite and array.size:
            flat = array.reshape(-1)
            spots = rng.integers(0, flat.size, size=min(3, flat.size))
            flat[spots] = rng.choice(np.array([np.nan, np.inf, -np.inf], dtype=dtype), size=spots.size)
        return array
    if spec.datatype == "BOOL":
        return rng.integers(0, 2, shape).astype(np.bool_)
    low, high = spec.value_range or (0, 100)
    return rng.integers(low, high + 1, shape).astype(dtype)


def _shape(spec: TensorSpec, batch: int, lengths: Sequence[int]) -> list[int]:
    shape, k = [batch], 0
    for size in spec.shape[1:]:
        if size == -1:
            shape.append(lengths[k])
            k += 1
        else:
            shape.append(size)
    return shape


def _expected_shape(spec: TensorSpec, batch: int, lengths: Sequence[int]) -> tuple[int, ...]:
    return tuple(_shape(spec, batch, lengths))


@st.composite
def cases(draw: st.DrawFn, models: Sequence[ModelInfo]) -> Case:
    """A request for one of ``models``, maybe mutated, with the status it is owed."""
    model = draw(st.sampled_from(list(models)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batch = draw(st.integers(1, model.max_batch_size))
    longest = min(model.max_len or 16, 16)
    lengths = [draw(st.integers(1, longest)) for _ in range(model.variable_axes)]
    specs = [spec for spec in model.inputs if not spec.optional or draw(st.booleans())]
    # Proportions come from a seeded generator (hypothesis favours the ends of a range).
    nonfinite = rng.random() < 0.1
    raw = draw(st.booleans())
    mutations: list[str] = []

    # Which mutations: none (OK) 30 % of the time.
    kinds: list[str] = []
    relational = [m for m in RELATIONAL_MUTATIONS if _applies(m, model, specs)]
    if rng.random() < 0.7:
        if relational and rng.random() < 0.1:
            kinds = [draw(st.sampled_from(relational))]
        else:
            pool = [m for m in (*DATA_MUTATIONS, *TENSOR_MUTATIONS, *REQUEST_MUTATIONS) if _applies(m, model, specs)]
            pool = [pool[i] for i in rng.permutation(len(pool))]  # hypothesis favours the first
            kinds = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3, unique=True))
            tensor_kinds = [m for m in kinds if m in TENSOR_MUTATIONS]
            kinds = [m for m in kinds if m not in TENSOR_MUTATIONS] + tensor_kinds[: len(specs)]
    mutations += kinds

    # The data, with the data-level mutations.
    if "batch_too_large" in kinds:
        batch = model.max_batch_size + draw(st.integers(1, 8))
    if "too_long" in kinds:
        assert model.max_len is not None
        lengths = [model.max_len + draw(st.integers(1, 64)) for _ in lengths]
    arrays: dict[str, np.ndarray] = {}
    for spec in specs:
        arrays[spec.name] = _values(spec, _shape(spec, batch, lengths), rng, nonfinite)
    if "out_of_range" in kinds:
        spec = draw(st.sampled_from([s for s in specs if s.value_range is not None]))
        assert spec.value_range is not None
        low, high = spec.value_range
        flat = arrays[spec.name].reshape(-1)
        flat[draw(st.integers(0, flat.size - 1))] = draw(
            st.one_of(st.integers(high + 1, high + 10**6), st.integers(max(low - 10**6, -(2**31)), low - 1))
        )
    if "batch_mismatch" in kinds or "length_mismatch" in kinds:
        spec = draw(st.sampled_from(specs[1:]))
        if "batch_mismatch" in kinds:
            other_batch = draw(st.integers(1, model.max_batch_size).filter(lambda b: b != batch))
            arrays[spec.name] = _values(spec, _shape(spec, other_batch, lengths), rng, False)
        else:
            other = [draw(st.sampled_from([n for n in range(1, longest + 2) if n != length])) for length in lengths]
            arrays[spec.name] = _values(spec, _shape(spec, batch, other), rng, False)

    # Encode, with the neutral variations.
    order = draw(st.permutations(specs))
    request = pb.ModelInferRequest(model_name=model.name, model_version=draw(st.sampled_from(["", "1"])))
    request.id = draw(st.one_of(st.just(""), st.text(max_size=20)))
    for spec in order:
        array = arrays[spec.name]
        tensor = request.inputs.add(name=spec.name, datatype=spec.datatype, shape=array.shape)
        if raw:
            request.raw_input_contents.append(array_to_raw(array, spec.datatype))
            if rng.random() < 0.1:
                tensor.contents.SetInParent()  # present but empty: allowed beside raw contents
        else:
            array_to_contents(array, spec.datatype, tensor.contents)
    if rng.random() < 0.2:
        request.parameters["fuzz_unknown"].string_param = draw(st.text(max_size=10))
        request.parameters["triton_enable_empty_final_response"].bool_param = True
    wanted = [spec.name for spec in model.outputs]
    if draw(st.booleans()):
        wanted = draw(st.lists(st.sampled_from(wanted), min_size=1, unique=True))
        for name in wanted:
            request.outputs.add(name=name)

    # Tensor-level and request-level mutations.
    tensor_kinds = [m for m in kinds if m in TENSOR_MUTATIONS]
    targets = draw(st.permutations(range(len(request.inputs))))[: len(tensor_kinds)]
    for kind, index in sorted(zip(tensor_kinds, targets, strict=True), key=lambda pair: -pair[1]):
        _mutate_tensor(draw, request, index, kind, model, raw)
    if "extra_raw" in kinds:
        request.raw_input_contents.append(draw(st.binary(max_size=16)))
    if "unknown_output" in kinds:
        request.outputs.add(name=draw(st.text(max_size=12).filter(lambda n: n not in wanted)))
    if "repeated_output" in kinds:
        name = draw(st.sampled_from([spec.name for spec in model.outputs]))
        request.outputs.add(name=name)
        request.outputs.add(name=name)

    expected = INVALID if kinds else OK
    not_found = rng.random()
    if not_found < 0.08:
        served = {m.name for m in models}
        request.model_name = draw(st.text(max_size=40).filter(lambda n: n not in served))
        mutations.append("unknown_model")
        expected = NOT_FOUND
    elif not_found < 0.12:
        request.model_version = draw(st.text(min_size=1, max_size=12).filter(lambda v: v != "1"))
        mutations.append("unknown_version")
        expected = NOT_FOUND
    if nonfinite and any(spec.datatype.startswith("FP") for spec in specs):
        mutations.append("nonfinite(neutral)")
    outputs = {spec.name: spec for spec in model.outputs}
    shapes = {name: _expected_shape(outputs[name], batch, lengths) for name in wanted}
    return Case(model, request, expected, mutations, shapes)


def _applies(kind: str, model: ModelInfo, specs: Sequence[TensorSpec]) -> bool:
    if kind == "too_long":
        return model.max_len is not None and model.variable_axes > 0
    if kind == "out_of_range":
        return any(spec.value_range is not None for spec in specs)
    if kind == "batch_mismatch":
        return len(specs) > 1
    if kind == "length_mismatch":
        return len(specs) > 1 and model.variable_axes > 0
    if kind == "fixed_dim":
        return all(any(size != -1 for size in spec.shape[1:]) for spec in specs)
    if kind == "missing":
        return all(not spec.optional for spec in specs)
    return True


def _mutate_tensor(
    draw: st.DrawFn, request: pb.ModelInferRequest, index: int, kind: str, model: ModelInfo, raw: bool
) -> None:
    """Break tensor ``index`` of ``request`` so that the server owes INVALID_ARGUMENT."""
    tensor = request.inputs[index]
    spec = next(s for s in model.inputs if s.name == tensor.name)
    shape = list(tensor.shape)
    if kind == "unknown_name":
        names = {s.name for s in model.inputs}
        tensor.name = draw(st.text(max_size=12).filter(lambda n: n not in names))
    elif kind == "wrong_datatype":
        tensor.datatype = draw(st.sampled_from([d for d in DATATYPES if d != spec.datatype] + BAD_DATATYPES))
    elif kind == "rank":
        if len(shape) > 1 and draw(st.booleans()):
            del tensor.shape[-1]
        elif draw(st.booleans()):
            del tensor.shape[:]
        else:
            tensor.shape.append(draw(st.integers(1, 4)))
    elif kind == "fixed_dim":
        axis = draw(st.sampled_from([a for a, size in enumerate(spec.shape) if a and size != -1]))
        tensor.shape[axis] = draw(st.integers(0, 2**40).filter(lambda n: n != spec.shape[axis]))
    elif kind == "negative_dim":
        tensor.shape[draw(st.integers(0, len(shape) - 1))] = draw(st.integers(-(2**63), -1))
    elif kind == "zero_dim":
        tensor.shape[draw(st.integers(0, len(shape) - 1))] = 0
    elif kind == "huge_dim":
        tensor.shape[draw(st.integers(0, len(shape) - 1))] = draw(st.integers(2**31, 2**62))
    elif kind == "byte_length":
        if raw:
            data = request.raw_input_contents[index]
            if data and draw(st.booleans()):
                request.raw_input_contents[index] = data[: -draw(st.integers(1, len(data)))]
            else:
                request.raw_input_contents[index] = data + draw(st.binary(min_size=1, max_size=9))
        else:
            values = getattr(tensor.contents, CONTENTS_FIELDS[spec.datatype])
            if len(values) and draw(st.booleans()):
                del values[-draw(st.integers(1, len(values))) :]
            else:
                values.extend([values[0] if len(values) else 0] * draw(st.integers(1, 3)))
    elif kind == "both_contents":
        if raw:
            getattr(tensor.contents, CONTENTS_FIELDS[spec.datatype]).append(0)
        else:
            for other in request.inputs:
                contents = getattr(other.contents, CONTENTS_FIELDS.get(other.datatype, "bytes_contents"), [])
                request.raw_input_contents.append(bytes(len(contents)))
    elif kind == "wrong_field":  # beside raw contents this is also "both_contents"
        right = CONTENTS_FIELDS[spec.datatype]
        wrong = draw(st.sampled_from(sorted({f for f in CONTENTS_FIELDS.values() if f != right})))
        count = len(getattr(tensor.contents, right)) or 1
        tensor.contents.ClearField(right)  # type: ignore[arg-type]
        _fill(getattr(tensor.contents, wrong), wrong, count)
    elif kind == "duplicate":
        request.inputs.append(pb.ModelInferRequest.InferInputTensor())
        request.inputs[-1].CopyFrom(tensor)
        if raw:
            request.raw_input_contents.append(request.raw_input_contents[index])
    elif kind == "missing":
        del request.inputs[index]
        if raw:
            del request.raw_input_contents[index]
    else:
        raise ValueError(f"unknown mutation {kind!r}")


def _fill(values: Any, field_name: str, count: int) -> None:
    if field_name == "bytes_contents":
        values.extend([b"x"] * count)
    elif field_name == "bool_contents":
        values.extend([True] * count)
    elif field_name.startswith("fp"):
        values.extend([0.5] * count)
    else:
        values.extend([1] * count)


def huge_shape_cases(models: Sequence[ModelInfo]) -> list[Case]:
    """Declared shapes far too large to allocate, and some of a few hundred MB, each with a
    few bytes (raw) or values (typed) of contents: INVALID_ARGUMENT, decided before any
    allocation. Only variable dimensions (the encoder's sequence) can be huge and still
    pass the shape checks; huge batches and fixed dimensions fail those first."""
    out: list[Case] = []
    for model in models:
        for spec in model.inputs:
            template = [1 if size == -1 else size for size in spec.shape]
            shapes = [[2**40, *template[1:]], [1, *(size * 2**20 for size in template[1:])]]
            if any(size == -1 for size in spec.shape[1:]):
                for huge in (2**26, 2**33, 2**40, 2**62):  # 512 MB of INT64 first; int64's end last
                    shapes.append([1, *(huge if size == -1 else size for size in spec.shape[1:])])
            for shape in shapes:
                for raw in (True, False):
                    request = pb.ModelInferRequest(model_name=model.name)
                    tensor = request.inputs.add(name=spec.name, datatype=spec.datatype, shape=shape)
                    field_name = CONTENTS_FIELDS[spec.datatype]
                    if raw:
                        request.raw_input_contents.append(bytes(16))
                    else:
                        _fill(getattr(tensor.contents, field_name), field_name, 4)
                    out.append(Case(model, request, INVALID, [f"huge_shape {shape} {'raw' if raw else 'typed'}"]))
    return out


def oversized_case(model: ModelInfo, limit: int = MAX_MESSAGE_BYTES) -> Case:
    """A request one KiB over the server's message limit: RESOURCE_EXHAUSTED."""
    spec = model.inputs[0]
    request = pb.ModelInferRequest(model_name=model.name)
    request.inputs.add(name=spec.name, datatype=spec.datatype, shape=[1, 1])
    request.raw_input_contents.append(bytes(limit + 1024))
    return Case(model, request, TOO_LARGE, ["oversized"])

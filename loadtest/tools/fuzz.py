"""Fuzz ModelInfer: malformed requests against running servers, each owed a precise status.

    python -m loadtest fuzz --server torch,tf --requests 10000       # start both locally, fuzz, stop
    python -m loadtest fuzz --target 127.0.0.1:8001 --requests 10000  # a server that already runs

Every request starts as a valid one for a served zoo model (random batch size, sequence
length, values, raw or typed contents, input order, outputs asked for, request id,
unknown parameters, NaN and Inf among the floats, the optional mask sent or not); then
hypothesis draws mutations, each of which fixes the status the server owes:

- NOT_FOUND: an unknown model name or version (checked before anything else);
- INVALID_ARGUMENT: an unknown, duplicate or missing input; a wrong or unknown datatype;
  a wrong rank; a wrong fixed dimension; a negative, zero or huge dimension; raw
  contents of the wrong byte length or a wrong count of typed values; typed contents in
  the wrong field; raw and typed contents both set; more raw entries than inputs; a
  value out of the input's range; a batch above max_batch_size; a sequence above the
  model's max_len; inputs that disagree on the batch or sequence length; an unknown or
  repeated output; no inputs at all. Several may be drawn at once (on different inputs:
  none can repair another);
- OK when none is drawn: then the reply must be well formed (the outputs asked for, in
  that order, with the request's batch and sequence length, byte lengths that match, the
  request id echoed).

Fixed cases beside them: declared shapes far too large to allocate (petabytes, and a few
hundred MB) with a few bytes of contents, raw and typed, must be INVALID_ARGUMENT without
the server allocating them (its RSS is sampled every 2 ms when this command started it,
or ``--pid`` names it); a message over the server's limit must be RESOURCE_EXHAUSTED.

Each answer is checked: exactly the owed status code (so never UNKNOWN or INTERNAL, no
hang: every call has a deadline), a non-empty one-line message with no traceback in it.
After the run, health must say SERVING and the same valid requests sent before the run
must get the same answers. Prints one JSON summary (requests and status codes per target,
mutations drawn, mismatches with their requests) and exits 1 on any mismatch.

The models are the zoo's with their default parameters (as ``serve`` runs them); the
command checks that the server's metadata agrees. Loopback only; ``tests/test_fuzz.py``
runs a bounded number of the same cases against both servers in-process.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import psutil
from google.protobuf import text_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

import modelzoo
from contract.codec import CONTENTS_FIELDS, array_to_contents, array_to_raw
from contract.datatypes import NUMPY_DTYPES, TensorSpec
from contract.protocol import inference_pb2 as pb
from contract.protocol import inference_pb2_grpc as pb_grpc

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
TOO_LARGE = grpc.StatusCode.RESOURCE_EXHAUSTED

#: The servers' default limit on a message (``--max-message-bytes``).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: Deadline of each fuzzed call: a server that has not answered by then hangs.
CALL_TIMEOUT_S = 30.0
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


@dataclass
class Outcome:
    """What the server answered a case, and what was wrong with it (empty: nothing)."""

    code: grpc.StatusCode
    message: str
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


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


# ---- sending and checking ----


class Connection:
    """One channel to one server; sends cases and checks the answers."""

    def __init__(self, target: str, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        if not target.startswith(("127.", "localhost:", "[::1]:")):
            raise ValueError(f"fuzzing is for loopback servers only, not {target!r}")
        self.target = target
        limit = 2 * max_message_bytes + (1 << 20)
        self._channel = grpc.insecure_channel(
            target, options=[("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
        )
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def models(self, names: Sequence[str] | None = None) -> list[ModelInfo]:
        """The served zoo models (all of them unless ``names``), checked against their metadata."""
        if names is None:
            stats = self._stub.ModelStatistics(pb.ModelStatisticsRequest(), timeout=CALL_TIMEOUT_S)
            names = sorted(s.name for s in stats.model_stats)
        infos = []
        for name in names:
            definition = modelzoo.get(name)
            metadata = self._stub.ModelMetadata(pb.ModelMetadataRequest(name=name), timeout=CALL_TIMEOUT_S)
            served = [(t.name, t.datatype, tuple(t.shape)) for t in metadata.inputs]
            zoo = [(s.name, s.datatype, s.shape) for s in definition.inputs]
            if served != zoo:
                raise ValueError(f"{self.target} serves {name} with inputs {served}, not the zoo's defaults {zoo}")
            config = self._stub.ModelConfig(pb.ModelConfigRequest(name=name), timeout=CALL_TIMEOUT_S).config
            max_len = definition.params.get("max_len")
            infos.append(ModelInfo(name, definition.inputs, definition.outputs, config.max_batch_size, max_len))
        return infos

    def send(self, case: Case) -> Outcome:
        """Send one case; the outcome lists every way the answer differs from what is owed."""
        try:
            response = self._stub.ModelInfer(case.request, timeout=CALL_TIMEOUT_S)
            code, message = OK, ""
        except grpc.RpcError as err:
            response = None
            code, message = err.code(), err.details() or ""
        problems = []
        if code != case.expected:
            problems.append(f"status {code.name}, owed {case.expected.name}")
        if response is not None:
            problems += _reply_problems(case, response)
        elif not message.strip():
            problems.append("empty status message")
        elif "\n" in message or "Traceback" in message or 'File "' in message:
            problems.append("status message is not one line free of tracebacks")
        return Outcome(code, message, problems)

    def health(self) -> str:
        reply = self._health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def answers(self, models: Sequence[ModelInfo]) -> dict[str, list[bytes]]:
        """Each model's raw outputs for fixed valid requests (compare before and after a run)."""
        result = {}
        for model in models:
            rng = np.random.default_rng(1234)
            inputs = modelzoo.get(model.name).example_inputs(min(3, model.max_batch_size), rng)
            request = pb.ModelInferRequest(model_name=model.name)
            for name, array in inputs.items():
                spec = next(s for s in model.inputs if s.name == name)
                request.inputs.add(name=name, datatype=spec.datatype, shape=array.shape)
                request.raw_input_contents.append(array_to_raw(array, spec.datatype))
            reply = self._stub.ModelInfer(request, timeout=CALL_TIMEOUT_S)
            result[model.name] = list(reply.raw_output_contents)
        return result


def _reply_problems(case: Case, response: pb.ModelInferResponse) -> list[str]:
    problems = []
    names = [tensor.name for tensor in response.outputs]
    if names != list(case.shapes):
        problems.append(f"outputs {names}, asked for {list(case.shapes)}")
    if response.id != case.request.id:
        problems.append(f"reply id {response.id!r}, request id {case.request.id!r}")
    if len(response.raw_output_contents) != len(response.outputs):
        problems.append("raw_output_contents do not match the outputs")
        return problems
    datatypes = {spec.name: spec.datatype for spec in case.model.outputs}
    for tensor, data in zip(response.outputs, response.raw_output_contents, strict=True):
        want = case.shapes.get(tensor.name)
        if want is not None and tuple(tensor.shape) != want:
            problems.append(f"output {tensor.name!r} shape {list(tensor.shape)}, expected {list(want)}")
        itemsize = NUMPY_DTYPES[datatypes.get(tensor.name, "FP32")].itemsize
        if len(data) != math.prod(tensor.shape) * itemsize:
            problems.append(f"output {tensor.name!r}: {len(data)} bytes for shape {list(tensor.shape)}")
    return problems


@dataclass
class Tally:
    """Counts of one run, and its mismatches."""

    requests: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    owed: Counter[str] = field(default_factory=Counter)
    mutations: Counter[str] = field(default_factory=Counter)
    mismatches: list[dict[str, Any]] = field(default_factory=list)

    def add(self, case: Case, outcome: Outcome) -> None:
        self.requests += 1
        self.codes[outcome.code.name] += 1
        self.owed[case.expected.name] += 1
        self.mutations.update(m.split(" ")[0] for m in case.mutations)
        if not outcome.ok and len(self.mismatches) < 50:
            self.mismatches.append(
                {"problems": outcome.problems, "message": outcome.message[:300], "case": case.describe()}
            )

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "status_codes": dict(self.codes.most_common()),
            "owed": dict(self.owed.most_common()),
            "mutations": dict(self.mutations.most_common()),
            "mismatches": self.mismatches,
        }


class RssSampler:
    """The highest RSS of a process while it runs, sampled every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.002) -> None:
        self._process = psutil.Process(pid)
        self._interval = interval
        self.start_bytes = self._process.memory_info().rss
        self.peak_bytes = self.start_bytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth_bytes(self) -> int:
        return self.peak_bytes - self.start_bytes


def fuzz(
    connection: Connection,
    models: Sequence[ModelInfo],
    requests: int,
    seed: int | None = None,
    on_case: Callable[[Case, Outcome], None] | None = None,
) -> Tally:
    """Send ``requests`` drawn cases (no shrinking: every mismatch is recorded, none raised)."""
    tally = Tally()

    @settings(
        max_examples=requests,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases(models))
    def one(case: Case) -> None:
        outcome = connection.send(case)
        tally.add(case, outcome)
        if on_case is not None:
            on_case(case, outcome)

    (one if seed is None else hypothesis_seed(seed)(one))()
    return tally


def run_target(
    target: str, requests: int, seed: int | None, pid: int | None, oversized: int, models: Sequence[str] | None
) -> dict[str, Any]:
    """The whole check against one server: before, drawn cases, fixed cases, after."""
    with Connection(target) as connection:
        infos = connection.models(models)
        before = connection.answers(infos)
        started = time.monotonic()
        tally = fuzz(connection, infos, requests, seed)
        fuzz_s = time.monotonic() - started
        huge = Tally()
        sampler = RssSampler(pid) if pid else None
        if sampler is not None:
            sampler.__enter__()
        for case in huge_shape_cases(infos):
            huge.add(case, connection.send(case))
        if sampler is not None:
            sampler.__exit__()
        big = Tally()
        for _ in range(oversized):
            case = oversized_case(infos[0])
            big.add(case, connection.send(case))
        health = connection.health()
        after = connection.answers(infos)
    same = {name: after[name] == before[name] for name in before}
    result: dict[str, Any] = {
        "target": target,
        "models": [info.name for info in infos],
        "fuzzed": {**tally.summary(), "seconds": round(fuzz_s, 1)},
        "huge_shapes": huge.summary(),
        "oversized": big.summary(),
        "health_after": health,
        "same_answers_after": same,
    }
    if sampler is not None:
        result["huge_shapes"]["server_rss_growth_mb"] = round(sampler.growth_bytes / 2**20, 1)
    return result


def failed(result: Mapping[str, Any], rss_limit_mb: float) -> list[str]:
    """Why a target's result fails the check (empty: it passes)."""
    reasons = []
    for part in ("fuzzed", "huge_shapes", "oversized"):
        if result[part]["mismatches"]:
            reasons.append(f"{len(result[part]['mismatches'])} mismatches in {part}")
    if result["health_after"] != "SERVING":
        reasons.append(f"health {result['health_after']} after the run")
    if not all(result["same_answers_after"].values()):
        reasons.append(f"different answers after the run: {result['same_answers_after']}")
    growth = result["huge_shapes"].get("server_rss_growth_mb")
    if growth is not None and growth > rss_limit_mb:
        reasons.append(f"server RSS grew {growth} MB during the huge-shape requests")
    return reasons


def _servers(names: str) -> Iterator[Any]:
    from loadtest.servers import ServerProcess

    for name in names.split(","):
        yield ServerProcess(name.strip(), "mlp,resnet,encoder", ["--threads", "1", "--max-batch-size", "8"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", action="append", help="HOST:PORT of a running server (loopback); repeatable")
    where.add_argument("--server", help="start these servers locally first: torch, tf or torch,tf")
    parser.add_argument("--requests", type=int, default=1000, help="drawn requests per server (default 1000)")
    parser.add_argument("--model", action="append", help="fuzz only this served model (repeatable)")
    parser.add_argument("--seed", type=int, help="hypothesis seed, to repeat a run")
    parser.add_argument("--pid", type=int, help="the --target server's process id, to watch its RSS")
    parser.add_argument("--oversized", type=int, default=3, help="messages over the 64 MiB limit per server")
    parser.add_argument("--rss-limit-mb", type=float, default=64.0, help="allowed RSS growth on huge shapes")
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    results = []
    if args.server:
        for server in _servers(args.server):
            with server:
                print(f"fuzzing {server.module} at {server.target} ...", file=sys.stderr, flush=True)
                results.append(run_target(server.target, args.requests, args.seed, server.pid, args.oversized,
                                          args.model))  # fmt: skip
    else:
        for target in args.target:
            print(f"fuzzing {target} ...", file=sys.stderr, flush=True)
            results.append(run_target(target, args.requests, args.seed, args.pid, args.oversized, args.model))
    verdicts = {result["target"]: failed(result, args.rss_limit_mb) for result in results}
    json.dump({"results": results, "failures": verdicts}, sys.stdout, indent=2)
    print()
    return 1 if any(verdicts.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

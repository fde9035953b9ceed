"""What a load test sends: its settings and the pool of pre-encoded requests.

Free of gevent and Locust, so the comparison runner, the tests and any tool can import it
without monkey-patching their process (``loadtest.users.grpc_user`` is the Locust side).

- ``LoadSettings``: what each request looks like (model, batch size, encoding, deadline, ...).
- ``InputPool``: ModelInferRequests built from the target's ModelMetadata/ModelConfig,
  kept both as messages and serialized, so a generator spends its CPU on gRPC, not numpy.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from contract.codec import build_request
from contract.datatypes import TensorSpec
from contract.protocol import inference_pb2 as pb
from contract.protocol import inference_pb2_grpc as pb_grpc
from contract.random_tensors import random_array

#: Channel arguments of every load-test channel. A local subchannel pool gives each
#: channel its own connection (gRPC otherwise shares one between identical channels).
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]


def grpc_target(host: str | None) -> str:
    """The gRPC target of Locust's ``--host``: ``HOST:PORT`` (a ``grpc://`` or ``http://`` prefix is
    accepted), ``dns:///NAME:PORT`` (every address of NAME, round-robin) or ``HOST:PORT,HOST:PORT``
    (users spread over the servers): ``client.targets``."""
    if not host:
        raise ValueError("no target: pass --host HOST:PORT (e.g. --host 127.0.0.1:8001)")
    for scheme in ("grpc://", "http://"):
        host = host.removeprefix(scheme)
    return host.rstrip("/")


def parse_shapes(text: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """``"x=32,4;ids=32"`` -> ``(("x", (32, 4)), ("ids", (32,)))``: inputs' shapes without the batch dimension."""
    shapes = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        name, sep, dims = item.partition("=")
        try:
            sizes = tuple(int(dim) for dim in dims.split(",") if dim.strip())
        except ValueError:
            sizes = ()
        if not sep or not name.strip() or not sizes or min(sizes) < 1:
            raise ValueError(f"shape {item!r}: expected NAME=D1,D2,... (positive sizes, the batch dimension left out)")
        shapes.append((name.strip(), sizes))
    return tuple(shapes)


def load_samples(path: str) -> dict[str, np.ndarray]:
    """Real inputs from an ``.npz``: one array per input name, samples along the first (batch) dimension."""
    with np.load(path, allow_pickle=False) as data:
        samples = {name: np.asarray(data[name]) for name in data.files}
    counts = {name: array.shape[0] if array.ndim else 0 for name, array in samples.items()}
    if not samples or len(set(counts.values())) != 1 or 0 in counts.values():
        raise ValueError(f"{path}: expected one array per input, all with the same (non-zero) number of samples")
    return samples


def parse_seq_len(text: str | int) -> tuple[int, int]:
    """``"16"`` -> (16, 16); ``"8:32"`` -> (8, 32), a length drawn per request."""
    low, _, high = str(text).partition(":")
    bounds = (int(low), int(high or low))
    if not 1 <= bounds[0] <= bounds[1]:
        raise ValueError(f"sequence length {text!r}: expected N or MIN:MAX with 1 <= MIN <= MAX")
    return bounds


@dataclass(frozen=True)
class LoadSettings:
    """What each request looks like; read from the locustfile's options (see locustfile.py)."""

    model: str = "mlp"
    #: Rows per request (the batch dimension of every input).
    batch_size: int = 1
    #: ``raw`` (raw_input_contents) or ``typed`` (InferTensorContents).
    encoding: str = "raw"
    #: Per-request gRPC deadline.
    deadline_s: float = 1.0
    #: Size of -1 (non-batch) dimensions: fixed, or a range drawn per pooled request.
    seq_len: tuple[int, int] = (16, 16)
    #: Pre-encoded requests per (model, batch size, encoding), cycled round-robin.
    pool_size: int = 64
    #: Model version to address ("" = the server's choice).
    model_version: str = ""
    #: gRPC channels (HTTP/2 connections) per load-generating process; its users share them.
    connections: int = 1
    #: Shapes of inputs (without the batch dimension) instead of ``seq_len`` for their -1 dimensions.
    shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    #: An ``.npz`` of real inputs to send instead of random ones (see ``load_samples``).
    inputs_file: str = ""

    @classmethod
    def from_options(cls, options: Any) -> LoadSettings:
        """From Locust's parsed options; missing options keep their defaults."""
        default = cls()
        deadline_ms = getattr(options, "deadline_ms", None)
        return cls(
            model=getattr(options, "model", None) or default.model,
            batch_size=int(getattr(options, "batch_size", None) or default.batch_size),
            encoding=getattr(options, "encoding", None) or default.encoding,
            deadline_s=float(deadline_ms) / 1000 if deadline_ms else default.deadline_s,
            seq_len=parse_seq_len(getattr(options, "seq_len", None) or default.seq_len[0]),
            pool_size=int(getattr(options, "pool_size", None) or default.pool_size),
            model_version=getattr(options, "model_version", None) or default.model_version,
            connections=max(1, int(getattr(options, "connections", None) or default.connections)),
            shapes=parse_shapes(getattr(options, "shape", None) or ""),
            inputs_file=getattr(options, "inputs", None) or "",
        )


class InputPool:
    """``size`` pre-encoded ModelInferRequests for one (model, batch size, encoding).

    ``inputs`` are full shapes as in ModelMetadata; when ``batched`` their first dimension
    is the batch (set to ``batch_size``). Other -1 dimensions take ``shapes[name]`` where given,
    else a length drawn from ``seq_len`` once per request (shared by all inputs of that
    request). Values come from ``contract.random_tensors.random_array`` with integers in the
    input's ``ranges`` entry (inclusive; the server's ModelConfig publishes them), else in
    ``int_range`` (ids valid for a 1000-token vocabulary, id 0 left as padding); inputs named
    ``*mask*`` are all ones. With ``samples`` (real inputs, samples along the first dimension)
    each request takes the next ``batch_size`` of them instead. ``requests`` holds the
    messages, ``payloads`` the same requests serialized.
    """

    def __init__(
        self,
        model: str,
        inputs: Sequence[TensorSpec],
        *,
        batch_size: int = 1,
        batched: bool = True,
        encoding: str = "raw",
        seq_len: tuple[int, int] = (16, 16),
        size: int = 64,
        seed: int = 0,
        int_range: tuple[int, int] = (1, 1000),
        model_version: str = "",
        ranges: Mapping[str, tuple[int, int]] | None = None,
        shapes: Mapping[str, tuple[int, ...]] | None = None,
        samples: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        if encoding not in ("raw", "typed"):
            raise ValueError(f"encoding {encoding!r}: expected 'raw' or 'typed'")
        if batch_size < 1:
            raise ValueError(f"batch size {batch_size}: must be at least 1")
        if batch_size > 1 and not batched:
            raise ValueError(f"batch size {batch_size}: model {model!r} has no batch dimension")
        if encoding == "typed" and (untyped := [s.name for s in inputs if s.datatype in ("FP16", "BF16")]):
            raise ValueError(f"inputs {untyped} are FP16/BF16, which have no typed contents: use raw encoding")
        self.model = model
        self.inputs = tuple(inputs)
        self.batch_size = batch_size
        self.batched = batched
        self.encoding = encoding
        self.ranges = dict(ranges or {})
        self.shapes = dict(shapes or {})
        self.samples = dict(samples) if samples is not None else None
        self._check_overrides()
        self._next_sample = 0
        rng = np.random.default_rng(seed)
        self.requests = [self._build(rng, seq_len, int_range, model_version) for _ in range(max(1, size))]
        self.payloads = [request.SerializeToString() for request in self.requests]
        self._cycle: Iterator[pb.ModelInferRequest] = itertools.cycle(self.requests)

    def _build(
        self, rng: np.random.Generator, seq_len: tuple[int, int], int_range: tuple[int, int], version: str
    ) -> pb.ModelInferRequest:
        length = int(rng.integers(seq_len[0], seq_len[1] + 1))
        arrays = {}
        if self.samples is not None:
            total = next(iter(self.samples.values())).shape[0]
            rows = [(self._next_sample + i) % total for i in range(self.batch_size)]
            self._next_sample = (self._next_sample + self.batch_size) % total
            arrays = {spec.name: self.samples[spec.name][rows].astype(spec.numpy_dtype) for spec in self.inputs}
        for spec in self.inputs if self.samples is None else ():
            dims = list(spec.shape)
            if self.batched and dims:
                dims[0] = self.batch_size
            if spec.name in self.shapes:
                dims[1:] = self.shapes[spec.name]
            shape = tuple(length if dim < 0 else dim for dim in dims)
            if "mask" in spec.name.lower() and spec.datatype != "BF16" and spec.numpy_dtype.kind in "iub":
                arrays[spec.name] = np.ones(shape, dtype=spec.numpy_dtype)
            else:
                low, high = self.ranges[spec.name] if spec.name in self.ranges else (int_range[0], int_range[1] - 1)
                arrays[spec.name] = random_array(spec.datatype, shape, rng, int_range=(low, high + 1))
        datatypes = {spec.name: spec.datatype for spec in self.inputs}
        return build_request(self.model, arrays, model_version=version, raw=self.encoding == "raw", datatypes=datatypes)

    def _check_overrides(self) -> None:
        """``shapes`` and ``samples`` must fit the inputs' specs (``ValueError`` naming the input)."""
        specs = {spec.name: spec for spec in self.inputs}
        for name, dims in self.shapes.items():
            spec = specs.get(name)
            if spec is None:
                raise ValueError(f"--shape {name}: {self.model!r} has no input {name!r}; it takes {sorted(specs)}")
            if not spec.accepts_shape((1, *dims)):
                raise ValueError(f"--shape {name}={','.join(map(str, dims))}: {name!r} is {list(spec.shape)}")
        if self.samples is None:
            return
        if missing := sorted(set(specs) - set(self.samples)):
            raise ValueError(f"--inputs: no samples of input(s) {missing}")
        for name, spec in specs.items():
            if not spec.accepts_shape((1, *self.samples[name].shape[1:])):
                raise ValueError(
                    f"--inputs: samples of {name!r} are {list(self.samples[name].shape[1:])} each, the model takes "
                    f"{list(spec.shape[1:])}"
                )

    def next(self) -> pb.ModelInferRequest:
        """The next pooled request (round-robin); requests are shared, never mutate them."""
        return next(self._cycle)

    def payload_cycle(self) -> Iterator[bytes]:
        """An endless round-robin over the serialized requests (one per caller: cheap to advance)."""
        return itertools.cycle(self.payloads)

    @classmethod
    def from_server(
        cls,
        channel: grpc.Channel,
        settings: LoadSettings,
        *,
        timeout: float = 10.0,
        metadata: tuple[tuple[str, str], ...] = (),
        **kwargs: Any,
    ) -> InputPool:
        """A pool for ``settings.model`` from the server's ModelMetadata and ModelConfig
        (both calls carry ``metadata``: a bearer token).

        Inputs marked optional in ModelConfig are left out. Servers without ModelConfig
        (UNIMPLEMENTED) get every input, and the first dimension counts as the batch when
        it is -1 in every input.
        """
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        name, version = settings.model, settings.model_version
        model = stub.ModelMetadata(
            pb.ModelMetadataRequest(name=name, version=version), timeout=timeout, metadata=metadata
        )
        try:
            config: pb.ModelConfig | None = stub.ModelConfig(
                pb.ModelConfigRequest(name=name, version=version), timeout=timeout, metadata=metadata
            ).config
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            config = None
        optional = {tensor.name for tensor in config.input if tensor.optional} if config else set()
        specs = [
            TensorSpec(tensor.name, tensor.datatype, tuple(tensor.shape))
            for tensor in model.inputs
            if tensor.name not in optional
        ]
        if config is not None:
            batched = config.max_batch_size > 0
            if batched and settings.batch_size > config.max_batch_size:
                raise ValueError(
                    f"batch size {settings.batch_size} exceeds {name!r}'s max_batch_size {config.max_batch_size}"
                )
        else:
            batched = all(spec.shape and spec.shape[0] == -1 for spec in specs)
        return cls(
            name,
            specs,
            batch_size=settings.batch_size,
            batched=batched,
            encoding=settings.encoding,
            seq_len=settings.seq_len,
            size=settings.pool_size,
            model_version=version,
            ranges=published_ranges(config),
            shapes=dict(settings.shapes),
            samples=load_samples(settings.inputs_file) if settings.inputs_file else None,
            **kwargs,
        )


def published_ranges(config: pb.ModelConfig | None) -> dict[str, tuple[int, int]]:
    """The integer ranges a server publishes in ModelConfig parameters (``range.<input>`` = ``low,high``)."""
    ranges = {}
    for key, parameter in config.parameters.items() if config is not None else ():
        if key.startswith("range."):
            low, _, high = parameter.string_value.partition(",")
            try:
                ranges[key.removeprefix("range.")] = (int(low), int(high))
            except ValueError:
                continue
    return ranges

"""Locust users that speak the Open Inference Protocol over gRPC.

- ``GrpcUser``: abstract Locust user owning ONE gRPC channel (its own HTTP/2 connection),
  opened in ``on_start`` and closed in ``on_stop``, never one per request.
- ``TimedRpc``: times each unary call with ``time.perf_counter`` and fires
  ``environment.events.request`` (name ``<model>/<RPC>``, ``exception=`` on failure, never
  a success/failure split in the request type). Open-loop senders set ``scheduled_start``
  so latency counts from the scheduled send time instead of the actual one.
- ``InputPool``: pre-encoded ``ModelInferRequest`` objects derived from the target's
  ModelMetadata/ModelConfig, so the generator spends its CPU on gRPC, not numpy.
- ``LatencyRecorder``: exact per-request latencies (Locust's percentiles are rounded to
  whole milliseconds), written per process as ``<prefix>.<pid>.npz`` and merged by
  ``load_latencies``.

Import order matters: ``locust`` (gevent monkey-patching) first, and
``grpc.experimental.gevent.init_gevent()`` before any channel exists; importing this
module does both.
"""

from __future__ import annotations

from locust import User  # first: gevent must patch the stdlib before grpc/ssl are used

# isort: split
import itertools
import json
import os
import time
import weakref
from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent.lock
import grpc
import grpc.experimental.gevent
import numpy as np
from locust.env import Environment
from locust.exception import LocustError

from contract.codec import build_request
from contract.datatypes import NUMPY_DTYPES, TensorSpec
from contract.protocol import inference_pb2 as pb
from contract.protocol import inference_pb2_grpc as pb_grpc

_gevent_ready_pid: int | None = None


def init_gevent_grpc() -> None:
    """Make gRPC cooperate with gevent, once per process.

    Without it every blocking gRPC call holds the gevent hub, so all users of a process
    silently take turns and the load serializes.
    """
    global _gevent_ready_pid
    if _gevent_ready_pid != os.getpid():
        grpc.experimental.gevent.init_gevent()
        _gevent_ready_pid = os.getpid()


init_gevent_grpc()

#: Channel arguments of every load-test channel. A local subchannel pool gives each
#: channel its own connection (gRPC otherwise shares one between identical channels).
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]

#: Set by open-loop senders (per greenlet) to the perf_counter time a request was
#: scheduled for; ``TimedRpc`` then measures latency from it.
scheduled_start: ContextVar[float | None] = ContextVar("scheduled_start", default=None)


def grpc_target(host: str | None) -> str:
    """``HOST:PORT`` from Locust's ``--host`` (a ``grpc://`` or ``http://`` prefix is accepted)."""
    if not host:
        raise LocustError("no target: pass --host HOST:PORT (e.g. --host 127.0.0.1:8001)")
    for scheme in ("grpc://", "http://", "dns:///"):
        host = host.removeprefix(scheme)
    return host.rstrip("/")


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
        )


class RpcFailure(Exception):
    """A failed call as Locust reports it: ``CODE: details`` (so equal errors group together)."""

    def __init__(self, code: grpc.StatusCode | None, details: str | None) -> None:
        self.code = code
        name = code.name if code else "UNKNOWN"
        super().__init__(f"{name}: {details}" if details else name)

    @classmethod
    def of(cls, error: grpc.RpcError) -> RpcFailure:
        if isinstance(error, grpc.Call):
            return cls(error.code(), error.details())
        return cls(None, str(error))


class ClientBacklog(Exception):
    """An open-loop request that was never sent: too many requests already in flight."""


# ---- exact latencies ----


class LatencyRecorder:
    """Per-request (start, latency, ok, send lag) of one process, kept exact (1 us).

    Written by ``save`` as ``<prefix>.<pid>.npz`` (``<prefix>.<pid>.<n>.npz`` for later
    runs of the same process) with arrays, one element per request Locust counted:

    - ``start_us`` int64: Unix time in microseconds the request was scheduled for
      (open loop) or sent at (closed loop);
    - ``latency_us`` int64: from ``start_us`` to the response or error; -1 if never sent;
    - ``ok`` bool: a successful response;
    - ``lag_us`` int64: actual send time minus scheduled time (0 in closed loop, -1 if
      never sent);
    - ``meta``: a JSON string (pid, model, batch size, encoding, mode, ...).
    """

    def __init__(self) -> None:
        # Flat doubles, 4 per request (32 bytes): compact enough for long runs.
        self._values = array("d")
        #: Record one request as (perf_counter start, latency s, ok, lag s); latency and lag -1 when never sent.
        self.record: Callable[[tuple[float, float, bool, float]], None] = self._values.extend
        self._saved = 0
        self._anchor = (time.time(), time.perf_counter())

    def __len__(self) -> int:
        return len(self._values) // 4

    def clear(self) -> None:
        del self._values[:]
        self._anchor = (time.time(), time.perf_counter())

    def save(self, prefix: str | os.PathLike[str], meta: Mapping[str, Any]) -> Path:
        """Write the requests recorded so far (and forget them); returns the file written."""
        suffix = f".{os.getpid()}" + (f".{self._saved}" if self._saved else "")
        path = Path(f"{prefix}{suffix}.npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = np.frombuffer(self._values, dtype=np.float64).reshape(-1, 4).copy()
        wall, perf = self._anchor
        sent = rows[:, 1] >= 0
        np.savez(
            path,
            start_us=np.rint((rows[:, 0] - perf + wall) * 1e6).astype(np.int64),
            latency_us=np.where(sent, np.rint(rows[:, 1] * 1e6), -1).astype(np.int64),
            ok=rows[:, 2].astype(bool),
            lag_us=np.where(sent, np.rint(rows[:, 3] * 1e6), -1).astype(np.int64),
            meta=np.array(json.dumps({"pid": os.getpid(), **meta})),
        )
        self._saved += 1
        self.clear()
        return path


_recorders: weakref.WeakKeyDictionary[Environment, LatencyRecorder] = weakref.WeakKeyDictionary()


def attach_recorder(environment: Environment) -> LatencyRecorder:
    """Record exact latencies of every user of ``environment`` created from now on."""
    return _recorders.setdefault(environment, LatencyRecorder())


def detach_recorder(environment: Environment) -> None:
    """Stop recording for users created from now on."""
    _recorders.pop(environment, None)


def recorder_for(environment: Environment) -> LatencyRecorder | None:
    return _recorders.get(environment)


def load_latencies(prefix: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """Merge every ``<prefix>.*.npz`` (all processes): arrays sorted by start, and the metas."""
    files = sorted(Path(prefix).parent.glob(f"{Path(prefix).name}.*.npz"))
    columns: dict[str, list[np.ndarray]] = {"start_us": [], "latency_us": [], "ok": [], "lag_us": []}
    metas = []
    for path in files:
        with np.load(path) as data:
            for name, parts in columns.items():
                parts.append(data[name])
            metas.append(json.loads(str(data["meta"])))
    merged = {
        name: np.concatenate(parts) if parts else np.empty(0, np.bool_ if name == "ok" else np.int64)
        for name, parts in columns.items()
    }
    order = np.argsort(merged["start_us"], kind="stable")
    return {name: array[order] for name, array in merged.items()}, metas


# ---- timing ----


class TimedRpc:
    """One unary RPC of a stub, timed: every call fires Locust's request event.

    ``request_type="grpc"``, ``name="<model>/<RPC>"``, ``response_time`` in ms (float, from
    ``time.perf_counter``; from ``scheduled_start`` when an open-loop sender set it),
    ``response_length`` the reply's size, ``exception=RpcFailure`` on failure (the call then
    raises as usual). A thin wrapper rather than a ``grpc.UnaryUnaryClientInterceptor``:
    gRPC's interceptor plumbing builds a new multicallable and call objects for every call,
    which cost 3-9 % more generator CPU per request than this in our measurements.
    """

    __slots__ = ("_call", "_context", "_fire", "_names", "_record", "_rpc")

    def __init__(
        self,
        call: Callable[..., Any],
        rpc: str,
        environment: Environment,
        context: dict[str, Any] | None = None,
        recorder: LatencyRecorder | None = None,
    ) -> None:
        self._call = call
        self._rpc = rpc
        self._fire = environment.events.request.fire
        self._context = context if context is not None else {}
        self._record = recorder.record if recorder is not None else None
        self._names: dict[str, str] = {}

    def __call__(self, request: Any, timeout: float | None = None) -> Any:
        scheduled = scheduled_start.get()
        start = time.perf_counter()
        try:
            response = self._call(request, timeout=timeout)
        except grpc.RpcError as error:
            self._report(request, scheduled, start, time.perf_counter(), 0, error)
            raise
        self._report(request, scheduled, start, time.perf_counter(), response.ByteSize(), None)
        return response

    def _report(
        self, request: Any, scheduled: float | None, start: float, end: float, length: int, error: grpc.RpcError | None
    ) -> None:
        if scheduled is None:
            scheduled = start
        if self._record is not None:
            self._record((scheduled, end - scheduled, error is None, start - scheduled))
        self._fire(
            request_type="grpc",
            name=self._name(request),
            response_time=(end - scheduled) * 1000.0,
            response_length=length,
            exception=None if error is None else RpcFailure.of(error),
            context=self._context,
        )

    def _name(self, request: Any) -> str:
        model: str | None = getattr(request, "model_name", None)
        if model is None:
            model = str(getattr(request, "name", ""))
        name = self._names.get(model)
        if name is None:
            name = self._names[model] = f"{model}/{self._rpc}" if model else self._rpc
        return name


# ---- inputs ----


def _random_tensor(
    spec: TensorSpec, shape: tuple[int, ...], rng: np.random.Generator, int_range: tuple[int, int]
) -> np.ndarray:
    """Random values for one input: FP* standard normal, INT* in ``int_range``, masks all ones."""
    kind = spec.datatype
    if kind == "BYTES":
        return np.array([rng.bytes(8) for _ in range(int(np.prod(shape)))], dtype=object).reshape(shape)
    if kind == "BF16":
        words = rng.standard_normal(shape, dtype=np.float32).view(np.uint32) >> 16
        return words.astype(np.uint16)
    dtype = NUMPY_DTYPES[kind]
    if "mask" in spec.name.lower() and dtype.kind in "iub":
        return np.ones(shape, dtype=dtype)
    if kind == "BOOL":
        return rng.random(shape) < 0.5
    if dtype.kind == "f":
        return rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    info = np.iinfo(dtype)
    low, high = max(int_range[0], int(info.min)), min(int_range[1], int(info.max) + 1)
    return rng.integers(low, high, size=shape).astype(dtype)


class InputPool:
    """``size`` pre-encoded ModelInferRequests for one (model, batch size, encoding).

    ``inputs`` are full shapes as in ModelMetadata; when ``batched`` their first dimension
    is the batch (set to ``batch_size``). Other -1 dimensions take a length drawn from
    ``seq_len`` once per request (shared by all inputs of that request). Values: FP*
    standard normal, INT*/UINT* uniform in ``int_range`` (ids valid for a 1000-token
    vocabulary, id 0 left as padding), BOOL random, inputs named ``*mask*`` all ones.
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
        rng = np.random.default_rng(seed)
        self.requests = [self._build(rng, seq_len, int_range, model_version) for _ in range(max(1, size))]
        self._cycle: Iterator[pb.ModelInferRequest] = itertools.cycle(self.requests)

    def _build(
        self, rng: np.random.Generator, seq_len: tuple[int, int], int_range: tuple[int, int], version: str
    ) -> pb.ModelInferRequest:
        length = int(rng.integers(seq_len[0], seq_len[1] + 1))
        arrays = {}
        for spec in self.inputs:
            dims = list(spec.shape)
            if self.batched and dims:
                dims[0] = self.batch_size
            shape = tuple(length if dim < 0 else dim for dim in dims)
            arrays[spec.name] = _random_tensor(spec, shape, rng, int_range)
        datatypes = {spec.name: spec.datatype for spec in self.inputs}
        return build_request(self.model, arrays, model_version=version, raw=self.encoding == "raw", datatypes=datatypes)

    def next(self) -> pb.ModelInferRequest:
        """The next pooled request (round-robin); requests are shared, never mutate them."""
        return next(self._cycle)

    @classmethod
    def from_server(
        cls, channel: grpc.Channel, settings: LoadSettings, *, timeout: float = 10.0, **kwargs: Any
    ) -> InputPool:
        """A pool for ``settings.model`` from the server's ModelMetadata and ModelConfig.

        Inputs marked optional in ModelConfig are left out. Servers without ModelConfig
        (UNIMPLEMENTED) get every input, and the first dimension counts as the batch when
        it is -1 in every input.
        """
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        name, version = settings.model, settings.model_version
        metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name=name, version=version), timeout=timeout)
        try:
            config: pb.ModelConfig | None = stub.ModelConfig(
                pb.ModelConfigRequest(name=name, version=version), timeout=timeout
            ).config
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            config = None
        optional = {tensor.name for tensor in config.input if tensor.optional} if config else set()
        specs = [
            TensorSpec(tensor.name, tensor.datatype, tuple(tensor.shape))
            for tensor in metadata.inputs
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
            **kwargs,
        )


_pools: dict[tuple[str, LoadSettings], InputPool] = {}
_pools_lock = gevent.lock.BoundedSemaphore()


def shared_pool(channel: grpc.Channel, target: str, settings: LoadSettings) -> InputPool:
    """The process-wide pool for (target, settings): built once, by the first user that asks."""
    key = (target, settings)
    with _pools_lock:
        if key not in _pools:
            _pools[key] = InputPool.from_server(channel, settings)
        return _pools[key]


# ---- users ----


class GrpcUser(User):
    """Abstract OIP user: one channel (connection) per user, calls timed by ``TimedRpc``.

    Subclasses add tasks: ``self.infer()`` for ModelInfer, ``self.timed("ModelMetadata")``
    for any other unary RPC. Settings come from the locustfile's options (override
    ``load_settings`` to set them otherwise).
    """

    abstract = True
    #: Seconds to wait for the connection in ``on_start`` (kept out of the measurements).
    connect_timeout_s: float = 10.0

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.settings = self.load_settings()
        self.target = grpc_target(environment.host or self.host)
        self.channel: grpc.Channel | None = None
        self.pool: InputPool | None = None
        #: The request event's ``context`` for every call of this user (built once: the hot path stays lean).
        self.request_context: dict[str, Any] = {
            "batch_size": self.settings.batch_size,
            "encoding": self.settings.encoding,
            **self.context(),
        }

    def load_settings(self) -> LoadSettings:
        return LoadSettings.from_options(self.environment.parsed_options)

    def on_start(self) -> None:
        channel = grpc.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        try:
            grpc.channel_ready_future(channel).result(timeout=self.connect_timeout_s)
            self.pool = shared_pool(channel, self.target, self.settings)
        except BaseException:
            channel.close()
            raise
        self.channel = channel
        self.stub = pb_grpc.GRPCInferenceServiceStub(channel)
        self._model_infer = self.timed("ModelInfer")

    def timed(self, rpc: str) -> TimedRpc:
        """``rpc`` (a unary GRPCInferenceService method name) on this user's channel, timed."""
        recorder = recorder_for(self.environment)
        return TimedRpc(getattr(self.stub, rpc), rpc, self.environment, self.request_context, recorder)

    def on_stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def infer(
        self, request: pb.ModelInferRequest | None = None, timeout: float | None = None
    ) -> pb.ModelInferResponse | None:
        """One ModelInfer (a pooled request by default); None when it failed (already reported)."""
        if request is None:
            assert self.pool is not None, "infer() before on_start()"
            request = self.pool.next()
        try:
            return self._model_infer(request, timeout=self.settings.deadline_s if timeout is None else timeout)
        except grpc.RpcError:
            return None

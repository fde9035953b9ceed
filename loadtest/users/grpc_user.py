"""Locust users that speak the Open Inference Protocol over gRPC.

- ``GrpcUser``: abstract Locust user. The users of a process share its gRPC channels
  (``LoadSettings.connections`` HTTP/2 connections, 1 by default, users assigned
  round-robin), opened once and kept for the process: one channel per user would also
  mean one completion thread per user (see ``loadtest.users.gevent_grpc``).
- ``TimedRpc``: one unary RPC, timed with ``time.perf_counter``; each call fires
  ``environment.events.request`` (name ``<model>/<RPC>``, ``exception=`` on failure, never
  a success/failure split in the request type) and, when recording, its exact figures.
  ``__call__`` waits in the calling greenlet (closed loop); ``start`` only sends, and
  reports from the hub when the reply comes (open loop: no greenlet per request, and the
  latency counts from the scheduled send time it is given).
- ModelInfer goes out pre-serialized (``InputPool.payloads``) and its reply is not parsed:
  the generator spends its CPU on gRPC, not on protobuf or numpy.
- TLS, mutual TLS and the bearer token: ``loadtest.users.security`` (read once per process,
  ``security_for``); the token's metadata is built once and goes with every call.

The gevent-free parts live in ``loadtest.workload`` (settings, input pool) and
``loadtest.users.latency_file`` (the exact latency files).

Import order matters: ``locust`` (gevent monkey-patching) first, and
``grpc.experimental.gevent.init_gevent()`` before any channel exists; importing this
module does both, and installs ``loadtest.users.gevent_grpc``.
"""

from __future__ import annotations

from locust import User  # first: gevent must patch the stdlib before grpc/ssl are used

# isort: split
import itertools
import os
import sys
import time
import weakref
from collections.abc import Callable
from typing import Any

import gevent.lock
import grpc
import grpc.experimental.gevent
from gevent._waiter import Waiter
from locust.env import Environment
from locust.exception import LocustError

from client.targets import split_targets
from contract.protocol import inference_pb2 as pb
from loadtest.users import gevent_grpc
from loadtest.users.latency_file import OK_ID, LatencyRecorder
from loadtest.users.security import NO_SECURITY, ChannelSecurity
from loadtest.workload import InputPool, LoadSettings, grpc_target

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name

_gevent_ready_pid: int | None = None
#: The interpreter's GIL switch interval in Locust processes (see ``init_gevent_grpc``).
SWITCH_INTERVAL_S = 0.001


def init_gevent_grpc() -> None:
    """Make gRPC cooperate with gevent, once per process.

    Without it every blocking gRPC call holds the gevent hub, so all users of a process
    silently take turns and the load serializes.
    """
    global _gevent_ready_pid
    if _gevent_ready_pid != os.getpid():
        grpc.experimental.gevent.init_gevent()
        gevent_grpc.install()
        # Replies are timed on gRPC's completion thread once it holds the GIL; a busy hub
        # hands the GIL over every switch interval (5 ms by default), which would count as latency.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        _gevent_ready_pid = os.getpid()


init_gevent_grpc()


class RpcFailure(grpc.RpcError):
    """A failed call as Locust reports it: ``CODE: details`` (so equal errors group together)."""

    def __init__(self, code: grpc.StatusCode | None, details: str | None) -> None:
        self._code = code
        self._details = details
        name = code.name if code else "UNKNOWN"
        super().__init__(f"{name}: {details}" if details else name)

    def code(self) -> grpc.StatusCode | None:  # type: ignore[override]
        return self._code

    def details(self) -> str | None:
        return self._details


class ClientBacklog(Exception):
    """An open-loop request that was never sent: too many requests already in flight."""


# ---- exact latencies ----

_recorders: weakref.WeakKeyDictionary[Environment, LatencyRecorder] = weakref.WeakKeyDictionary()


def attach_recorder(environment: Environment) -> LatencyRecorder:
    """Record exact latencies of every user of ``environment`` created from now on."""
    return _recorders.setdefault(environment, LatencyRecorder())


def detach_recorder(environment: Environment) -> None:
    """Stop recording for users created from now on."""
    _recorders.pop(environment, None)


def recorder_for(environment: Environment) -> LatencyRecorder | None:
    return _recorders.get(environment)


# ---- channel security ----

_security: weakref.WeakKeyDictionary[Environment, ChannelSecurity] = weakref.WeakKeyDictionary()


def security_for(environment: Environment) -> ChannelSecurity:
    """The TLS material and token of ``environment``'s options, read (and checked) on the first ask.

    Kept for the process: a worker keeps what it read at start even when the master's
    spawn message later brings the master's option values. ``ValueError`` names a bad option.
    """
    found = _security.get(environment)
    if found is None:
        found = _security[environment] = ChannelSecurity.from_options(environment.parsed_options)
    return found


# ---- timing ----

#: What a finished call hands to its continuation: (serialized reply or None, RpcFailure or None).
Outcome = tuple[bytes | None, RpcFailure | None]


class Pending:
    """A call in flight. ``abandon`` cancels it: it is then never reported (its caller was stopped)."""

    __slots__ = ("abandoned", "call")

    def __init__(self) -> None:
        self.call: Any = None
        self.abandoned = False

    def abandon(self) -> None:
        self.abandoned = True
        if self.call is not None:
            gevent_grpc.cancel(self.call, "the load-test user stopped")


class TimedRpc:
    """One unary RPC of a channel, timed: every call fires Locust's request event.

    ``request_type="grpc"``, ``name="<model>/<RPC>"``, ``response_time`` in ms (float, from
    ``time.perf_counter``: from the scheduled time when ``start`` is given one),
    ``response_length`` the reply's size, ``exception=RpcFailure`` on failure. The end time
    is taken on the completion thread as the reply arrives, not when the hub gets to it.
    Requests go out serialized (messages are serialized here); ``__call__`` parses the reply
    with ``reply_type`` when given, and returns it serialized otherwise. Calls start on the
    channel's core (``gevent_grpc.RawUnary``), neither through an interceptor nor a stub;
    ``metadata`` (the bearer token) goes with each, built once here.
    """

    __slots__ = ("_completions", "_context", "_fire", "_names", "_record", "_reply_type", "_rpc", "_status", "_unary")

    def __init__(
        self,
        channel: grpc.Channel,
        rpc: str,
        environment: Environment,
        context: dict[str, Any] | None = None,
        recorder: LatencyRecorder | None = None,
        reply_type: Any = None,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self._unary = gevent_grpc.RawUnary(channel, f"/{SERVICE}/{rpc}", metadata)
        self._rpc = rpc
        self._reply_type = reply_type
        self._fire = environment.events.request.fire
        self._context = context if context is not None else {}
        self._record = recorder.record if recorder is not None else None
        self._status = recorder.status_id if recorder is not None else None
        self._names: dict[str, str] = {}
        self._completions = gevent_grpc.completions()

    def __call__(self, request: Any, timeout: float | None = None, name: str | None = None) -> Any:
        """Call and wait; the reply, or the ``RpcFailure`` raised (after it was reported)."""
        waiter = Waiter(self._completions.hub)
        pending = self.start(request, timeout, then=waiter.switch, name=name)
        try:
            reply, error = waiter.get()
        except BaseException:  # this greenlet was killed (a user stopped): the call goes unreported
            pending.abandon()
            raise
        if error is not None:
            raise error
        return reply if self._reply_type is None else self._reply_type.FromString(reply)

    def start(
        self,
        request: Any,
        timeout: float | None,
        *,
        scheduled: float | None = None,
        then: Callable[[Outcome], None] | None = None,
        name: str | None = None,
    ) -> Pending:
        """Send without waiting; the reply is reported from the hub, which then calls ``then((reply, error))``.

        ``scheduled``: the ``perf_counter`` time the request was due (open loop); latency and
        send lag count from it. ``name``: the request name (default ``<model>/<RPC>`` from
        the request message).
        """
        label = name or self._name(request)
        payload = request if isinstance(request, bytes) else request.SerializeToString()
        pending = Pending()
        completions = self._completions
        post = completions.post
        finish = self._finish
        sent = time.perf_counter()
        due = sent if scheduled is None else scheduled

        def done(code: grpc.StatusCode, details: str, reply: bytes | None, end: float) -> None:
            post(finish, pending, label, due, sent, code, details, reply, end, then)

        pending.call = self._unary.start(payload, timeout, done)
        completions.expect()
        return pending

    def _finish(
        self,
        pending: Pending,
        label: str,
        scheduled: float,
        sent: float,
        code: grpc.StatusCode,
        details: str,
        reply: bytes | None,
        end: float,
        then: Callable[[Outcome], None] | None,
    ) -> None:
        pending.call = None  # the call's state refers back to this callback: no cycle left for the collector
        if pending.abandoned:
            return
        error = None if reply is not None else RpcFailure(code, details)
        if self._record is not None and self._status is not None:
            status = OK_ID if error is None else self._status(code.name if code is not None else "UNKNOWN", details)
            self._record((scheduled, end - scheduled, error is None, sent - scheduled, status))
        self._fire(
            request_type="grpc",
            name=label,
            response_time=(end - scheduled) * 1000.0,
            response_length=0 if reply is None else len(reply),
            exception=error,
            context=self._context,
        )
        if then is not None:
            then((reply, error))

    def _name(self, request: Any) -> str:
        model: str | None = getattr(request, "model_name", None)
        if model is None:
            model = str(getattr(request, "name", ""))
        name = self._names.get(model)
        if name is None:
            name = self._names[model] = f"{model}/{self._rpc}" if model else self._rpc
        return name


# ---- channels and inputs, shared by the users of a process ----

_channels: dict[tuple[str, int, ChannelSecurity], grpc.Channel] = {}
_pools: dict[tuple[str, LoadSettings], InputPool] = {}
_shared_lock = gevent.lock.BoundedSemaphore()
_user_numbers = itertools.count()


def shared_channel(
    target: str, index: int = 0, connect_timeout_s: float = 10.0, security: ChannelSecurity = NO_SECURITY
) -> grpc.Channel:
    """The process's ``index``-th channel to ``target`` (TLS per ``security``): opened (and
    connected) once, kept until ``close_channels``."""
    key = (target, index, security)
    with _shared_lock:
        channel = _channels.get(key)
        if channel is None:
            channel = gevent_grpc.open_channel(lambda: security.open_channel(target))
            try:
                grpc.channel_ready_future(channel).result(timeout=connect_timeout_s)
            except BaseException:
                channel.close()
                raise
            _channels[key] = channel
        return channel


def close_channels() -> None:
    """Close every shared channel (at the end of a process's load tests, before it exits).

    Calls still in flight are cancelled; this returns once gRPC's spin threads are idle, so that
    none is inside gRPC while the interpreter shuts down.
    """
    with _shared_lock:
        channels = list(_channels.values())
        _channels.clear()
    gevent_grpc.close(channels)


def shared_pool(
    channel: grpc.Channel, target: str, settings: LoadSettings, metadata: tuple[tuple[str, str], ...] = ()
) -> InputPool:
    """The process-wide pool for (target, settings): built once, by the first user that asks
    (its ModelMetadata and ModelConfig calls carry ``metadata``)."""
    key = (target, settings)
    with _shared_lock:
        if key not in _pools:
            _pools[key] = InputPool.from_server(channel, settings, metadata=metadata)
        return _pools[key]


# ---- users ----


class GrpcUser(User):
    """Abstract OIP user on the process's shared channels, calls timed by ``TimedRpc``.

    Subclasses add tasks: ``self.infer()`` for ModelInfer, ``self.timed("ModelMetadata")``
    for any other unary RPC. Settings come from the locustfile's options (override
    ``load_settings`` to set them otherwise), TLS and token too (``security_for``).
    """

    abstract = True
    #: Seconds to wait for the connection in ``on_start`` (kept out of the measurements).
    connect_timeout_s: float = 10.0

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.settings = self.load_settings()
        try:
            self.targets = split_targets(grpc_target(environment.host or self.host))
            self.security = security_for(environment)
        except ValueError as error:
            raise LocustError(str(error)) from None
        self.target = self.targets[0]  # this user's server: chosen in on_start
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
        # Users spread over the servers of a list target, then over each one's connections.
        number = next(_user_numbers)
        self.target = self.targets[number % len(self.targets)]
        index = number // len(self.targets) % self.settings.connections
        self.channel = shared_channel(self.target, index, self.connect_timeout_s, self.security)
        self.pool = shared_pool(self.channel, self.target, self.settings, self.security.metadata)
        self._payloads = self.pool.payload_cycle()
        self.infer_name = f"{self.pool.model}/ModelInfer"
        self.infer_rpc = self.timed("ModelInfer")

    def timed(self, rpc: str, reply_type: Any = None) -> TimedRpc:
        """``rpc`` (a unary GRPCInferenceService method name) on this user's channel, timed.

        Its calls return the reply parsed as ``reply_type`` (e.g. ``pb.ModelMetadataResponse``),
        or serialized when None.
        """
        assert self.channel is not None, "timed() before on_start()"
        recorder = recorder_for(self.environment)
        return TimedRpc(
            self.channel, rpc, self.environment, self.request_context, recorder, reply_type, self.security.metadata
        )

    def on_stop(self) -> None:
        self.channel = None  # shared: closed with the process's others (close_channels)

    def next_payload(self) -> bytes:
        """The next pooled request, serialized."""
        return next(self._payloads)

    def infer(self, request: pb.ModelInferRequest | None = None, timeout: float | None = None) -> bytes | None:
        """One ModelInfer (a pooled request by default); its serialized reply, or None when it failed (reported)."""
        if request is None:
            payload, name = self.next_payload(), self.infer_name
        else:
            payload, name = request.SerializeToString(), f"{request.model_name}/ModelInfer"
        try:
            reply: bytes = self.infer_rpc(
                payload, timeout=self.settings.deadline_s if timeout is None else timeout, name=name
            )
        except RpcFailure:
            return None
        return reply

"""gRPC calls from gevent greenlets without a native-thread round trip per call.

grpcio's gevent support (``grpc.experimental.gevent.init_gevent``, which every Locust
process must run) makes each wait for a completion-queue event a task of gevent's thread
pool: a hand-off to a native thread and back, through pure-Python queues and conditions,
for every event. On this project's 2-core box a blocking unary call from a greenlet cost
230-290 µs of generator CPU that way, against about 180 µs from plain threads.

Two things change that (and a third detail, see ``install``), all on grpc's internals (grpcio is pinned; the load tests
exercise every path, so a grpcio that moves them fails there):

- ``install()``: grpc's "channel spin", the loop that takes a channel's call events from
  its completion queue and hands each to its call, runs on a native thread (from a small
  pool of them) instead of a greenlet, so it waits in C without touching the hub.
- ``RawUnary``: a unary call started straight on the channel's core (serialized request
  in, serialized reply out, one batch of six operations, the channel's own call
  bookkeeping), without grpc's per-call Python state (a condition variable, a rendezvous
  object, locks), which cost more than the call itself from a greenlet. Its callback runs
  on the spin thread with the status and the reply, and hands them to the hub with
  ``Completions.post``: one libev async watcher wakes the hub, which runs everything
  posted since in one go.

The hub and the spin threads share a channel's call state under two locks: grpc's channel
lock (cygrpc's ``_ChannelState.condition``) and its call count's (``_ChannelCallState.lock``).
Made after monkey-patching, both would be gevent locks, and those lose wakeups across
threads: a spin thread that releases one schedules the wakeup of the greenlet waiting for it
on its own thread's hub (grpc's ``_latent_event`` gives each spin thread one), and that hub
never runs, so the greenlet waits forever for a free lock. Locust hung so as it stopped its
users (their greenlets in ``cancel``). ``open_channel`` makes both locks native
(``NativeCondition``): no holder switches greenlets while holding one, so a greenlet that
finds one held waits natively, for microseconds, until a spin thread lets go. Such a channel
serves ``RawUnary`` and blocking calls (``stub.Method(request)``), not ``future()`` or
streaming calls, whose per-call state a spin thread updates under gevent locks. ``close`` the
channels before the process exits, so that no spin thread is inside gRPC as it shuts down.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import gevent
import gevent.monkey
import grpc
from gevent.hub import Hub, get_hub
from grpc import _channel as grpc_channel
from grpc import _common as grpc_common
from grpc import _observability as grpc_observability
from grpc._cython import cygrpc  # type: ignore[attr-defined]

log = logging.getLogger(__name__)

_SimpleQueue = gevent.monkey.get_original("queue", "SimpleQueue")
_start_new_thread = gevent.monkey.get_original("_thread", "start_new_thread")
_allocate_lock = gevent.monkey.get_original("_thread", "allocate_lock")
_NativeLock = type(_allocate_lock())
#: How often a waiter on a ``NativeCondition`` (only ever a closing channel) looks again.
WAIT_POLL_S = 0.001
#: How long ``close`` waits for the spin threads to finish the closed channel's last calls.
SPIN_END_TIMEOUT_S = 5.0


class SpinThreads:
    """Native threads that each run one channel spin at a time; an idle one takes the next.

    A spin ends when its channel has no call left; its thread then waits for the next
    spin instead of exiting, so a channel that goes idle between calls costs a queue
    hand-off to restart, not a new thread. A spin never waits for a busy thread: one is
    started when none is idle.
    """

    def __init__(self) -> None:
        self._jobs = _SimpleQueue()
        self._lock = _allocate_lock()
        self._idle = 0
        self.threads = 0

    def run(self, job: Callable[[], None]) -> None:
        with self._lock:
            start = self._idle == 0
            if start:
                self.threads += 1
            else:
                self._idle -= 1
        if start:
            _start_new_thread(self._serve, ())
        self._jobs.put(job)

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                job()
            except BaseException:  # a spin that dies would strand its calls: say so loudly
                log.exception("gRPC channel spin failed")
            with self._lock:
                self._idle += 1

    def busy(self) -> int:
        """Threads running a spin (or about to: one handed over and not yet taken counts too)."""
        with self._lock:
            return self.threads - self._idle


_spin_threads = SpinThreads()
_installed = False


def _native_channel_spin(state: Any) -> None:
    """grpc's ``_run_channel_spin_thread``, on a native thread: the same loop as grpc's own.

    It takes the channel's call events until the channel manages no call any more (grpc
    counts them in ``state.managed_calls`` and starts a spin when the count leaves 0).
    """

    def spin() -> None:
        while True:
            cygrpc.block_if_fork_in_progress(state)
            event = state.channel.next_call_event()
            if event.completion_type == cygrpc.CompletionType.queue_timeout:
                continue
            if event.tag(event):
                with state.lock:
                    state.managed_calls -= 1
                    if state.managed_calls == 0:
                        return

    _spin_threads.run(spin)


class NativeCondition:
    """What cygrpc uses of a ``threading.Condition``, on a native lock (see the module docstring).

    ``notify``/``notify_all`` do nothing and ``wait`` lets go of the lock for ``WAIT_POLL_S``:
    cygrpc's only waiter, ``Channel.close``, waits in loops on its predicates (calls and
    connectivity watches drained), so it needs no wakeup, and in the hub it sleeps
    cooperatively, letting the greenlets it waits for run.
    """

    def __init__(self) -> None:
        self._lock = _allocate_lock()

    def __enter__(self) -> bool:
        return self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def wait(self, timeout: float | None = None) -> bool:
        self._lock.release()
        try:
            gevent.sleep(WAIT_POLL_S if timeout is None else min(timeout, WAIT_POLL_S))
        finally:
            self._lock.acquire()
        return True

    def notify(self, n: int = 1) -> None:
        return None

    def notify_all(self) -> None:
        return None


def open_channel(opener: Callable[[], grpc.Channel]) -> grpc.Channel:
    """The channel ``opener()`` makes (e.g. ``lambda: grpc.insecure_channel(target)``), on native locks.

    cygrpc makes its channel lock with ``threading.Condition()`` while the channel is made (in
    this thread, without a greenlet switch): that one call gets a ``NativeCondition``.
    ``RuntimeError`` when this grpcio made none or several (loadtest.users.gevent_grpc needs updating).
    """
    install()
    made: list[NativeCondition] = []

    def condition() -> NativeCondition:
        made.append(NativeCondition())
        return made[-1]

    gevent_condition = threading.Condition
    threading.Condition = condition  # type: ignore[assignment,misc]
    try:
        channel = opener()
    finally:
        threading.Condition = gevent_condition  # type: ignore[misc]
    if len(made) != 1:
        channel.close()
        raise RuntimeError(f"this grpcio made {len(made)} channel locks with threading.Condition, not 1: "
                           "loadtest.users.gevent_grpc needs updating")  # fmt: skip
    channel._call_state.lock = _allocate_lock()  # type: ignore[attr-defined]
    return channel


def close(channels: Iterable[grpc.Channel], timeout: float = SPIN_END_TIMEOUT_S) -> None:
    """Close these channels (every one the process opened; their calls are cancelled) and wait, at
    most ``timeout`` s, until no spin thread runs: none is left inside gRPC."""
    for channel in channels:
        channel.close()
    deadline = time.monotonic() + timeout
    while _spin_threads.busy() and time.monotonic() < deadline:
        gevent.sleep(WAIT_POLL_S)


class _CurrentPlugin:
    """``grpc._observability.get_plugin()`` without its lock: the plugin as it is now."""

    def __enter__(self) -> Any:
        return grpc_observability._OBSERVABILITY_PLUGIN

    def __exit__(self, *exc: object) -> None:
        return None


_current_plugin = _CurrentPlugin()


def _get_plugin() -> _CurrentPlugin:
    return _current_plugin


def install() -> None:
    """Run channel spins on native threads (once per process; after ``init_gevent``).

    Also reads grpc's observability plugin (asked for on every call) without taking its lock:
    under gevent that lock is a pure-Python RLock, and with a generator-based context manager
    around it, about a sixth of a call's cost in the hub. A load generator registers no plugin.
    """
    global _installed
    if _installed:
        return
    for module, name in ((grpc_channel, "_run_channel_spin_thread"), (grpc_observability, "get_plugin")):
        if not callable(getattr(module, name, None)):
            raise RuntimeError(f"this grpcio has no {module.__name__}.{name}: loadtest.users.gevent_grpc needs one")
    grpc_channel._run_channel_spin_thread = _native_channel_spin
    grpc_observability.get_plugin = _get_plugin  # type: ignore[assignment]
    _installed = True


class Completions:
    """Callables posted from any thread, run in one gevent hub, in batches.

    ``post`` is thread-safe (a deque append and a libev async send). The hub runs what was
    posted in order; an exception goes to the hub's error handler, like any callback's.
    ``expect``/``done`` count outstanding posts, so that the watcher keeps the hub's loop
    alive only while a post is due.
    """

    def __init__(self, hub: Hub | None = None) -> None:
        self.hub = hub or get_hub()
        self._ready: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = collections.deque()
        self._watcher = self.hub.loop.async_()
        self._watcher.start(self._run)
        self._watcher.ref = False
        self._send = self._watcher.send
        self.pending = 0

    def expect(self) -> None:
        """One more post is due (call in the hub's thread before the work that posts)."""
        self.pending += 1
        if self.pending == 1:
            self._watcher.ref = True

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        self._ready.append((fn, args))
        self._send()

    def _run(self) -> None:
        ready = self._ready
        while ready:
            fn, args = ready.popleft()
            self.pending -= 1
            try:
                fn(*args)
            except Exception:
                self.hub.handle_error(fn, *sys.exc_info())
        if self.pending <= 0:
            self.pending = 0
            self._watcher.ref = False


_completions: dict[int, Completions] = {}


def completions() -> Completions:
    """The ``Completions`` of this thread's hub (created on first use)."""
    hub = get_hub()
    found = _completions.get(id(hub))
    if found is None or found.hub is not hub:
        found = _completions[id(hub)] = Completions(hub)
    return found


#: A finished call's status code (``grpc.StatusCode``), details, serialized reply (None when
#: failed) and ``time.perf_counter`` when the completion thread saw it end.
Done = Callable[[grpc.StatusCode, str, bytes | None, float], None]

_STATUS_CODES = grpc_common.CYGRPC_STATUS_CODE_TO_STATUS_CODE
_RECEIVE_STATUS = cygrpc.OperationType.receive_status_on_client
_RECEIVE_MESSAGE = cygrpc.OperationType.receive_message


class RawUnary:
    """One unary method of a channel, called with a serialized request (see the module docstring).

    ``start(payload, timeout, done)`` sends and returns the call (``cancel`` it to give up);
    ``done(code, details, reply, end)`` then runs once, on the channel's spin thread: keep
    it short and thread-safe (``Completions.post`` is). ``metadata`` (e.g. the bearer token)
    goes with every call, as given once here.
    """

    __slots__ = ("_create", "_handle", "_metadata", "_method")

    def __init__(self, channel: grpc.Channel, method: str, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        install()
        state = channel._call_state  # type: ignore[attr-defined]
        if not isinstance(state.lock, _NativeLock):
            raise ValueError("RawUnary needs a channel of loadtest.users.gevent_grpc.open_channel (native locks)")
        self._create = grpc_channel._channel_managed_call_management(state)
        self._method = method.encode()
        self._handle = channel._get_registered_call_handle(method)  # type: ignore[attr-defined]
        self._metadata = tuple(metadata) or None

    def start(self, payload: bytes, timeout: float | None, done: Done) -> Any:
        operations = (
            cygrpc.SendInitialMetadataOperation(self._metadata, 0),
            cygrpc.SendMessageOperation(payload, 0),
            cygrpc.SendCloseFromClientOperation(0),
            cygrpc.ReceiveInitialMetadataOperation(0),
            cygrpc.ReceiveMessageOperation(0),
            cygrpc.ReceiveStatusOnClientOperation(0),
        )

        def handle(event: Any) -> bool:
            end = time.perf_counter()
            code, details, reply = grpc.StatusCode.UNKNOWN, "", None
            for operation in event.batch_operations:
                kind = operation.type()
                if kind == _RECEIVE_STATUS:
                    code = _STATUS_CODES.get(operation.code(), grpc.StatusCode.UNKNOWN)
                    details = operation.details()
                elif kind == _RECEIVE_MESSAGE:
                    reply = operation.message()
            done(code, details, reply if code == grpc.StatusCode.OK else None, end)
            return True  # one batch: the call is over

        deadline = None if timeout is None else time.time() + timeout
        flags = cygrpc.PropagationConstants.GRPC_PROPAGATE_DEFAULTS
        return self._create(flags, self._method, None, deadline, None, None, (operations,), handle, None,
                            self._handle)  # fmt: skip


def cancel(call: Any, details: str) -> None:
    """Give up a call started by ``RawUnary.start`` (its ``done`` still runs, with CANCELLED)."""
    call.cancel(cygrpc.StatusCode.cancelled, details)

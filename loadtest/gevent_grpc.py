"""gRPC calls from gevent greenlets without a native-thread round trip per call.

grpcio's gevent support (``grpc.experimental.gevent.init_gevent``, which every Locust
process must run) makes each wait for a completion-queue event a task of gevent's thread
pool: a hand-off to a native thread and back, through pure-Python queues and conditions,
for every event. On this project's 2-core box a blocking unary call from a greenlet cost
230-290 µs of generator CPU that way, against about 180 µs from plain threads.

``install()`` changes where one loop runs: grpc's "channel spin", which takes the events of
a channel's ``future()`` calls from its completion queue and runs their callbacks, runs on
a native thread (from a small pool of them) instead of a greenlet, so it waits in C without
touching the hub, and handles every event as it comes. A call's done-callback then hands
its result to the hub with ``Completions.post``: one libev async watcher wakes the hub, which
runs everything posted since in one go. Blocking calls (``stub.Method(request)``) keep
grpc's own gevent path.

Threads touch gevent's (monkey-patched) locks of grpc's call state from the spin thread;
gevent supports locks shared between native threads.
"""

from __future__ import annotations

import collections
import logging
import sys
from collections.abc import Callable
from typing import Any

import gevent.monkey
from gevent.hub import Hub, get_hub
from grpc import _channel as grpc_channel
from grpc._cython import cygrpc  # type: ignore[attr-defined]

log = logging.getLogger(__name__)

_SimpleQueue = gevent.monkey.get_original("queue", "SimpleQueue")
_start_new_thread = gevent.monkey.get_original("_thread", "start_new_thread")
_allocate_lock = gevent.monkey.get_original("_thread", "allocate_lock")


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


def install() -> None:
    """Run channel spins on native threads (once per process; after ``init_gevent``)."""
    global _installed
    if _installed:
        return
    if not callable(getattr(grpc_channel, "_run_channel_spin_thread", None)):
        raise RuntimeError("this grpcio has no grpc._channel._run_channel_spin_thread: loadtest.gevent_grpc needs one")
    grpc_channel._run_channel_spin_thread = _native_channel_spin
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

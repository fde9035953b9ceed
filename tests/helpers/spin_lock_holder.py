"""Test-only Locust plugin (``-f loadtest/locustfile.py,tests/helpers/spin_lock_holder.py``): as Locust
stops its users, a gRPC spin thread holds the channel lock.

cygrpc notifies its channel lock after handling a call event, still holding it. When the test
stops, the first spin thread to get there then sleeps 200 ms (natively), and the hub waits
until it does: the users' cancellations, as Locust stops them, find the lock held by a spin
thread. That is the race behind Locust hanging at stop, made certain.
"""

from __future__ import annotations

from locust import events  # first: gevent monkey-patching

# isort: split
import threading
from collections.abc import Callable
from typing import Any

import gevent.monkey

from loadtest.users import gevent_grpc

HOLD_S = 0.2

_native_sleep = gevent.monkey.get_original("time", "sleep")
_native_thread_id = gevent.monkey.get_original("_thread", "get_ident")
_allocate_lock = gevent.monkey.get_original("_thread", "allocate_lock")
_hub_thread = _native_thread_id()
_armed = [False]
_arming = _allocate_lock()
_holding = _allocate_lock()  # released by the spin thread that holds the channel lock
_holding.acquire()


def _then_hold(notify_all: Callable[[Any], None]) -> Callable[[Any], None]:
    def notify_all_then_hold(self: Any) -> None:
        notify_all(self)
        if _native_thread_id() == _hub_thread:
            return
        with _arming:
            hold, _armed[0] = _armed[0], False
        if hold:
            _holding.release()
            _native_sleep(HOLD_S)

    return notify_all_then_hold


#: The channel lock as grpc makes it (threading.Condition) and as loadtest.users.gevent_grpc does.
_LOCK_CLASSES: tuple[Any, ...] = (threading.Condition, gevent_grpc.NativeCondition)
for _lock_class in _LOCK_CLASSES:
    _lock_class.notify_all = _then_hold(_lock_class.notify_all)


@events.test_stopping.add_listener
def hold_the_channel_lock(**_: Any) -> None:
    with _arming:
        _armed[0] = True
    _holding.acquire(timeout=5)  # the hub waits (natively) until a spin thread holds the lock

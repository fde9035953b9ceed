"""Test-only Locust plugin (``-f loadtest/locustfile.py,tests/helpers/lag_injector.py``): a generator that lags.

Every 200 ms it blocks the gevent hub for 60 ms with a real (unpatched) sleep, as a load
generator short of CPU would stall: no greenlet runs, so scheduled sends go out late.
"""

from __future__ import annotations

from locust import events  # first: gevent monkey-patching

# isort: split
from typing import Any

import gevent
import gevent.monkey

_blocking_sleep = gevent.monkey.get_original("time", "sleep")


@events.test_start.add_listener
def stall_the_hub(**_: Any) -> None:
    def stall() -> None:
        while True:
            gevent.sleep(0.2)
            _blocking_sleep(0.06)

    gevent.spawn(stall)

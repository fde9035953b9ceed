"""The locustfile, where Locust users look for it: ``locust -f loadtest/locustfile.py --host HOST``.

Everything lives in ``loadtest.users.locustfile`` (its docstring has the options and the
shapes); this file only brings its users, shape and event listeners into Locust's view.
"""

from __future__ import annotations

from locust import events  # first: gevent monkey-patching, before anything imports ssl

# isort: split
from loadtest.users.locustfile import ConfigurableShape, InferUser, OpenLoopInferUser

__all__ = ["ConfigurableShape", "InferUser", "OpenLoopInferUser", "events"]

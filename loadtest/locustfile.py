"""The locustfile, where Locust users look for it: ``locust -f loadtest/locustfile.py --host HOST``.

Everything lives in ``loadtest.users.locustfile`` (its docstring has the options and the
shapes); this file only brings its users, shape and event listeners into Locust's view.
Locust answers ``--help`` before it reads any locustfile, so ``locust -f loadtest/locustfile.py
--help`` lists only Locust's own options; ``python -m loadtest locust --help`` lists ours too.
"""

from __future__ import annotations

from locust import events  # first: gevent monkey-patching, before anything imports ssl

# isort: split
from loadtest.users.locustfile import ConfigurableShape, InferUser, OpenLoopInferUser

__all__ = ["ConfigurableShape", "InferUser", "OpenLoopInferUser", "events"]

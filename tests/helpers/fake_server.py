"""``python -m tests.helpers.fake_server serve --model double ...``: the real command line and serving
core around the framework-free fake model, as a process (lifecycle tests).

``FAKE_FORWARD_S`` (seconds) makes every forward pass take that long; ``inf`` makes it hang.
``FAKE_FAIL_WORKER=i`` makes worker ``i`` of a ``--workers`` server fail to load its model.
"""

from __future__ import annotations

import os
import sys
import threading

from serving.cli import main
from serving.workers import WorkerPlace
from tests.helpers.fakes import ZOO, FakeFramework

if __name__ == "__main__":
    framework = FakeFramework()
    forward_s = float(os.environ.get("FAKE_FORWARD_S", "0"))
    if forward_s == float("inf"):
        framework.controls.gate = threading.Event()  # never set: predict waits forever
    else:
        framework.controls.delay_s = forward_s
    place = WorkerPlace.from_environment()
    if place is not None and str(place.index) == os.environ.get("FAKE_FAIL_WORKER"):
        framework.controls.load_error = OSError(f"worker {place.index} cannot read its model")
    sys.exit(main(framework, zoo=ZOO))

"""The GPU check's time: one budget owns the deadline, and every wait of the check is bounded by it.

A step starts only when what is left covers it (``fits``); once started, each of its waits
(a child process, a server start, an RPC, a load run) gets ``timeout(cap)``: its own cap, or
what is left when that is less. A wait that ends because the budget did is the budget's
(``spent``), and the check reports that step as skipped for the time budget, not failed.
Child processes run in their own process group (``run``), so a timeout ends all they started.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

#: A wait shorter than this is not started: the budget counts as spent.
MIN_WAIT_S = 0.5
#: How long a stopped server may drain before it is killed, even with the budget spent.
STOP_FLOOR_S = 5.0


class OutOfTime(Exception):
    """The time budget has no room left for this wait."""


@dataclasses.dataclass
class Budget:
    """``seconds`` from ``started`` (time.monotonic)."""

    seconds: float
    started: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def deadline(self) -> float:
        return self.started + self.seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def fits(self, seconds: float) -> bool:
        """Whether a step of about ``seconds`` can finish before the deadline."""
        return self.left() >= seconds

    def spent(self) -> bool:
        return self.left() < MIN_WAIT_S

    def timeout(self, cap: float) -> float:
        """``cap``, or what is left when that is less; OutOfTime when (almost) nothing is."""
        left = self.left()
        if left < MIN_WAIT_S:
            raise OutOfTime(f"time budget of {self.seconds:g} s spent")
        return min(cap, left)

    def stop_timeout(self, cap: float = 30.0) -> float:
        """How long a server may take to stop: what is left, at least ``STOP_FLOOR_S``."""
        return min(cap, max(STOP_FLOOR_S, self.left()))

    def part(self, share: float) -> Budget:
        """A budget that ends once ``share`` of what is left now has passed."""
        now = time.monotonic()
        return Budget(self.left() * share, now)


def run(command: Sequence[str], timeout: float, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``command`` with its output captured, in its own process group: after ``timeout`` the
    whole group is killed (a compiler's worker processes too) and TimeoutExpired raised."""
    with subprocess.Popen(
        list(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env,
        start_new_session=True,
    ) as process:  # fmt: skip
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
    return subprocess.CompletedProcess(list(command), process.returncode, stdout, stderr)

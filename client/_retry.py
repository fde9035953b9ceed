"""When a failed call is sent again, and the deadline bookkeeping of its tries.

``RetryPolicy`` (public, as ``client.RetryPolicy``) says which failures may be retried and
how long to pause; ``Attempts`` applies it to one call's tries and words its final error;
``ReadinessPoll`` paces ``wait_until_ready``. Both clients use them; neither waits here.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import grpc

from client.errors import DeadlineExceededError, InferenceServerError, UnavailableError

#: How grpc's own messages begin for a call that was never sent: no connection to the
#: target, or its name did not resolve.
_NOT_CONNECTED = ("failed to connect to all addresses", "errors resolving", "DNS resolution failed")
#: What our servers answer when they refuse an inference before accepting it: loading
#: (serving/runtime.py) or draining (serving/batcher.py, serving/server.py). Such a
#: request was never queued, so sending it again cannot run it twice.
_REFUSED = ("is not ready", "not accepting new requests")
#: grpc's own text for a deadline that passed on the client's side.
_LOCAL_DEADLINE = "Deadline Exceeded"


@dataclass(frozen=True)
class RetryPolicy:
    """When a failed call is sent again, and how long the client waits before it does.

    Only UNAVAILABLE is retried, never another status code (INVALID_ARGUMENT, NOT_FOUND,
    RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED ... would fail again or may already have run).
    Calls that only read (health, readiness, metadata, config, statistics) are retried
    on any UNAVAILABLE. An inference is retried only when the failure shows that it was
    never run: the client could not connect to the server, or the server refused it
    before accepting it (loading or draining). An UNAVAILABLE that ends a call the server
    may have been computing (the connection dropped, the server stopped mid-call) is
    raised at once, unless ``retry_unsafe_infer`` accepts that it may run twice. Streams
    are never retried.

    The n-th retry waits ``backoff * multiplier**(n-1)`` seconds, capped at
    ``max_backoff``, less a random share of up to ``jitter`` of it (so that clients
    refused together do not come back together). Attempts stop after ``attempts`` tries
    or when the next pause would reach past the call's deadline: the deadline (the
    client's ``timeout`` unless the call passes its own) bounds all tries together.
    """

    #: Tries in all, the first included (1: never retry).
    attempts: int = 3
    #: Pause before the first retry, seconds.
    backoff: float = 0.1
    #: Longest pause between two tries, seconds.
    max_backoff: float = 2.0
    #: Each pause is this many times the previous one.
    multiplier: float = 2.0
    #: Share of each pause drawn at random: a pause of p lasts between p * (1 - jitter) and p.
    jitter: float = 0.5
    #: Also retry an inference after an UNAVAILABLE that may have ended it mid-run.
    retry_unsafe_infer: bool = False

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"retry attempts must be at least 1, got {self.attempts}")
        if self.backoff < 0 or self.max_backoff < self.backoff:
            raise ValueError(f"retry backoff must satisfy 0 <= backoff <= max_backoff, got {self}")
        if self.multiplier < 1:
            raise ValueError(f"retry multiplier must be at least 1, got {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"retry jitter must lie in [0, 1], got {self.jitter}")

    def pause(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first)."""
        full = min(self.backoff * self.multiplier ** (retry - 1), self.max_backoff)
        return full * (1.0 - self.jitter * (rng or random).random())

    def may_retry(self, error: InferenceServerError, call_reads_only: bool) -> bool:
        """Whether a call that failed with ``error`` may be sent again."""
        if error.code is not grpc.StatusCode.UNAVAILABLE:
            return False
        return call_reads_only or self.retry_unsafe_infer or never_ran(error)


NO_RETRY = RetryPolicy(attempts=1)


def never_ran(error: InferenceServerError) -> bool:
    """An UNAVAILABLE that proves the server did not run the call: it was never sent
    (no connection), or our server refused it before accepting it."""
    return error.message.startswith(_NOT_CONNECTED) or any(phrase in error.message for phrase in _REFUSED)


class Attempts:
    """One call's tries: the time left for each, whether to try again, and its final error.

    See ``RetryPolicy``: only UNAVAILABLE, only when it cannot run a call twice, with
    exponential backoff and jitter, never past the call's deadline.
    """

    def __init__(self, target: str, method: str, timeout: float, policy: RetryPolicy, reads_only: bool) -> None:
        self._target = target
        self._method = method
        self._timeout = timeout
        self._policy = policy
        self._reads_only = reads_only
        self._started = time.monotonic()
        self._deadline = self._started + timeout
        self.tries = 0

    def timeout(self) -> float:
        """Seconds left for the next try (counts it)."""
        self.tries += 1
        return max(self._deadline - time.monotonic(), 0.0)

    def retry_after(self, error: InferenceServerError) -> float | None:
        """Seconds to wait before the next try, or None to give up (then raise ``final(error)``)."""
        if self.tries >= self._policy.attempts or not self._policy.may_retry(error, self._reads_only):
            return None
        delay = self._policy.pause(self.tries)
        if time.monotonic() + delay >= self._deadline:
            return None
        return delay

    def final(self, error: InferenceServerError) -> InferenceServerError:
        """The error to raise: a failure to reach the server, or a deadline that passed
        without a word from it, names the target, the tries and the time they took."""
        elapsed = time.monotonic() - self._started
        tries = f"{self.tries} attempt{'s' if self.tries != 1 else ''} over {elapsed:.1f} s"
        target = self._target
        if error.code is grpc.StatusCode.UNAVAILABLE and error.message.startswith(_NOT_CONNECTED):
            reason = error.message.rsplit(": ", 1)[-1].strip("[] ")
            return UnavailableError(
                f"cannot reach the server at {target}: {reason} ({tries})", details=error.details or error.message
            )
        if error.code is grpc.StatusCode.DEADLINE_EXCEEDED and error.message == _LOCAL_DEADLINE:
            return DeadlineExceededError(
                f"no reply from {target} to {self._method} within the deadline of {self._timeout:g} s ({tries})",
                details=error.details or error.message,
            )
        return error


class ReadinessPoll:
    """Bookkeeping for ``wait_until_ready``: time left, pause between polls, the final error."""

    def __init__(self, timeout: float, interval: float) -> None:
        if timeout <= 0 or interval <= 0:
            raise ValueError("timeout and interval must be positive")
        self._timeout = timeout
        self._deadline = time.monotonic() + timeout
        self._interval = interval
        self.last: str = "no answer"

    def remaining(self) -> float:
        return max(self._deadline - time.monotonic(), 0.0)

    def pause(self) -> float | None:
        """Seconds to sleep before polling again, or None when the time is up."""
        remaining = self.remaining()
        return min(self._interval, remaining) if remaining > 0 else None

    def expired(self) -> DeadlineExceededError:
        return DeadlineExceededError(f"not ready after {self._timeout:g} s (last: {self.last})")

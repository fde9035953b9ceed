"""Open-loop (constant arrival rate) load: latency measured from the scheduled send time.

A closed-loop user sends its next request only after the previous reply, so a slow
server slows the generator down and its queueing never shows in the numbers
("coordinated omission"). ``OpenLoopUser`` is one arrival stream instead: its requests
are scheduled at fixed or Poisson (exponential) intervals, each is sent at its
scheduled time whether or not earlier replies have arrived (no greenlet waits for a
reply: the hub reports it), and its latency and deadline both count from the scheduled
time. A saturated server (or
generator) therefore shows as latency that grows with the backlog.

The target rate (``--arrival-rate``, req/s in total) is split evenly over
``--arrival-users`` streams, spread by Locust over its processes/workers. Per stream at
most ``--max-in-flight`` requests are outstanding: an arrival that finds the stream full
is not sent and counts as a failure (``ClientBacklog``; Locust sees response time 0, the
comparison counts it at the deadline). The cap only bounds the generator's memory: with
the deadline counted from the scheduled time a stream never holds more than about
``rate x deadline`` requests, so any backlog failure means the generator, not the
server, limited the offered load and the run is invalid.

Each process counts scheduled, sent, dropped, late (sent over ``LATE_S`` after their
scheduled time: the generator's hub was busy) and completed requests, and reports
offered vs achieved rate (``summary``); workers send theirs to the master.
"""

from __future__ import annotations

from locust import task  # first: gevent monkey-patching (see grpc_user)

# isort: split
import math
import random
import time
import weakref
from dataclasses import asdict, dataclass
from typing import Any

from gevent.event import Event
from locust.env import Environment
from locust.runners import MasterRunner

from loadtest.users.grpc_user import ClientBacklog, GrpcUser, Outcome, recorder_for
from loadtest.users.latency_file import UNSENT_ID

#: A send later than this after its scheduled time counts as late.
LATE_S = 0.002
ARRIVAL_PROCESSES = ("fixed", "poisson")


@dataclass(frozen=True)
class ArrivalSettings:
    """The open-loop schedule; read from the locustfile's options."""

    #: Requests per second over all streams and processes.
    rate: float = 100.0
    #: ``fixed`` intervals or ``poisson`` (exponential intervals).
    process: str = "poisson"
    #: Number of streams (OpenLoopUsers) the rate is split over.
    users: int = 4
    #: Outstanding requests per stream before arrivals are dropped as ClientBacklog.
    max_in_flight: int = 1000

    def __post_init__(self) -> None:
        if self.process not in ARRIVAL_PROCESSES:
            raise ValueError(f"arrival process {self.process!r}: expected one of {ARRIVAL_PROCESSES}")
        if self.rate <= 0 or self.users < 1 or self.max_in_flight < 1:
            raise ValueError("arrival rate, arrival users and max in flight must be positive")

    @classmethod
    def from_options(cls, options: Any) -> ArrivalSettings:
        default = cls()
        return cls(
            rate=float(getattr(options, "arrival_rate", None) or default.rate),
            process=getattr(options, "arrival", None) or default.process,
            users=int(getattr(options, "arrival_users", None) or default.users),
            max_in_flight=int(getattr(options, "max_in_flight", None) or default.max_in_flight),
        )


@dataclass
class OpenLoopStats:
    """Open-loop counters of one process (or, summed, of all workers) over one test run."""

    #: Sum of the target rates of the streams that ran (req/s).
    target_rps: float = 0.0
    scheduled: int = 0
    sent: int = 0
    dropped: int = 0
    late: int = 0
    ok: int = 0
    failed: int = 0
    max_lag_s: float = 0.0
    #: Unix times: first stream started, last stream stopped scheduling, last reply arrived.
    started: float = 0.0
    stopped: float = 0.0
    finished: float = 0.0

    def add(self, other: OpenLoopStats) -> None:
        for name in ("target_rps", "scheduled", "sent", "dropped", "late", "ok", "failed"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("max_lag_s", "stopped", "finished"):
            setattr(self, name, max(getattr(self, name), getattr(other, name)))
        self.started = min(self.started or other.started, other.started or self.started)

    def summary(self) -> dict[str, Any]:
        """Counters plus offered rate (scheduled / arrival window) and achieved rate (ok / until the last reply)."""
        window = self.stopped - self.started
        busy = self.finished - self.started
        return {
            **asdict(self),
            "window_s": round(window, 3),
            "offered_rps": round(self.scheduled / window, 2) if window > 0 else 0.0,
            "achieved_rps": round(self.ok / busy, 2) if busy > 0 else 0.0,
        }


_stats: weakref.WeakKeyDictionary[Environment, OpenLoopStats] = weakref.WeakKeyDictionary()
_worker_stats: weakref.WeakKeyDictionary[Environment, dict[str, OpenLoopStats]] = weakref.WeakKeyDictionary()


def stats_for(environment: Environment) -> OpenLoopStats:
    """This process's counters (created on first use, reset at each test start by ``install``)."""
    return _stats.setdefault(environment, OpenLoopStats())


def install(environment: Environment) -> None:
    """Reset counters per test; workers report theirs to the master (call from ``events.init``)."""

    def on_test_start(**_: Any) -> None:
        _stats[environment] = OpenLoopStats()
        _worker_stats[environment] = {}

    def on_report_to_master(data: dict[str, Any], **_: Any) -> None:
        data["openloop"] = asdict(stats_for(environment))

    def on_worker_report(client_id: str, data: dict[str, Any], **_: Any) -> None:
        if "openloop" in data:
            _worker_stats.setdefault(environment, {})[client_id] = OpenLoopStats(**data["openloop"])

    environment.events.test_start.add_listener(on_test_start)
    environment.events.report_to_master.add_listener(on_report_to_master)
    environment.events.worker_report.add_listener(on_worker_report)


def summary(environment: Environment) -> dict[str, Any] | None:
    """Offered vs achieved rate of this process (the master: of all workers); None without arrivals."""
    if isinstance(environment.runner, MasterRunner):
        total = OpenLoopStats()
        for stats in _worker_stats.get(environment, {}).values():
            total.add(stats)
    else:
        total = stats_for(environment)
    return total.summary() if total.scheduled else None


class OpenLoopUser(GrpcUser):
    """One arrival stream at ``rate / users`` req/s (see the module docstring).

    Each task run sends every arrival that is due (normally one) and ``wait_time`` sleeps
    until the next, so Locust's start/stop (graceful or not) work as for any user. A request
    is only sent from the stream's greenlet (``TimedRpc.start``): its reply is handled by the
    hub, so no greenlet waits per request. On stop, requests still in flight are waited for
    (at most one deadline and a second) so the backlog is measured too.
    """

    abstract = True

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.arrivals = ArrivalSettings.from_options(environment.parsed_options)
        self.stream_rate = self.arrivals.rate / self.arrivals.users
        self._poisson = self.arrivals.process == "poisson"
        self._next_at = 0.0
        self.in_flight = 0
        self._idle = Event()
        self._idle.set()

    def on_start(self) -> None:
        super().on_start()
        self.stats = stats_for(self.environment)
        self._record = recorder_for(self.environment)
        self._backlog = ClientBacklog(f"{self.arrivals.max_in_flight} requests in flight on this stream")
        # Fixed intervals start at a random phase so that streams do not send in lockstep.
        first = self._gap() if self._poisson else random.uniform(0.0, 1.0 / self.stream_rate)
        self._next_at = time.perf_counter() + first
        self.stats.target_rps += self.stream_rate
        self.stats.started = min(self.stats.started or math.inf, time.time())

    def _gap(self) -> float:
        return random.expovariate(self.stream_rate) if self._poisson else 1.0 / self.stream_rate

    def wait_time(self) -> float:
        return max(0.0, self._next_at - time.perf_counter())

    @task
    def arrive(self) -> None:
        now = time.perf_counter()
        while self._next_at <= now:
            scheduled = self._next_at
            self._next_at = scheduled + self._gap()
            self._send(scheduled, now)

    def _send(self, scheduled: float, now: float) -> None:
        stats = self.stats
        stats.scheduled += 1
        if self.in_flight >= self.arrivals.max_in_flight:
            stats.dropped += 1
            if self._record is not None:
                self._record.record((scheduled, -1.0, False, -1.0, UNSENT_ID))
            self.environment.events.request.fire(
                request_type="grpc",
                name=self.infer_name,
                response_time=0.0,
                response_length=0,
                exception=self._backlog,
                context=self.request_context,
            )
            return
        lag = now - scheduled
        stats.sent += 1
        if lag > LATE_S:
            stats.late += 1
            stats.max_lag_s = max(stats.max_lag_s, lag)
        self.in_flight += 1
        self._idle.clear()
        # The deadline counts from the scheduled time too; an already expired one still
        # goes out (and fails DEADLINE_EXCEEDED at once) so that it is counted.
        self.infer_rpc.start(
            self.next_payload(),
            max(self.settings.deadline_s - lag, 0.0),
            scheduled=scheduled,
            then=self._replied,
            name=self.infer_name,
        )

    def _replied(self, outcome: Outcome) -> None:
        stats = self.stats
        if outcome[1] is None:
            stats.ok += 1
        else:
            stats.failed += 1
        stats.finished = time.time()
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    def on_stop(self) -> None:
        if self._next_at:
            self.stats.stopped = max(self.stats.stopped, time.time())
        try:
            self._idle.wait(timeout=self.settings.deadline_s + 1.0)
        finally:
            super().on_stop()

"""Drain as a row: SIGTERM to each server under steady load, and what became of the calls.

After the open loop, per repeat and in ABBA order, each server the comparison started gets a
fresh process (``loadtest.servers.ServerProcess``, with the phases' flags, cores and model
repository) and an open loop of Poisson arrivals (``loadtest.driver.open_loop``: grpc.aio in
this process, not Locust, so that the signal can be sent mid-run while the arrivals go on) at
``LOAD_FRACTION`` of the lower valid closed-loop peak, as the open-loop grid reckons rates.
After ``STEADY_S`` seconds the server process gets SIGTERM; arrivals keep coming until it has
exited, and ``TAIL_S`` after. Meanwhile a poller asks grpc.health.v1 (the overall service)
every ``POLL_S`` seconds on its own connection. Running servers (``--torch-target``) and
references are not ours to stop: they have no drain.

Per run (``figures``, from the timestamps; pure):

- ``lost_calls``: calls that ended at or after the signal in anything but OK or UNAVAILABLE
  (``classify``). OK was served; UNAVAILABLE was refused before any of it was computed, which a
  client may retry elsewhere. Anything else — CANCELLED, INTERNAL, DEADLINE_EXCEEDED, UNKNOWN (a
  connection reset), RESOURCE_EXHAUSTED too — is lost. ``lost_before_signal``: the same before
  the signal, which the drain cannot have caused (the steady load was more than the server
  could take); it is shown, not judged. ``lost_window_s``: the first and last end of a lost call,
  in seconds after the signal (where in the drain they were lost), and ``lost_examples``: the
  first ``LOST_EXAMPLES`` of them (status, details, sent and ended after the signal).
- ``statuses``: every call's final status, counted.
- ``exit_s``: SIGTERM to the process's exit (None: it did not exit in grace + 1 s (its
  watchdog) + ``EXIT_MARGIN_S`` and was killed then: ``killed_after_s``, which the verdict takes
  as its time to exit, a lower bound).
- ``readiness_flip_ms``: SIGTERM to the first NOT_SERVING the poller saw (None: never seen,
  the server went away first); its resolution is the poll interval plus one health call.
- ``in_flight_at_signal``, ``served_after_signal``: calls sent before the signal and not yet
  answered, and OK answers that came after it (the drain at work).
- ``send_lag_p99_ms``: how late the generator sent (p99 over the sent calls): a busy generator
  sends late, and the load it put on the server was then less steady than asked.

results.json gets, per server, ``drain``: each figure as a list over repeats (with ``rate_rps``,
``grace_s``, ``exit_code``, ``repeat``) and a ``summary``; the verdict judges calls lost, time to
exit and readiness flip (lower is better), and the report has a table with every run.
"""

from __future__ import annotations

import asyncio
import collections
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from contract.protocol import inference_pb2 as pb
from contract.protocol import inference_pb2_grpc as pb_grpc
from loadtest import driver
from loadtest.cli import progress
from loadtest.compare.plan import Arm, abba, rate_grid
from loadtest.compare.steps import Run, path_name
from loadtest.compare.verdict import number, server_label
from loadtest.servers import ServerProcess, ServerStartError
from loadtest.stats import percentiles
from serving.settings import ServerSettings

#: The drain's load, as a fraction of the lower valid closed-loop peak (the open-loop grid's reckoning).
LOAD_FRACTION = 0.5
#: Seconds of steady load before the signal.
STEADY_S = 2.0
#: Seconds the arrivals go on after the process exited.
TAIL_S = 0.3
#: Lost calls a run records one by one.
LOST_EXAMPLES = 5
#: Health poll interval, seconds.
POLL_S = 0.005
#: A server still there this long after its grace period (and the watchdog's second) is killed.
EXIT_MARGIN_S = 5.0
#: The keys of results.json's ``drain``, one value per repeat each.
FIGURES = ("repeat", "rate_rps", "grace_s", "calls", "lost_calls", "lost_before_signal", "statuses",
           "lost_window_s", "lost_examples", "in_flight_at_signal", "served_after_signal", "send_lag_p99_ms",
           "readiness_flip_ms", "exit_s", "killed_after_s", "exit_code")  # fmt: skip


# ---------------------------------------------------------------- the figures (pure)


def classify(status: str) -> str:
    """A call's fate by its final status: ``served`` (OK), ``refused`` (UNAVAILABLE), ``unsent`` (the
    generator's own backlog, never sent: not the server's doing), else ``lost``."""
    if status == "OK":
        return "served"
    if status == "UNAVAILABLE":
        return "refused"
    if status == driver.BACKLOG:
        return "unsent"
    return "lost"


@dataclass(frozen=True)
class Timeline:
    """One drain run's events, in seconds from the open loop's origin (its arrivals' clock)."""

    signal_s: float
    exit_s: float | None
    #: (seconds, status) of every health answer: a ServingStatus name, or ``error:<code>``.
    health: Sequence[tuple[float, str]]


def figures(arrivals: Sequence[driver.Arrival], timeline: Timeline) -> dict[str, Any]:
    """The figures of one drain run (see the module docstring) from its calls and events."""
    statuses = collections.Counter(arrival.status for arrival in arrivals)
    signal_s = timeline.signal_s
    flips = [t for t, status in timeline.health if t >= signal_s and status == "NOT_SERVING"]
    lost = [a for a in arrivals if classify(a.status) == "lost"]
    drained = sorted((a for a in lost if a.scheduled + a.latency >= signal_s), key=lambda a: a.scheduled + a.latency)
    ends = [a.scheduled + a.latency - signal_s for a in drained]
    lags = np.array([a.lag for a in arrivals if a.status != driver.BACKLOG]) * 1000
    return {
        "calls": len(arrivals),
        "lost_calls": len(drained),
        "lost_before_signal": len(lost) - len(drained),
        "statuses": dict(sorted(statuses.items())),
        "lost_window_s": [ends[0], ends[-1]] if ends else None,
        "lost_examples": [
            {"status": a.status, "details": a.details[:200], "sent_s": a.scheduled + a.lag - signal_s, "ended_s": end}
            for a, end in zip(drained[:LOST_EXAMPLES], ends, strict=False)
        ],
        "in_flight_at_signal": sum(
            1
            for a in arrivals
            if a.status != driver.BACKLOG and a.scheduled + a.lag <= signal_s < a.scheduled + a.latency
        ),
        "served_after_signal": sum(1 for a in arrivals if a.status == "OK" and a.scheduled + a.latency >= signal_s),
        "send_lag_p99_ms": percentiles(lags)["p99"],
        "readiness_flip_ms": (min(flips) - signal_s) * 1000 if flips else None,
        "exit_s": None if timeline.exit_s is None else timeline.exit_s - signal_s,
    }


def summary(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Over a server's drain runs: calls lost and statuses summed, the times' mean and worst."""
    statuses: collections.Counter[str] = collections.Counter()
    for run in runs:
        statuses.update(run["statuses"])

    def spread(key: str) -> dict[str, float | None]:
        values = [run[key] for run in runs if run[key] is not None]
        return {"mean": statistics.fmean(values) if values else None, "max": max(values, default=None),
                "missing": len(runs) - len(values)}  # fmt: skip

    return {
        "runs": len(runs),
        "calls": sum(run["calls"] for run in runs),
        "lost_calls": sum(run["lost_calls"] for run in runs),
        "lost_before_signal": sum(run["lost_before_signal"] for run in runs),
        "statuses": dict(sorted(statuses.items())),
        "readiness_flip_ms": spread("readiness_flip_ms"),
        "exit_s": spread("exit_s"),
        "exit_codes": sorted({run["exit_code"] for run in runs}, key=str),
        "rate_rps": sorted({run["rate_rps"] for run in runs}),
        "grace_s": sorted({run["grace_s"] for run in runs}),
        "send_lag_p99_ms": max((run["send_lag_p99_ms"] or 0.0 for run in runs), default=None),
        "steady_s": STEADY_S,
        "health_poll_ms": POLL_S * 1000,
    }


def record(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """results.json's ``drain`` of one server: each of ``FIGURES`` as a list over its runs, and the summary."""
    return {key: [run[key] for run in runs] for key in FIGURES} | {"summary": summary(runs)}


def grace_period(server_args: Sequence[str]) -> float:
    """The ``--grace-period-s`` among server flags (the last one counts), else the servers' default."""
    value: str | None = None
    for i, arg in enumerate(server_args):
        if arg == "--grace-period-s" and i + 1 < len(server_args):
            value = server_args[i + 1]
        elif arg.startswith("--grace-period-s="):
            value = arg.partition("=")[2]
    if value is not None:
        return float(value)
    return float(ServerSettings.grace_period_s)


def drain_rate(steps: Mapping[str, Sequence[dict[str, Any]]]) -> float | None:
    """``LOAD_FRACTION`` of the lower valid closed-loop peak of the compared servers (None: no peak)."""
    rates = rate_grid(steps, [LOAD_FRACTION], 0.0)["rates"]
    return rates[0] if rates else None


# ---------------------------------------------------------------- one run against a process


class _HealthPoller(threading.Thread):
    """Asks grpc.health.v1 (the overall service) every ``interval`` s on its own channel, until stopped."""

    def __init__(self, target: str, interval: float) -> None:
        super().__init__(name="drain-health", daemon=True)
        self.target, self.interval = target, interval
        self.samples: list[tuple[float, str]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        with grpc.insecure_channel(self.target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            while not self.halt.is_set():
                asked = time.perf_counter()
                try:
                    reply = check(health_pb2.HealthCheckRequest(), timeout=0.5)
                    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                except grpc.RpcError as err:
                    status = f"error:{err.code().name}"
                # Stamped when the answer came: NOT_SERVING is known to the client from then on.
                self.samples.append((time.perf_counter(), status))
                self.halt.wait(max(0.0, self.interval - (time.perf_counter() - asked)))


class _RoundRobin:
    """ModelInfer over several connections in turn (a server of several workers needs several)."""

    def __init__(self, stubs: Sequence[pb_grpc.GRPCInferenceServiceAsyncStub]) -> None:
        self.stubs, self.turn = list(stubs), 0

    def ModelInfer(self, request: pb.ModelInferRequest, **kwargs: Any) -> Any:
        self.turn += 1
        return self.stubs[self.turn % len(self.stubs)].ModelInfer(request, **kwargs)


@dataclass
class _Clock:
    """The open loop's origin (taken at its first pull of the schedule) and when its arrivals stop."""

    origin: float = 0.0
    end: float = float("inf")


def _poisson(rate: float, clock: _Clock, seed: int) -> Iterator[tuple[str, float]]:
    """Poisson arrivals at ``rate`` per second until ``clock.end``; the first pull stamps the origin
    (``open_loop`` pulls it right after taking its own, so the two agree to a few microseconds)."""
    clock.origin = time.perf_counter()
    rng = np.random.default_rng(seed)
    offset, index = 0.0, 0
    while True:
        offset += float(rng.exponential(1.0 / rate))
        if clock.origin + offset > clock.end:
            return
        yield str(index), offset
        index += 1


def _wait_for_exit(process: subprocess.Popen[bytes], limit_s: float) -> float | None:
    """When ``process`` exited (perf_counter), or None when it outlived ``limit_s`` (then it is killed)."""
    try:
        process.wait(limit_s)
        return time.perf_counter()
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return None


async def _signal_under_load(
    server: ServerProcess, model: str, rate: float, *, deadline_s: float, batch_size: int, connections: int,
    steady_s: float, limit_s: float, poller: _HealthPoller, seed: int,
) -> tuple[list[driver.Arrival], Timeline]:  # fmt: skip
    process = server.process
    assert process is not None
    opened = driver.channels(server.target, connections)
    try:
        stubs = [pb_grpc.GRPCInferenceServiceStub(channel) for channel in opened]
        pool = await driver.RequestPool.from_metadata(stubs[0], model, batch_size, seed=seed)
        clock = _Clock()
        load = asyncio.get_running_loop().create_task(
            driver.open_loop(
                cast("pb_grpc.GRPCInferenceServiceAsyncStub", _RoundRobin(stubs)),
                pool,
                _poisson(rate, clock, seed),
                deadline_s,
            )
        )
        await asyncio.sleep(steady_s)
        if process.poll() is not None:
            clock.end = time.perf_counter()
            await load
            raise RuntimeError(f"the server exited with {process.returncode} before the signal:\n{server.log_tail()}")
        signalled = time.perf_counter()
        process.send_signal(signal.SIGTERM)
        exited = await asyncio.to_thread(_wait_for_exit, process, limit_s)
        clock.end = (exited or time.perf_counter()) + TAIL_S
        arrivals = await load
        poller.halt.set()
        await asyncio.to_thread(poller.join, 5.0)
    finally:
        for channel in opened:
            await channel.close(None)
    health = [(t - clock.origin, status) for t, status in poller.samples]
    return arrivals, Timeline(signalled - clock.origin, None if exited is None else exited - clock.origin, health)


def drain_run(
    server: ServerProcess, model: str, rate: float, *, grace_s: float, deadline_s: float, batch_size: int = 1,
    connections: int = 1, steady_s: float = STEADY_S, poll_s: float = POLL_S, seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """One drain run against a started ``server`` (which it ends): ``figures`` plus the rate, grace and exit code."""
    limit_s = grace_s + 1.0 + EXIT_MARGIN_S
    poller = _HealthPoller(server.target, poll_s)
    poller.start()
    try:
        arrivals, timeline = asyncio.run(
            _signal_under_load(
                server,
                model,
                rate,
                deadline_s=deadline_s,
                batch_size=batch_size,
                connections=connections,
                steady_s=steady_s,
                limit_s=limit_s,
                poller=poller,
                seed=seed,
            )
        )
    finally:
        poller.halt.set()
    assert server.process is not None
    found = figures(arrivals, timeline)
    killed = None if found["exit_s"] is not None else limit_s
    return {"rate_rps": rate, "grace_s": grace_s, **found, "killed_after_s": killed,
            "exit_code": server.process.returncode}  # fmt: skip


# ---------------------------------------------------------------- the comparison's phase


def phase(
    run: Run,
    arms: Sequence[Arm],
    records: dict[str, Any],
    model_dirs: dict[str, Path],
    order: list[dict[str, Any]],
    failures: list[dict[str, Any]],
) -> None:
    """Every repeat of the drain, the servers the comparison started in ABBA order, each on a fresh process;
    ``records[name]["drain"]`` gets each server's ``record``."""
    opts = run.opts
    local = [arm for arm in arms if arm.kind == "local"]
    if not local:
        progress("drain: none (the servers already ran: they are not ours to stop)")
        return
    rate = drain_rate({arm.name: records[arm.name]["steps"] for arm in local})
    if rate is None:
        failures.append({"server": "all", "phase": "drain", "repeat": 0,
                         "error": "no closed-loop step measured: no peak to set the drain's load from"})  # fmt: skip
        return
    progress(f"drain: SIGTERM after {STEADY_S:g} s at {rate:g} req/s ({LOAD_FRACTION:g} x the lower peak)")
    runs: dict[str, list[dict[str, Any]]] = {arm.name: [] for arm in local}
    for repeat in range(opts.repeats):
        for arm in abba(local, repeat):
            order.append({"phase": "drain", "repeat": repeat, "arm": arm.name})
            assert arm.framework is not None
            args = [*arm.server_args, *(["--model-dir", str(model_dirs[arm.name])] if arm.name in model_dirs else [])]
            log_path = run.logs / path_name(f"{arm.name}-drain-r{repeat}.log")
            server = ServerProcess(arm.framework, opts.model, args, cpus=run.server_cpus, log_path=log_path)
            try:
                server.start()
                found = drain_run(
                    server, opts.model, rate, grace_s=grace_period(arm.server_args),
                    deadline_s=opts.deadline_ms / 1000, batch_size=opts.batch_size, connections=run.connections,
                    seed=repeat,
                )  # fmt: skip
            except (ServerStartError, RuntimeError, grpc.RpcError) as err:
                failures.append({"server": arm.name, "phase": "drain", "repeat": repeat, "error": str(err)})
                progress(f"{arm.name} drain r{repeat + 1}/{opts.repeats}: FAILED, going on: {err}")
                continue
            finally:
                server.close()
            runs[arm.name].append({"repeat": repeat, **found})
            progress(f"{arm.name} drain r{repeat + 1}/{opts.repeats}: {_run_text(found)}")
    for name, found_runs in runs.items():
        if found_runs:
            records[name]["drain"] = record(found_runs)


def _run_text(run: Mapping[str, Any]) -> str:
    flip = "not seen" if run["readiness_flip_ms"] is None else f"{run['readiness_flip_ms']:.1f} ms"
    exited = "killed" if run["exit_s"] is None else f"{run['exit_s']:.2f} s (exit {run['exit_code']})"
    statuses = ", ".join(f"{status} {count}" for status, count in run["statuses"].items())
    return (
        f"{run['lost_calls']} calls lost of {run['calls']} ({statuses}); NOT_SERVING after {flip}; "
        f"exited after {exited}"
    )


# ---------------------------------------------------------------- the report


Table = tuple[list[str], list[list[str]]]


def table(results: dict[str, Any]) -> Table:
    """A row per server and drain run: the load, the calls and their fates, the readiness flip, the exit."""
    head = ["server", "repeat", "load (req/s)", "send lag p99 (ms)", "grace (s)", "calls", "statuses", "calls lost",
            "lost at (s after SIGTERM)", "lost before SIGTERM", "in flight at SIGTERM", "OK after SIGTERM",
            "NOT_SERVING after (ms)", "exit after (s)", "exit code"]  # fmt: skip
    body = []
    for name, server in results["servers"].items():
        found = server.get("drain")
        if not found:
            continue
        for i, repeat in enumerate(found["repeat"]):
            flip, exited = found["readiness_flip_ms"][i], found["exit_s"][i]
            body.append(
                [
                    server_label(results, name),
                    str(repeat + 1),
                    f"{found['rate_rps'][i]:g}",
                    number(found["send_lag_p99_ms"][i]),
                    f"{found['grace_s'][i]:g}",
                    str(found["calls"][i]),
                    ", ".join(f"{status} {count}" for status, count in found["statuses"][i].items()),
                    str(found["lost_calls"][i]),
                    _window(found["lost_window_s"][i]),
                    str(found["lost_before_signal"][i]),
                    str(found["in_flight_at_signal"][i]),
                    str(found["served_after_signal"][i]),
                    "not seen" if flip is None else number(flip),
                    "killed" if exited is None else f"{exited:.2f}",
                    str(found["exit_code"][i]),
                ]
            )
    return head, body


def _window(window: Sequence[float] | None) -> str:
    if not window:
        return ""
    first, last = window
    return f"{first:.3f}" if last - first < 5e-4 else f"{first:.3f}–{last:.3f}"

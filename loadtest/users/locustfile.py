"""Locust load test of an Open Inference Protocol gRPC server (torch_server, tf_server, Triton...).

    locust -f loadtest/locustfile.py --host 127.0.0.1:8001                      # web UI
    locust -f loadtest/locustfile.py --host 127.0.0.1:8001 --headless -u 8 -t 30s --csv out/run
    locust -f loadtest/locustfile.py --host 127.0.0.1:8001 --headless --processes 4 -u 32 -t 30s
    locust -f loadtest/locustfile.py --host 127.0.0.1:8001 --headless -t 30s \\
        --load-shape rate --arrival-rate 500 --arrival poisson --latency-file out/lat

Every option below also reads an environment variable (``LOADTEST_<OPTION>``) and shows
in the web UI. ``--load-shape`` picks the load (one kind per run):

- ``none``: closed loop, Locust's own ``-u``/``-r``/``-t`` (InferUser, no think time);
- ``step``: closed loop, a staircase of ``--step-count`` steps of ``--step-users`` users,
  ``--step-time`` seconds each (throughput vs concurrency);
- ``spike``: closed loop, ``--base-users`` for ``--base-time`` s, ``--spike-users`` for
  ``--spike-time`` s, ``--base-users`` again for ``--base-time`` s;
- ``rate``: open loop, ``--arrival-rate`` req/s at ``fixed`` or ``poisson`` intervals over
  ``--arrival-users`` OpenLoopUsers, latency from the scheduled send time (see openloop.py).

The shape (``ConfigurableShape``, always active) also picks the user class, so that a run
is either closed loop (``InferUser``) or open loop (``OpenLoopInferUser``), never both;
``-u``/``-r`` only apply to ``none``, and ``-t`` bounds every shape. Phase changes and the
end happen on time, not on Locust's once-a-second shape tick.

``--latency-file PREFIX`` makes every load-generating process write its exact latencies to
``PREFIX.<pid>.npz`` at test stop (Locust rounds its percentiles to whole milliseconds):
format and reader in ``loadtest.users.latency_file``. Each file's
meta also holds the process's CPU time over the run (a saturated generator invalidates a
run) and, open loop, its offered vs achieved rate.

A server behind TLS, mutual TLS or a bearer token: ``--tls-ca``, ``--tls-client-cert`` /
``--tls-client-key``, ``--tls-server-name`` and ``--auth-token-file`` (or the token itself in
``LOADTEST_AUTH_TOKEN``); see ``loadtest.users.security``. Not Locust's own ``--tls-cert`` /
``--tls-key``, which serve its web UI. A bad one stops Locust at start with one line.
"""

from __future__ import annotations

from locust import LoadTestShape, User, constant, events, task  # first: gevent monkey-patching

# isort: split
import gc
import logging
import os
import sys
import time
from typing import Any

import gevent
from locust.env import Environment
from locust.runners import MasterRunner

from loadtest import openloop
from loadtest.openloop import ArrivalSettings, OpenLoopUser
from loadtest.users.grpc_user import (
    GrpcUser,
    attach_recorder,
    close_channels,
    detach_recorder,
    recorder_for,
    security_for,
)
from loadtest.users.security import TOKEN_ENV
from loadtest.workload import LoadSettings

logger = logging.getLogger(__name__)

LOAD_SHAPES = ("none", "step", "spike", "rate")
#: Users started per second when a step/spike/rate shape changes the user count.
RAMP_RATE = 100.0


@events.init_command_line_parser.add_listener
def add_options(parser: Any) -> None:
    """The load-test options, each also read from ``LOADTEST_<OPTION>``."""

    def option(flag: str, default: Any, help: str, **kwargs: Any) -> None:
        env_var = "LOADTEST_" + flag.removeprefix("--").replace("-", "_").upper()
        parser.add_argument(flag, default=default, type=type(default), env_var=env_var, help=help, **kwargs)

    option("--model", "mlp", "model to load")
    option("--model-version", "", "model version (empty: the server's default)")
    option("--batch-size", 1, "rows per request (the batch dimension of every input)")
    option("--encoding", "raw", "tensor payload: raw_input_contents or typed contents", choices=["raw", "typed"])
    option("--deadline-ms", 1000.0, "per-request gRPC deadline (open loop: from the scheduled send time)")
    option("--seq-len", "16", "size of variable (-1) non-batch dimensions: N, or MIN:MAX drawn per request")
    option("--shape", "", "inputs' shapes without the batch dimension, instead of --seq-len: NAME=D1,D2;NAME=...")
    option("--inputs", "", "an .npz of real inputs (one array per input, samples along the first dimension)")
    option("--pool-size", 64, "pre-encoded requests per process, cycled")
    option("--connections", 1, "gRPC channels (HTTP/2 connections) per process, shared by its users")
    option("--load-shape", "none", "none (-u/-r/-t), step, spike, or rate (open loop)", choices=list(LOAD_SHAPES))
    option("--step-users", 4, "step shape: users added per step")
    option("--step-time", 10.0, "step shape: seconds per step")
    option("--step-count", 5, "step shape: number of steps")
    option("--base-users", 2, "spike shape: users before and after the spike")
    option("--base-time", 10.0, "spike shape: seconds before and after the spike")
    option("--spike-users", 32, "spike shape: users during the spike")
    option("--spike-time", 5.0, "spike shape: seconds of spike")
    option("--arrival-rate", 100.0, "rate shape: requests per second offered, over all processes")
    option("--arrival", "poisson", "rate shape: arrival intervals", choices=list(openloop.ARRIVAL_PROCESSES))
    option("--arrival-users", 4, "rate shape: open-loop users (streams) the rate is split over")
    option("--max-in-flight", 1000, "rate shape: outstanding requests per stream before arrivals fail")
    option("--latency-file", "", "write exact per-request latencies to PREFIX.<pid>.npz at test stop")
    option("--tls-ca", "", "PEM root certificates to trust: talk TLS to the target")
    option("--tls-client-cert", "", "PEM certificate chain to present (mutual TLS; with --tls-client-key)")
    option("--tls-client-key", "", "PEM private key of --tls-client-cert")
    option("--tls-server-name", "", "check the server certificate against this name instead of the target host")
    option("--auth-token-file", "", f"send this file's first line as a bearer token (or set {TOKEN_ENV})")


class InferUser(GrpcUser):
    """Closed loop: ModelInfer with pooled requests, back to back (no think time)."""

    wait_time = constant(0)

    @task
    def model_infer(self) -> None:
        self.infer()


class OpenLoopInferUser(OpenLoopUser):
    """Open loop: one arrival stream of ModelInfer requests (``--load-shape rate``)."""


class ConfigurableShape(LoadTestShape):
    """The load of ``--load-shape``: its users, spawn rate and (closed or open-loop) user class.

    Locust ticks a shape once a second; when the next phase change (or the end) is less
    than a second away, ``tick`` sleeps until it so that phases start and end on time.
    """

    use_common_options = True

    def tick(self) -> tuple[int, float, list[type[User]]] | None:
        assert self.runner is not None
        options: Any = self.runner.environment.parsed_options
        elapsed = self.get_run_time()
        upcoming = [change for change in self.changes(options) if change > elapsed]
        if upcoming and upcoming[0] - elapsed < 1 and self.runner.shape_last_tick is not None:
            gevent.sleep(upcoming[0] - elapsed)
            elapsed = upcoming[0]
        return self.stage(options, elapsed)

    @staticmethod
    def changes(options: Any) -> list[float]:
        """Seconds from the start at which the stage changes, the last being the end (if any)."""
        shape = options.load_shape
        if shape == "step":
            times = [step * options.step_time for step in range(1, options.step_count + 1)]
        elif shape == "spike":
            times = [options.base_time, options.base_time + options.spike_time]
            times.append(times[-1] + options.base_time)
        else:
            times = []
        if options.run_time:
            times = [t for t in times if t < options.run_time] + [float(options.run_time)]
        return times

    @staticmethod
    def stage(options: Any, elapsed: float) -> tuple[int, float, list[type[User]]] | None:
        """(users, spawn rate, user classes) at ``elapsed`` seconds; None once the shape is over."""
        shape = options.load_shape
        if options.run_time and elapsed >= options.run_time:
            return None
        if shape == "none":
            return (options.num_users or 1, options.spawn_rate or 1.0, [InferUser])
        if shape == "step":
            step = int(elapsed // options.step_time) + 1
            return None if step > options.step_count else (step * options.step_users, RAMP_RATE, [InferUser])
        if shape == "spike":
            if elapsed >= 2 * options.base_time + options.spike_time:
                return None
            spiking = options.base_time <= elapsed < options.base_time + options.spike_time
            return (options.spike_users if spiking else options.base_users, RAMP_RATE, [InferUser])
        if shape == "rate":
            return (ArrivalSettings.from_options(options).users, RAMP_RATE, [OpenLoopInferUser])
        raise ValueError(f"--load-shape {shape!r}: expected one of {LOAD_SHAPES}")


#: perf_counter and process_time at this process's test start: the generator's CPU use per run.
_clock: dict[str, float] = {}
#: The process that imported this file: Locust's first, which forks any --processes workers.
_FIRST_PID = os.getpid()


@events.init.add_listener
def on_init(environment: Environment, **_: Any) -> None:
    openloop.install(environment)
    try:
        security_for(environment)  # reads the TLS files and the token once; fails here, not mid-run
    except ValueError as error:
        if os.getpid() == _FIRST_PID:  # forked --processes workers say nothing: their parent says it once
            sys.stderr.write(f"locust: error: {error}\n")
        sys.exit(1)


@events.test_start.add_listener
def on_test_start(environment: Environment, **_: Any) -> None:
    options: Any = environment.parsed_options
    if getattr(options, "latency_file", "") and not isinstance(environment.runner, MasterRunner):
        attach_recorder(environment).clear()
    else:
        detach_recorder(environment)
    _clock.update(wall=time.perf_counter(), cpu=time.process_time())
    # What exists now (Locust, gRPC, the input pool) lives for the whole run: keep the cyclic garbage
    # collector from scanning it again and again. Its full collections otherwise stalled the hub for
    # 50-90 ms every couple of seconds at 4,600 req/s (late sends, invalid open-loop steps).
    gc.collect()
    gc.freeze()


@events.test_stop.add_listener
def on_test_stop(environment: Environment, **_: Any) -> None:
    options: Any = environment.parsed_options
    wall = time.perf_counter() - _clock.get("wall", time.perf_counter())
    cpu = time.process_time() - _clock.get("cpu", time.process_time())
    summary = openloop.summary(environment)
    if summary is not None and not isinstance(environment.runner, MasterRunner):
        log_summary(summary)
    recorder = recorder_for(environment)
    prefix = getattr(options, "latency_file", "")
    if recorder is None or not prefix or isinstance(environment.runner, MasterRunner):
        return
    settings = LoadSettings.from_options(options)
    meta = {
        "target": environment.host,
        "mode": "open" if options.load_shape == "rate" else "closed",
        "load_shape": options.load_shape,
        "model": settings.model,
        "model_version": settings.model_version,
        "batch_size": settings.batch_size,
        "encoding": settings.encoding,
        "deadline_ms": settings.deadline_s * 1000,
        "seq_len": list(settings.seq_len),
        "connections": settings.connections,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "openloop": summary,
    }
    if options.load_shape == "rate":
        arrivals = ArrivalSettings.from_options(options)
        meta["arrival"] = {"rate": arrivals.rate, "process": arrivals.process, "users": arrivals.users}
    path = recorder.save(prefix, meta)
    logger.info("latencies written to %s (generator CPU %.0f%% of one core)", path, 100 * cpu / max(wall, 1e-9))


@events.quitting.add_listener
def on_quitting(environment: Environment, **_: Any) -> None:
    if isinstance(environment.runner, MasterRunner) and (summary := openloop.summary(environment)):
        log_summary(summary)
    # Closed before the process exits: no gRPC spin thread is then left inside gRPC (or
    # holding a call) while the interpreter shuts down.
    close_channels()


def log_summary(summary: dict[str, Any]) -> None:
    logger.info(
        "open loop: target %.1f req/s, offered %.1f, achieved %.1f req/s over %.1f s; %d scheduled, %d sent "
        "(%d late by > %.0f ms, max lag %.1f ms), %d dropped (client backlog), %d ok, %d failed",
        summary["target_rps"],
        summary["offered_rps"],
        summary["achieved_rps"],
        summary["window_s"],
        summary["scheduled"],
        summary["sent"],
        summary["late"],
        openloop.LATE_S * 1000,
        summary["max_lag_s"] * 1000,
        summary["dropped"],
        summary["ok"],
        summary["failed"],
    )

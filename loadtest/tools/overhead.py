"""What our Locust user costs the load generator: CPU per request, against a minimal one.

    python -m loadtest overhead [--mode sync|aio] [--users 8] [--seconds 5] [--rounds 2] [--rates 1000,3000]
    python -m loadtest overhead --target HOST:PORT ...     # a server that already runs

By default it starts the bare identity server (``loadtest.tools.bare``: no model, the cheapest
replies) pinned to the first half of the cores and pins itself to the rest, so the
generator's own cost is what limits it. Then, in one Locust process (Locust as a
library), it runs rounds of ``GrpcUser`` (our user: shared channel, completions off the
hub, exact latency records) and of a minimal user (one pre-built request through a plain
blocking stub, timed by hand, the request event with the fewest fields), in ABBA order
(ours, minimal, minimal, ours, ...). With ``--rates``, our open-loop user too, at those
arrival rates. Prints requests/s, generator CPU % and CPU µs per request of each run and
the medians, and whether GrpcUser meets ``TARGET_US`` per request (closed loop), on stderr;
the JSON result (every run, the medians, the verdict) to ``--out`` (or stdout). Exits 1 when
any request failed.
"""

from __future__ import annotations

from locust import User, constant, task  # first: gevent monkey-patching (see grpc_user)

# isort: split
import argparse
import dataclasses
import gc
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import gevent
import grpc
from locust.env import Environment
from locust.event import Events

from contract.protocol import inference_pb2_grpc as pb_grpc
from loadtest.cli import add_cpu_split_option, add_out_option, available_cpus, show, split_cpus, write_result
from loadtest.openloop import OpenLoopUser
from loadtest.servers import ServerProcess
from loadtest.users.grpc_user import GrpcUser, attach_recorder, close_channels, shared_pool
from loadtest.workload import CHANNEL_OPTIONS, LoadSettings

#: Generator CPU per request that leaves a one-core generator room for this box's servers (µs).
TARGET_US = 200.0


@dataclass(frozen=True)
class RunResult:
    """One run of one user class: what it sent and what it cost this process."""

    name: str
    requests: int
    failures: int
    seconds: float
    cpu_s: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def cpu_percent(self) -> float:
        return 100.0 * self.cpu_s / self.seconds

    @property
    def cpu_us_per_request(self) -> float:
        return 1e6 * self.cpu_s / max(self.requests, 1)

    def summary(self) -> dict[str, float | int | str]:
        """The run's counts and rates, for the JSON result."""
        return {**dataclasses.asdict(self), "rps": self.rps, "cpu_percent": self.cpu_percent,
                "cpu_us_per_request": self.cpu_us_per_request}  # fmt: skip

    def line(self, label: str) -> str:
        """The run in one line, for people."""
        return (
            f"{label}: {self.rps:8.1f} req/s  {self.failures} failures  generator CPU {self.cpu_percent:5.1f}%  "
            f"{self.cpu_us_per_request:6.1f} us CPU/request"
        )


def user_classes(settings: LoadSettings) -> tuple[type[User], type[User]]:
    """(ours, minimal) closed-loop user classes for ``settings``."""

    class OurUser(GrpcUser):
        wait_time = constant(0)

        def load_settings(self) -> LoadSettings:
            return settings

        @task
        def model_infer(self) -> None:
            self.infer()

    class MinimalUser(User):
        wait_time = constant(0)

        def on_start(self) -> None:
            self.channel = grpc.insecure_channel(self.environment.host, options=CHANNEL_OPTIONS)
            grpc.channel_ready_future(self.channel).result(timeout=10)
            self.request = shared_pool(self.channel, self.environment.host, settings).next()
            self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
            self.fire = self.environment.events.request.fire

        def on_stop(self) -> None:
            self.channel.close()

        @task
        def model_infer(self) -> None:
            exception = None
            start = time.perf_counter()
            try:
                self.stub.ModelInfer(self.request, timeout=settings.deadline_s)
            except grpc.RpcError as error:
                exception = error
            self.fire(
                request_type="grpc",
                name="ModelInfer",
                response_time=(time.perf_counter() - start) * 1000,
                response_length=0,
                exception=exception,
            )

    return OurUser, MinimalUser


def open_loop_class(settings: LoadSettings) -> type[User]:
    class OurOpenLoopUser(OpenLoopUser):
        def load_settings(self) -> LoadSettings:
            return settings

    return OurOpenLoopUser


def run(
    name: str, user_class: type[User], target: str, users: int, seconds: float, warmup: float = 1.0, **options: float
) -> RunResult:
    """Requests/s and generator CPU of ``users`` instances of ``user_class`` over ``seconds`` (after ``warmup``).

    ``options``: parsed options the users read (e.g. ``arrival_rate`` for the open-loop user).
    """
    environment = Environment(user_classes=[user_class], events=Events(), host=target,
                              parsed_options=SimpleNamespace(**options))  # fmt: skip
    attach_recorder(environment)  # as in a comparison: every request's exact figures are kept
    runner = environment.create_local_runner()
    runner.start(users, spawn_rate=users * 10)
    gevent.sleep(users / (users * 10) + warmup)
    gc.collect()
    gc.freeze()  # as the locustfile does at test start
    environment.stats.reset_all()
    wall, cpu = time.perf_counter(), time.process_time()
    gevent.sleep(seconds)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    total = environment.stats.total
    result = RunResult(name, total.num_requests, total.num_failures, wall, cpu)
    runner.quit()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", help="a running server's HOST:PORT (default: start the bare identity server)")
    parser.add_argument("--mode", choices=["sync", "aio"], default="sync", help="the bare server's (%(default)s)")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run (%(default)s)")
    parser.add_argument("--users", type=int, default=8, help="closed-loop users (%(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="(ours, minimal) pairs, in ABBA order (%(default)s)")
    parser.add_argument("--rates", default="", help="open-loop rates (req/s) to run our open-loop user at too")
    add_cpu_split_option(parser, "auto: the bare server on the first half of the cores, this process on the rest; "
                         "none: no pinning (%(default)s)")  # fmt: skip
    add_out_option(parser)
    args = parser.parse_args(argv)
    split = split_cpus(args.cpu_split, server_cores=max(1, len(available_cpus()) // 2))
    server_cpus, own_cpus = split.server, split.generator
    settings = LoadSettings(model=args.model, batch_size=args.batch_size)
    ours, minimal = user_classes(settings)
    rates = [float(rate) for rate in args.rates.split(",") if rate.strip()]
    server = None
    if args.target is None:
        server = ServerProcess("bare", args.model, ["--mode", args.mode], cpus=server_cpus).start()
    split.pin_generator()
    target = args.target or (server.target if server else "")
    show(f"target {target} ({'bare identity server, ' + args.mode if server else 'given'}), server cpus "
         f"{server_cpus}, generator cpus {own_cpus}")  # fmt: skip
    results: dict[str, list[RunResult]] = {"GrpcUser": [], "minimal": []}
    try:
        for round_index in range(args.rounds):
            pair = [("GrpcUser", ours), ("minimal", minimal)]
            for name, user_class in pair if round_index % 2 == 0 else reversed(pair):
                result = run(name, user_class, target, args.users, args.seconds)
                results[name].append(result)
                show(result.line(f"{name:>8}"))
        open_results = []
        for rate in rates:
            result = run(f"open {rate:g}/s", open_loop_class(settings), target, 4, args.seconds,
                         arrival_rate=rate, arrival_users=4)  # fmt: skip
            open_results.append(result)
            show(result.line(f"open loop {rate:g}/s"))
    finally:
        close_channels()
        if server is not None:
            server.close()
    median = {name: statistics.median(r.rps for r in runs) for name, runs in results.items()}
    cpu = {name: statistics.median(r.cpu_us_per_request for r in runs) for name, runs in results.items()}
    meets = cpu["GrpcUser"] <= TARGET_US
    show(
        f"median: GrpcUser {median['GrpcUser']:.1f} req/s, minimal {median['minimal']:.1f} req/s; "
        f"CPU/request GrpcUser {cpu['GrpcUser']:.1f} us, minimal {cpu['minimal']:.1f} us; "
        f"GrpcUser {'meets' if meets else 'MISSES'} the target of <= {TARGET_US:g} us per request"
    )
    write_result(
        {
            "target": target,
            "bare_server_mode": args.mode if server else None,
            "cpu_split": {"server": server_cpus, "generator": own_cpus},
            "users": args.users,
            "closed_loop": {name: [r.summary() for r in runs] for name, runs in results.items()},
            "open_loop": [r.summary() for r in open_results],
            "median_rps": median,
            "median_cpu_us_per_request": cpu,
            "target_us": TARGET_US,
            "meets_target": meets,
        },
        args.out,
    )
    failed = any(r.failures for runs in results.values() for r in runs) or any(r.failures for r in open_results)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

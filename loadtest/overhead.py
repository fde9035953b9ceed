"""How much our Locust layers cost: GrpcUser vs a bare Locust user making the same call.

    python -m loadtest.overhead --target 127.0.0.1:8001 [--model mlp] [--seconds 10] [--users 8]

Runs one Locust process (Locust as a library) alternately with ``GrpcUser`` (TimedRpc,
pooled inputs, request context) and with a bare user that sends one pre-built request
through a plain stub, times it by hand and fires the request event with the minimum of
fields. Prints requests/s of each, their ratio (target >= 0.9) and the generator's CPU
time per request: the ratio only measures our overhead when the generator, not the
server, is the bottleneck (CPU near 100 %); the CPU per request measures it either way.
"""

from __future__ import annotations

from locust import User, constant, task  # first: gevent monkey-patching (see grpc_user)

# isort: split
import argparse
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import gevent
import grpc
from locust.env import Environment
from locust.event import Events

from contract.protocol import inference_pb2_grpc as pb_grpc
from loadtest.grpc_user import CHANNEL_OPTIONS, GrpcUser, LoadSettings, shared_pool


@dataclass(frozen=True)
class RunResult:
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


def user_classes(settings: LoadSettings) -> tuple[type[User], type[User]]:
    """(ours, bare) user classes for ``settings``."""

    class OurUser(GrpcUser):
        wait_time = constant(0)

        def load_settings(self) -> LoadSettings:
            return settings

        @task
        def model_infer(self) -> None:
            self.infer()

    class BareUser(User):
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

    return OurUser, BareUser


def run(user_class: type[User], target: str, users: int, seconds: float, warmup: float = 1.0) -> RunResult:
    """Requests/s of ``users`` instances of ``user_class`` over ``seconds`` (after ``warmup``)."""
    environment = Environment(user_classes=[user_class], events=Events(), host=target)
    runner = environment.create_local_runner()
    runner.start(users, spawn_rate=users * 10)
    gevent.sleep(users / (users * 10) + warmup)
    environment.stats.reset_all()
    wall, cpu = time.perf_counter(), time.process_time()
    gevent.sleep(seconds)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    total = environment.stats.total
    result = RunResult(total.num_requests, total.num_failures, wall, cpu)
    runner.quit()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="server HOST:PORT")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per run")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="alternating (ours, bare) pairs")
    args = parser.parse_args(argv)
    settings = LoadSettings(model=args.model, batch_size=args.batch_size)
    ours, bare = user_classes(settings)
    results: dict[str, list[RunResult]] = {"GrpcUser": [], "bare": []}
    for _ in range(args.rounds):
        for name, user_class in (("GrpcUser", ours), ("bare", bare)):
            result = run(user_class, args.target, args.users, args.seconds)
            results[name].append(result)
            print(
                f"{name:>8}: {result.rps:8.1f} req/s  {result.failures} failures  "
                f"generator CPU {result.cpu_percent:5.1f}%  {result.cpu_us_per_request:6.1f} us CPU/request",
                flush=True,
            )
    median = {name: statistics.median(r.rps for r in runs) for name, runs in results.items()}
    cpu = {name: statistics.median(r.cpu_us_per_request for r in runs) for name, runs in results.items()}
    print(
        f"median: GrpcUser {median['GrpcUser']:.1f} req/s, bare {median['bare']:.1f} req/s, "
        f"ratio {median['GrpcUser'] / median['bare']:.3f} (target >= 0.9); "
        f"CPU/request GrpcUser {cpu['GrpcUser']:.1f} us, bare {cpu['bare']:.1f} us"
    )
    failed = any(r.failures for runs in results.values() for r in runs)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

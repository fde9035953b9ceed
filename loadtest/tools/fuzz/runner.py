"""Sending fuzz cases to a running server and checking each answer against the status it is owed,
then the server's health and answers after the run; and the ``python -m loadtest fuzz`` command
(``loadtest.tools.fuzz``'s docstring is its help). The cases: ``loadtest.tools.fuzz.catalogue``.
"""

from __future__ import annotations

import argparse
import math
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed

import loadtest.tools.fuzz
import modelzoo
from contract.codec import array_to_raw
from contract.datatypes import NUMPY_DTYPES
from contract.protocol import inference_pb2 as pb
from contract.protocol import inference_pb2_grpc as pb_grpc
from loadtest.cli import add_out_option, add_server_option, progress, write_result
from loadtest.tools.fuzz.catalogue import (
    MAX_MESSAGE_BYTES,
    OK,
    Case,
    ModelInfo,
    cases,
    huge_shape_cases,
    oversized_case,
)

#: Deadline of each fuzzed call: a server that has not answered by then hangs.
CALL_TIMEOUT_S = 30.0


@dataclass
class Outcome:
    """What the server answered a case, and what was wrong with it (empty: nothing)."""

    code: grpc.StatusCode
    message: str
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


class Connection:
    """One channel to one server; sends cases and checks the answers."""

    def __init__(self, target: str, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        if not target.startswith(("127.", "localhost:", "[::1]:")):
            raise ValueError(f"fuzzing is for loopback servers only, not {target!r}")
        self.target = target
        limit = 2 * max_message_bytes + (1 << 20)
        self._channel = grpc.insecure_channel(
            target, options=[("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
        )
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def models(self, names: Sequence[str] | None = None) -> list[ModelInfo]:
        """The served zoo models (all of them unless ``names``), checked against their metadata."""
        if names is None:
            stats = self._stub.ModelStatistics(pb.ModelStatisticsRequest(), timeout=CALL_TIMEOUT_S)
            names = sorted(s.name for s in stats.model_stats)
        infos = []
        for name in names:
            definition = modelzoo.get(name)
            metadata = self._stub.ModelMetadata(pb.ModelMetadataRequest(name=name), timeout=CALL_TIMEOUT_S)
            served = [(t.name, t.datatype, tuple(t.shape)) for t in metadata.inputs]
            zoo = [(s.name, s.datatype, s.shape) for s in definition.inputs]
            if served != zoo:
                raise ValueError(f"{self.target} serves {name} with inputs {served}, not the zoo's defaults {zoo}")
            config = self._stub.ModelConfig(pb.ModelConfigRequest(name=name), timeout=CALL_TIMEOUT_S).config
            max_len = definition.params.get("max_len")
            infos.append(ModelInfo(name, definition.inputs, definition.outputs, config.max_batch_size, max_len))
        return infos

    def send(self, case: Case) -> Outcome:
        """Send one case; the outcome lists every way the answer differs from what is owed."""
        try:
            response = self._stub.ModelInfer(case.request, timeout=CALL_TIMEOUT_S)
            code, message = OK, ""
        except grpc.RpcError as err:
            response = None
            code, message = err.code(), err.details() or ""
        problems = []
        if code != case.expected:
            problems.append(f"status {code.name}, owed {case.expected.name}")
        if response is not None:
            problems += _reply_problems(case, response)
        elif not message.strip():
            problems.append("empty status message")
        elif "\n" in message or "Traceback" in message or 'File "' in message:
            problems.append("status message is not one line free of tracebacks")
        return Outcome(code, message, problems)

    def health(self) -> str:
        reply = self._health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def answers(self, models: Sequence[ModelInfo]) -> dict[str, list[bytes]]:
        """Each model's raw outputs for fixed valid requests (compare before and after a run)."""
        result = {}
        for model in models:
            rng = np.random.default_rng(1234)
            inputs = modelzoo.get(model.name).example_inputs(min(3, model.max_batch_size), rng)
            request = pb.ModelInferRequest(model_name=model.name)
            for name, array in inputs.items():
                spec = next(s for s in model.inputs if s.name == name)
                request.inputs.add(name=name, datatype=spec.datatype, shape=array.shape)
                request.raw_input_contents.append(array_to_raw(array, spec.datatype))
            reply = self._stub.ModelInfer(request, timeout=CALL_TIMEOUT_S)
            result[model.name] = list(reply.raw_output_contents)
        return result


def _reply_problems(case: Case, response: pb.ModelInferResponse) -> list[str]:
    problems = []
    names = [tensor.name for tensor in response.outputs]
    if names != list(case.shapes):
        problems.append(f"outputs {names}, asked for {list(case.shapes)}")
    if response.id != case.request.id:
        problems.append(f"reply id {response.id!r}, request id {case.request.id!r}")
    if len(response.raw_output_contents) != len(response.outputs):
        problems.append("raw_output_contents do not match the outputs")
        return problems
    datatypes = {spec.name: spec.datatype for spec in case.model.outputs}
    for tensor, data in zip(response.outputs, response.raw_output_contents, strict=True):
        want = case.shapes.get(tensor.name)
        if want is not None and tuple(tensor.shape) != want:
            problems.append(f"output {tensor.name!r} shape {list(tensor.shape)}, expected {list(want)}")
        itemsize = NUMPY_DTYPES[datatypes.get(tensor.name, "FP32")].itemsize
        if len(data) != math.prod(tensor.shape) * itemsize:
            problems.append(f"output {tensor.name!r}: {len(data)} bytes for shape {list(tensor.shape)}")
    return problems


@dataclass
class Tally:
    """Counts of one run, and its mismatches."""

    requests: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    owed: Counter[str] = field(default_factory=Counter)
    mutations: Counter[str] = field(default_factory=Counter)
    mismatches: list[dict[str, Any]] = field(default_factory=list)

    def add(self, case: Case, outcome: Outcome) -> None:
        self.requests += 1
        self.codes[outcome.code.name] += 1
        self.owed[case.expected.name] += 1
        self.mutations.update(m.split(" ")[0] for m in case.mutations)
        if not outcome.ok and len(self.mismatches) < 50:
            self.mismatches.append(
                {"problems": outcome.problems, "message": outcome.message[:300], "case": case.describe()}
            )

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "status_codes": dict(self.codes.most_common()),
            "owed": dict(self.owed.most_common()),
            "mutations": dict(self.mutations.most_common()),
            "mismatches": self.mismatches,
        }


class RssSampler:
    """The highest RSS of a process while it runs, sampled every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.002) -> None:
        self._process = psutil.Process(pid)
        self._interval = interval
        self.start_bytes = self._process.memory_info().rss
        self.peak_bytes = self.start_bytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth_bytes(self) -> int:
        return self.peak_bytes - self.start_bytes


def fuzz(
    connection: Connection,
    models: Sequence[ModelInfo],
    requests: int,
    seed: int | None = None,
    on_case: Callable[[Case, Outcome], None] | None = None,
) -> Tally:
    """Send ``requests`` drawn cases (no shrinking: every mismatch is recorded, none raised)."""
    tally = Tally()

    @settings(
        max_examples=requests,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases(models))
    def one(case: Case) -> None:
        outcome = connection.send(case)
        tally.add(case, outcome)
        if on_case is not None:
            on_case(case, outcome)

    (one if seed is None else hypothesis_seed(seed)(one))()
    return tally


def run_target(
    target: str, requests: int, seed: int | None, pid: int | None, oversized: int, models: Sequence[str] | None
) -> dict[str, Any]:
    """The whole check against one server: before, drawn cases, fixed cases, after."""
    with Connection(target) as connection:
        infos = connection.models(models)
        before = connection.answers(infos)
        started = time.monotonic()
        tally = fuzz(connection, infos, requests, seed)
        fuzz_s = time.monotonic() - started
        huge = Tally()
        sampler = RssSampler(pid) if pid else None
        if sampler is not None:
            sampler.__enter__()
        for case in huge_shape_cases(infos):
            huge.add(case, connection.send(case))
        if sampler is not None:
            sampler.__exit__()
        big = Tally()
        for _ in range(oversized):
            case = oversized_case(infos[0])
            big.add(case, connection.send(case))
        health = connection.health()
        after = connection.answers(infos)
    same = {name: after[name] == before[name] for name in before}
    result: dict[str, Any] = {
        "target": target,
        "models": [info.name for info in infos],
        "fuzzed": {**tally.summary(), "seconds": round(fuzz_s, 1)},
        "huge_shapes": huge.summary(),
        "oversized": big.summary(),
        "health_after": health,
        "same_answers_after": same,
    }
    if sampler is not None:
        result["huge_shapes"]["server_rss_growth_mb"] = round(sampler.growth_bytes / 2**20, 1)
    return result


def failed(result: Mapping[str, Any], rss_limit_mb: float) -> list[str]:
    """Why a target's result fails the check (empty: it passes)."""
    reasons = []
    for part in ("fuzzed", "huge_shapes", "oversized"):
        if result[part]["mismatches"]:
            reasons.append(f"{len(result[part]['mismatches'])} mismatches in {part}")
    if result["health_after"] != "SERVING":
        reasons.append(f"health {result['health_after']} after the run")
    if not all(result["same_answers_after"].values()):
        reasons.append(f"different answers after the run: {result['same_answers_after']}")
    growth = result["huge_shapes"].get("server_rss_growth_mb")
    if growth is not None and growth > rss_limit_mb:
        reasons.append(f"server RSS grew {growth} MB during the huge-shape requests")
    return reasons


def _servers(frameworks: Sequence[str]) -> Iterator[Any]:
    from loadtest.servers import ServerProcess

    for framework in frameworks:
        yield ServerProcess(framework, "mlp,resnet,encoder", ["--threads", "1", "--max-batch-size", "8"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=loadtest.tools.fuzz.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", action="append", help="HOST:PORT of a running server (loopback); repeatable")
    add_server_option(where, default=None)
    parser.add_argument("--requests", type=int, default=1000, help="drawn requests per server (default 1000)")
    parser.add_argument("--model", action="append", help="fuzz only this served model (repeatable)")
    parser.add_argument("--seed", type=int, help="hypothesis seed, to repeat a run")
    parser.add_argument("--pid", type=int, help="the --target server's process id, to watch its RSS")
    parser.add_argument("--oversized", type=int, default=3, help="messages over the 64 MiB limit per server")
    parser.add_argument("--rss-limit-mb", type=float, default=64.0, help="allowed RSS growth on huge shapes")
    add_out_option(parser)
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    results = []
    if args.servers:
        for server in _servers(args.servers):
            with server:
                progress(f"fuzzing {server.module} at {server.target} ...")
                results.append(run_target(server.target, args.requests, args.seed, server.pid, args.oversized,
                                          args.model))  # fmt: skip
    else:
        for target in args.target:
            progress(f"fuzzing {target} ...")
            results.append(run_target(target, args.requests, args.seed, args.pid, args.oversized, args.model))
    verdicts = {result["target"]: failed(result, args.rss_limit_mb) for result in results}
    write_result({"results": results, "failures": verdicts}, args.out)
    return 1 if any(verdicts.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

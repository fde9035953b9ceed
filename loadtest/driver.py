"""The load engine of the asyncio tools (grpc.aio, one process, no Locust): one request pool,
a closed loop and an open loop. bench, scaling, overload, soak and the GPU check drive
servers through it; Locust is the load driver for scenarios (``loadtest.users``).

    python -m loadtest drive --target 127.0.0.1:8001 --model mlp --concurrency 8 --seconds 5

- ``RequestPool``: pre-built ModelInfer requests, cycled (random inputs from the model's
  metadata, as ``python -m client infer --random`` makes them, or the zoo model's examples).
- ``closed_loop``: ``concurrency`` callers send back to back over ``channels`` connections
  (a server of several workers needs several: the kernel spreads connections, not
  requests) for ``warmup`` + ``seconds``; only requests that start after the warm-up count.
- ``open_loop``: each request is sent at its scheduled time whatever earlier ones are doing,
  its deadline and latency counted from that time (no coordinated omission), optionally
  bounded in flight (an arrival beyond the bound is recorded as GENERATOR_BACKLOG, unsent).

``drive`` (the command) writes one JSON object to ``--out`` (or stdout): requests, errors, rows/s,
requests/s, latency percentiles (µs) and this process's CPU share (near 1.0: the generator, not
the server, set the pace).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import numpy as np

import modelzoo
from contract import codec
from contract.protocol import inference_pb2 as pb
from contract.protocol import inference_pb2_grpc as pb_grpc
from contract.random_tensors import random_array
from loadtest.cli import add_out_option, write_result
from loadtest.stats import percentiles

#: Channel options of every connection the engine opens (a connection per channel).
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.use_local_subchannel_pool", 1),
]
#: Status recorded for an open-loop arrival that was not sent: ``max_in_flight`` were outstanding.
BACKLOG = "GENERATOR_BACKLOG"


def random_inputs(metadata: pb.ModelMetadataResponse, batch_size: int, seq_len: int, rng: np.random.Generator) -> dict:
    """Random inputs from model metadata, as ``python -m client infer --random`` makes them."""
    arrays = {}
    for tensor in metadata.inputs:
        if tensor.name == "attention_mask":
            continue  # optional: the model fills it in
        shape = (batch_size, *(seq_len if d == -1 else d for d in list(tensor.shape)[1:]))
        arrays[tensor.name] = random_array(tensor.datatype, shape, rng)
    return arrays


@dataclass(frozen=True)
class RequestPool:
    """Pre-built requests, sent in turn (building one per send would load the generator)."""

    requests: tuple[pb.ModelInferRequest, ...]

    def __getitem__(self, index: int) -> pb.ModelInferRequest:
        return self.requests[index % len(self.requests)]

    @classmethod
    async def from_metadata(
        cls, stub: pb_grpc.GRPCInferenceServiceAsyncStub, model: str, batch_size: int = 1, seq_len: int = 16,
        count: int = 16, seed: int = 0,
    ) -> RequestPool:  # fmt: skip
        """Random inputs shaped by the server's ModelMetadata of ``model``."""
        metadata = await stub.ModelMetadata(pb.ModelMetadataRequest(name=model), timeout=30)
        rng = np.random.default_rng(seed)
        return cls(tuple(codec.build_request(model, random_inputs(metadata, batch_size, seq_len, rng))
                         for _ in range(count)))  # fmt: skip

    @classmethod
    def from_zoo(cls, model: str, seq_len: int = 16, count: int = 64) -> RequestPool:
        """Batch-1 requests of the zoo model's own example inputs (``seq_len`` tokens for the encoder)."""
        definition = modelzoo.get(model)
        rng = np.random.default_rng(0)
        extra = {"seq_len": seq_len} if "max_len" in definition.params else {}
        return cls(tuple(codec.build_request(model, definition.example_inputs(1, rng, **extra)) for _ in range(count)))


def channels(target: str, count: int = 1) -> list[grpc.aio.Channel]:
    """``count`` connections to ``target`` (insecure: the engine loads loopback servers)."""
    return [grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) for _ in range(count)]


@dataclass
class ClosedLoop:
    """What a closed loop saw after its warm-up: latencies (s), errors by status, and all
    requests completed (the warm-up's too); ``generator_cpu``: this process's CPU share."""

    seconds: float
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    completed: int = 0
    generator_cpu: float = 0.0

    @property
    def requests_per_s(self) -> float:
        return len(self.latencies) / self.seconds


async def closed_loop(
    stubs: Sequence[pb_grpc.GRPCInferenceServiceAsyncStub], pool: RequestPool, concurrency: int, seconds: float,
    warmup: float = 0.0, timeout: float = 30.0,
) -> ClosedLoop:  # fmt: skip
    """``concurrency`` callers over ``stubs`` (one per connection) sending back to back."""
    result = ClosedLoop(seconds)
    measure_from = time.perf_counter() + warmup
    stop_at = measure_from + seconds

    async def caller(index: int) -> None:
        stub = stubs[index % len(stubs)]
        while (sent := time.perf_counter()) < stop_at:
            try:
                await stub.ModelInfer(pool[index], timeout=timeout)
                result.completed += 1
                if sent >= measure_from:
                    result.latencies.append(time.perf_counter() - sent)
            except grpc.aio.AioRpcError as err:
                if sent >= measure_from:
                    result.errors[err.code().name] = result.errors.get(err.code().name, 0) + 1
            index += concurrency

    cpu_before, wall_before = time.process_time(), time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    result.generator_cpu = (time.process_time() - cpu_before) / (time.perf_counter() - wall_before)
    return result


@dataclass(frozen=True, slots=True)
class Arrival:
    """One open-loop request: its tag, scheduled time (s from the loop's origin), send lag
    (s), latency from its scheduled time (s), and status ("OK", a gRPC code, BACKLOG)."""

    tag: str
    scheduled: float
    lag: float
    latency: float
    status: str
    details: str = ""


async def open_loop(
    stub: pb_grpc.GRPCInferenceServiceAsyncStub, pool: RequestPool, schedule: Iterable[tuple[str, float]],
    deadline_s: float, max_in_flight: int | None = None,
) -> list[Arrival]:  # fmt: skip
    """Send ``pool``'s requests at the ``schedule``'s times ((tag, seconds from now) in
    order), each with a deadline of ``deadline_s`` from its scheduled time; wait for all."""
    arrivals: list[Arrival] = []
    tasks: set[asyncio.Task[None]] = set()
    origin = time.perf_counter()

    async def send(tag: str, index: int, scheduled: float) -> None:
        lag = time.perf_counter() - scheduled
        status, details = "OK", ""
        try:
            await stub.ModelInfer(pool[index], timeout=max(deadline_s - lag, 0.001))
        except grpc.aio.AioRpcError as err:
            status, details = err.code().name, err.details() or ""
        arrivals.append(Arrival(tag, scheduled - origin, lag, time.perf_counter() - scheduled, status, details))

    for index, (tag, offset) in enumerate(schedule):
        scheduled = origin + offset
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if max_in_flight is not None and len(tasks) >= max_in_flight:
            arrivals.append(Arrival(tag, offset, time.perf_counter() - scheduled, 0.0, BACKLOG))
            continue
        task = asyncio.get_running_loop().create_task(send(tag, index, scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    while tasks:
        await asyncio.gather(*list(tasks))
    return arrivals


async def drive(
    target: str,
    model: str,
    concurrency: int,
    seconds: float,
    warmup: float,
    batch_size: int,
    seq_len: int,
    channel_count: int = 1,
) -> dict[str, Any]:
    """A closed loop against ``target`` with random inputs, summed up as the command prints it."""
    opened = channels(target, channel_count)
    try:
        stubs = [pb_grpc.GRPCInferenceServiceStub(channel) for channel in opened]
        pool = await RequestPool.from_metadata(stubs[0], model, batch_size, seq_len)
        loop = await closed_loop(stubs, pool, concurrency, seconds, warmup)
    finally:
        for channel in opened:
            await channel.close(None)
    return {
        "target": target,
        "model": model,
        "concurrency": concurrency,
        "channels": channel_count,
        "batch_size": batch_size,
        "seconds": seconds,
        "requests": len(loop.latencies),
        "requests_all": loop.completed,
        "errors": loop.errors,
        "requests_per_s": loop.requests_per_s,
        "rows_per_s": loop.requests_per_s * batch_size,
        "latency_us": percentiles(np.asarray(loop.latencies) * 1e6),
        "generator_cpu": loop.generator_cpu,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True)
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=16, help="size of -1 dimensions beyond the batch")
    parser.add_argument("--channels", type=int, default=1, help="connections the callers share (spread workers)")
    add_out_option(parser)
    args = parser.parse_args(argv)
    result = asyncio.run(
        drive(
            args.target,
            args.model,
            args.concurrency,
            args.seconds,
            args.warmup,
            args.batch_size,
            args.seq_len,
            args.channels,
        )
    )
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A lean closed-loop gRPC load generator for benchmarks (one process, grpc.aio).

    python -m loadtest.driver --target 127.0.0.1:8001 --model mlp --concurrency 8 --seconds 5

``concurrency`` coroutines each send pre-built ModelInfer requests back to back on
``channels`` connections (default one; a server of several workers needs several, since
the kernel spreads connections, not requests) for ``warmup`` + ``seconds``; only requests that start after the
warm-up count. Prints one JSON object: requests, errors, rows/s, requests/s,
latency percentiles (µs) and this process's CPU use (to detect a saturated
generator). Locust is the load driver for scenarios; this is the minimal-overhead
driver the benchmark uses to find a server's ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np

from contract import codec
from contract.protocol import inference_pb2 as pb
from contract.protocol import inference_pb2_grpc as pb_grpc
from contract.random_tensors import random_array
from loadtest.stats import percentiles


def random_inputs(metadata: pb.ModelMetadataResponse, batch_size: int, seq_len: int, rng: np.random.Generator) -> dict:
    """Random inputs from model metadata, as ``python -m client infer --random`` makes them."""
    arrays = {}
    for tensor in metadata.inputs:
        if tensor.name == "attention_mask":
            continue  # optional: the model fills it in
        shape = (batch_size, *(seq_len if d == -1 else d for d in list(tensor.shape)[1:]))
        arrays[tensor.name] = random_array(tensor.datatype, shape, rng)
    return arrays


async def drive(
    target: str,
    model: str,
    concurrency: int,
    seconds: float,
    warmup: float,
    batch_size: int,
    seq_len: int,
    channels: int = 1,
) -> dict[str, Any]:
    """``concurrency`` callers over ``channels`` connections (a server of several workers
    gets connections, not requests, spread over them)."""
    options = [
        ("grpc.max_receive_message_length", 64 << 20),
        ("grpc.max_send_message_length", 64 << 20),
        ("grpc.use_local_subchannel_pool", 1),  # a connection per channel
    ]
    opened = [grpc.aio.insecure_channel(target, options=options) for _ in range(channels)]
    try:
        stubs = [pb_grpc.GRPCInferenceServiceStub(channel) for channel in opened]
        metadata = await stubs[0].ModelMetadata(pb.ModelMetadataRequest(name=model), timeout=30)
        rng = np.random.default_rng(0)
        pool = [codec.build_request(model, random_inputs(metadata, batch_size, seq_len, rng)) for _ in range(16)]
        start = time.perf_counter()
        measure_from = start + warmup
        stop_at = measure_from + seconds
        latencies: list[float] = []
        errors: dict[str, int] = {}
        completed = [0]

        async def worker(index: int) -> None:
            stub = stubs[index % channels]
            i = index
            while True:
                sent = time.perf_counter()
                if sent >= stop_at:
                    return
                try:
                    await stub.ModelInfer(pool[i % len(pool)], timeout=30)
                    completed[0] += 1
                    if sent >= measure_from:
                        latencies.append(time.perf_counter() - sent)
                except grpc.aio.AioRpcError as err:
                    if sent >= measure_from:
                        errors[err.code().name] = errors.get(err.code().name, 0) + 1
                i += 1

        cpu_before = time.process_time()
        wall_before = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        cpu = (time.process_time() - cpu_before) / (time.perf_counter() - wall_before)
    finally:
        for channel in opened:
            await channel.close(None)
    latencies_us = np.asarray(latencies) * 1e6
    return {
        "target": target,
        "model": model,
        "concurrency": concurrency,
        "channels": channels,
        "batch_size": batch_size,
        "seconds": seconds,
        "requests": len(latencies),
        "requests_all": completed[0],
        "errors": errors,
        "requests_per_s": len(latencies) / seconds,
        "rows_per_s": len(latencies) * batch_size / seconds,
        "latency_us": percentiles(latencies_us),
        "generator_cpu": cpu,
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
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

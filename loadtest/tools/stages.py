"""What each stage of one request costs on the served path, in-process.

    python -m loadtest stages --server torch --model mlp

Runs the serving core's own code for one batch-1 request of the model, stage by stage,
in a tight loop on one core (the one the other tools give the server; ``--cpu-split none``:
unpinned): parsing the request and serializing the
reply (the protobuf part of gRPC in and out), decode + validate, the batcher's round
trip with an instant model (queue, lead, merge, split, deliver: a lone caller runs its
own batch, no thread hop), merge and split of a batch of 8, the forward pass at batch 1
and 8, encode, and the metrics of one request and one batch; then the whole dataplane
(``ModelRuntime.infer``) at once. The rest of a request's cost is grpcio's: the bench
measures it as the bare identity server's CPU per request. Microbenchmark figures are a
floor: under load, caches are colder and every stage costs more. A table on stderr; the JSON
result to ``--out`` (or stdout).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import modelzoo
from contract import codec
from contract.protocol import inference_pb2 as pb
from loadtest.cli import add_cpu_split_option, add_out_option, add_server_option, show, split_cpus, write_result
from loadtest.servers import MODULES
from serving import repository
from serving.backend import BackendOptions, Framework
from serving.batcher import DynamicBatcher, Request, merge, split
from serving.metrics import ModelMetrics
from serving.runtime import ModelRuntime
from serving.settings import BatchingSettings


def timed(run: Callable[[], object], seconds: float = 0.5) -> float:
    """Median µs per call over blocks of calls filling about ``seconds``."""
    for _ in range(50):
        run()
    block = 200
    blocks: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(blocks) < 5:
        started = time.perf_counter()
        for _ in range(block):
            run()
        blocks.append((time.perf_counter() - started) / block * 1e6)
    return float(np.median(blocks))


def framework_of(name: str) -> Framework:
    module = __import__(f"{MODULES[name]}.framework", fromlist=["FRAMEWORK"])
    framework: Framework = module.FRAMEWORK
    return framework


def stages(framework: Framework, model_name: str, model_dir: Path, seconds: float) -> list[dict[str, Any]]:
    model = modelzoo.get(model_name)
    backend = framework.create_backend(model, repository.ensure(framework, model, model_dir), BackendOptions())
    backend.start()
    rng = np.random.default_rng(0)
    inputs = model.example_inputs(1, rng, seq_len=16)
    request = codec.build_request(model.name, inputs)
    wire = request.SerializeToString()
    settings = BatchingSettings(max_batch_size=32)
    runtime = ModelRuntime(model, backend, settings, ModelMetrics(model.name), framework.name, {})
    runtime.start()
    decoder = runtime.decoder
    arrays, rows = decoder.inputs(request)
    names = runtime.decoder.outputs(request)
    outputs = backend.forward(arrays)
    response = runtime.encode(request, outputs, names)
    instant = DynamicBatcher(dict, model.inputs, model.inputs, settings, ModelMetrics("instant"))
    instant.start()
    specs = {spec.name: spec for spec in model.inputs}
    output_specs = {spec.name: spec for spec in model.outputs}
    batch = [Request(arrays, rows, None, (), None) for _ in range(8)]
    merged, _ = merge(batch, specs, model.pad_values)
    batch_outputs = backend.forward(merged)
    metrics = ModelMetrics(model.name)

    def one_request_metrics() -> None:
        metrics.request_started()
        metrics.request_done("OK", 300_000)

    figures = [
        ("gRPC in: parse the request (protobuf)", lambda: pb.ModelInferRequest.FromString(wire)),
        (
            "decode + validate inputs, outputs",
            lambda: (runtime.decoder.inputs(request), runtime.decoder.outputs(request)),
        ),
        ("batcher round trip, instant model", lambda: instant.infer(arrays, rows)),
        ("merge 8 requests (per batch)", lambda: merge(batch, specs, model.pad_values)),
        ("forward, batch 1", lambda: backend.forward(arrays)),
        ("forward, batch 8", lambda: backend.forward(merged)),
        ("split 8 requests (per batch)", lambda: split(batch_outputs, batch, output_specs)),
        ("encode the reply", lambda: runtime.encode(request, outputs, names)),
        ("gRPC out: serialize the reply (protobuf)", response.SerializeToString),
        ("metrics of one request", one_request_metrics),
        ("metrics of one batch of 8", lambda: metrics.batch_done(8, [1e-4] * 8, 1000, 60_000, 1000)),
        ("whole dataplane: ModelRuntime.infer", lambda: runtime.infer(request, None)),
    ]
    results = [{"stage": label, "us": timed(run, seconds)} for label, run in figures]
    backend.shutdown()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_option(parser)
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--seconds", type=float, default=0.5, help="timing budget per stage")
    parser.add_argument("--threads", type=int, default=1)
    add_cpu_split_option(parser, "auto: run on the core the other tools give the server; none: unpinned (%(default)s)")
    add_out_option(parser)
    args = parser.parse_args(argv)
    cpus = split_cpus(args.cpu_split).server
    if cpus:
        os.sched_setaffinity(0, cpus)
    report: dict[str, Any] = {"model": args.model, "threads": args.threads, "cpus": cpus, "servers": {}}
    for name in args.servers:
        framework = framework_of(name)
        framework.configure(args.threads, "cpu")
        with tempfile.TemporaryDirectory() as tmp:
            report["servers"][name] = stages(framework, args.model, Path(tmp), args.seconds)
    for name, rows in report["servers"].items():
        pinned = f"on core {cpus[0]}" if cpus else "unpinned"
        show(f"{name}, {args.model}, one batch-1 request (µs, in-process, {pinned}):")
        show("\n".join(f"  {row['stage']:44s} {row['us']:9.2f}" for row in rows))
    write_result(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

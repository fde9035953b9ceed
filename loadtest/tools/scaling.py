"""Worker scaling: throughput of 1..N server processes behind one port (``--workers``).

    python -m loadtest scaling --server torch --model resnet --model-arg image_size=160 --workers 1,2

For each worker count W the server runs pinned to the first W cores (one worker per
core, one framework thread each) and a closed-loop driver (loadtest.driver, spread
over ``--channels`` connections so that the kernel hands every worker some) loads it.
Prints throughput per worker count, the ratio to one worker, the driver's CPU (it
shares the cores: a compute-bound model keeps it small), and how the requests spread
over the workers (the server's ``inference_worker_requests_total``), on stderr; the JSON
result to ``--out`` (or stdout).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.cli import add_out_option, add_server_option, available_cpus, progress, write_result
from loadtest.sampling import scrape
from loadtest.servers import ServerProcess
from loadtest.stats import requests_per_worker
from loadtest.tools.bench import DriveOptions, drive


@dataclass(frozen=True)
class ScalingOptions:
    """One scaling run of a server (the module docstring tells what it measures)."""

    model: str = "resnet"
    #: Zoo model parameters (default: a forward pass of ~8 ms at batch 1 on one core).
    model_arg: str = "image_size=160"
    device: str = "cpu"
    #: Framework threads per worker (0: the framework's own choice).
    threads: int = 1
    #: Closed-loop callers, spread over ``channels`` connections.
    concurrency: int = 16
    channels: int = 16
    seconds: float = 8.0
    warmup: float = 2.0


def measure(framework: str, workers: int, opts: ScalingOptions, model_dir: Path) -> dict[str, Any]:
    """One fresh server of ``workers`` processes on as many cores, loaded closed loop."""
    cpus = available_cpus()[:workers]
    server_args = ["--workers", str(workers), "--device", opts.device, "--model-dir", str(model_dir)]
    if opts.threads:
        server_args += ["--threads", str(opts.threads)]
    if opts.model_arg:
        server_args += ["--model-arg", opts.model_arg]
    with ServerProcess(framework, opts.model, server_args, cpus=cpus) as server:
        step_options = DriveOptions(opts.model, opts.seconds, opts.warmup, channels=opts.channels)
        step = drive(server, opts.concurrency, step_options, None)
        counts = scrape(server.metrics_url, opts.model)
    return {"workers": workers, "server_cpus": cpus, "step": step, "requests_per_worker": requests_per_worker(counts)}


def main(argv: Sequence[str] | None = None) -> int:
    defaults = ScalingOptions()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_option(parser, default="torch", one=True)
    parser.add_argument("--model", default=defaults.model)
    parser.add_argument(
        "--model-arg",
        default=defaults.model_arg,
        help="zoo model parameters (default: a forward pass of ~8 ms at batch 1 on one core)",
    )
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--threads", type=int, default=defaults.threads,
                        help="framework threads per worker (0: its own choice)")  # fmt: skip
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency)
    parser.add_argument("--channels", type=int, default=defaults.channels)
    parser.add_argument("--seconds", type=float, default=defaults.seconds)
    parser.add_argument("--warmup", type=float, default=defaults.warmup)
    add_out_option(parser)
    args = parser.parse_args(argv)
    (server,) = args.servers
    opts = ScalingOptions(
        model=args.model,
        model_arg=args.model_arg,
        device=args.device,
        threads=args.threads,
        concurrency=args.concurrency,
        channels=args.channels,
        seconds=args.seconds,
        warmup=args.warmup,
    )
    counts = [int(part) for part in args.workers.split(",") if part.strip()]
    results: dict[str, Any] = {"server": server, "model": args.model, "model_arg": args.model_arg, "runs": []}
    with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
        for workers in counts:
            run = measure(server, workers, opts, Path(tmp))
            results["runs"].append(run)
            step = run["step"]
            base = results["runs"][0]["step"]["requests_per_s"]
            progress(
                f"{server} {args.model} ({args.model_arg}), {workers} worker(s) on cores {run['server_cpus']}: "
                f"{step['requests_per_s']:.1f} req/s ({step['requests_per_s'] / base:.2f}x one worker), "
                f"p50 {step['latency_us']['p50'] / 1e3:.1f} ms, driver CPU {step['generator_cpu']:.0%}, "
                f"errors {step['errors'] or 0}, per worker {sorted(run['requests_per_worker'].values())}"
            )
    write_result(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
from pathlib import Path
from typing import Any

from loadtest.cli import add_out_option, add_server_option, available_cpus, progress, write_result
from loadtest.sampling import scrape
from loadtest.servers import ServerProcess
from loadtest.stats import requests_per_worker
from loadtest.tools.bench import drive


def measure(framework: str, workers: int, args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    cpus = available_cpus()[:workers]
    server_args = ["--workers", str(workers), "--device", args.device, "--model-dir", str(model_dir)]
    if args.threads:
        server_args += ["--threads", str(args.threads)]
    if args.model_arg:
        server_args += ["--model-arg", args.model_arg]
    with ServerProcess(framework, args.model, server_args, cpus=cpus) as server:
        opts = argparse.Namespace(
            model=args.model, seconds=args.seconds, warmup=args.warmup, batch_size=1, channels=args.channels
        )
        step = drive(server, args.concurrency, opts, None)
        counts = scrape(server.metrics_url, args.model)
    return {"workers": workers, "server_cpus": cpus, "step": step, "requests_per_worker": requests_per_worker(counts)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_option(parser, default="torch", one=True)
    parser.add_argument("--model", default="resnet")
    parser.add_argument(
        "--model-arg",
        default="image_size=160",
        help="zoo model parameters (default: a forward pass of ~8 ms at batch 1 on one core)",
    )
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="framework threads per worker (0: its own choice)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    add_out_option(parser)
    args = parser.parse_args(argv)
    (server,) = args.servers
    counts = [int(part) for part in args.workers.split(",") if part.strip()]
    results: dict[str, Any] = {"server": server, "model": args.model, "model_arg": args.model_arg, "runs": []}
    with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
        for workers in counts:
            run = measure(server, workers, args, Path(tmp))
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

"""Serving-efficiency benchmark: in-process forward vs served, batching on vs off.

    python -m loadtest.bench --server both --model mlp --concurrency 1,8,32

For each server: (1) the model's own forward pass in-process at batch sizes
1..max (``python -m <server> forward``: the physical ceiling), (2) the server
started with batching on and off, loaded closed-loop from a separate process
(loadtest.driver) at each concurrency. Prints a table and writes JSON with served
requests/s and rows/s, latency percentiles, the mean batch size / queue / compute
time from the server's own metrics, and serving efficiency = served rows/s over
in-process rows/s at the observed mean batch size. On a 2-core machine the server
is pinned to core 0 and the generator to core 1 (``--cpu-split none`` to turn off).
Figures, not assertions: the machine is shared and noisy, compare within one run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.compare import metric_deltas, scrape
from loadtest.servers import MODULES, ROOT, ServerProcess, pin_to


def _run_json(command: list[str], cpus: list[int] | None, timeout: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
        preexec_fn=pin_to(cpus),
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def in_process(framework: str, model: str, max_batch: int, threads: int, cpus: list[int] | None) -> dict[str, Any]:
    sizes = sorted({1, *(2**k for k in range(1, 12) if 2**k <= max_batch), max_batch})
    command = [sys.executable, "-m", MODULES[framework], "forward", "--model", model, "--threads", str(threads),
               "--batch-sizes", ",".join(map(str, sizes)), "--seconds", "1", "--device", "cpu"]  # fmt: skip
    return _run_json(command, cpus, timeout=600)


def rows_per_s_at(forward: dict[str, Any], batch_size: float) -> float:
    """In-process rows/s at a (fractional) batch size, interpolated between measured sizes."""
    sizes = [r["batch_size"] for r in forward["results"]]
    rates = [r["rows_per_s"] for r in forward["results"]]
    return float(np.interp(batch_size, sizes, rates))


def served(
    framework: str,
    model: str,
    batching: bool,
    concurrencies: Sequence[int],
    opts: argparse.Namespace,
    server_cpus: list[int] | None,
    driver_cpus: list[int] | None,
) -> dict[str, Any]:
    args = ["--threads", str(opts.threads), "--max-batch-size", str(opts.max_batch_size), "--device", "cpu",
            "--max-queue-delay-us", str(opts.max_queue_delay_us),
            "--dynamic-batching" if batching else "--no-dynamic-batching"]  # fmt: skip
    steps = []
    with ServerProcess(framework, model, args, cpus=server_cpus) as server:
        for concurrency in concurrencies:
            before = scrape(server.metrics_url, model)
            command = [sys.executable, "-m", "loadtest.driver", "--target", server.target, "--model", model,
                       "--concurrency", str(concurrency), "--seconds", str(opts.seconds),
                       "--warmup", str(opts.warmup), "--batch-size", str(opts.batch_size)]  # fmt: skip
            result = _run_json(command, driver_cpus, timeout=opts.seconds + opts.warmup + 120)
            result["server"] = metric_deltas(before, scrape(server.metrics_url, model))
            steps.append(result)
            print(
                f"  {framework:10s} batching={'on ' if batching else 'off'} c={concurrency:<3d} "
                f"{result['requests_per_s']:8.0f} req/s  p50 {result['latency_us'].get('p50') or 0:7.0f} µs  "
                f"p99 {result['latency_us'].get('p99') or 0:7.0f} µs  "
                f"batch {result['server']['batch_size_mean'] or 0:5.1f}",
                file=sys.stderr,
                flush=True,
            )
        cold_start = server.cold_start_s
    return {"batching": batching, "cold_start_s": cold_start, "server_args": args, "steps": steps}


def efficiency(forward: dict[str, Any], step: dict[str, Any]) -> float | None:
    batch = step["server"].get("batch_size_mean")
    if not batch:
        return None
    return float(step["rows_per_s"] / rows_per_s_at(forward, batch))


def table(results: dict[str, Any]) -> str:
    lines = []
    for framework, data in results["servers"].items():
        forward = data["in_process"]
        lines.append(f"\n{framework}: in-process forward ({forward['version']}, threads={results['threads']})")
        lines.append("  batch   median µs      rows/s")
        for r in forward["results"]:
            lines.append(f"  {r['batch_size']:5d} {r['median_us']:11.0f} {r['rows_per_s']:11.0f}")
        lines.append(
            "  batching  conc   req/s   rows/s   p50 µs   p99 µs  mean batch  queue ms  compute ms  efficiency  gen CPU"
        )
        for run in data["served"]:
            for step in run["steps"]:
                srv = step["server"]
                eff = step.get("efficiency")
                lines.append(
                    f"  {'on ' if run['batching'] else 'off':8s} {step['concurrency']:5d} {step['requests_per_s']:7.0f}"
                    f" {step['rows_per_s']:8.0f} {step['latency_us'].get('p50') or 0:8.0f} "
                    f"{step['latency_us'].get('p99') or 0:8.0f} {srv.get('batch_size_mean') or 0:11.2f}"
                    f" {srv.get('queue_ms_mean') or 0:9.3f} {srv.get('compute_ms_mean') or 0:11.3f}"
                    f" {eff if eff is not None else float('nan'):11.2f} {step['generator_cpu']:8.2f}"
                )
        by_key = {(run["batching"], s["concurrency"]): s for run in data["served"] for s in run["steps"]}
        for concurrency in results["concurrency"]:
            on, off = by_key.get((True, concurrency)), by_key.get((False, concurrency))
            if on and off and off["requests_per_s"]:
                ratio = on["requests_per_s"] / off["requests_per_s"]
                lines.append(f"  batching on/off at concurrency {concurrency}: {ratio:.2f}x")
        cold = [run["cold_start_s"] for run in data["served"]]
        lines.append(f"  cold start to SERVING: {', '.join(f'{c:.2f} s' for c in cold)}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", choices=["torch", "tensorflow", "both"], default="both")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated closed-loop concurrencies")
    parser.add_argument("--batching", default="on,off", help="on, off or on,off")
    parser.add_argument("--batch-size", type=int, default=1, help="rows per request")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-queue-delay-us", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1, help="framework intra-op threads (both servers)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per step")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each step")
    parser.add_argument("--cpu-split", choices=["auto", "none"], default="auto")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default reports/bench-<time>.json)")
    opts = parser.parse_args(argv)
    concurrencies = [int(c) for c in opts.concurrency.split(",") if c.strip()]
    modes = [part.strip() == "on" for part in opts.batching.split(",") if part.strip()]
    cpus = sorted(os.sched_getaffinity(0))
    server_cpus, driver_cpus = ([cpus[0]], cpus[1:]) if opts.cpu_split == "auto" and len(cpus) >= 2 else (None, None)
    frameworks = ["torch", "tensorflow"] if opts.server == "both" else [opts.server]
    results: dict[str, Any] = {
        "model": opts.model,
        "threads": opts.threads,
        "max_batch_size": opts.max_batch_size,
        "max_queue_delay_us": opts.max_queue_delay_us,
        "rows_per_request": opts.batch_size,
        "concurrency": concurrencies,
        "cpu_split": {"server": server_cpus, "generator": driver_cpus},
        "servers": {},
    }
    for framework in frameworks:
        print(f"{framework}: in-process forward ...", file=sys.stderr, flush=True)
        forward = in_process(framework, opts.model, opts.max_batch_size, opts.threads, server_cpus)
        runs = [
            served(framework, opts.model, batching, concurrencies, opts, server_cpus, driver_cpus) for batching in modes
        ]
        for run in runs:
            for step in run["steps"]:
                step["efficiency"] = efficiency(forward, step)
        results["servers"][framework] = {"in_process": forward, "served": runs}
    print(table(results))
    out = opts.out or ROOT / "reports" / f"bench-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

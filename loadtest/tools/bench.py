"""Serving-efficiency benchmark: what the served path costs beyond the model and the gRPC stack.

    python -m loadtest bench --server both --model mlp --concurrency 1,8,32

In one run, with the server pinned to one core and the load driver (loadtest.driver,
closed loop, batch-1 requests by default) to another:

1. the plumbing ceiling: the bare identity OIP server (loadtest.tools.bare, same grpcio, no
   model), as ``grpc.aio`` and as a thread-pool ``grpc.server``, at each concurrency;
2. per framework, the model's own forward pass in-process at each batch size beside the
   framework's fastest call of the same model (``python -m <server> forward``);
3. per framework, the server with its DEFAULT settings (natural batching) and with
   batching off, at each concurrency; the server's own metrics give the mean batch.

Printed per server: served / bare throughput (the faster bare server at that
concurrency), added latency at c=1 (served p50 - bare p50 - in-process forward p50 at
batch 1), server CPU µs per request, forward vs its reference, batching on/off, and
serving efficiency (served rows/s over in-process rows/s at the observed mean batch), on
stderr; the JSON result to ``--out`` (or stdout). ``--repeats N`` runs everything N times in
alternating order (ABBA) and reports medians. A step whose driver used > 90 % of its core is
marked: the generator, not the server, may have set its pace. Figures, not assertions: compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from loadtest.cli import (
    FRAMEWORKS,
    add_cpu_split_option,
    add_out_option,
    add_server_option,
    progress,
    show,
    split_cpus,
    write_result,
)
from loadtest.sampling import scrape
from loadtest.servers import MODULES, ROOT, ServerProcess, pinned
from loadtest.stats import metric_deltas

GENERATOR_LIMIT = 0.9
BARE_MODES = ("aio", "sync")


@dataclass(frozen=True)
class DriveOptions:
    """One closed-loop step of ``loadtest.driver`` against a running server: what it sends, for how long."""

    model: str
    #: Measured seconds, after ``warmup`` unmeasured ones.
    seconds: float = 4.0
    warmup: float = 1.0
    #: Rows per request.
    batch_size: int = 1
    #: Connections the callers share (a server of several workers needs several).
    channels: int = 1


@dataclass(frozen=True)
class BenchOptions:
    """One bench run (the module docstring tells what it measures)."""

    servers: tuple[str, ...] = FRAMEWORKS
    model: str = "mlp"
    #: Closed-loop concurrencies of every step sweep.
    concurrencies: tuple[int, ...] = (1, 8, 32)
    #: Dynamic batching of the served runs: on, off, or both (in this order).
    batching: tuple[bool, ...] = (True, False)
    batch_size: int = 1
    max_batch_size: int = 32
    #: Framework intra-op threads of both servers and of the in-process forward pass.
    threads: int = 1
    seconds: float = 4.0
    warmup: float = 1.0
    #: Runs of everything, in alternating (ABBA) order; figures are their medians.
    repeats: int = 1
    cpu_split: str = "auto"

    @property
    def step(self) -> DriveOptions:
        """The driver's options of each step."""
        return DriveOptions(self.model, self.seconds, self.warmup, self.batch_size)


def _run(command: list[str], cpus: list[int] | None, timeout: float) -> str:
    """Run ``command`` (pinned to ``cpus``); its stdout, or RuntimeError with its stderr's tail."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        pinned(command, cpus),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return done.stdout


def in_process(
    framework: str, model: str, max_batch: int, threads: int, cpus: list[int] | None, model_dir: Path
) -> dict[str, Any]:
    sizes = sorted({1, *(2**k for k in range(1, 12) if 2**k <= max_batch), max_batch})
    command = [sys.executable, "-m", MODULES[framework], "forward", "--model", model, "--threads", str(threads),
               "--batch-sizes", ",".join(map(str, sizes)), "--seconds", "1", "--device", "cpu",
               "--model-dir", str(model_dir)]  # fmt: skip
    return dict(json.loads(_run(command, cpus, timeout=600).strip().splitlines()[-1]))  # its last line


def rows_per_s_at(forward: dict[str, Any], batch_size: float) -> float:
    """In-process rows/s at a (fractional) batch size, interpolated between measured sizes."""
    sizes = [r["batch_size"] for r in forward["results"]]
    rates = [r["rows_per_s"] for r in forward["results"]]
    return float(np.interp(batch_size, sizes, rates))


def drive(server: ServerProcess, concurrency: int, opts: DriveOptions, cpus: list[int] | None) -> dict[str, Any]:
    """One closed-loop step against a running server: the driver's figures plus the server's
    CPU µs per request and, when it has metrics, its own breakdown of the step."""
    before = scrape(server.metrics_url, opts.model)
    process = psutil.Process(server.pid)
    cpu_before = sum(process.cpu_times()[:2])
    with tempfile.TemporaryDirectory(prefix="drive-") as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "loadtest.driver", "--target", server.target, "--model", opts.model,
                   "--concurrency", str(concurrency), "--seconds", str(opts.seconds), "--warmup", str(opts.warmup),
                   "--batch-size", str(opts.batch_size), "--channels", str(opts.channels),
                   "--out", str(out)]  # fmt: skip
        _run(command, cpus, timeout=opts.seconds + opts.warmup + 120)
        result: dict[str, Any] = json.loads(out.read_text())
    cpu = sum(process.cpu_times()[:2]) - cpu_before
    answered = result["requests_all"]  # warm-up included, as the server's CPU time is
    result["server_cpu_s"] = cpu
    result["server_cpu_us_per_request"] = 1e6 * cpu / answered if answered else None
    result["server"] = metric_deltas(before, scrape(server.metrics_url, opts.model)) if before else {}
    result["generator_bound"] = result["generator_cpu"] > GENERATOR_LIMIT
    return result


def _log(label: str, step: dict[str, Any]) -> None:
    batch = (step.get("server") or {}).get("batch_size_mean")
    progress(
        f"  {label:26s} c={step['concurrency']:<3d} {step['requests_per_s']:8.0f} req/s  "
        f"p50 {step['latency_us'].get('p50') or 0:7.0f} µs  p99 {step['latency_us'].get('p99') or 0:7.0f} µs  "
        f"CPU {step['server_cpu_us_per_request'] or 0:5.0f} µs/req"
        + (f"  batch {batch:5.2f}" if batch else "")
        + f"  gen {step['generator_cpu']:.2f}"
        + ("  GENERATOR-BOUND" if step["generator_bound"] else "")
    )


def bare(mode: str, opts: BenchOptions, server_cpus: list[int] | None, driver_cpus: list[int] | None) -> dict:
    """The bare identity server in ``mode`` (aio or sync), swept over the concurrencies."""
    args = ["--mode", mode]
    with ServerProcess("bare", opts.model, args, cpus=server_cpus) as server:
        steps = []
        for concurrency in opts.concurrencies:
            step = drive(server, concurrency, opts.step, driver_cpus)
            _log(f"bare {mode}", step)
            steps.append(step)
    return {"mode": mode, "steps": steps}


def served(
    framework: str,
    batching: bool,
    opts: BenchOptions,
    server_cpus: list[int] | None,
    driver_cpus: list[int] | None,
    model_dir: Path,
) -> dict[str, Any]:
    args = ["--threads", str(opts.threads), "--max-batch-size", str(opts.max_batch_size), "--device", "cpu",
            "--model-dir", str(model_dir), *([] if batching else ["--no-dynamic-batching"])]  # fmt: skip
    steps = []
    with ServerProcess(framework, opts.model, args, cpus=server_cpus) as server:
        for concurrency in opts.concurrencies:
            step = drive(server, concurrency, opts.step, driver_cpus)
            _log(f"{framework} batching {'on' if batching else 'off'}", step)
            steps.append(step)
        cold_start = server.cold_start_s
    return {"batching": batching, "cold_start_s": cold_start, "server_args": args, "steps": steps}


def _median_step(steps: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One step's figures, the median of its repeats (the first repeat's for the rest)."""
    merged = dict(steps[0])
    for key in ("requests_per_s", "rows_per_s", "generator_cpu", "server_cpu_us_per_request"):
        values = [step[key] for step in steps if step.get(key) is not None]
        merged[key] = statistics.median(values) if values else None
    merged["latency_us"] = {
        name: statistics.median(step["latency_us"][name] for step in steps)
        for name in steps[0]["latency_us"]
        if all(step["latency_us"].get(name) is not None for step in steps)
    }
    batches = [step["server"].get("batch_size_mean") for step in steps if step.get("server")]
    if batches and all(batch is not None for batch in batches):
        merged["server"] = {**steps[0]["server"], "batch_size_mean": statistics.median(batches)}
    merged["generator_bound"] = any(step["generator_bound"] for step in steps)
    merged["repeats"] = len(steps)
    return merged


def summarize(results: dict[str, Any]) -> None:
    """Add the ratios the README's benchmark table shows, per framework."""
    ceiling: dict[int, dict[str, Any]] = {}
    for i, c in enumerate(results["concurrency"]):
        best = max(results["bare"], key=lambda run: run["steps"][i]["requests_per_s"])
        ceiling[c] = {"mode": best["mode"], **best["steps"][i]}
    results["ceiling"] = {str(c): step for c, step in ceiling.items()}
    first = results["concurrency"][0]
    bare_p50 = min(run["steps"][0]["latency_us"]["p50"] for run in results["bare"])
    for data in results["servers"].values():
        forward = data["in_process"]
        forward_p50 = forward["results"][0]["median_us"]
        runs = {run["batching"]: run for run in data["served"]}
        summary: dict[str, Any] = {
            "forward_vs_reference": {r["batch_size"]: r["vs_reference"] for r in forward["results"]}
        }
        on = runs.get(True)
        if on is not None:
            summary["served_vs_bare"] = {
                c: step["requests_per_s"] / ceiling[c]["requests_per_s"]
                for c, step in zip(results["concurrency"], on["steps"], strict=True)
            }
            summary["added_latency_us"] = on["steps"][0]["latency_us"]["p50"] - bare_p50 - forward_p50
            summary["added_latency_at_concurrency"] = first
            summary["server_cpu_us_per_request"] = {
                c: step["server_cpu_us_per_request"]
                for c, step in zip(results["concurrency"], on["steps"], strict=True)
            }
            for step in on["steps"]:
                batch = step["server"].get("batch_size_mean")
                step["efficiency"] = step["rows_per_s"] / rows_per_s_at(forward, batch) if batch else None
        off = runs.get(False)
        if on is not None and off is not None:
            summary["batching_on_vs_off"] = {
                c: a["requests_per_s"] / b["requests_per_s"]
                for c, a, b in zip(results["concurrency"], on["steps"], off["steps"], strict=True)
            }
        data["summary"] = summary


def table(results: dict[str, Any]) -> str:
    concurrency = results["concurrency"]
    lines = [
        f"bench: {results['model']}, {results['rows_per_request']} row(s) per request, server cpus "
        f"{results['cpu_split']['server']}, driver cpus {results['cpu_split']['generator']}, "
        f"{results['repeats']} repeat(s), order {' '.join(results['order'])}",
        "",
        "ceiling: bare identity OIP server (no model, same grpcio)",
        "  server  conc    req/s   p50 µs   p99 µs  CPU µs/req  gen CPU",
    ]
    for run in results["bare"]:
        for step in run["steps"]:
            lines.append(
                f"  {run['mode']:6s} {step['concurrency']:5d} {step['requests_per_s']:8.0f} "
                f"{step['latency_us']['p50']:8.0f} {step['latency_us']['p99']:8.0f} "
                f"{step['server_cpu_us_per_request'] or 0:11.0f} {step['generator_cpu']:8.2f}"
                + ("  GENERATOR-BOUND" if step["generator_bound"] else "")
            )
    for framework, data in results["servers"].items():
        forward, summary = data["in_process"], data["summary"]
        lines += [
            "",
            f"{framework} ({forward['version']}, threads={results['threads']}): in-process forward vs its reference",
            f"  reference: {forward['reference']}",
            "  batch  served µs  reference µs  ratio     rows/s",
        ]
        for r in forward["results"]:
            lines.append(
                f"  {r['batch_size']:5d} {r['median_us']:10.0f} {r['reference_us']:13.0f} {r['vs_reference']:6.2f}"
                f" {r['rows_per_s']:10.0f}"
            )
        lines.append(
            "  batching  conc    req/s   p50 µs   p99 µs  CPU µs/req  mean batch  vs bare  efficiency  gen CPU"
        )
        for run in data["served"]:
            for c, step in zip(concurrency, run["steps"], strict=True):
                srv = step.get("server") or {}
                ratio = step["requests_per_s"] / results["ceiling"][str(c)]["requests_per_s"]
                eff = step.get("efficiency")
                lines.append(
                    f"  {'on ' if run['batching'] else 'off':8s} {c:5d} {step['requests_per_s']:8.0f} "
                    f"{step['latency_us']['p50']:8.0f} {step['latency_us']['p99']:8.0f} "
                    f"{step['server_cpu_us_per_request'] or 0:11.0f} {srv.get('batch_size_mean') or 0:11.2f} "
                    f"{ratio:8.2f} {eff if eff is not None else float('nan'):11.2f} {step['generator_cpu']:8.2f}"
                    + ("  GENERATOR-BOUND" if step["generator_bound"] else "")
                )
        if "added_latency_us" in summary:
            lines.append(
                f"  added latency at c={summary['added_latency_at_concurrency']}: {summary['added_latency_us']:.0f} µs"
                " (served p50 - bare p50 - forward p50 at batch 1)"
            )
        if "served_vs_bare" in summary:
            ratios = ", ".join(f"c={c}: {r:.2f}x" for c, r in summary["served_vs_bare"].items())
            lines.append(f"  served / faster bare server: {ratios}")
        if "batching_on_vs_off" in summary:
            ratios = ", ".join(f"c={c}: {r:.2f}x" for c, r in summary["batching_on_vs_off"].items())
            lines.append(f"  batching on / off: {ratios}")
        cold = [run["cold_start_s"] for run in data["served"]]
        lines.append(f"  cold start to SERVING: {', '.join(f'{c:.2f} s' for c in cold if c is not None)}")
    return "\n".join(lines)


def run(opts: BenchOptions) -> dict[str, Any]:
    """Everything, ``opts.repeats`` times in ABBA order; the results (medians of the repeats, ratios added)."""
    split = split_cpus(opts.cpu_split)
    server_cpus, driver_cpus = split.server, split.generator
    targets = [f"bare-{mode}" for mode in BARE_MODES] + list(opts.servers)
    order: list[str] = []
    raw: dict[str, list[Any]] = {target: [] for target in targets}
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        model_dir = Path(tmp)
        for repeat in range(opts.repeats):
            for target in targets if repeat % 2 == 0 else targets[::-1]:
                order.append(target)
                progress(f"repeat {repeat + 1}: {target}")
                if target.startswith("bare-"):
                    raw[target].append(bare(target.removeprefix("bare-"), opts, server_cpus, driver_cpus))
                    continue
                models = model_dir / target  # one repository per framework
                forward = in_process(target, opts.model, opts.max_batch_size, opts.threads, server_cpus, models)
                runs = [served(target, on, opts, server_cpus, driver_cpus, models) for on in opts.batching]
                raw[target].append({"in_process": forward, "served": runs})
    results: dict[str, Any] = {
        "model": opts.model,
        "threads": opts.threads,
        "max_batch_size": opts.max_batch_size,
        "rows_per_request": opts.batch_size,
        "concurrency": list(opts.concurrencies),
        "repeats": opts.repeats,
        "order": order,
        "cpu_split": {"server": server_cpus, "generator": driver_cpus},
        "generator": "loadtest.driver (grpc.aio, one channel)",
        "bare": [
            {
                "mode": mode,
                "steps": [_median_step(s) for s in zip(*(r["steps"] for r in raw[f"bare-{mode}"]), strict=True)],
            }
            for mode in BARE_MODES
        ],
        "servers": {},
    }
    for framework in opts.servers:
        repeats = raw[framework]
        forward = repeats[0]["in_process"]
        for index, entry in enumerate(forward["results"]):
            for key in ("median_us", "reference_us", "vs_reference", "rows_per_s"):
                entry[key] = statistics.median(r["in_process"]["results"][index][key] for r in repeats)
        runs = []
        for index, served_run in enumerate(repeats[0]["served"]):
            steps = [_median_step(s) for s in zip(*(r["served"][index]["steps"] for r in repeats), strict=True)]
            runs.append({**served_run, "steps": steps})
        results["servers"][framework] = {"in_process": forward, "served": runs, "raw": repeats}
    summarize(results)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    defaults = BenchOptions()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_option(parser)
    parser.add_argument("--model", default=defaults.model)
    parser.add_argument("--concurrency", default=",".join(map(str, defaults.concurrencies)),
                        help="comma-separated closed-loop concurrencies (%(default)s)")  # fmt: skip
    parser.add_argument("--batching", default="on,off", help="on, off or on,off (%(default)s)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="rows per request")
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size)
    parser.add_argument("--threads", type=int, default=defaults.threads,
                        help="framework intra-op threads (both servers)")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=defaults.seconds, help="measured seconds per step")
    parser.add_argument("--warmup", type=float, default=defaults.warmup, help="unmeasured seconds before each step")
    parser.add_argument("--repeats", type=int, default=defaults.repeats,
                        help="runs of everything, in alternating order")  # fmt: skip
    add_cpu_split_option(parser)
    add_out_option(parser)
    args = parser.parse_args(argv)
    opts = BenchOptions(
        servers=args.servers,
        model=args.model,
        concurrencies=tuple(int(c) for c in args.concurrency.split(",") if c.strip()),
        batching=tuple(part.strip() == "on" for part in args.batching.split(",") if part.strip()),
        batch_size=args.batch_size,
        max_batch_size=args.max_batch_size,
        threads=args.threads,
        seconds=args.seconds,
        warmup=args.warmup,
        repeats=args.repeats,
        cpu_split=args.cpu_split,
    )
    results = run(opts)
    show(table(results))
    write_result(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

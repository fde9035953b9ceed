"""Running the GPU check: artifacts built first, then one run per framework, model, precision
and compile mode (start, reported options, parity, load, in-process forward), then the worker
sweep; the report's data (gpucheck.report renders it, gpucheck.cli runs it all).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

import modelzoo
from client import InferenceServerError
from client.metrics import scrape
from gpucheck import budget as timing
from gpucheck.budget import Budget, OutOfTime
from gpucheck.measure import GpuMemory, check_parity, in_process, load, model_config, probe_tensorflow
from gpucheck.options import (
    BUILD_SHARE,
    CALL_CAP_S,
    CHILD_CAP_S,
    FORWARD_SECONDS,
    SEQ_LEN,
    START_CAP_S,
    SWEEP_CALLERS,
    TIME_BUDGET,
    XLA_BATCH_SIZES,
    Options,
    child_env,
)
from loadtest.servers import MODULES, ROOT, ServerProcess
from loadtest.stats import requests_per_worker
from serving.settings import parse_model_args


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def server_args(opts: Options, framework: str, model: str, precision: str, compile: str, repo: Path) -> list[str]:
    args = [
        "--device", opts.device, "--precision", precision, "--compile", compile, "--model-dir", str(repo),
        "--max-batch-size", str(opts.max_batch_size), "--model-arg", opts.model_args.get(model, ""),
    ]  # fmt: skip
    if framework == "tensorflow" and compile == "on":
        sizes = [size for size in XLA_BATCH_SIZES if size < opts.max_batch_size] + [opts.max_batch_size]
        args += ["--preferred-batch-sizes", ",".join(map(str, sizes))]
    if opts.threads:
        args += ["--threads", str(opts.threads)]
    return [*args, *opts.server_args]


def build_artifacts(opts: Options, framework: str, repo: Path, budget: Budget) -> list[dict[str, Any]]:
    """Export each model, then build every (model, precision, compile) artifact in parallel
    (a ``forward`` run each: it exports, compiles and caches what the server will load).
    What ``budget`` has no room for is noted as skipped."""

    def step(name: str, command: list[str]) -> dict[str, Any]:
        started = time.monotonic()
        try:
            done = timing.run(command, budget.timeout(CHILD_CAP_S), ROOT, child_env())
        except (OutOfTime, subprocess.TimeoutExpired):
            return {"step": name, "skipped": TIME_BUDGET}
        note: dict[str, Any] = {"step": name, "seconds": round(time.monotonic() - started, 1)}
        if done.returncode != 0:
            note["error"] = done.stderr.strip().splitlines()[-1:]
        return note

    notes = []
    for model in opts.models:
        command = [sys.executable, "-m", MODULES[framework], "export", "--model", model,
                   "--model-arg", opts.model_args.get(model, ""), "--out", str(repo)]  # fmt: skip
        notes.append(step(f"export {model}", command))
    # One job per (model, precision) that has something to build: its own export (bf16,
    # fp16) and, for torch, its AOTInductor package. XLA keeps nothing between processes.
    compile = "on" if framework == "torch" and "on" in opts.compile_modes else "off"
    jobs = [
        (model, precision)
        for model in opts.models
        for precision in opts.precisions
        if compile == "on" or precision in ("bf16", "fp16")
    ]

    def build(job: tuple[str, str]) -> dict[str, Any]:
        model, precision = job
        command = [
            sys.executable, "-m", MODULES[framework], "forward", "--model", model,
            "--model-arg", opts.model_args.get(model, ""), "--model-dir", str(repo), "--batch-sizes", "1",
            "--seconds", "0.01", "--device", opts.device, "--precision", precision, "--compile", compile,
        ]  # fmt: skip
        return step(f"build {model} {precision} compile {compile}", command)

    workers = max(1, min(len(jobs), (os.cpu_count() or 2) // 2, 8))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        notes += list(pool.map(build, jobs))
    return notes


def stop(server: ServerProcess, budget: Budget) -> None:
    server.stop(timeout=budget.stop_timeout())
    server.close()


def run_one(
    opts: Options,
    framework: str,
    model_name: str,
    precision: str,
    compile: str,
    repo: Path,
    budget: Budget,
    references: dict[str, list[dict[str, np.ndarray]]],
) -> dict[str, Any]:
    """One server with these options: start, parity, load, then the in-process forward pass,
    each wait within the budget. A run the budget cuts short is skipped, not failed."""
    model = modelzoo.get(model_name, **parse_model_args(opts.model_args.get(model_name, "")))
    result: dict[str, Any] = {"framework": framework, "model": model_name, "precision": precision, "compile": compile}
    memory = GpuMemory(opts.device)
    baseline = memory.device_used() if memory.nvml else 0
    server = ServerProcess(framework, model_name, server_args(opts, framework, model_name, precision, compile, repo))
    stop_watch, peak = threading.Event(), dict[str, int]()
    phase = "the server's start"
    try:
        server.start(timeout=budget.timeout(START_CAP_S))
        result["cold_start_s"] = server.cold_start_s
        phase = "ModelConfig"
        reported = model_config(server.target, model_name, budget.timeout(CALL_CAP_S))
        result["reported"] = {key: reported.get(key) for key in
                              ("device", "device_name", "precision", "compile", "export_s", "load_s", "compile_s",
                               "warmup_s", "soft_placement")}  # fmt: skip
        wanted = {"precision": precision, "compile": compile}
        result["reported_ok"] = all(reported.get(key) == value for key, value in wanted.items()) and (
            reported.get("device", "").split(":")[0] == opts.device.split(":")[0]
        )
        phase = "parity"
        result["parity"] = check_parity(server.target, model, precision, opts.max_batch_size, budget, references)
        if opts.parity_only:
            return result
        phase = "load"
        if not budget.fits(opts.warmup + opts.seconds):
            raise OutOfTime(phase)
        seq_len = SEQ_LEN if model.pad_values else 1
        load(server.target, model_name, opts.concurrency, opts.warmup, 0.0, seq_len, opts.channels, budget)
        before = scrape(server.metrics_url, model_name, budget.timeout(CALL_CAP_S))
        watcher = None
        if memory.nvml:
            watcher = threading.Thread(target=memory.watch, args=(server.pid, baseline, stop_watch, peak), daemon=True)
            watcher.start()
        served = load(server.target, model_name, opts.concurrency, opts.seconds, 0.0, seq_len, opts.channels, budget)
        stop_watch.set()
        if watcher:
            watcher.join()
        after = scrape(server.metrics_url, model_name, budget.timeout(CALL_CAP_S))
        executions = after.get("inference_executions_total", 0) - before.get("inference_executions_total", 0)
        rows = after.get("inference_rows_total", 0) - before.get("inference_rows_total", 0)
        latency = served["latency_us"]
        result["served"] = {
            "concurrency": opts.concurrency,
            "requests_per_s": served["requests_per_s"],
            "p50_ms": None if latency.get("p50") is None else latency["p50"] / 1e3,
            "p99_ms": None if latency.get("p99") is None else latency["p99"] / 1e3,
            "errors": served["errors"],
            "mean_batch": rows / executions if executions else None,
            "generator_cpu": served["generator_cpu"],
        }
        held = after.get("process_gpu_memory_framework_bytes")
        if held is not None:  # holds where NVML lists no processes (containers)
            peak["framework_bytes"] = int(held)
        result["gpu_memory_mib"] = (
            {key.replace("_bytes", ""): round(value / 2**20, 1) for key, value in peak.items()}
            if memory.nvml or held is not None
            else memory.reason
        )
    except (OutOfTime, InferenceServerError, RuntimeError, OSError) as err:  # OSError: TimeoutError too
        if isinstance(err, OutOfTime) or budget.spent():
            result["skipped"] = f"{TIME_BUDGET}: it ran out during {phase}"
        else:
            result["error"] = " ".join(str(err).split())[-2000:]
        return result
    finally:
        stop_watch.set()
        stop(server, budget)
    mean_batch = result["served"]["mean_batch"]
    if mean_batch:
        result["in_process"] = in_process(opts, framework, model_name, precision, compile, mean_batch, repo, budget)
        if "rows_per_s" in result["in_process"]:
            result["efficiency"] = result["served"]["requests_per_s"] / result["in_process"]["rows_per_s"]
    return result


def run_check(opts: Options, budget: Budget) -> dict[str, Any]:
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "device": opts.device,
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(opts).items()},
        "frameworks": {},
        "runs": [],
    }
    references: dict[str, list[dict[str, np.ndarray]]] = {}
    # A run starts only when what is left covers the longest run so far (before the first:
    # its load and forward seconds, which no run can take less than).
    durations = [opts.warmup + opts.seconds + 2 * FORWARD_SECONDS if not opts.parity_only else 1.0]
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        for framework in opts.frameworks:
            why_not = probe_tensorflow(opts.device, budget) if framework == "tensorflow" else None
            if why_not:
                report["frameworks"][framework] = {"skipped": why_not}
                log(f"{framework}: skipped: {why_not}")
                continue
            repo = Path(scratch) / framework
            log(f"{framework}: building artifacts")
            notes = build_artifacts(opts, framework, repo, budget.part(BUILD_SHARE))
            report["frameworks"][framework] = {"prepared": notes}
            for compile in opts.compile_modes:
                for model in opts.models:
                    for precision in opts.precisions:
                        combo = f"{framework} {model} {precision} compile {compile}"
                        entry: dict[str, Any] = {"framework": framework, "model": model, "precision": precision,
                                                 "compile": compile}  # fmt: skip
                        if not budget.fits(max(durations)):
                            entry["skipped"] = (f"{TIME_BUDGET}: {budget.left():.0f} s left, a run takes about "
                                                f"{max(durations):.0f} s")  # fmt: skip
                            report["runs"].append(entry)
                            log(f"{combo}: skipped ({entry['skipped']})")
                            continue
                        log(f"{combo}: running")
                        started = time.monotonic()
                        entry = run_one(opts, framework, model, precision, compile, repo, budget, references)
                        if "skipped" not in entry:
                            durations.append(time.monotonic() - started)
                        report["runs"].append(entry)
                        log(f"{combo}: {summary(entry)}")
        if opts.workers and not opts.parity_only:
            report["workers"] = worker_sweep(opts, Path(scratch) / "workers", budget)
    finished = [entry for entry in report["runs"] if "skipped" not in entry]
    report["budget_s"] = budget.seconds
    report["skipped_for_time"] = {
        "runs": len(report["runs"]) - len(finished),
        "workers": len([entry for entry in report.get("workers", []) if "skipped" in entry]),
    }
    report["ok"] = (
        bool(finished)
        and all(run_ok(entry) for entry in finished)
        and all("error" not in entry for entry in report.get("workers", []))
    )
    report["elapsed_s"] = round(budget.elapsed(), 1)
    return report


def worker_sweep(opts: Options, repo: Path, budget: Budget) -> list[dict[str, Any]]:
    """torch_server's mlp (fp32) behind 1, 2, 4, 8 ... workers, 64 callers over 64 connections:
    what more server processes buy when Python around a small model is the limit. A step
    starts only when what is left covers the longest so far (before the first: its load)."""
    entries: list[dict[str, Any]] = []
    durations = [opts.warmup + opts.seconds]
    for count in opts.workers:
        if not budget.fits(max(durations)):
            entries.append({"workers": count, "skipped": f"{TIME_BUDGET}: {budget.left():.0f} s left"})
            log(f"torch mlp with {count} worker(s): skipped ({TIME_BUDGET})")
            continue
        log(f"torch mlp with {count} worker(s): running")
        started = time.monotonic()
        try:
            entries.append(sweep_step(opts, count, repo, budget))
        except Exception as err:  # a run that failed is reported, the others still run
            reason = f"{TIME_BUDGET}: it ran out" if isinstance(err, OutOfTime) or budget.spent() else None
            entries.append({"workers": count, "skipped": reason} if reason else
                           {"workers": count, "error": " ".join(str(err).split())[:500]})  # fmt: skip
            continue
        durations.append(time.monotonic() - started)
        log(f"torch mlp with {count} worker(s): {entries[-1]['requests_per_s']:.0f} req/s")
    return entries


def sweep_step(opts: Options, count: int, repo: Path, budget: Budget) -> dict[str, Any]:
    """mlp behind ``count`` workers pinned to the first ``count`` cores (one each), loaded by
    64 callers over 64 connections: requests/s, latency, and how the workers shared them."""
    args = ["--workers", str(count), "--device", opts.device, "--model-dir", str(repo)]
    if opts.threads:
        args += ["--threads", str(opts.threads)]
    server = ServerProcess("torch", "mlp", args, cpus=sorted(os.sched_getaffinity(0))[:count])
    try:
        server.start(timeout=budget.timeout(START_CAP_S))
        step = load(server.target, "mlp", SWEEP_CALLERS, opts.seconds, opts.warmup, 1, SWEEP_CALLERS, budget)
        counts = scrape(server.metrics_url, "mlp", budget.timeout(CALL_CAP_S))
    finally:
        stop(server, budget)
    return {
        "workers": count,
        "requests_per_s": step["requests_per_s"],
        "p50_ms": step["latency_us"]["p50"] / 1e3,
        "p99_ms": step["latency_us"]["p99"] / 1e3,
        "errors": step["errors"],
        "requests_per_worker": requests_per_worker(counts),
    }


def run_ok(entry: dict[str, Any]) -> bool:
    return "error" not in entry and bool(entry.get("reported_ok")) and bool(entry.get("parity", {}).get("ok"))


def summary(entry: dict[str, Any]) -> str:
    if "skipped" in entry:
        return f"skipped ({entry['skipped']})"
    if "error" in entry:
        return f"FAILED: {entry['error'][:300]}"
    served = entry.get("served", {})
    parity = "ok" if entry["parity"]["ok"] else "FAILED"
    efficiency = entry.get("efficiency")
    return (
        f"parity {parity}, {served.get('requests_per_s', 0):.0f} req/s, p99 {served.get('p99_ms') or 0:.2f} ms, "
        f"batch {served.get('mean_batch') or 0:.1f}, efficiency {efficiency:.2f}"
        if efficiency is not None
        else f"parity {parity}"
    )

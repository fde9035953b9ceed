"""The GPU check: every precision and compile mode of the servers on one CUDA GPU, in minutes.

    scripts/gpu_check.sh OUTDIR            # a host with one CUDA GPU and PyTorch, no network
    scripts/gpu_check.sh --cpu OUTDIR      # the same path on the CPU, small models (CI runs it)
    python -m gpucheck run [--cpu] OUTDIR  # the same without the script's wheel install

For each framework that can run here (torch always; TensorFlow only where it imports and,
on a GPU run, sees a GPU: otherwise the report says it was skipped and why), each model
(resnet, encoder), precision (fp32, bf16, fp16) and compile mode (off, on), it

1. starts the server (``python -m <server> serve``) on the device with those options and
   reads back what ModelConfig reports (device, precision, compile mode, start-up times);
2. checks parity: a batch over gRPC against the model's fp32 reference computed on the CPU
   (its torch module), within ``serving.backend.TOLERANCES``;
3. loads it with ``concurrency`` closed-loop callers (``loadtest.driver``: grpc.aio, no
   Locust) for ``seconds``: requests/s, p50/p99, the mean batch the server formed (its own
   counters), and the GPU memory the server process used (NVML, sampled);
4. stops it and times the model's forward pass in-process at that mean batch
   (``python -m <server> forward``, interpolated between the two whole sizes around it):
   serving efficiency = served rows/s / in-process rows/s.

Artifacts (each precision's export, the AOTInductor packages) are built first, one process
per (model, precision) in parallel, within half of what is left of the time budget, so the
measured starts load them from the model repository. Last, a worker sweep: torch_server's
mlp (fp32) behind ``--workers`` 1, 2, 4, 8 server processes (1, 2 on the CPU; ``--workers
none`` skips it), 64 callers over 64 connections (the kernel spreads connections, not
requests, over workers), one worker per core. ``--server-arg`` passes a flag to every server.

Time: ``--budget-s`` (GPU 420 s, CPU 900 s) is the whole check's, from its start to its
report (gpucheck.budget). Every child process, server start, RPC, load run and sweep step
waits at most what is left of it; a run or sweep step starts only when what is left covers
the longest one so far; what does not fit is reported as skipped for the time budget. Past
the budget only stopping a server (at most 5 s) and writing the report remain, so with the
defaults scripts/gpu_check.sh, its wheel install included, ends within 8 minutes.

Results go to ``OUTDIR/gpu_check.json`` and ``OUTDIR/gpu_check.md`` (also printed). The
exit status is 1 when a run failed (a server did not start, parity or a reported option
was wrong) or no run finished within the budget, else 0.

This module imports neither TensorFlow nor Locust: the TensorFlow server runs in its own
process, and only when the probe finds it.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import dataclasses
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import modelzoo
from client import InferenceClient, InferenceServerError
from client.metrics import scrape
from gpucheck import budget as timing
from gpucheck.budget import Budget, OutOfTime
from loadtest.driver import drive
from loadtest.servers import MODULES, ROOT, ServerProcess
from loadtest.stats import requests_per_worker
from modelzoo.base import ModelDefinition
from serving.backend import TOLERANCES
from serving.nvml import Gpu, open_gpu
from serving.settings import COMPILE_MODES, PRECISIONS

#: Model parameters of a GPU run: enough compute per row that the GPU, not the Python
#: front end, can be the limit at 64 callers (resnet ~15 GFLOP per 112x112 image).
GPU_MODEL_ARGS = {
    "resnet": "image_size=112,widths=[64,128,256,512],blocks_per_stage=2",
    "encoder": "hidden=768,heads=12,layers=4,ffn=3072,max_len=128,vocab_size=8192",
    "mlp": "",
}
#: Small models for a CPU run (CI): the same code path in seconds.
CPU_MODEL_ARGS = {
    "resnet": "image_size=16,widths=[8,16]",
    "encoder": "hidden=32,heads=4,layers=1,ffn=64,max_len=32",
    "mlp": "hidden=[32,32]",
}
#: Sequence length of the encoder's requests.
SEQ_LEN = 16
#: Parity batches: (rows, encoder sequence length, seed).
PARITY_BATCHES = ((1, 5, 1), (8, SEQ_LEN, 2), (32, 64, 3))
#: Under XLA every batch size is a compilation: TensorFlow's compiled runs use these buckets.
XLA_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
#: The whole check's time budget, seconds: the GPU default keeps scripts/gpu_check.sh within 8 minutes.
BUDGET_S = {"gpu": 420.0, "cpu": 900.0}
#: Share of what is left of the budget that the artifact builds may use: the runs get the rest.
BUILD_SHARE = 0.5
#: Caps of single waits; the budget bounds each further.
START_CAP_S = 300.0
CALL_CAP_S = 120.0
CHILD_CAP_S = 600.0
#: Measured seconds per batch size of the in-process forward timing.
FORWARD_SECONDS = 1.0
#: The worker sweep's callers, one connection each.
SWEEP_CALLERS = 64
#: Why a run or step was not started, or stopped: its report says this.
TIME_BUDGET = "time budget"


@dataclasses.dataclass
class Options:
    out: Path
    device: str
    frameworks: list[str]
    models: list[str]
    precisions: list[str]
    compile_modes: list[str]
    concurrency: int
    seconds: float
    warmup: float
    max_batch_size: int
    budget_s: float
    model_args: dict[str, str]
    server_args: list[str]
    threads: int | None
    parity_only: bool = False
    channels: int = 1
    #: Worker counts of the sweep (mlp, fp32, 64 callers over 64 connections); empty: none.
    workers: list[int] = dataclasses.field(default_factory=list)


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def probe_tensorflow(device: str, budget: Budget | None = None) -> str | None:
    """None when tf_server can run on ``device`` here, else why not (in a child process, so
    TensorFlow never loads into this one)."""
    code = "import tensorflow as tf; print(len(tf.config.list_physical_devices('GPU')))"
    try:
        timeout = (budget or Budget(CALL_CAP_S)).timeout(CALL_CAP_S)
    except OutOfTime:
        return f"not probed: {TIME_BUDGET} spent"
    try:
        done = timing.run([sys.executable, "-c", code], timeout, ROOT, _env())
    except subprocess.TimeoutExpired:
        cut = f" ({TIME_BUDGET} spent)" if budget and budget.spent() else ""
        return f"TensorFlow did not import within {timeout:.0f} s{cut}"
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        return f"TensorFlow does not import here ({lines[-1].strip() if lines else 'exit ' + str(done.returncode)})"
    gpus = int(done.stdout.strip().splitlines()[-1])
    if device != "cpu" and gpus == 0:
        return "TensorFlow imports but sees no GPU (a CPU-only build, or no CUDA libraries for it)"
    return None


def reference_outputs(model: ModelDefinition, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The fp32 reference: the model's torch module on the CPU."""
    import torch

    from torch_server.model import build

    with torch.inference_mode():
        outputs = build(model)(*(torch.from_numpy(inputs[spec.name]) for spec in model.inputs))
    return {name: tensor.numpy() for name, tensor in outputs.items()}


def parity_inputs(model: ModelDefinition, max_batch_size: int) -> list[dict[str, np.ndarray]]:
    batches = []
    for rows, seq_len, seed in PARITY_BATCHES:
        kwargs = {"seq_len": min(seq_len, int(model.params["max_len"]))} if model.pad_values else {}
        batches.append(model.example_inputs(min(rows, max_batch_size), np.random.default_rng(seed), **kwargs))
    return batches


def check_parity(
    target: str,
    model: ModelDefinition,
    precision: str,
    max_batch_size: int,
    budget: Budget,
    references: dict[str, list[dict[str, np.ndarray]]],
) -> dict[str, Any]:
    """Each parity batch over gRPC against the fp32 reference (computed once per model, kept in
    ``references``): the largest errors per output."""
    tolerance = TOLERANCES[precision]
    outputs: dict[str, dict[str, Any]] = {}
    batches = parity_inputs(model, max_batch_size)
    if model.name not in references:
        references[model.name] = [reference_outputs(model, model.complete_inputs(inputs)) for inputs in batches]
    with InferenceClient(target, timeout=CALL_CAP_S) as client:
        for inputs, expected in zip(batches, references[model.name], strict=True):
            served = client.infer(model.name, inputs, timeout=budget.timeout(CALL_CAP_S))
            for name, want in expected.items():
                error, relative = tolerance.errors(served[name], want)
                entry = outputs.setdefault(name, {"max_abs": 0.0, "max_rel_to_largest": 0.0, "ok": True})
                entry["max_abs"] = max(entry["max_abs"], error)
                entry["max_rel_to_largest"] = max(entry["max_rel_to_largest"], relative)
                entry["ok"] = entry["ok"] and tolerance.holds(served[name], want)
    return {
        "ok": all(entry["ok"] for entry in outputs.values()),
        "tolerance": dataclasses.asdict(tolerance),
        "batches": [rows for rows, _, _ in PARITY_BATCHES],
        "outputs": outputs,
    }


def model_config(target: str, model: str, timeout: float) -> dict[str, str]:
    with InferenceClient(target, timeout=timeout) as client:
        config = client.model_config(model)
    return {key: value.string_value for key, value in config.parameters.items()}


class GpuMemory:
    """Peak GPU memory of one process (NVML through ``serving.nvml``: the process's own figure
    where NVML lists it, and the device's rise over a baseline). Inert on the CPU or without NVML."""

    def __init__(self, device: str) -> None:
        self.gpu: Gpu | None = None
        if device == "cpu":
            self.reason = "cpu run"
            return
        try:
            self.gpu = open_gpu(int(device.partition(":")[2] or 0))
            self.reason = ""
        except Exception as err:  # no NVML, or no NVML device for it: memory is unknown, with why
            self.reason = f"NVML unavailable ({err})"

    @property
    def nvml(self) -> bool:
        return self.gpu is not None

    def device_used(self) -> int:
        return (self.gpu.memory_used() if self.gpu else None) or 0

    def process_used(self, pid: int) -> int | None:
        return self.gpu.process_used(pid) if self.gpu else None

    def watch(self, pid: int, baseline: int, stop: threading.Event, peak: dict[str, int]) -> None:
        while not stop.is_set():
            own = self.process_used(pid)
            if own is not None:
                peak["process_bytes"] = max(peak.get("process_bytes", 0), own)
            peak["device_rise_bytes"] = max(peak.get("device_rise_bytes", 0), self.device_used() - baseline)
            stop.wait(0.2)


def forward_rows_per_s(
    opts: Options,
    framework: str,
    model: str,
    precision: str,
    compile: str,
    mean_batch: float,
    repo: Path,
    budget: Budget,
) -> dict[str, Any]:
    """In-process rows/s at ``mean_batch``: ``python -m <server> forward`` at the whole batch
    sizes around it, interpolated linearly."""
    low = max(1, math.floor(mean_batch))
    high = min(opts.max_batch_size, max(low, math.ceil(mean_batch)))
    sizes = sorted({low, high})
    command = [
        sys.executable, "-m", MODULES[framework], "forward",
        "--model", model, "--model-arg", opts.model_args.get(model, ""), "--model-dir", str(repo),
        "--batch-sizes", ",".join(map(str, sizes)), "--seconds", str(FORWARD_SECONDS), "--device", opts.device,
        "--precision", precision, "--compile", compile,
    ]  # fmt: skip
    if opts.threads:
        command += ["--threads", str(opts.threads)]
    done = timing.run(command, budget.timeout(CHILD_CAP_S), ROOT, _env())
    if done.returncode != 0:
        raise RuntimeError(f"forward failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    rates = {entry["batch_size"]: entry["rows_per_s"] for entry in result["results"]}
    if low == high:
        rows_per_s = rates[low]
    else:
        share = mean_batch - low
        rows_per_s = rates[low] * (1 - share) + rates[high] * share
    return {"rows_per_s": rows_per_s, "at_batch_sizes": rates, "reference": result.get("reference")}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return env


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
            done = timing.run(command, budget.timeout(CHILD_CAP_S), ROOT, _env())
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


def load(target: str, model: str, concurrency: int, seconds: float, warmup: float, seq_len: int, channels: int,
         budget: Budget) -> dict[str, Any]:  # fmt: skip
    """``loadtest.driver.drive``, cancelled when the budget runs out (TimeoutError)."""
    timeout = budget.timeout(warmup + seconds + CALL_CAP_S)
    return asyncio.run(
        asyncio.wait_for(drive(target, model, concurrency, seconds, warmup, 1, seq_len, channels), timeout)
    )


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
    model = modelzoo.get(model_name, **_params(opts.model_args.get(model_name, "")))
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


def in_process(
    opts: Options,
    framework: str,
    model: str,
    precision: str,
    compile: str,
    mean_batch: float,
    repo: Path,
    budget: Budget,
) -> dict[str, Any]:
    """``forward_rows_per_s`` when the budget has room for it, else why not."""
    if not budget.fits(2 * FORWARD_SECONDS):
        return {"skipped": TIME_BUDGET}
    try:
        return forward_rows_per_s(opts, framework, model, precision, compile, mean_batch, repo, budget)
    except (OutOfTime, subprocess.TimeoutExpired) as err:
        return {"skipped": TIME_BUDGET} if budget.spent() else {"error": str(err)}
    except (RuntimeError, ValueError, KeyError) as err:
        return {"error": str(err)}


def _params(text: str) -> dict[str, str]:
    from serving.settings import parse_model_args

    return parse_model_args(text)


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


def _cell(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# GPU check ({report['device']}), {report['date']}",
        "",
        f"Host {report['host']}, Python {report['python']}, {report['elapsed_s']} s of a {report['budget_s']:g} s "
        f"time budget; {report['options']['concurrency']} closed-loop callers for {report['options']['seconds']} s "
        "per run. Efficiency = served rows/s / in-process rows/s at the mean batch the server formed. "
        f"Overall: {verdict(report)}.",
        "",
    ]
    for framework, state in report["frameworks"].items():
        if "skipped" in state:
            lines.append(f"- **{framework}: skipped** — {state['skipped']}.")
        else:
            failed = [note for note in state["prepared"] if "error" in note]
            skipped = [note for note in state["prepared"] if "skipped" in note]
            lines.append(
                f"- {framework}: ran; artifact builds: {len(state['prepared'])}, failed: {len(failed)}, "
                f"skipped for the {TIME_BUDGET}: {len(skipped)}."
            )
    lines += [
        "",
        "| framework | model | precision | compile | parity (max abs) | reported | cold start s | load / compile s | "
        "req/s | p50 ms | p99 ms | mean batch | in-process rows/s | efficiency | GPU MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in report["runs"]:
        head = f"| {entry['framework']} | {entry['model']} | {entry['precision']} | {entry['compile']} |"
        if "skipped" in entry:
            lines.append(f"{head} skipped: {entry['skipped']} |" + " |" * 10)
            continue
        if "error" in entry:
            lines.append(f"{head} FAILED: {entry['error'][:200]} |" + " |" * 10)
            continue
        parity = entry["parity"]
        worst = max(output["max_abs"] for output in parity["outputs"].values())
        served = entry.get("served", {})
        memory = entry.get("gpu_memory_mib")
        mib = (
            memory.get("process", memory.get("framework", memory.get("device_rise")))
            if isinstance(memory, dict)
            else None
        )
        reported = entry["reported"]
        startup = f"{reported.get('load_s') or '–'} / {reported.get('compile_s') if entry['compile'] == 'on' else '–'}"
        lines.append(
            f"{head} {'ok' if parity['ok'] else 'FAILED'} ({worst:.2g}) | {'ok' if entry['reported_ok'] else 'WRONG'} "
            f"| {_cell(entry.get('cold_start_s'), '.1f')} | {startup} "
            f"| {_cell(served.get('requests_per_s'), '.0f')} | {_cell(served.get('p50_ms'), '.2f')} "
            f"| {_cell(served.get('p99_ms'), '.2f')} | {_cell(served.get('mean_batch'), '.1f')} "
            f"| {forward_cell(entry.get('in_process', {}))} "
            f"| {_cell(entry.get('efficiency'), '.2f')} | {_cell(mib)} |"
        )
    if report.get("workers"):
        base = next((w["requests_per_s"] for w in report["workers"] if "requests_per_s" in w), None)
        lines += [
            "",
            "Workers (torch_server, mlp fp32, 64 callers over 64 connections; one worker per core):",
            "",
            "| workers | req/s | vs 1 worker | p50 ms | p99 ms | errors | requests per worker |",
            "|---|---|---|---|---|---|---|",
        ]
        for entry in report["workers"]:
            if "skipped" in entry:
                lines.append(f"| {entry['workers']} | skipped: {entry['skipped']} | | | | | |")
                continue
            if "error" in entry:
                lines.append(f"| {entry['workers']} | FAILED: {entry['error'][:200]} | | | | | |")
                continue
            ratio = entry["requests_per_s"] / base if base else None
            spread = " ".join(f"{count:.0f}" for count in entry["requests_per_worker"].values())
            lines.append(
                f"| {entry['workers']} | {entry['requests_per_s']:.0f} | {_cell(ratio, '.2f')} | {entry['p50_ms']:.2f} "
                f"| {entry['p99_ms']:.2f} | {sum(entry['errors'].values())} | {spread} |"
            )
    return "\n".join(lines) + "\n"


def forward_cell(forward: dict[str, Any]) -> str:
    if "skipped" in forward:
        return f"skipped: {forward['skipped']}"
    if "error" in forward:
        return f"FAILED: {forward['error'][:200]}"
    return _cell(forward.get("rows_per_s"), ".0f")


def verdict(report: dict[str, Any]) -> str:
    """OK, FAILED or INCOMPLETE, and what the time budget skipped."""
    skipped = report["skipped_for_time"]
    runs = len(report["runs"])
    if report["ok"]:
        word = "OK"
    elif runs and skipped["runs"] == runs:
        word = f"INCOMPLETE (no run finished within the {TIME_BUDGET})"
    else:
        word = "FAILED"
    if skipped["runs"] or skipped["workers"]:
        word += (
            f"; skipped for the {TIME_BUDGET}: {skipped['runs']} of {runs} runs, "
            f"{skipped['workers']} of {len(report.get('workers', []))} worker-sweep steps"
        )
    return word


def parse_model_args(items: Sequence[str], defaults: dict[str, str]) -> dict[str, str]:
    """``MODEL:KEY=VALUE,...`` items over the defaults."""
    chosen = dict(defaults)
    for item in items:
        model, sep, args = item.partition(":")
        if not sep:
            raise argparse.ArgumentTypeError(f"--model-arg {item!r} is not MODEL:KEY=VALUE,...")
        chosen[model] = args
    return chosen


def _list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    budget_started = time.monotonic()
    parser = argparse.ArgumentParser(
        prog="python -m gpucheck run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU with small models (the CI check)")
    parser.add_argument("--device", default=None, help="default: cuda:0, or cpu with --cpu")
    parser.add_argument("--frameworks", default="torch,tensorflow")
    parser.add_argument("--models", default="resnet,encoder")
    parser.add_argument("--precisions", default="fp32,bf16,fp16")
    parser.add_argument("--compile", default="off,on", dest="compile_modes")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=None, help="measured seconds per run (GPU 4, CPU 1)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before each measured run")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help=f"seconds for the whole check, builds, runs, sweep and report; what does not fit is skipped "
        f"(GPU {BUDGET_S['gpu']:g} s: with the defaults scripts/gpu_check.sh ends within 8 minutes; "
        f"CPU {BUDGET_S['cpu']:g} s)",
    )
    parser.add_argument("--model-arg", action="append", default=[], help="MODEL:KEY=VALUE,... (repeatable)")
    parser.add_argument("--server-arg", action="append", default=[], help="one more server flag (repeatable)")
    parser.add_argument("--channels", type=int, default=1, help="connections of the load driver (workers: several)")
    parser.add_argument("--parity-only", action="store_true", help="check parity and reported options, no load")
    parser.add_argument("--threads", type=int, default=None, help="--threads of servers and forward (CPU: 1)")
    parser.add_argument(
        "--workers", default=None, help="worker counts of the mlp sweep, or none (GPU 1,2,4,8; CPU 1,2)"
    )
    args = parser.parse_args(argv)
    device = args.device or ("cpu" if args.cpu else "cuda:0")
    opts = Options(
        out=args.out,
        device=device,
        frameworks=_list(args.frameworks),
        models=_list(args.models),
        precisions=_list(args.precisions),
        compile_modes=_list(args.compile_modes),
        concurrency=args.concurrency,
        seconds=args.seconds if args.seconds is not None else (1.0 if device == "cpu" else 4.0),
        warmup=args.warmup,
        max_batch_size=args.max_batch_size,
        budget_s=args.budget_s if args.budget_s is not None else BUDGET_S["cpu" if device == "cpu" else "gpu"],
        model_args=parse_model_args(args.model_arg, CPU_MODEL_ARGS if device == "cpu" else GPU_MODEL_ARGS),
        server_args=list(args.server_arg),
        threads=args.threads if args.threads is not None else (1 if device == "cpu" else None),
        parity_only=args.parity_only,
        channels=args.channels,
        workers=[
            int(count) for count in _list(args.workers or ("1,2" if device == "cpu" else "1,2,4,8")) if count != "none"
        ],
    )
    unknown = [
        *(f"--frameworks {name}" for name in opts.frameworks if name not in ("torch", "tensorflow")),
        *(f"--models {name}" for name in opts.models if name not in modelzoo.names()),
        *(f"--precisions {name}" for name in opts.precisions if name not in PRECISIONS),
        *(f"--compile {name}" for name in opts.compile_modes if name not in COMPILE_MODES),
    ]
    if unknown:
        print(f"error: unknown {', '.join(unknown)}", file=sys.stderr)
        return 2
    if device != "cpu":
        import torch

        if not torch.cuda.is_available():
            print(f"error: --device {device}: torch {torch.__version__} sees no CUDA GPU (use --cpu)", file=sys.stderr)
            return 2
    report = run_check(opts, Budget(opts.budget_s, budget_started))
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    text = markdown(report)
    (opts.out / "gpu_check.md").write_text(text)
    print(text)
    return 0 if report["ok"] else 1

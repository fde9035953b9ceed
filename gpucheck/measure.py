"""What the GPU check measures, each wait within the time budget: whether tf_server can run
here (``probe_tensorflow``), parity of a served model with its fp32 reference on the CPU, what
ModelConfig reports, a process's GPU memory (NVML), closed-loop load (``loadtest.driver``), and
the model's in-process forward pass at the batch the server formed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from client import InferenceClient
from gpucheck import budget as timing
from gpucheck.budget import Budget, OutOfTime
from gpucheck.options import CALL_CAP_S, CHILD_CAP_S, FORWARD_SECONDS, PARITY_BATCHES, TIME_BUDGET, Options, child_env
from loadtest.driver import drive
from loadtest.servers import MODULES, ROOT
from modelzoo.base import ModelDefinition
from serving.backend import TOLERANCES
from serving.nvml import Gpu, open_gpu


def probe_tensorflow(device: str, budget: Budget | None = None) -> str | None:
    """None when tf_server can run on ``device`` here, else why not (in a child process, so
    TensorFlow never loads into this one)."""
    code = "import tensorflow as tf; print(len(tf.config.list_physical_devices('GPU')))"
    try:
        timeout = (budget or Budget(CALL_CAP_S)).timeout(CALL_CAP_S)
    except OutOfTime:
        return f"not probed: {TIME_BUDGET} spent"
    try:
        done = timing.run([sys.executable, "-c", code], timeout, ROOT, child_env())
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
    done = timing.run(command, budget.timeout(CHILD_CAP_S), ROOT, child_env())
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


def load(target: str, model: str, concurrency: int, seconds: float, warmup: float, seq_len: int, channels: int,
         budget: Budget) -> dict[str, Any]:  # fmt: skip
    """``loadtest.driver.drive``, cancelled when the budget runs out (TimeoutError)."""
    timeout = budget.timeout(warmup + seconds + CALL_CAP_S)
    return asyncio.run(
        asyncio.wait_for(drive(target, model, concurrency, seconds, warmup, 1, seq_len, channels), timeout)
    )


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

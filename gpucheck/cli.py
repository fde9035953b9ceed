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
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import modelzoo
from gpucheck.budget import Budget
from gpucheck.check import run_check
from gpucheck.options import BUDGET_S, CPU_MODEL_ARGS, GPU_MODEL_ARGS, Options
from gpucheck.report import markdown
from serving.settings import COMPILE_MODES, PRECISIONS


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

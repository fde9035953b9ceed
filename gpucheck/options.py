"""The GPU check's options (``Options``, from its command line) and the fixed settings its
parts share: model sizes, parity batches, the default time budget and the caps of single waits.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from loadtest.servers import ROOT

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
    """What one check runs: device, the matrix of frameworks, models, precisions and compile
    modes, the load of each run, the time budget, and the worker sweep."""

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


def child_env() -> dict[str, str]:
    """This process's environment with the repository first on PYTHONPATH: what every child
    process of the check (probe, export, forward) runs with."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return env

"""The parity gate: before anything is timed, both servers must give the same outputs for the
same inputs, or the comparison would time two different models.

Inputs are built once, from the first server's ModelMetadata and ModelConfig (``InputPool``: its
published integer ranges, optional inputs left out, every dynamic dimension ``LENGTH`` long),
and sent to every server by name; outputs are compared by name, BF16 as values, within a
tolerance (``serving.backend.TOLERANCES`` of the precision, unless set).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from client import InferenceClient
from contract import codec
from contract.datatypes import bf16_to_float32
from loadtest.compare.fidelity import top1
from loadtest.workload import InputPool, LoadSettings
from serving.backend import Tolerance

#: Size of every dynamic non-batch dimension in the parity inputs.
LENGTH = 8
#: Rows of the parity batches (the second bounded by the model's max batch size).
ROWS = (1, 4)


@dataclass(frozen=True)
class Probe:
    """The parity inputs, and the datatype of each output (to compare BF16 words as values)."""

    batches: tuple[dict[str, np.ndarray], ...]
    datatypes: Mapping[str, str]
    output_datatypes: Mapping[str, str]


def probe_for(target: str, model: str, *, timeout: float = 30.0) -> Probe:
    """Parity inputs for ``model`` built from the server at ``target`` (seeded: the same every run)."""
    import grpc

    with grpc.insecure_channel(target) as channel:
        batches = []
        for index, rows in enumerate(ROWS):
            settings = LoadSettings(model=model, batch_size=rows, seq_len=(LENGTH, LENGTH), pool_size=1)
            try:
                pool = InputPool.from_server(channel, settings, timeout=timeout, seed=index)
            except ValueError:  # more rows than the model takes
                continue
            batches.append(_arrays(pool))
    with InferenceClient(target, timeout=timeout) as client:
        metadata = client.model_metadata(model)
    return Probe(
        tuple(batches),
        {spec.name: spec.datatype for spec in metadata.inputs},
        {spec.name: spec.datatype for spec in metadata.outputs},
    )


def _arrays(pool: InputPool) -> dict[str, np.ndarray]:
    return codec.request_inputs(pool.requests[0])


def outputs_of(target: str, model: str, probe: Probe, *, timeout: float = 60.0) -> list[dict[str, np.ndarray]]:
    """Every probe batch's outputs from the server at ``target``."""
    with InferenceClient(target, timeout=timeout) as client:
        return [client.infer(model, batch, datatypes=dict(probe.datatypes)) for batch in probe.batches]


def differences(
    expected: Sequence[Mapping[str, np.ndarray]],
    actual: Sequence[Mapping[str, np.ndarray]],
    output_datatypes: Mapping[str, str],
    tolerance: Tolerance,
) -> list[dict[str, Any]]:
    """Per batch and output: the largest difference, absolute and relative to the largest value,
    whether it is within ``tolerance`` (a missing output or another shape never is), and the rows whose
    argmax over the last axis agrees (``top1_agree`` of ``top1_rows``; None without a class axis)."""
    found = []
    for batch, (want, got) in enumerate(zip(expected, actual, strict=True)):
        for name in sorted(set(want) | set(got)):
            entry: dict[str, Any] = {"batch": batch, "output": name}
            if name not in want or name not in got or want[name].shape != got[name].shape:
                shapes = [list(side[name].shape) if name in side else None for side in (want, got)]
                found.append(entry | {"max_abs": None, "max_rel": None, "within": False, "shapes": shapes,
                                  "top1_agree": None, "top1_rows": None})  # fmt: skip
                continue
            a, b = _values(want[name], output_datatypes.get(name)), _values(got[name], output_datatypes.get(name))
            error, relative = tolerance.errors(b, a)
            agree, rows = top1(a, b) or (None, None)
            found.append(entry | {"max_abs": error, "max_rel": relative, "within": tolerance.holds(b, a),
                                  "top1_agree": agree, "top1_rows": rows})  # fmt: skip
    return found


def _values(array: np.ndarray, datatype: str | None) -> np.ndarray:
    if datatype == "BF16":
        return bf16_to_float32(array)
    return array.astype(np.float64) if array.dtype.kind in "biuf" else array

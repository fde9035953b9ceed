"""Preparation of a comparison and the gates before any timing.

Each server starts once on its model repository (a fresh one the zoo model is exported into, or the
user's own), timed apart; its ModelConfig is read and its outputs on the parity inputs are taken.
Then two gates: ``check_fairness`` refuses servers that report different settings (device,
threads, precision, compile mode, batching), ``check_parity`` servers whose outputs differ beyond
the precision's tolerance. Either raises ``ComparisonRefused`` with the numbers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from client import InferenceServerError
from loadtest.cli import progress
from loadtest.compare import parity
from loadtest.compare.plan import Arm, Options, check_settings, expected_settings
from loadtest.compare.steps import Run, path_name, serving
from serving.backend import TOLERANCES, Tolerance


class ComparisonRefused(RuntimeError):
    """The servers would not be compared like with like (settings differ); the message says how."""


def repository_for(opts: Options, arm: Arm, tmp: Path) -> Path:
    """The model repository a local server serves from: the user's (``--torch-repository``,
    ``--tf-repository``: their own models), else a fresh one the first start exports the zoo model into."""
    given = opts.torch_repository if arm.framework == "torch" else opts.tf_repository
    return given if given is not None else tmp / "models" / path_name(arm.name)


def prepare(run: Run, arms: Sequence[Arm], records: dict[str, Any], model_dirs: dict[str, Path]) -> dict[str, Any]:
    """Start each server once (exporting into its fresh repository, timed apart), read its ModelConfig,
    and take its outputs on the parity inputs (built from the first server's metadata); returns them
    (``outputs`` by arm, and ``errors`` by arm where a server could not answer)."""
    probe: parity.Probe | None = None
    outputs: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for arm in arms:
        started = time.perf_counter()
        with serving(run, arm, records[arm.name], "prepare", 0, model_dirs.get(arm.name)) as (endpoint, _):
            first_start = time.perf_counter() - started
            config = endpoint.describe()
            if arm.framework is not None:
                # Judged after the settings are (check_parity): a server that cannot answer is refused there.
                try:
                    probe = probe or parity.probe_for(endpoint.target, run.opts.model)
                    outputs[arm.name] = parity.outputs_of(endpoint.target, run.opts.model, probe)
                    records[arm.name]["output_datatypes"] = dict(probe.output_datatypes)
                except (grpc.RpcError, InferenceServerError, ValueError) as err:
                    errors[arm.name] = " ".join(str(err).split())[:300]
        params = config.get("parameters", {})
        records[arm.name]["model_config"] = config
        records[arm.name]["target"] = records[arm.name]["target"] or endpoint.target
        if arm.kind == "local":
            records[arm.name]["prepare"] = {
                "first_start_s": round(first_start, 3),
                "export_s": float(params["export_s"]) if "export_s" in params else None,
                "compile_s": float(params["compile_s"]) if "compile_s" in params else None,
                "model_dir": str(model_dirs[arm.name]),
            }
            own = run.opts.torch_repository is not None
            progress(f"{arm.name}: prepared in {first_start:.1f} s (first start"
                     f"{' from your repository' if own else ': export into a fresh repository'})")  # fmt: skip
    return {"outputs": outputs, "errors": errors}


class ParityFailed(ComparisonRefused):
    """The servers give different outputs for the same inputs: they do not serve the same model."""


def check_parity(
    opts: Options, groups: Sequence[dict[str, Any]], records: dict[str, Any], taken: dict[str, Any]
) -> list[dict[str, Any]]:
    """Per variant, torch's outputs against tensorflow's on the parity inputs (``taken`` by ``prepare``);
    ``ParityFailed`` (with the numbers) beyond the tolerance: the precision's (``serving.backend.TOLERANCES``)
    unless --parity-atol/rtol (with --allow-mismatch: a warning, and the findings say so), or when a server
    could not answer them (even with --allow-mismatch: nothing was compared)."""
    outputs, errors = taken["outputs"], taken["errors"]
    checked, problems = [], []
    problems += [f"{name}: no outputs for the parity inputs ({error})" for name, error in errors.items()]
    for group in groups:
        members = group["arms"]
        if not {"torch", "tensorflow"} <= set(members) or not all(members[f] in outputs for f in members):
            continue
        precision = group["values"].get("precision", opts.precision)
        default = TOLERANCES.get(precision, TOLERANCES["fp32"])
        tolerance = Tolerance(
            atol=default.atol if opts.parity_atol is None else opts.parity_atol,
            rtol=default.rtol if opts.parity_rtol is None else opts.parity_rtol,
        )
        found = parity.differences(
            outputs[members["torch"]], outputs[members["tensorflow"]],
            records[members["torch"]].get("output_datatypes", {}), tolerance,
        )  # fmt: skip
        checked.append({"variant": group["name"], "atol": tolerance.atol, "rtol": tolerance.rtol, "outputs": found})
        for entry in found:
            if not entry["within"]:
                where = f"{group['name']}: output {entry['output']!r} (parity batch {entry['batch']})"
                if entry["max_abs"] is None:
                    problems.append(f"{where}: shapes {entry['shapes']}")
                else:
                    problems.append(
                        f"{where}: max |diff| {entry['max_abs']:.3g}, {entry['max_rel']:.3g} of the largest value, "
                        f"beyond atol {tolerance.atol:g} + rtol {tolerance.rtol:g}"
                    )
    if problems and (errors or not opts.allow_mismatch):
        raise ParityFailed(
            "refusing to compare: the servers' outputs differ on the same inputs, so they do not serve the same "
            "model:\n  " + "\n  ".join(problems) + ("" if errors else "\n(--allow-mismatch compares them anyway)")
        )
    if problems:
        progress("WARNING: the servers' outputs differ on the same inputs; comparing anyway (--allow-mismatch):\n  "
                 + "\n  ".join(problems))  # fmt: skip
    for entry in checked:
        if all(item["within"] for item in entry["outputs"]):
            worst = max((item["max_abs"] for item in entry["outputs"] if item["max_abs"] is not None), default=0.0)
            progress(f"parity ({entry['variant']}): outputs agree, max |diff| {worst:.3g}")
    return checked


def check_fairness(opts: Options, groups: Sequence[dict[str, Any]], records: dict[str, Any]) -> None:
    """Refuse (``ComparisonRefused``) when the servers of a variant report different settings."""
    problems = []
    for group in groups:
        configs = {records[name]["label"]: records[name]["model_config"] for name in group["arms"].values()}
        # Servers that already run were not started with our flags: they need only agree.
        expected = None if opts.remote else expected_settings(opts, group["values"])
        problems += [f"{group['name']}: {problem}" for problem in check_settings(configs, expected)]
    if problems:
        raise ComparisonRefused(
            "refusing to compare: the servers do not report the same settings (ModelConfig parameters):\n  "
            + "\n  ".join(problems)
        )

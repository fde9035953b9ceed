"""The fidelity guard: do the compared servers compute the same thing, and how closely?

The parity gate (``loadtest.compare.prepare.check_parity`` over ``loadtest.compare.parity``)
sends both servers the same fixed inputs before anything is timed. Per output this module
sums up what it found: the largest absolute (and relative) difference, and the top-1
agreement, the fraction of rows whose argmax over the last axis is the same on both servers
(``top1``), for every output with a class axis (two dimensions or more, the last one 2 wide
or more: logits, and for an embedding a coarse check that its largest feature is the same).

The tolerance decides (``serving.backend.TOLERANCES`` of the precision, or ``--parity-atol``
/ ``--parity-rtol``): beyond it the comparison stops with exit status 3, unless
``--allow-mismatch``; it then goes on, and results.json (``fidelity``), the report's
"Fidelity" table and a warning at the head of the report say that the servers disagree.
Top-1 agreement is shown, not judged: near-ties may flip within the tolerance.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

Table = tuple[list[str], list[list[str]]]


def top1(expected: np.ndarray, actual: np.ndarray) -> tuple[int, int] | None:
    """(rows whose argmax over the last axis agrees, rows) of one output on both servers; None when
    the output has no class axis (fewer than two dimensions, a last axis under 2 wide), is not
    numeric, or the shapes differ. A row is every position of the leading axes."""
    if expected.shape != actual.shape or expected.ndim < 2 or expected.shape[-1] < 2:
        return None
    if expected.dtype.kind not in "biuf" or actual.dtype.kind not in "biuf":
        return None
    classes = expected.shape[-1]
    want = expected.reshape(-1, classes).argmax(axis=1)
    got = actual.reshape(-1, classes).argmax(axis=1)
    return int(np.count_nonzero(want == got)), int(want.size)


def _largest(values: Sequence[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return max(known) if known else None


def per_output(entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``parity.differences``' entries (per batch and output) summed up per output, over the batches:
    the largest differences, top-1 agreement over all their rows, and whether every batch was within."""
    outputs: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        outputs.setdefault(entry["output"], []).append(entry)
    summary = []
    for name, found in outputs.items():
        counted = [entry for entry in found if entry.get("top1_rows")]
        rows = sum(entry["top1_rows"] for entry in counted)
        agree = sum(entry["top1_agree"] for entry in counted)
        summary.append(
            {
                "output": name,
                "max_abs": _largest([entry["max_abs"] for entry in found]),
                "max_rel": _largest([entry["max_rel"] for entry in found]),
                "top1_agreement": agree / rows if rows else None,
                "top1_rows": rows,
                "shapes_differ": any(entry["max_abs"] is None for entry in found),
                "within": all(entry["within"] for entry in found),
            }
        )
    return summary


def record(checked: Sequence[dict[str, Any]], allow_mismatch: bool) -> dict[str, Any]:
    """results.json's ``fidelity``: per variant its outputs (``per_output``), tolerance and verdict
    ("agree" or "mismatch"); overall the same ("not checked" when no variant could be), and whether
    the comparison went on despite a mismatch (``--allow-mismatch``)."""
    variants = []
    for entry in checked:
        outputs = per_output(entry["outputs"])
        verdict = "agree" if all(output["within"] for output in outputs) else "mismatch"
        variants.append(
            {
                "variant": entry["variant"],
                "atol": entry["atol"],
                "rtol": entry["rtol"],
                "outputs": outputs,
                "verdict": verdict,
            }
        )
    overall = "not checked"
    if variants:
        overall = "mismatch" if any(variant["verdict"] == "mismatch" for variant in variants) else "agree"
    return {
        "verdict": overall,
        "allow_mismatch": allow_mismatch,
        "proceeded_despite_mismatch": overall == "mismatch",
        "variants": variants,
    }


def of(results: dict[str, Any]) -> dict[str, Any]:
    """The results document's fidelity record (rebuilt from its parity entries when it is older)."""
    return results.get("fidelity") or record(results.get("parity") or [], allow_mismatch=False)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def table(results: dict[str, Any]) -> Table:
    """Per variant and output: the largest |diff|, top-1 agreement, the tolerance and the verdict."""
    body = []
    for variant in of(results)["variants"]:
        tolerance = f"atol {variant['atol']:g} + rtol {variant['rtol']:g}"
        for output in variant["outputs"]:
            largest = "shapes differ" if output["shapes_differ"] else _number(output["max_abs"])
            top = _percent(output["top1_agreement"])
            if output["top1_rows"]:
                top += f" of {output['top1_rows']} rows"
            verdict = "within tolerance" if output["within"] else "MISMATCH: beyond tolerance"
            body.append([variant["variant"], output["output"], largest, top, tolerance, verdict])
    return ["variant", "output", "max |diff|, torch vs tf", "top-1 agreement", "tolerance", "verdict"], body


def warnings(results: dict[str, Any]) -> list[str]:
    """The mismatch, stated at the head of the report, when the comparison went on despite it."""
    found = of(results)
    if found["verdict"] != "mismatch":
        return []
    details = []
    for variant in found["variants"]:
        for output in variant["outputs"]:
            if not output["within"]:
                largest = "shapes differ" if output["shapes_differ"] else f"max |diff| {_number(output['max_abs'])}"
                details.append(
                    f"{variant['variant']}: output {output['output']!r} {largest} beyond atol {variant['atol']:g} + "
                    f"rtol {variant['rtol']:g}, top-1 agreement {_percent(output['top1_agreement'])}"
                )
    return [
        "FIDELITY MISMATCH: the servers' outputs differ beyond tolerance on the same inputs ("
        + "; ".join(details)
        + "). The comparison went on only because of --allow-mismatch: its figures time two different "
        "computations (see Fidelity)."
    ]

"""Synthetic comparison results (results.json as compare writes it) for the report, docs and worker tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from loadtest import breakdown, sampling, stats
from loadtest.compare import plan, plots
from loadtest.compare import run as compare
from loadtest.users.latency_file import Samples


def samples(start_s: np.ndarray, latency_ms: np.ndarray, ok: np.ndarray, lag_ms: np.ndarray | None = None) -> Samples:
    lag = np.zeros(len(start_s)) if lag_ms is None else lag_ms * 1000
    return Samples(start_s, latency_ms * 1000.0, ok, np.where(latency_ms >= 0, lag, -1.0))


def synthetic_step(repeat: int, mode: str, x: float, speed: float) -> dict[str, Any]:
    # Latencies from one distribution for every server, the slower one's a little off per repeat, so that
    # their means differ while their ranges overlap.
    shift = 1.0 if speed == 1.0 else (1.04, 0.97, 1.01)[repeat % 3]
    latency_ms = np.random.default_rng(repeat).gamma(4.0, 1.0, 500) * shift
    figures = stats.window_stats(
        samples(np.linspace(0, 5, 500), latency_ms, np.ones(500, bool)), 0, 5, batch_size=1, deadline_s=1.0
    )
    invalid = x == 300.0
    return {
        "phase": mode,
        "repeat": repeat,
        "mode": mode,
        "concurrency": x if mode == "closed" else None,
        "offered_rps": x if mode == "open" else None,
        **figures,
        "throughput_rps": 100.0 * x * speed + repeat,  # torch (speed 1.0) well ahead of tf (0.8)
        "server_cpu_pct": {"mean": 50.0 * x / 4, "max": 60.0},
        # Invalid steps report a huge RSS that must not reach "memory under load".
        "server_rss_bytes": {"mean": 3e8, "max": 9e9 if invalid else 3.1e8 / speed},
        "generator_cpu_pct": {"mean": 30.0, "max": 35.0},
        "generator_us_per_request": 250.0,
        "other_cpu_pct": {"mean": 3.0, "max": 5.0},
        "gpu": None,
        "server_metrics": stats.metric_deltas({}, {}) | {"queue_ms_mean": 0.5, "compute_ms_mean": 1},
        # Client 4 ms = 1 network + 3 server (0.5 queue, 0.1 input, 1.5 infer, 0.2 output, 0.7 other), slower on tf.
        "breakdown": breakdown.time_breakdown(
            4.0 / speed,
            {"success_count": 100.0, "success_ns": 3e8 / speed, "queue_count": 100.0, "queue_ns": 5e7 / speed}
            | {f"{name}_count": 100.0 for name in ("compute_input", "compute_infer", "compute_output")}
            | {"compute_input_ns": 1e7 / speed, "compute_infer_ns": 1.5e8 / speed, "compute_output_ns": 2e7 / speed},
        ),
        "invalid_reasons": ["generator send lag p99 30 ms > 10 ms"] if invalid else [],
        "valid": not invalid,
    } | (OVERLOADED if invalid else {})


#: The failures of an overloaded step (50 of its 500 requests).
OVERLOADED = {
    "errors": 50,
    "error_rate": 0.1,
    "errors_by_status": {"RESOURCE_EXHAUSTED": 40, "DEADLINE_EXCEEDED": 10},
    "errors_by_reason": {"RESOURCE_EXHAUSTED: queue full (N requests waiting)": 40},
}


def synthetic_results(repeats: int = 3) -> dict[str, Any]:
    """A results document shaped like ``run_comparison``'s: torch, tf and a reference."""
    servers: dict[str, Any] = {}
    for name, framework, speed in (("torch", "torch", 1.0), ("tensorflow", "tensorflow", 0.8), ("bare", None, 2.0)):
        steps = [
            synthetic_step(repeat, mode, x, speed)
            for repeat in range(repeats)
            for mode, x in [("closed", 1), ("closed", 4), ("open", 100.0), ("open", 300.0)]
        ]
        servers[name] = {
            "label": {"torch": "torch_server", "tensorflow": "tf_server"}.get(name, "bare (reference)"),
            "framework": framework,
            "kind": "local" if framework else "reference",
            "variant": {},
            "starts": [
                {
                    "phase": phase,
                    "repeat": r,
                    "cold_start_s": None if framework is None else 3.0 / speed + r * 0.1,
                    "idle_rss_bytes": 2e8 + r * 1e6 + (0 if speed == 1.0 else 5e5),  # overlapping ranges
                }
                for phase in ("closed", "open")
                for r in range(repeats)
            ],
            "steps": steps,
            "target": "127.0.0.1:1",
            "model_config": {"parameters": {"framework_version": "1.0", "device": "cpu"}, "max_batch_size": 32},
            "prepare": {"first_start_s": 9.0, "export_s": 2.5, "compile_s": 0.0, "model_dir": "/tmp/x"},
        }
    options = plan.Options(concurrency=[1, 4], repeats=repeats, targets=["bare=127.0.0.1:1"])
    settings = {
        **vars(options),
        "out": None,
        "mode": "local",
        "server_args_for_all": options.server_args_for_all(),
        "reference_concurrency": options.reference_concurrency,
        "pinning": {"mode": "auto", "server_cpus": [0], "generator_cpus": [1]},
        "limits": {"generator_cpu_pct_per_core": 90.0, "slo_error_rate": 0.01},
        "latency_note": compare.LATENCY_NOTE,
        "decision_rule": stats.DECISION_RULE,
    }
    order = [
        {"phase": phase, "repeat": r, "arm": arm}
        for phase in ("closed", "open")
        for r in range(repeats)
        for arm in plan.abba(["torch", "tensorflow", "bare"], r)
    ]
    return {
        "meta": {"started": "2024-01-01T00:00:00", "duration_s": 1.0, "command": "", "out": ""},
        "settings": settings,
        "environment": sampling.environment(),
        "servers": servers,
        "variants": [{"name": "as set", "values": {}, "arms": {"torch": "torch", "tensorflow": "tensorflow"}}],
        "grid": {
            "rates": [100.0, 300.0],
            "fixed": False,
            "fractions": [0.25],
            "overload": 1.1,
            "lower_peak_rps": 320.0,
            "higher_peak_rps": 400.0,
            "peaks": {"torch": 400.0, "tensorflow": 320.0},
            "invalid_peaks": [],
        },
        "order": order,
        "failures": [{"server": "tensorflow", "phase": "open", "repeat": 1, "error": "tf_server exited with 1"}],
    }


def check_report_folder(out: Path) -> dict[str, Any]:
    for name in ["report.html", "report.md", "summary.json", *plots.PLOT_NAMES]:
        assert (out / name).stat().st_size > 0, name
    assert {path.name for path in out.glob("perf_*.csv")} >= {"perf_torch.csv", "perf_tensorflow.csv"}
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(plots.PLOT_NAMES)
    assert page.index("Verdict") < page.index("<img")
    markdown = (out / "report.md").read_text()
    assert "## Verdict" in markdown
    assert "| characteristic | torch_server | tf_server | difference of means | verdict |" in markdown
    assert "include failed requests" in markdown
    results = json.loads((out / "results.json").read_text())
    assert {"meta", "settings", "environment", "servers", "failures", "verdict", "order", "grid"} <= set(results)
    return results

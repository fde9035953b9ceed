"""scripts/gpu_check.sh in CPU mode, so the GPU check cannot rot where no GPU is: the one
command runs both servers (small encoder, bf16), checks parity and the reported options,
drives load and times the forward pass, and writes its JSON and markdown; its TensorFlow
probe says why it would skip TensorFlow; it keeps TensorFlow and Locust out of itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.gpucheck import probe_tensorflow

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600, check=False
    )


def test_gpu_check_cpu_mode(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = run_script(
        "--cpu", str(out), "--models", "encoder", "--precisions", "bf16", "--compile", "off",
        "--concurrency", "4", "--seconds", "0.5", "--warmup", "0.3", "--max-batch-size", "8",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["ok"] is True
    assert report["device"] == "cpu"
    skipped = report["frameworks"]["tensorflow"].get("skipped")
    assert {entry["framework"] for entry in report["runs"]} == ({"torch"} if skipped else {"torch", "tensorflow"})
    for entry in report["runs"]:
        assert "error" not in entry, entry
        assert entry["reported"]["precision"] == "bf16"
        assert entry["reported"]["compile"] == "off"
        assert entry["reported"]["device"] == "cpu"
        parity = entry["parity"]
        assert parity["ok"]
        assert set(parity["outputs"]) == {"last_hidden_state", "pooled"}
        assert parity["outputs"]["last_hidden_state"]["max_abs"] > 1e-4  # bf16 really ran
        served = entry["served"]
        assert served["requests_per_s"] > 0
        assert served["errors"] == {}
        assert 0 < served["p50_ms"] <= served["p99_ms"]
        assert 1 <= served["mean_batch"] <= 4
        assert entry["in_process"]["rows_per_s"] > 0
        assert entry["efficiency"] == pytest.approx(served["requests_per_s"] / entry["in_process"]["rows_per_s"])
        assert entry["gpu_memory_mib"] == "cpu run"
    # The worker sweep: mlp behind one and two server processes, both answered, both used.
    sweep = {entry["workers"]: entry for entry in report["workers"]}
    assert set(sweep) == {1, 2}
    for count, entry in sweep.items():
        assert "error" not in entry, entry
        assert entry["requests_per_s"] > 0
        assert sum(entry["errors"].values()) == 0
        assert len([n for n in entry["requests_per_worker"].values() if n > 0]) == count
    table = (out / "gpu_check.md").read_text()
    assert table in done.stdout
    assert "| 2 |" in table.split("Workers (")[1]
    assert table.count("| encoder | bf16 | off | ok (") == len(report["runs"])


def test_gpu_mode_refuses_without_cuda(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here")
    done = run_script(str(tmp_path / "out"))
    assert done.returncode == 2
    assert "sees no CUDA GPU (use --cpu)" in done.stderr
    assert not (tmp_path / "out").exists()


def test_tensorflow_probe_says_why_it_skips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "tensorflow"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('no TensorFlow on this host')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    assert probe_tensorflow("cuda:0") == "TensorFlow does not import here (ImportError: no TensorFlow on this host)"
    monkeypatch.delenv("PYTHONPATH")
    pytest.importorskip("tensorflow")
    reason = probe_tensorflow("cuda:0")
    import torch

    if not torch.cuda.is_available():
        assert reason is not None
        assert reason.startswith("TensorFlow imports but sees no GPU")
    assert probe_tensorflow("cpu") is None


def test_check_imports_neither_tensorflow_nor_locust() -> None:
    code = "import sys, loadtest.gpucheck; print(sorted({'tensorflow', 'locust', 'gevent'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]"

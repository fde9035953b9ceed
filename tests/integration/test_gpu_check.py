"""scripts/gpu_check.sh in CPU mode, so the GPU check cannot rot where no GPU is: the one
command runs both servers (small encoder, bf16), checks parity and the reported options,
drives load and times the forward pass, and writes its JSON and markdown; its time budget
bounds the whole command and what does not fit is reported skipped; its TensorFlow probe
says why it would skip TensorFlow; it keeps TensorFlow and Locust out of itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpucheck.budget import Budget, OutOfTime, run
from gpucheck.check import run_ok
from gpucheck.measure import probe_tensorflow

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600, check=False
    )


@pytest.mark.slow
@pytest.mark.timeout(660)
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


@pytest.mark.slow
def test_time_budget_bounds_the_whole_check(tmp_path: Path) -> None:
    """Six runs and a worker sweep cannot fit 20 s: the command still ends at its budget, every
    run is listed, and what did not fit is reported skipped for the time budget, not failed."""
    budget_s = 20.0
    out = tmp_path / "out"
    started = time.monotonic()
    done = run_script(
        "--cpu", str(out), "--frameworks", "torch", "--models", "mlp,encoder", "--precisions", "fp32,bf16,fp16",
        "--compile", "off", "--concurrency", "4", "--seconds", "1", "--warmup", "1", "--max-batch-size", "8",
        "--budget-s", str(budget_s),
    )  # fmt: skip
    wall = time.monotonic() - started
    report = json.loads((out / "gpu_check.json").read_text())
    # Past the budget: stopping a server (5 s at most), the report, and the script's own start.
    assert report["elapsed_s"] <= budget_s + 10, report["elapsed_s"]
    assert wall <= budget_s + 30, wall
    runs = report["runs"]
    assert len(runs) == 6
    skipped = [index for index, entry in enumerate(runs) if "skipped" in entry]
    assert skipped, "six runs of at least 4 s each cannot all fit 20 s"
    assert skipped == list(range(skipped[0], len(runs))), "once a run does not fit, no later run starts"
    assert all(runs[index]["skipped"].startswith("time budget") for index in skipped)
    finished = [entry for entry in runs if "skipped" not in entry]
    assert all(run_ok(entry) for entry in finished), finished
    sweep = report["workers"]
    assert [entry["workers"] for entry in sweep] == [1, 2]
    assert any("skipped" in entry for entry in sweep), "the sweep cannot fit after the runs did not"
    for entry in sweep:
        assert entry.get("requests_per_s", 0) > 0 or entry["skipped"].startswith("time budget"), entry
    # The report, the markdown and the exit status say the same.
    assert report["skipped_for_time"] == {
        "runs": len(skipped),
        "workers": len([entry for entry in sweep if "skipped" in entry]),
    }
    assert report["ok"] is bool(finished)
    assert done.returncode == (0 if report["ok"] else 1), done.stderr[-3000:]
    table = (out / "gpu_check.md").read_text()
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| torch | ")]
    assert [row[4].startswith("skipped: time budget") for row in rows] == ["skipped" in entry for entry in runs]
    steps = [
        line.split(" | ") for line in table.split("Workers (")[1].splitlines() if line.startswith(("| 1 ", "| 2 "))
    ]
    assert [step[1].startswith("skipped: time budget") for step in steps] == ["skipped" in entry for entry in sweep]
    assert f"skipped for the time budget: {len(skipped)} of 6 runs" in table
    assert ("Overall: OK" if finished else "Overall: INCOMPLETE") in table


def test_budget_bounds_each_wait() -> None:
    budget = Budget(10.0)
    assert 9.0 < budget.timeout(120.0) <= 10.0
    assert budget.timeout(3.0) == 3.0
    assert budget.fits(5.0)
    assert not budget.fits(11.0)
    part = budget.part(0.5)
    assert 4.5 < part.left() <= 5.0
    spent = Budget(10.0, time.monotonic() - 10.0)
    assert spent.spent()
    assert not spent.fits(1.0)
    with pytest.raises(OutOfTime):
        spent.timeout(120.0)
    assert spent.stop_timeout() == 5.0  # a server still gets a few seconds to stop


def test_a_timed_out_child_takes_what_it_started_along(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run(["bash", "-c", f"sleep 60 & echo $! > {pid_file}; wait"], 1.0, tmp_path, dict(os.environ))
    assert time.monotonic() - started < 10
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while Path(f"/proc/{grandchild}").exists() and "Z" not in _state(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{grandchild}").exists() or "Z" in _state(grandchild)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


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
    code = "import sys, gpucheck.cli; print(sorted({'tensorflow', 'locust', 'gevent'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]"

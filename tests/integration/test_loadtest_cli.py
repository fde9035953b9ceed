"""``python -m loadtest``: one entry point that reaches every tool of the load suite."""

from __future__ import annotations

import argparse
import json
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import loadtest.tools
from loadtest import cli
from loadtest.__main__ import LOCUST, TOOLS
from loadtest.cli import CpuSplit, add_server_option, available_cpus, parse_servers, split_cpus, write_result

pytestmark = pytest.mark.timeout(120)


def test_every_tool_is_a_command() -> None:
    """A module (or package) added to loadtest/tools without a command fails here."""
    tools = {info.name for info in pkgutil.iter_modules(loadtest.tools.__path__)}
    reached = {module.removeprefix("loadtest.tools.").split(".")[0] for module, _ in TOOLS.values()}
    assert tools <= reached


def test_help_lists_every_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "loadtest", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    for command in ("compare", "report", LOCUST, *TOOLS):
        assert f"\n    {command}" in done.stdout


@pytest.mark.parametrize("command", sorted(TOOLS))
def test_each_command_runs_its_tool(command: str) -> None:
    """``python -m loadtest <command> --help`` is the tool's own help, under the name it was called by.
    In a child process: some tools load Locust, whose gevent monkey-patching must not reach pytest's."""
    done = subprocess.run(
        [sys.executable, "-m", "loadtest", command, "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: python -m loadtest {command}")


def test_locust_command_lists_our_options_in_locusts_help() -> None:
    """Locust answers --help before it reads any locustfile, so ``locust -f loadtest/locustfile.py --help``
    lists none of our options; ``python -m loadtest locust --help`` registers them first. In a child
    process: it loads Locust, whose gevent monkey-patching must not reach pytest's."""
    done = subprocess.run(
        [sys.executable, "-m", "loadtest", LOCUST, "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    for option in ("--headless", "--model", "--load-shape", "--arrival-rate", "--latency-file", "--tls-ca"):
        assert re.search(rf"^ +{option}\b", done.stdout, re.MULTILINE), f"{option} not in:\n{done.stdout}"


@pytest.mark.parametrize("command", sorted(set(TOOLS) - {"bare"}))
def test_every_measuring_tool_writes_its_result_where_out_says(command: str) -> None:
    """One output convention (``loadtest.cli``): the JSON result to ``--out``, else stdout. ``bare`` is a
    server, not a measurement."""
    done = subprocess.run(
        [sys.executable, "-m", "loadtest", command, "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "--out PATH" in done.stdout


@pytest.mark.parametrize(
    ("value", "servers"),
    [
        ("both", ("torch", "tensorflow")),
        ("torch", ("torch",)),
        ("tf", ("tensorflow",)),
        ("tensorflow", ("tensorflow",)),
        ("tf,torch", ("torch", "tensorflow")),  # torch first, whatever the order given
        ("torch, tf,both", ("torch", "tensorflow")),
    ],
)
def test_server_option_names_frameworks_torch_first(value: str, servers: tuple[str, ...]) -> None:
    assert parse_servers(value) == servers


def test_server_option_refuses_what_it_does_not_know_and_more_than_one_where_one_is_measured() -> None:
    parser = argparse.ArgumentParser()
    add_server_option(parser, default="torch", one=True)
    assert parser.parse_args([]).servers == ("torch",)
    assert parser.parse_args(["--server", "tf"]).servers == ("tensorflow",)
    for bad in ("both", "torch,tf", "mxnet", ""):
        with pytest.raises(SystemExit):
            parser.parse_args(["--server", bad])


def test_cpu_split_gives_the_server_the_first_cores_and_the_generator_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: {3, 1, 2, 0})
    assert split_cpus("auto") == CpuSplit([0], [1, 2, 3])
    assert split_cpus("auto", server_cores=2) == CpuSplit([0, 1], [2, 3])
    assert split_cpus("auto", server_cores=4) == CpuSplit(None, None)  # none left for the generator
    assert split_cpus("none") == CpuSplit(None, None)


def test_result_goes_to_out_or_stdout_and_progress_to_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_result({"rps": 1.5}, None)
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"rps": 1.5}
    assert captured.err == ""
    out = tmp_path / "deeper" / "result.json"
    write_result({"rps": 2.5}, out)
    captured = capsys.readouterr()
    assert json.loads(out.read_text()) == {"rps": 2.5}
    assert captured.out == ""
    assert str(out) in captured.err


def test_report_refuses_a_missing_or_foreign_results_file_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from loadtest.__main__ import main

    foreign = tmp_path / "other.json"
    foreign.write_text(json.dumps({"model": "mlp"}))
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    for path, why in ((tmp_path / "missing.json", "cannot read"), (broken, "cannot read"), (foreign, "not a results")):
        assert main(["report", str(path)]) == 2
        stderr = capsys.readouterr().err
        assert why in stderr
        assert len(stderr.strip().splitlines()) == 1
        assert not (tmp_path / "report.html").exists()


@pytest.mark.parametrize("taskset", [True, False], ids=["taskset", "shim"])
def test_pinned_children_run_on_the_given_core_only(monkeypatch: pytest.MonkeyPatch, taskset: bool) -> None:
    from loadtest import servers

    if not taskset:
        monkeypatch.setattr(servers.shutil, "which", lambda name: None)
    core = available_cpus()[-1]
    probe = [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"]
    done = subprocess.run(servers.pinned(probe, [core]), capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(done.stdout) == [core]
    assert servers.pinned(probe, None) == probe

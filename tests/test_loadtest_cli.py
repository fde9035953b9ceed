"""``python -m loadtest``: one entry point that reaches every tool of the load suite."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import loadtest.tools
from loadtest.__main__ import TOOLS

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
    for command in ("compare", "report", *TOOLS):
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

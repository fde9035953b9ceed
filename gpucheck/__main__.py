"""``python -m gpucheck {prepare,run}``.

prepare   download the wheels the check carries to its host into .whl/ (standard library and pip:
          runs on any machine with network, before the check's own packages are installed)
run       the GPU check (``run --help``); scripts/gpu_check.sh installs .whl/ first
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:  # everything after it is the check's own command line (``run --help``)
        from gpucheck.cli import main as run

        return run(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m gpucheck",
        description="The GPU check of both servers on one CUDA GPU: prepare what it carries, then run it.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{prepare,run}")
    commands.add_parser(
        "prepare",
        help="download the wheels the check carries to its host into .whl/",
        description="Download the wheels the GPU check carries to its host into .whl/ (standard library and pip: "
        "runs on any machine with network, before the check's own packages are installed).",
    )
    commands.add_parser("run", help="the GPU check (python -m gpucheck run --help)", add_help=False)
    parser.parse_args(argv)  # only prepare gets here
    from gpucheck.wheels import prepare

    return prepare()


if __name__ == "__main__":
    sys.exit(main())

"""``python -m loadtest {compare,report}``.

compare   start both servers (or target running ones), load them identically, write a report folder
report    re-render report.md, report.html and the plots of a results.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from loadtest import compare


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description="torch_server vs tf_server comparison.")
    commands = parser.add_subparsers(dest="command", required=True)
    compare.add_arguments(
        commands.add_parser(
            "compare",
            help="measure both servers with identical Locust scenarios and write a report",
            description=compare.__doc__.split("\n\n")[1] if compare.__doc__ else None,
        )
    )
    report = commands.add_parser("report", help="re-render a report folder from its results.json")
    report.add_argument("results", type=Path, help="a results.json written by compare")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "compare":
        return compare.main(args, argv)
    from loadtest.report import write_report

    write_report(json.loads(args.results.read_text()), args.results.parent)
    print(args.results.parent / "report.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m loadtest <command>``: every load-testing tool of the suite, one entry point.

``python -m loadtest --help`` lists the commands; ``python -m loadtest <command> --help`` tells
one. A tool's module is imported only when it runs (some load grpc.aio, some the frameworks).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

#: command -> (module with ``main(argv) -> int``, what it does). compare, report and locust are below.
TOOLS: dict[str, tuple[str, str]] = {
    "bench": ("loadtest.tools.bench", "what the served path costs beyond the model and gRPC (ratios, one run)"),
    "stages": ("loadtest.tools.stages", "what each stage of one request costs on the served path, in-process"),
    "bare": ("loadtest.tools.bare", "the plumbing ceiling: a bare identity server, no model"),
    "drive": ("loadtest.driver", "a lean closed-loop gRPC load generator (grpc.aio, no Locust)"),
    "coldstart": ("loadtest.tools.coldstart", "cold start to SERVING and idle memory of each server"),
    "overhead": ("loadtest.tools.overhead", "what our Locust user costs the load generator per request"),
    "overload": ("loadtest.tools.overload", "open-loop load past capacity and back: refusals, not collapse"),
    "scaling": ("loadtest.tools.scaling", "throughput of 1..N server worker processes behind one port"),
    "soak": ("loadtest.tools.soak", "a steady share of capacity for minutes: what drifts"),
    "fuzz": ("loadtest.tools.fuzz.runner", "malformed ModelInfer requests, each owed a precise status"),
}


#: The command that runs Locust itself (``loadtest.users.launcher``): its help is Locust's, not ours.
LOCUST = "locust"


def build_parser() -> argparse.ArgumentParser:
    from loadtest.compare import command, run

    parser = argparse.ArgumentParser(
        prog="python -m loadtest",
        description="torch_server vs tf_server: the comparison, its report, and the load-testing tools.",
        epilog="Locust itself: locust -f loadtest/locustfile.py --host HOST (see its docstring); its options with "
        "ours listed: python -m loadtest locust --help.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    command.add_arguments(
        commands.add_parser(
            "compare",
            help="measure both servers with identical Locust scenarios and write a report",
            description=run.__doc__.split("\n\n")[1] if run.__doc__ else None,
        )
    )
    report = commands.add_parser("report", help="re-render a report folder from its results.json")
    report.add_argument("results", type=Path, help="a results.json written by compare")
    for name, (_, summary) in TOOLS.items():
        commands.add_parser(name, help=summary, add_help=False)
    commands.add_parser(LOCUST, help="Locust on loadtest/locustfile.py, its --help listing our options", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == LOCUST:
        from loadtest.users import launcher  # loads Locust (gevent): only for this command

        return launcher.main(argv[1:])
    if argv and argv[0] in TOOLS:
        module = importlib.import_module(TOOLS[argv[0]][0])
        called, sys.argv[0] = sys.argv[0], f"python -m loadtest {argv[0]}"  # its usage line names the command
        try:
            return int(module.main(argv[1:]))
        finally:
            sys.argv[0] = called
    args = build_parser().parse_args(argv)
    if args.command == "compare":
        from loadtest.compare import command

        return command.main(args, argv)
    from loadtest.compare.report import write_report

    try:
        results = json.loads(args.results.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        print(f"python -m loadtest report: cannot read {args.results}: {err}", file=sys.stderr)
        return 2
    if not isinstance(results, dict) or not isinstance(results.get("servers"), dict):
        print(f"python -m loadtest report: {args.results} is not a results.json written by compare", file=sys.stderr)
        return 2
    write_report(results, args.results.parent)
    print(args.results.parent / "report.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())

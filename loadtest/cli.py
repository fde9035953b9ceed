"""What the suite's commands share on the command line, so that every tool reads the same way.

- ``--server``: which servers a tool starts: ``torch``, ``tensorflow`` (or ``tf``), ``both``, or
  a comma-separated list (``torch,tf``); parsed to framework names, torch first
  (``add_server_option``; tools that measure one server at a time accept exactly one).
- ``--cpu-split auto|none``: whether the server and this load generator get cores of their own
  (``add_cpu_split_option``, ``split_cpus``): auto gives the server the first core(s) of this
  process's affinity and the generator the rest, when at least one is left; none pins nothing.
- Output, one convention: the JSON result goes to the file ``--out`` names, or to stdout without
  it (``add_out_option``, ``write_result``); human lines (progress, tables, summaries) go to
  stderr (``progress``, ``show``), so that ``python -m loadtest TOOL > result.json`` keeps only
  the result. ``compare`` is the one exception: its result is a report folder (its ``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

#: The compared frameworks, in the order tools run them.
FRAMEWORKS = ("torch", "tensorflow")
#: What ``--server`` accepts, item by item, and the frameworks each names.
SERVER_NAMES: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "tensorflow": ("tensorflow",),
    "tf": ("tensorflow",),
    "both": FRAMEWORKS,
}
CPU_SPLITS = ("auto", "none")
CPU_SPLIT_HELP = "auto: the server on the first core, this load generator on the rest; none: no pinning (%(default)s)"


class Options(Protocol):
    """Where options are added: a parser, or a group of one (e.g. mutually exclusive)."""

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action: ...


# ---------------------------------------------------------------- --server


def parse_servers(text: str) -> tuple[str, ...]:
    """``--server``'s value as framework names, torch first, each once (``torch,tf`` -> torch, tensorflow)."""
    named: set[str] = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        if item not in SERVER_NAMES:
            raise argparse.ArgumentTypeError(f"{item!r}: expected torch, tensorflow (tf) or both")
        named.update(SERVER_NAMES[item])
    if not named:
        raise argparse.ArgumentTypeError("no server named")
    return tuple(framework for framework in FRAMEWORKS if framework in named)


def parse_server(text: str) -> tuple[str, ...]:
    """``--server``'s value for a tool that measures one server: exactly one framework."""
    servers = parse_servers(text)
    if len(servers) != 1:
        raise argparse.ArgumentTypeError(f"{text!r}: one server, torch or tensorflow (tf)")
    return servers


def add_server_option(parser: Options, *, default: str | None = "both", one: bool = False) -> None:
    """``--server`` into ``args.servers``: a tuple of framework names (of one with ``one``)."""
    choices = "torch|tensorflow" if one else "torch|tensorflow|both"
    parser.add_argument(
        "--server",
        dest="servers",
        type=parse_server if one else parse_servers,
        default=default,
        metavar=choices,
        help=("the server to start" if one else "the servers to start, in this order: torch, tensorflow (tf), both")
        + (f" (default: {default})" if default else ""),
    )


# ---------------------------------------------------------------- --cpu-split


@dataclass(frozen=True)
class CpuSplit:
    """Cores of the server and of this load generator; None: that side is not pinned."""

    server: list[int] | None
    generator: list[int] | None

    def pin_generator(self) -> None:
        """Keep this process (the generator) to its cores, if it has any of its own."""
        if self.generator:
            os.sched_setaffinity(0, self.generator)


def available_cpus() -> list[int]:
    """This process's cores (its affinity), in order."""
    return sorted(os.sched_getaffinity(0))


def add_cpu_split_option(parser: Options, help: str = CPU_SPLIT_HELP) -> None:
    """``--cpu-split auto|none`` into ``args.cpu_split`` (default auto)."""
    parser.add_argument("--cpu-split", choices=CPU_SPLITS, default="auto", help=help)


def split_cpus(mode: str, server_cores: int = 1) -> CpuSplit:
    """The cores for ``mode``: with auto, the first ``server_cores`` of ``available_cpus`` for the server and
    the rest for the generator, when at least one is left for it; otherwise (none, too few cores) no pinning."""
    cpus = available_cpus()
    if mode == "none" or len(cpus) <= server_cores:
        return CpuSplit(None, None)
    return CpuSplit(cpus[:server_cores], cpus[server_cores:])


# ---------------------------------------------------------------- output


def add_out_option(parser: Options, help: str = "write the JSON result to this file (default: stdout)") -> None:
    """``--out PATH`` into ``args.out`` (None: stdout)."""
    parser.add_argument("--out", type=Path, default=None, metavar="PATH", help=help)


def write_result(result: Any, out: Path | None) -> None:
    """The JSON result: into ``out`` (its folder made, and a line on stderr naming it), else on stdout."""
    text = json.dumps(result, indent=2, default=str) + "\n"
    if out is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    progress(f"wrote {out}")


def progress(message: str) -> None:
    """One progress line on stderr, timestamped."""
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def show(text: str) -> None:
    """Text for people (a table, a summary) on stderr, as it is."""
    print(text, file=sys.stderr, flush=True)

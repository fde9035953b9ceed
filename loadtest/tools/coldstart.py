"""Cold start to SERVING and idle memory of each server, per model.

    python -m loadtest coldstart --model mlp,resnet,encoder --repeats 3

Each start is a fresh process (``python -m <server> serve --port 0``) on its own model
repository. The first start of each (server, model) exports the artifact into the empty
repository and is reported apart (``first_start_s``); the timed starts that follow find
it there, and run in ABBA order over the servers (forward on even repeats, reversed on
odd ones; ``order`` lists them). Cold start is spawn to the port file the server writes
once SERVING: imports, load, warm-up. A line per (server, model) on stderr; the JSON result
to ``--out`` (or stdout).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from loadtest.cli import add_out_option, add_server_option, progress, write_result
from loadtest.compare.plan import abba
from loadtest.servers import ServerProcess


def start_once(framework: str, model: str, threads: int, model_dir: Path) -> tuple[float, float]:
    """(cold start s, idle RSS bytes) of one fresh server process."""
    args = ["--threads", str(threads), "--device", "cpu", "--model-dir", str(model_dir)]
    with ServerProcess(framework, model, args) as server:
        return server.cold_start_s or 0.0, float(psutil.Process(server.pid).memory_info().rss)


def measure(frameworks: Sequence[str], model: str, repeats: int, threads: int, root: Path) -> list[dict[str, Any]]:
    """One model: a first (exporting) start per server, then ``repeats`` timed starts each, in ABBA order."""
    dirs = {framework: root / framework / model for framework in frameworks}
    first = {framework: start_once(framework, model, threads, dirs[framework])[0] for framework in frameworks}
    starts: dict[str, list[float]] = {framework: [] for framework in frameworks}
    rss: dict[str, list[float]] = {framework: [] for framework in frameworks}
    order = []
    for repeat in range(repeats):
        for framework in abba(frameworks, repeat):
            order.append(framework)
            cold, idle = start_once(framework, model, threads, dirs[framework])
            starts[framework].append(cold)
            rss[framework].append(idle)
    return [
        {
            "framework": framework,
            "model": model,
            "first_start_s": first[framework],
            "cold_start_s": statistics.median(starts[framework]),
            "cold_start_all_s": starts[framework],
            "idle_rss_mib": statistics.median(rss[framework]) / 2**20,
            "order": order,
        }
        for framework in frameworks
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mlp,resnet,encoder")
    add_server_option(parser)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    add_out_option(parser)
    opts = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="coldstart-") as tmp:
        for model in filter(None, opts.model.split(",")):
            for result in measure(opts.servers, model, opts.repeats, opts.threads, Path(tmp)):
                results.append(result)
                progress(
                    f"{result['framework']:10s} {model:8s} cold start {result['cold_start_s']:6.2f} s "
                    f"(first, with export: {result['first_start_s']:6.2f} s)  "
                    f"idle RSS {result['idle_rss_mib']:6.0f} MiB"
                )
    write_result(results, opts.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

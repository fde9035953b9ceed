"""Cold start to SERVING and idle memory of each server, per model.

    python -m loadtest.coldstart --model mlp,resnet,encoder --repeats 3

Each start is a fresh process (``python -m <server> serve --port 0``) with the
artifact already in the model repository (the first start of a model exports it
and is reported separately as ``first_start_s``). Cold start is spawn to the port
file the server writes once SERVING: imports, load, warm-up. Prints a table and
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import psutil

from loadtest.servers import ServerProcess


def measure(framework: str, model: str, repeats: int, threads: int, model_dir: Path) -> dict[str, object]:
    args = ["--threads", str(threads), "--device", "cpu", "--model-dir", str(model_dir)]
    starts, rss = [], []
    first = None
    for index in range(repeats + 1):
        with ServerProcess(framework, model, args) as server:
            if index == 0:
                first = server.cold_start_s
                continue
            starts.append(server.cold_start_s or 0.0)
            rss.append(psutil.Process(server.pid).memory_info().rss)
    return {
        "framework": framework,
        "model": model,
        "first_start_s": first,
        "cold_start_s": statistics.median(starts),
        "cold_start_all_s": starts,
        "idle_rss_mib": statistics.median(rss) / 2**20,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mlp,resnet,encoder")
    parser.add_argument("--server", choices=["torch", "tensorflow", "both"], default="both")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    opts = parser.parse_args(argv)
    frameworks = ["torch", "tensorflow"] if opts.server == "both" else [opts.server]
    results = []
    with tempfile.TemporaryDirectory(prefix="coldstart-") as tmp:
        for model in filter(None, opts.model.split(",")):
            for framework in frameworks:
                result = measure(framework, model, opts.repeats, opts.threads, Path(tmp) / framework)
                results.append(result)
                print(
                    f"{framework:10s} {model:8s} cold start {result['cold_start_s']:6.2f} s "
                    f"(first, with export: {result['first_start_s']:6.2f} s)  "
                    f"idle RSS {result['idle_rss_mib']:6.0f} MiB",
                    file=sys.stderr,
                    flush=True,
                )
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m loadtest compare``: its flags, their validation into ``plan.Options``, and its exit
status (0 done, 2 bad flags or an unwritable report folder, 3 refused (settings differ, or outputs
differ beyond tolerance without --allow-mismatch) or a server that did not start while preparing).
What the comparison does: ``loadtest.compare.run``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from loadtest.cli import add_cpu_split_option, progress
from loadtest.compare import capacity_phase, sweep_phase
from loadtest.compare.plan import (
    CONNECTIONS_PER_WORKER,
    MATRIX_KEYS,
    PROCESS_CPU_BUDGET,
    Options,
    connections,
    parse_list,
    plan_arms,
    server_workers,
)
from loadtest.compare.prepare import ComparisonRefused
from loadtest.compare.run import report_folder, run_comparison
from loadtest.servers import ServerStartError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``compare`` flags."""
    defaults = Options()
    arg = parser.add_argument
    arg("--model", default=defaults.model, help="the model both serve: a zoo model, or a model of the "
        "--torch-repository / --tf-repository (default: %(default)s)")  # fmt: skip
    arg("--torch-repository", type=Path, help="torch_server's model repository (your own models; default: a fresh "
        "one the zoo model is exported into)")  # fmt: skip
    arg("--tf-repository", type=Path, help="tf_server's model repository (as --torch-repository)")
    arg("--parity-atol", type=float, help="outputs must agree within this absolute tolerance (default: the "
        "precision's, e.g. 1e-5 for fp32)")  # fmt: skip
    arg("--parity-rtol", type=float, help="... plus this relative one (default: the precision's, e.g. 1e-4 for fp32)")
    arg("--allow-mismatch", action="store_true", help="compare even when the outputs differ beyond the tolerance "
        "(the report says so at its head); without it such a comparison stops with exit status 3")  # fmt: skip
    arg("--drain", choices=["on", "off"], default=defaults.drain, help="after the open loop, per repeat: SIGTERM "
        "to each server under steady load at half the lower peak; calls lost, time to exit, readiness flip "
        "(%(default)s)")  # fmt: skip
    users, fractions = ",".join(map(str, defaults.concurrency)), ",".join(f"{f:g}" for f in defaults.rate_fractions)
    arg("--concurrency", default=users, help="closed-loop users per step, comma-separated (default: %(default)s)")
    arg("--rates", default="", help="open-loop arrival rates, req/s, comma-separated (default: the grid below)")
    arg("--rate-fractions", default=fractions, help="open-loop rates as fractions of the LOWER valid "
        "closed-loop peak of the two servers, the same rates for both (default: %(default)s)")  # fmt: skip
    arg("--overload", type=float, default=defaults.overload,
        help="one more open-loop rate at this multiple of the HIGHER peak; 0: none (default: %(default)s)")  # fmt: skip
    arg("--arrival", choices=["poisson", "fixed"], default=defaults.arrival, help="open-loop arrivals (%(default)s)")
    arg("--arrival-users", type=int, default=defaults.arrival_users,
        help="open-loop streams the rate is split over (default: %(default)s)")  # fmt: skip
    arg("--step-seconds", type=float, default=defaults.step_seconds, help="measured window per step (%(default)s)")
    arg("--warmup-seconds", type=float, default=defaults.warmup_seconds,
        help="discarded load before each window (%(default)s)")  # fmt: skip
    arg("--repeats", type=int, default=defaults.repeats,
        help="repeats of each phase, in ABBA order; a winner needs >= 3 (default: %(default)s)")  # fmt: skip
    arg("--slo-ms", type=float, default=defaults.slo_ms, help="p99 latency objective, ms (%(default)s)")
    arg("--batch-size", type=int, default=defaults.batch_size, help="rows per request (%(default)s)")
    arg("--deadline-ms", type=float, default=defaults.deadline_ms,
        help="per-request deadline; open loop: from the scheduled send time (%(default)s)")  # fmt: skip
    arg("--encoding", choices=["raw", "typed"], default=defaults.encoding, help="request tensors (%(default)s)")
    servers = parser.add_argument_group("server settings, passed explicitly and identically to both servers")
    servers.add_argument("--device", default=defaults.device, help="(%(default)s)")
    servers.add_argument("--threads", type=int, default=defaults.threads, help="intra-op threads (%(default)s)")
    servers.add_argument("--precision", default=defaults.precision, help="fp32, tf32, bf16, fp16 (%(default)s)")
    servers.add_argument("--compile", default=defaults.compile, help="off or on (%(default)s)")
    servers.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size, help="(%(default)s)")
    servers.add_argument("--dynamic-batching", action=argparse.BooleanOptionalAction, default=True, help="(on)")
    servers.add_argument("--max-queue-delay-us", type=int, default=defaults.max_queue_delay_us, help="(%(default)s)")
    servers.add_argument("--max-queue-size", type=int, default=defaults.max_queue_size, help="(%(default)s)")
    servers.add_argument("--instances", type=int, default=defaults.instances, help="(%(default)s)")
    servers.add_argument("--grpc-threads", type=int, default=defaults.grpc_threads, help="(%(default)s)")
    servers.add_argument("--server-arg", action="append", default=[], dest="server_args", metavar="ARG",
                         help="any other flag for both servers, repeatable (--server-arg=--model-arg=...)")  # fmt: skip
    servers.add_argument("--matrix", nargs="+", default=[], metavar="KEY=V1,V2",
                         help=f"measure every combination, one report (keys: {', '.join(MATRIX_KEYS)}); e.g. "
                         "--matrix precision=fp32,bf16 compile=off,on")  # fmt: skip
    arg("--target", action="append", default=[], dest="targets", metavar="NAME=HOST:PORT",
        help="a running OIP server measured beside the two: reference rows (repeatable; ,METRICS_URL)")  # fmt: skip
    arg("--torch-target", help="HOST:PORT of a running torch_server (with --tf-target: start nothing)")
    arg("--tf-target", help="HOST:PORT of a running tf_server")
    arg("--torch-metrics", help="metrics URL of the running torch_server")
    arg("--tf-metrics", help="metrics URL of the running tf_server")
    arg("--locust-processes", default=defaults.locust_processes,
        help="Locust processes per step: a number, or auto (more when one would need over "
        f"{PROCESS_CPU_BUDGET * 100:.0f}%% of a core, at most one per generator core) (%(default)s)")  # fmt: skip
    arg("--connections", default=defaults.connections,
        help="gRPC connections per Locust process, shared by its users: a number, or auto (1; with "
        f"--workers N, {CONNECTIONS_PER_WORKER} per worker, so the kernel spreads them) (%(default)s)")  # fmt: skip
    arg("--out", type=Path, help="report folder (default: <--out-root>/<timestamp>)")
    arg("--out-root", type=Path, help="folder for timestamped report folders (default: reports)")
    capacity_phase.add_arguments(parser)
    sweep_phase.add_arguments(parser)
    add_cpu_split_option(parser, "auto: pin the server to the first half of the cores (with --workers N: N cores, "
                         "one at least left) and Locust to the rest (%(default)s)")  # fmt: skip


def options_from(args: argparse.Namespace) -> Options:
    """Validated ``Options`` from parsed flags; ``ValueError`` on bad combinations."""
    if bool(args.torch_target) != bool(args.tf_target):
        raise ValueError("--torch-target and --tf-target go together")
    fields = {f.name for f in dataclasses.fields(Options)}
    opts = Options(
        **{key: value for key, value in vars(args).items() if key in fields}
        | {
            "concurrency": parse_list(args.concurrency, int),
            "rates": parse_list(args.rates, float),
            "rate_fractions": parse_list(args.rate_fractions, float),
        }
    )
    if not opts.concurrency or min(opts.concurrency) < 1:
        raise ValueError("--concurrency needs positive user counts")
    if opts.repeats < 1 or opts.step_seconds <= 0 or opts.warmup_seconds < 0:
        raise ValueError("--repeats >= 1, --step-seconds > 0 and --warmup-seconds >= 0 are required")
    if opts.locust_processes != "auto" and not (opts.locust_processes.isdigit() and int(opts.locust_processes) > 0):
        raise ValueError("--locust-processes: a positive number or auto")
    if opts.matrix and opts.remote:
        raise ValueError("--matrix starts the servers itself: not with --torch-target/--tf-target")
    if (opts.torch_repository is None) != (opts.tf_repository is None):
        raise ValueError("--torch-repository and --tf-repository go together (each server its own repository)")
    if opts.remote and opts.torch_repository is not None:
        raise ValueError("--torch-repository/--tf-repository are for servers compare starts: not with --torch-target")
    server_workers(opts.server_args)  # validates --server-arg=--workers=N
    connections(opts.connections, 1)  # validates --connections
    plan_arms(opts)  # validates --matrix and --target
    capacity_phase.check_options(opts)
    sweep_phase.check_options(opts)
    return opts


def check_writable(folder: Path) -> str | None:
    """Why the report cannot be written to ``folder`` (None: it can), found before any measurement: a
    container writing to a bind-mounted host folder is the usual case, so the message names the uids."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            return None
    except OSError as err:
        existing = next((parent for parent in (folder, *folder.parents) if parent.exists()), folder)
        try:
            owner = f"uid {existing.stat().st_uid}"
        except OSError:
            owner = "an unknown owner"
        return (
            f"cannot write the report to {folder}: {err.strerror or err} (this process runs as uid {os.getuid()}, "
            f"gid {os.getgid()}; {existing} belongs to {owner}): make it writable for uid {os.getuid()}, or run as "
            "its owner (docker compose: HOST_UID=$(id -u) HOST_GID=$(id -g))"
        )


def main(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run the comparison (``argv``: its command line, recorded) and write the report; the exit status."""
    from loadtest.compare.report import write_report

    try:
        opts = options_from(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    opts.out = report_folder(opts)
    if (problem := check_writable(opts.out)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        results = run_comparison(opts, ["python", "-m", "loadtest", *argv])
    except ComparisonRefused as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except ServerStartError as err:
        print(f"error: a server did not start while preparing the comparison: {err}", file=sys.stderr)
        return 3
    out = Path(results["meta"]["out"])
    write_report(results, out)
    progress(f"report: {out / 'report.html'} (also report.md, results.json, *.png)")
    return 0

"""Soak: hold a server at a steady share of its capacity for minutes; report what drifts.

    python -m loadtest soak --server torch --model mlp --minutes 10      # start it, 70 % of capacity
    python -m loadtest soak --target 127.0.0.1:8001 --pid 4321 --rate 800 --minutes 10

With ``--server`` the server is started here (``python -m <server> serve``, pinned to the
first core and this generator to the rest when there are two or more; ``--cpu-split none``:
no pinning). Its capacity is measured
first with a short closed-loop step (``--capacity-concurrency`` callers sending back to
back for ``--capacity-s`` seconds), unless ``--rate`` gives the rate; the soak then
offers ``--fraction`` (0.7) of it, open loop: batch-1 requests at fixed intervals, each
sent at its scheduled time whatever earlier ones are doing, its latency counted from that
time (no coordinated omission), with a deadline of ``--deadline-s``. A warm-up at the
same rate (``--warmup-s``) is not counted.

Reported (one JSON object, to ``--out`` or stdout): offered and achieved rate; requests, errors by status code
(a deadline that passes counts; so does an arrival the generator could not send because
``--max-in-flight`` were outstanding) and per window; the server's RSS (sampled every second) at the
start and end of the soak, its peak, growth in % (also from the end of the first
window), its slope in MB/min and 21 samples of it; latency p50/p99 over the whole soak
and in its first and last ``--window-s`` (60 s: the first and last minute), with their
ratio (drift); late sends (the generator missed a scheduled time by over 2 ms) and the
generator's own CPU share (near 1.0: it, not the server, set the pace). The run passes
(exit 0) with 0 errors and RSS growth under ``--max-rss-growth`` percent (5). Loopback
only, bounded by ``--minutes``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import grpc
import grpc.aio
import numpy as np
import psutil

from contract.protocol import inference_pb2_grpc as pb_grpc
from loadtest.cli import add_cpu_split_option, add_out_option, add_server_option, progress, split_cpus, write_result
from loadtest.driver import BACKLOG, CHANNEL_OPTIONS, RequestPool, closed_loop, open_loop
from loadtest.stats import percentiles

#: A send later than this after its scheduled time counts as late.
LATE_S = 0.002
RSS_INTERVAL_S = 1.0
MiB = 1 << 20


@dataclass
class SoakSettings:
    """One soak's parameters (see the module docstring)."""

    target: str
    model: str = "mlp"
    rate: float = 100.0
    seconds: float = 600.0
    warmup_s: float = 5.0
    deadline_s: float = 1.0
    window_s: float = 60.0
    max_in_flight: int = 2000
    seq_len: int = 16

    def __post_init__(self) -> None:
        host = self.target.rsplit(":", 1)[0]
        if host not in ("127.0.0.1", "localhost", "[::1]"):
            raise ValueError(f"soak is for loopback servers only, not {self.target!r}")
        if self.rate <= 0 or self.seconds <= 0 or self.warmup_s < 0 or self.deadline_s <= 0:
            raise ValueError("rate, seconds and deadline must be positive, warm-up not negative")


@dataclass
class Record:
    """What one soak saw: per-request outcomes by scheduled time, and RSS samples."""

    #: (scheduled offset from the soak's start in seconds, latency in seconds) of each success.
    latencies: list[tuple[float, float]] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    #: Scheduled offset of each error, seconds.
    error_offsets: list[float] = field(default_factory=list)
    scheduled: int = 0
    sent: int = 0
    late: int = 0
    #: (offset in seconds, RSS in bytes).
    rss: list[tuple[float, int]] = field(default_factory=list)


async def soak(settings: SoakSettings, pid: int | None) -> dict[str, Any]:
    """Run one soak against ``settings.target``; ``pid``: the server's process, for its RSS."""
    process = psutil.Process(pid) if pid else None
    record = Record()
    pool = RequestPool.from_zoo(settings.model, settings.seq_len)
    interval = 1.0 / settings.rate
    total = settings.warmup_s + settings.seconds
    schedule = (("soak" if index * interval >= settings.warmup_s else "warmup", index * interval)
                for index in range(math.ceil(total / interval)))  # fmt: skip
    async with grpc.aio.insecure_channel(settings.target, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        started = time.perf_counter()
        measure_from, stop_at = started + settings.warmup_s, started + total

        async def sample_rss() -> None:
            while process is not None:
                now = time.perf_counter()
                if now >= measure_from:
                    record.rss.append((now - measure_from, process.memory_info().rss))
                if now >= stop_at:
                    return
                await asyncio.sleep(min(RSS_INTERVAL_S, max(stop_at - now, 0.0)))

        cpu_before = time.process_time()
        arrivals, _ = await asyncio.gather(
            open_loop(stub, pool, schedule, settings.deadline_s, settings.max_in_flight), sample_rss()
        )
        generator_cpu = (time.process_time() - cpu_before) / (time.perf_counter() - started)
    for arrival in arrivals:
        if arrival.tag != "soak":
            continue
        offset = arrival.scheduled - settings.warmup_s
        record.scheduled += 1
        record.late += arrival.lag > LATE_S
        record.sent += arrival.status != BACKLOG
        if arrival.status == "OK":
            record.latencies.append((offset, arrival.latency))
        else:
            record.errors[arrival.status] += 1
            record.error_offsets.append(offset)
    return summarize(settings, record, generator_cpu)


def summarize(settings: SoakSettings, record: Record, generator_cpu: float) -> dict[str, Any]:
    """The report of one soak (see the module docstring)."""
    offsets = np.array([offset for offset, _ in record.latencies])
    latencies_ms = np.array([latency for _, latency in record.latencies]) * 1e3
    window = min(settings.window_s, settings.seconds / 3)
    first = latencies_ms[offsets < window] if len(offsets) else latencies_ms
    last = latencies_ms[offsets >= settings.seconds - window] if len(offsets) else latencies_ms
    early, late = percentiles(first), percentiles(last)
    errors = sum(record.errors.values())
    report: dict[str, Any] = {
        "target": settings.target,
        "model": settings.model,
        "seconds": settings.seconds,
        "offered_rate": round(settings.rate, 1),
        "achieved_rate": round(len(record.latencies) / settings.seconds, 1),
        "requests": record.scheduled,
        "completed": len(record.latencies),
        "errors": errors,
        "errors_by_code": dict(record.errors),
        "errors_per_window": np.histogram(
            record.error_offsets, bins=max(1, round(settings.seconds / window)), range=(0.0, settings.seconds)
        )[0].tolist(),
        "late_sends": record.late,
        "generator_cpu": round(generator_cpu, 3),
        "latency_ms": _rounded(percentiles(latencies_ms)),
        "window_s": window,
        "latency_first_window_ms": _rounded(early),
        "latency_last_window_ms": _rounded(late),
        "drift_p50": _ratio(late["p50"], early["p50"]),
        "drift_p99": _ratio(late["p99"], early["p99"]),
    }
    if record.rss:
        start, end = record.rss[0][1], record.rss[-1][1]
        times = np.array([t for t, _ in record.rss])
        values = np.array([v for _, v in record.rss], dtype=np.float64)
        slope = float(np.polyfit(times, values, 1)[0]) * 60 / MiB if len(times) > 1 else 0.0
        settled = next((v for t, v in record.rss if t >= window), end)
        report["rss_mb"] = {
            "start": round(start / MiB, 1),
            "end": round(end / MiB, 1),
            "peak": round(float(values.max()) / MiB, 1),
            "growth_pct": round(100.0 * (end - start) / start, 2),
            # From the end of the first window: a step while load settles in is not a leak.
            "growth_after_first_window_pct": round(100.0 * (end - settled) / settled, 2),
            "slope_mb_per_min": round(slope, 2),
            "samples": len(record.rss),
            # At most 21 evenly spaced samples: [seconds into the soak, MB].
            "series": [
                [round(record.rss[i][0], 1), round(record.rss[i][1] / MiB, 1)]
                for i in sorted({round(k * (len(record.rss) - 1) / 20) for k in range(21)})
            ],
        }
    return report


def _rounded(stats: dict[str, float | None]) -> dict[str, float | None]:
    return {key: None if value is None else round(value, 3) for key, value in stats.items()}


def _ratio(late: float | None, early: float | None) -> float | None:
    return None if late is None or not early else round(late / early, 2)


def verdict(report: dict[str, Any], max_rss_growth_pct: float) -> list[str]:
    """Why a soak fails its targets (empty: it passes)."""
    reasons = []
    if report["errors"]:
        reasons.append(f"{report['errors']} errors: {report['errors_by_code']}")
    growth = report.get("rss_mb", {}).get("growth_pct")
    if growth is not None and growth >= max_rss_growth_pct:
        reasons.append(f"RSS grew {growth} % (limit {max_rss_growth_pct} %)")
    return reasons


async def capacity(target: str, model: str, concurrency: int, seconds: float, seq_len: int) -> float:
    """Requests per second the server completes under a closed loop of ``concurrency``
    callers sending back to back for ``seconds`` (after one uncounted second)."""
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        loop = await closed_loop([stub], RequestPool.from_zoo(model, seq_len), concurrency, seconds, warmup=1.0)
    return loop.requests_per_s


@dataclass(frozen=True)
class SoakOptions:
    """What a soak is asked for (the module docstring tells each); ``run`` resolves the rate from the
    capacity it measures, unless ``rate`` gives it, into a ``SoakSettings``."""

    model: str = "mlp"
    minutes: float = 10.0
    #: Offered requests/s; None: ``fraction`` of the capacity measured first.
    rate: float | None = None
    fraction: float = 0.7
    capacity_concurrency: int = 8
    capacity_s: float = 5.0
    warmup_s: float = 5.0
    deadline_s: float = 1.0
    window_s: float = 60.0
    max_in_flight: int = 2000
    #: RSS growth limit, percent: a soak that grows more fails.
    max_rss_growth: float = 5.0
    seq_len: int = 16

    def __post_init__(self) -> None:
        if self.minutes <= 0 or not 0 < self.fraction <= 2:
            raise ValueError("--minutes must be positive and --fraction in (0, 2]")


def run(opts: SoakOptions, target: str, pid: int | None) -> dict[str, Any]:
    """Measure the capacity (unless ``opts.rate``), soak ``target`` and judge it; ``pid``: the server's, for its RSS."""
    measured = None
    rate = opts.rate
    if rate is None:
        measured = asyncio.run(capacity(target, opts.model, opts.capacity_concurrency, opts.capacity_s, opts.seq_len))
        rate = opts.fraction * measured
    settings = SoakSettings(
        target=target,
        model=opts.model,
        rate=rate,
        seconds=opts.minutes * 60.0,
        warmup_s=opts.warmup_s,
        deadline_s=opts.deadline_s,
        window_s=opts.window_s,
        max_in_flight=opts.max_in_flight,
        seq_len=opts.seq_len,
    )
    report = asyncio.run(soak(settings, pid))
    report["capacity_rps"] = None if measured is None else round(measured, 1)
    report["fraction"] = None if measured is None else opts.fraction
    report["failures"] = verdict(report, opts.max_rss_growth)
    return report


def build_parser() -> argparse.ArgumentParser:
    defaults = SoakOptions()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", help="HOST:PORT of a running server (loopback)")
    add_server_option(where, default=None, one=True)
    parser.add_argument("--pid", type=int, help="the --target server's process id (for its RSS)")
    parser.add_argument("--model", default=defaults.model)
    parser.add_argument("--minutes", type=float, default=defaults.minutes, help="length of the soak (%(default)s)")
    parser.add_argument("--rate", type=float, help="offered requests/s (default: --fraction of measured capacity)")
    parser.add_argument("--fraction", type=float, default=defaults.fraction,
                        help="share of capacity to offer (%(default)s)")  # fmt: skip
    parser.add_argument("--capacity-concurrency", type=int, default=defaults.capacity_concurrency,
                        help="callers of the capacity step")  # fmt: skip
    parser.add_argument("--capacity-s", type=float, default=defaults.capacity_s, help="length of the capacity step")
    parser.add_argument("--warmup-s", type=float, default=defaults.warmup_s,
                        help="uncounted warm-up at the soak rate")  # fmt: skip
    parser.add_argument("--deadline-s", type=float, default=defaults.deadline_s, help="deadline of each request")
    parser.add_argument("--window-s", type=float, default=defaults.window_s,
                        help="first/last window compared for drift")  # fmt: skip
    parser.add_argument("--max-in-flight", type=int, default=defaults.max_in_flight,
                        help="outstanding requests before dropping")  # fmt: skip
    parser.add_argument("--max-rss-growth", type=float, default=defaults.max_rss_growth,
                        help="RSS growth limit, percent")  # fmt: skip
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len, help="size of variable dimensions (encoder)")
    parser.add_argument("--server-arg", action="append", default=[], help="extra argument for --server")
    add_cpu_split_option(parser, "with --server: auto pins it to the first core and this generator to the rest; "
                         "none: no pinning (%(default)s)")  # fmt: skip
    add_out_option(parser)
    return parser


def options_from(args: argparse.Namespace) -> SoakOptions:
    """The soak's options from parsed flags (``ValueError`` on bad values)."""
    names = {option.name for option in fields(SoakOptions)}
    return SoakOptions(**{name: value for name, value in vars(args).items() if name in names})


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        opts = options_from(args)
    except ValueError as err:
        parser.error(str(err))
    if args.servers:
        from loadtest.servers import ServerProcess

        split = split_cpus(args.cpu_split)
        server_args = ["--threads", "1", *args.server_arg]
        with ServerProcess(args.servers[0], args.model, server_args, cpus=split.server) as server:
            split.pin_generator()
            progress(f"soaking {server.module} ({args.model}) at {server.target} ...")
            report = run(opts, server.target, server.pid)
            report["server"] = server.module
            report["cpu_split"] = {"server": split.server, "generator": split.generator}
    else:
        report = run(opts, args.target, args.pid)
    write_result(report, args.out)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())

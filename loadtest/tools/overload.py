"""Overload without collapse: open-loop load past a server's capacity, and back.

    python -m loadtest overload --server both --model resnet --deadline-ms 250

Per server (pinned to the first core; this generator to the rest, unless ``--cpu-split none``):
the closed-loop peak with 64
callers (loadtest.driver), then one continuous open-loop run (Poisson arrivals; latency
and deadline counted from each request's scheduled send time) at 0.8x the peak, 2x the
peak, then 0.5x. Printed per server: goodput during the overload vs the peak, how fast
refusals (RESOURCE_EXHAUSTED) were answered (from the actual send), the admitted requests' p99 vs the p99 at
0.8x, the error mix, and the p99 once the overload has been over for a second: a line per
server on stderr, the JSON result to ``--out`` (or stdout).
The generator's own send lag is reported: a lagging generator offered less than asked.

The server's admission control is what is measured: a request that would wait past its
deadline at the measured service rate is refused at once instead of queued
(``serving.batcher``), so the queue never holds more than about rate x deadline.

Refusing is not free: every refused call still costs the server's core its transport work
(grpcio's polling thread, ``serving.admission``). In the same run, before the servers, the
bare refusing server (``loadtest bare --mode refuse``, on the same core) gives the CPU time of
one refusal, and from it each server's goodput ceiling at 2x (``goodput_ceiling``): the most a
core that served the peak with nothing to spare can serve while it refuses the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from contract.protocol import inference_pb2_grpc as pb_grpc
from loadtest.cli import add_cpu_split_option, add_out_option, add_server_option, progress, split_cpus, write_result
from loadtest.driver import CHANNEL_OPTIONS, RequestPool, open_loop
from loadtest.sampling import scrape
from loadtest.servers import ServerProcess
from loadtest.stats import metric_deltas, percentiles
from loadtest.tools.bench import DriveOptions, drive

PHASES = (("80%", 0.8), ("200%", 2.0), ("after", 0.5))
#: The closed-loop step that measures the peak: 64 callers, 3 s after 1 s of warm-up.
PEAK_CALLERS = 64
#: Seconds of the closed loop (``PEAK_CALLERS`` callers) against the bare refusing server.
REFUSAL_SECONDS = 2.0
#: How long a scrape of the server's metrics over the 2x phase may take.
SCRAPE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class OverloadOptions:
    """One overload run of a server (the module docstring tells the phases)."""

    model: str = "resnet"
    #: Every request's deadline, from its scheduled send time.
    deadline_ms: float = 250.0
    #: Seconds of each phase.
    seconds: float = 4.0
    #: Extra server flags.
    server_args: tuple[str, ...] = ()


async def poisson_phases(
    target: str, model: str, phases: Sequence[tuple[str, float, float]], deadline_s: float, seed: int = 0
) -> list[tuple[str, float, float, float, str]]:
    """Poisson arrivals at each phase's rate (req/s) for its seconds, through the engine's open
    loop; one record per request: (phase, scheduled time from the start, send lag, latency from
    the scheduled time, status; a refusal names who refused: grpcio's cap or our admission)."""
    arrivals = random.Random(seed)
    schedule: list[tuple[str, float]] = []
    phase_start = 0.0
    for phase, rate, seconds in phases:
        scheduled = phase_start
        while (scheduled := scheduled + arrivals.expovariate(rate)) < phase_start + seconds:
            schedule.append((phase, scheduled))
        phase_start += seconds
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        pool = await RequestPool.from_metadata(stub, model, seed=seed)
        done = await open_loop(stub, pool, schedule, deadline_s)
    refused = "RESOURCE_EXHAUSTED"
    return [
        (arrival.tag, arrival.scheduled, arrival.lag, arrival.latency,
         arrival.status + (": " + " ".join(arrival.details.split()[:3]) if arrival.status == refused else ""))
        for arrival in done
    ]  # fmt: skip


def summarize(records: list[tuple[str, float, float, float, str]], peak: float, seconds: dict[str, float]) -> dict:
    by_phase: dict[str, dict[str, Any]] = {}
    overload_end = seconds["80%"] + seconds["200%"]
    for phase, _ in PHASES:
        rows = [r for r in records if r[0] == phase]
        ok = np.array([r[3] for r in rows if r[4] == "OK"]) * 1e3
        # A refusal's latency is the server's answer time, from the actual send: the
        # generator's own lag before sending is reported apart (send_lag_p99_ms).
        refused = np.array([r[3] - r[2] for r in rows if r[4].startswith("RESOURCE_EXHAUSTED")]) * 1e3
        statuses: dict[str, int] = {}
        for row in rows:
            statuses[row[4]] = statuses.get(row[4], 0) + 1
        by_phase[phase] = {
            "offered_rps": len(rows) / seconds[phase],
            "goodput_rps": len(ok) / seconds[phase],
            "statuses": statuses,
            "admitted_latency_ms": percentiles(ok),
            "refusal_latency_ms": percentiles(refused),
            "send_lag_p99_ms": float(np.percentile([r[2] for r in rows], 99) * 1e3) if rows else None,
        }
    settled = np.array([r[3] for r in records if r[0] == "after" and r[1] >= overload_end + 1.0 and r[4] == "OK"])
    normal_p99 = by_phase["80%"]["admitted_latency_ms"]["p99"]
    overload = by_phase["200%"]
    return {
        "peak_rps": peak,
        "phases": by_phase,
        "goodput_vs_peak": overload["goodput_rps"] / peak if peak else None,
        "refusal_p99_ms": overload["refusal_latency_ms"]["p99"],
        "admitted_p99_vs_80pct_p99": (overload["admitted_latency_ms"]["p99"] or 0) / normal_p99 if normal_p99 else None,
        "p99_1s_after_overload_ms": float(np.percentile(settled, 99) * 1e3) if len(settled) else None,
        "p99_at_80pct_ms": normal_p99,
    }


def refusal_cost(model: str, server_cpus: list[int] | None) -> dict[str, float]:
    """What one refusal costs a server: the bare refusing server (same grpcio, same core),
    ``PEAK_CALLERS`` callers for ``REFUSAL_SECONDS``; its CPU time per refused call."""
    with ServerProcess("bare", model, ["--mode", "refuse"], cpus=server_cpus) as server:
        step = drive(server, PEAK_CALLERS, DriveOptions(model, seconds=REFUSAL_SECONDS, warmup=0.0), None)
    refused = step["errors"].get("RESOURCE_EXHAUSTED", 0)
    if not refused or refused != sum(step["errors"].values()) or step["requests_all"]:
        raise RuntimeError(f"the bare refusing server did not refuse every call: {step['errors']}, "
                           f"{step['requests_all']} answered")  # fmt: skip
    return {"refusals_per_s": refused / REFUSAL_SECONDS, "cpu_us": 1e6 * step["server_cpu_s"] / refused}


def goodput_ceiling(peak_rps: float, refusal_s: float, offered: float = 2.0) -> float:
    """The most goodput (as a fraction of the peak) a server keeps at ``offered`` times its
    peak when each refusal costs ``refusal_s`` seconds of its CPU, if at the peak the served
    requests took all of it: served g x peak at 1/peak each, refused (offered - g) x peak at
    refusal_s each, within one CPU-second per second."""
    load = peak_rps * refusal_s  # the CPU share a peak's worth of refusals takes
    if load >= 1.0:
        return 0.0
    return max(0.0, min(1.0, (1.0 - offered * load) / (1.0 - load)))


def measure(framework: str, opts: OverloadOptions, server_cpus: list[int] | None, model_dir: Path) -> dict:
    """The peak of one fresh server, then its phases of open-loop load (``summarize``'s figures)."""
    server_args = ["--threads", "1", "--device", "cpu", "--model-dir", str(model_dir / framework), *opts.server_args]
    with ServerProcess(framework, opts.model, server_args, cpus=server_cpus) as server:
        at_peak = drive(server, PEAK_CALLERS, DriveOptions(opts.model, seconds=3.0, warmup=1.0), None)
        peak = at_peak["requests_per_s"]
        seconds = {name: opts.seconds for name, _ in PHASES}
        phases = [(name, fraction * peak, seconds[name]) for name, fraction in PHASES]
        # The server's own figures over the 2x phase (its batches, their compute time), scraped at
        # its start and end (from the schedule: the arrivals begin a few ms after the call).
        started = time.monotonic() + seconds["80%"]
        scrapes = _Scrapes(server.metrics_url, opts.model, [started, started + seconds["200%"]])
        cpu_before = time.process_time()
        records = asyncio.run(poisson_phases(server.target, opts.model, phases, opts.deadline_ms / 1e3))
        generator_cpu = (time.process_time() - cpu_before) / sum(seconds.values())
        scrapes.join()
    result = summarize(records, peak, seconds)
    result["generator_cpu"] = generator_cpu
    result["server_at_peak"] = at_peak["server"]
    before, after = scrapes.taken
    result["server_at_2x"] = metric_deltas(before, after) if before and after else {}
    return result


class _Scrapes(threading.Thread):
    """The server's metrics (``loadtest.sampling.scrape``) at each of ``times`` (time.monotonic()),
    in a thread of its own: ``taken`` once joined (an empty dict where a scrape failed)."""

    def __init__(self, url: str | None, model: str, times: Sequence[float]) -> None:
        super().__init__(name="overload-scrapes", daemon=True)
        self.url, self.model, self.times = url, model, times
        self.taken: list[dict[str, float]] = []
        self.start()

    def run(self) -> None:
        for moment in self.times:
            time.sleep(max(0.0, moment - time.monotonic()))
            # A server at twice its peak answers its metrics port late: wait for it.
            self.taken.append(scrape(self.url, self.model, SCRAPE_TIMEOUT_S))


def _batches(result: dict[str, Any]) -> str:
    """The server's batches at the peak and at 2x: rows and compute time, mean."""
    parts = []
    for label, key in (("at the peak", "server_at_peak"), ("at 2x", "server_at_2x")):
        figures = result.get(key) or {}
        if figures.get("compute_ms_mean") is not None and figures.get("batch_size_mean") is not None:
            parts.append(f"{figures['batch_size_mean']:.1f} rows in {figures['compute_ms_mean']:.1f} ms {label}")
    return "batches " + (", ".join(parts) if parts else "unknown (no metrics)")


def main(argv: Sequence[str] | None = None) -> int:
    defaults = OverloadOptions()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_option(parser)
    parser.add_argument("--model", default=defaults.model)
    parser.add_argument("--deadline-ms", type=float, default=defaults.deadline_ms, help="every request's deadline")
    parser.add_argument("--seconds", type=float, default=defaults.seconds, help="seconds per phase")
    parser.add_argument("--server-arg", action="append", default=[], help="extra server flag, repeatable")
    add_cpu_split_option(parser)
    add_out_option(parser)
    args = parser.parse_args(argv)
    opts = OverloadOptions(
        model=args.model, deadline_ms=args.deadline_ms, seconds=args.seconds, server_args=tuple(args.server_arg)
    )
    split = split_cpus(args.cpu_split)
    split.pin_generator()
    cost = refusal_cost(args.model, split.server)
    progress(f"a refusal costs the server {cost['cpu_us']:.0f} µs of CPU (the bare refusing server, "
             f"{cost['refusals_per_s']:.0f} refusals/s)")  # fmt: skip
    results: dict[str, Any] = {"model": args.model, "deadline_ms": args.deadline_ms, "servers": {},
                               "cpu_split": {"server": split.server, "generator": split.generator},
                               "refusal_cost": cost}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="overload-") as tmp:
        for framework in args.servers:
            result = measure(framework, opts, split.server, Path(tmp))
            result["goodput_ceiling"] = goodput_ceiling(result["peak_rps"], cost["cpu_us"] / 1e6)
            results["servers"][framework] = result
            over = result["phases"]["200%"]
            progress(
                f"{framework}: peak {result['peak_rps']:.0f} req/s; at 2x ({over['offered_rps']:.0f} req/s offered): "
                f"goodput {over['goodput_rps']:.0f} req/s = {result['goodput_vs_peak']:.2f}x peak "
                f"(ceiling {result['goodput_ceiling']:.2f}x at this refusal cost), "
                f"refusals answered p99 {result['refusal_p99_ms'] or 0:.2f} ms, admitted p99 "
                f"{over['admitted_latency_ms']['p99'] or 0:.1f} ms = {result['admitted_p99_vs_80pct_p99'] or 0:.2f}x "
                f"the p99 at 0.8x ({result['p99_at_80pct_ms'] or 0:.1f} ms), statuses {over['statuses']}; "
                f"1 s after: p99 {result['p99_1s_after_overload_ms'] or 0:.1f} ms; {_batches(result)}; generator CPU "
                f"{result['generator_cpu']:.2f}, send lag p99 {over['send_lag_p99_ms'] or 0:.1f} ms"
            )
    write_result(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

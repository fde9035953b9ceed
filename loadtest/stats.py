"""The comparison's statistics: pure functions over per-request samples, resource ticks and repeats.

- ``window_stats``: a step's request figures over its measured window. Latency
  percentiles count every request *sent* in the window (scheduled in it, open loop): a
  failed one at the time it took to fail (a timeout at its deadline), one the generator
  never sent at the deadline. Throughput counts successes *completed* in the window.
  Its failures are counted by outcome (``error_counts``).
- ``resource_stats``: CPU, RSS, GPU and the servers' metric deltas from the resource
  samples (``Tick``) taken inside the window only, never in the warm-up before it.
- ``requests_per_worker``: a scrape's ``inference_worker_requests_total`` by worker (the
  comparison and ``loadtest.tools.scaling`` share it); ``worker_balance``: how a step's
  requests spread over the workers, and whether one got too few (``UNBALANCED_SHARE``).
- ``mean_interval``: a mean over repeats with its Student-t 95 % confidence interval (``t_975``).
- ``decide``: whether one server beats another on values over repeats, by a stated rule
  (``DECISION_RULE``), else "no difference beyond noise".

No I/O here: ``loadtest.sampling`` takes the samples, ``loadtest.compare.steps`` runs the steps.
"""

from __future__ import annotations

import itertools
import math
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loadtest.users.latency_file import Samples, status_code

WORKER_REQUESTS = "inference_worker_requests_total"
#: A worker that answered less than this fraction of its fair share (requests / workers) makes a step unbalanced.
UNBALANCED_SHARE = 0.5
#: Fewest requests per worker (the fair share) before a step's spread is judged.
BALANCE_MIN_REQUESTS = 20
QUANTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99.9": 99.9}
CDF_LEVELS = np.unique(np.concatenate([np.linspace(0.0, 1.0, 101), [0.95, 0.99, 0.995, 0.999, 0.9999]]))
#: Fewest values (repeats) per server before a difference can be called.
MIN_VALUES = 3
DECISION_RULE = (
    f"a server wins a characteristic only when each has at least {MIN_VALUES} values (one per repeat or start) and all "
    "of the winner's values beat all of the other's (ranges that do not overlap); if the servers were equal, that "
    "happens by chance with probability 2/C(n+m, n) (0.10 for 3 vs 3 values, 0.002 for 6 vs 6), the exact "
    "two-sided p-value of a rank test. Otherwise the verdict is 'no difference beyond noise'."
)


# ---------------------------------------------------------------- latency and throughput


def percentiles(values_ms: np.ndarray) -> dict[str, float | None]:
    """Nearest-rank p50/p90/p99/p99.9 plus mean and max of exact per-request latencies."""
    if len(values_ms) == 0:
        return dict.fromkeys([*QUANTILES, "max", "mean"])
    ranked = np.percentile(values_ms, list(QUANTILES.values()), method="inverted_cdf")
    stats = {name: float(value) for name, value in zip(QUANTILES, ranked, strict=True)}
    return {**stats, "max": float(np.max(values_ms)), "mean": float(np.mean(values_ms))}


def latency_cdf(values_ms: np.ndarray) -> list[list[float]]:
    """``[[latency_ms, fraction ≤ it], ...]`` at fixed levels (dense in the tail), for plots."""
    if len(values_ms) == 0:
        return []
    points = np.quantile(values_ms, CDF_LEVELS, method="inverted_cdf")
    return [[round(float(ms), 4), round(float(level), 5)] for ms, level in zip(points, CDF_LEVELS, strict=True)]


def window_stats(samples: Samples, start: float, end: float, batch_size: int, deadline_s: float) -> dict[str, Any]:
    """Request figures of the window [start, end) (see the module docstring for what counts where)."""
    seconds = end - start
    in_window = (samples.start_s >= start) & (samples.start_s < end)
    sent = samples.sent
    ok = samples.ok[in_window]
    latency_us = samples.latency_us[in_window]
    # Never sent (dropped by the generator): counted as failed at the deadline.
    all_ms = np.where(latency_us >= 0, latency_us, deadline_s * 1e6) / 1000.0
    ok_ms = all_ms[ok]
    lag_ms = samples.lag_us[in_window & sent] / 1000.0
    ends = samples.end_s
    completed = int(np.count_nonzero(samples.ok & (ends >= start) & (ends < end)))
    requests = int(np.count_nonzero(in_window))
    successes = len(ok_ms)
    errors = requests - successes
    return {
        "window_s": round(seconds, 3),
        "requests": requests,
        "successes": successes,
        "errors": errors,
        "unsent": int(np.count_nonzero(in_window & ~sent)),
        "error_rate": errors / requests if requests else None,
        "scheduled_rps": requests / seconds,
        "sent_rps": int(np.count_nonzero(in_window & sent)) / seconds,
        "throughput_rps": completed / seconds,
        "rows_per_s": completed * batch_size / seconds,
        "latency_ms": percentiles(all_ms),
        "latency_ok_ms": percentiles(ok_ms),
        "latency_cdf": latency_cdf(all_ms),
        "send_lag_ms": {"p99": percentiles(lag_ms)["p99"], "max": float(lag_ms.max()) if len(lag_ms) else None},
        **error_counts(samples, in_window),
    }


def error_counts(samples: Samples, mask: np.ndarray) -> dict[str, dict[str, int]]:
    """The failed requests among ``mask`` by outcome, most frequent first: ``errors_by_status`` by gRPC status
    code (``UNSENT``: never sent; ``NOT_RECORDED``: from a latency file without outcomes), and
    ``errors_by_reason`` by the labels that carry a reason (``RESOURCE_EXHAUSTED: queue full (N requests
    waiting)``). The counts of ``errors_by_status`` add up to the failures."""
    status, labels = samples.outcomes()
    counts = np.bincount(status[mask & ~samples.ok].astype(np.intp), minlength=len(labels))
    by_label = sorted(((labels[i], int(n)) for i, n in enumerate(counts) if n), key=lambda item: -item[1])
    by_status: dict[str, int] = {}
    for label, count in by_label:
        code = status_code(label)
        by_status[code] = by_status.get(code, 0) + count
    return {
        "errors_by_status": dict(sorted(by_status.items(), key=lambda item: -item[1])),
        "errors_by_reason": {label: count for label, count in by_label if label != status_code(label)},
    }


def errors_text(errors: int, by_status: Mapping[str, int] | None) -> str:
    """``errors 3223 (RESOURCE_EXHAUSTED 3100, DEADLINE_EXCEEDED 123)``; without counts by status (a step
    measured before they were recorded) just ``errors 3223``."""
    if not errors or not by_status:
        return f"errors {errors}"
    return f"errors {errors} (" + ", ".join(f"{code} {count}" for code, count in by_status.items()) + ")"


# ---------------------------------------------------------------- resources


@dataclass
class Tick:
    """One resource sample: wall time, cumulative CPU seconds, RSS, the server's metrics.

    ``host_cpu_s`` counts the busy time of all cores and ``runner_cpu_s`` the runner's own,
    so that what neither the server, the generator nor the runner used is other processes' load.
    ``statistics``: the server's cumulative ModelStatistics (``loadtest.breakdown.flatten``), empty when not read.
    """

    t: float
    server_cpu_s: float | None
    server_rss: float | None
    generator_cpu_s: float | None
    metrics: dict[str, float] = field(default_factory=dict)
    host_cpu_s: float | None = None
    runner_cpu_s: float | None = None
    statistics: dict[str, float] = field(default_factory=dict)

    @property
    def other_cpu_s(self) -> float | None:
        parts = (self.host_cpu_s, self.runner_cpu_s, self.server_cpu_s, self.generator_cpu_s)
        if any(part is None for part in parts):
            return None
        host, runner, server, generator = (float(part or 0.0) for part in parts)
        return host - runner - server - generator


def inside(ticks: Sequence[Tick], start: float, end: float) -> list[Tick]:
    """The ticks taken within [start, end]: no sample from before the window (the warm-up) or after it."""
    return [tick for tick in ticks if start <= tick.t <= end]


def _cpu_pct(ticks: Sequence[Tick], read: Callable[[Tick], float | None]) -> dict[str, float | None]:
    points = [(tick.t, value) for tick in ticks if (value := read(tick)) is not None]
    if len(points) < 2 or points[-1][0] <= points[0][0]:
        return {"mean": None, "max": None}
    rates = [100.0 * (c1 - c0) / (t1 - t0) for (t0, c0), (t1, c1) in itertools.pairwise(points) if t1 > t0]
    (t_first, c_first), (t_last, c_last) = points[0], points[-1]
    return {"mean": 100.0 * (c_last - c_first) / (t_last - t_first), "max": max(rates)}


def _gauge(ticks: Sequence[Tick], read: Callable[[Tick], float | None]) -> dict[str, float | None]:
    values = [value for tick in ticks if (value := read(tick)) is not None]
    return {"mean": float(np.mean(values)), "max": max(values)} if values else {"mean": None, "max": None}


def _series(prefix: str) -> Callable[[Tick], float | None]:
    def read(tick: Tick) -> float | None:
        values = [value for key, value in tick.metrics.items() if key.startswith(prefix)]
        return sum(values) / len(values) if values else None

    return read


def _ratio(numerator: float, denominator: float, scale: float = 1.0) -> float | None:
    return numerator / denominator * scale if denominator > 0 else None


def _worker_order(worker: str) -> tuple[int, int, str]:
    return (0, int(worker), "") if worker.isdigit() else (1, 0, worker)


def requests_per_worker(metrics: Mapping[str, float]) -> dict[str, float]:
    """A scrape's (``client.metrics.parse_metrics``) requests answered by each worker process, by its
    ``worker`` label: ``"0"``, ``"1"``... (a lone server: ``"0"``) and ``"replaced"`` (workers since
    restarted). Empty when the server does not report ``inference_worker_requests_total``."""
    counts: dict[str, float] = {}
    for key, value in metrics.items():
        name, _, labels = key.partition("{")
        worker = dict(re.findall(r'(\w+)="([^"]*)"', labels)).get("worker")
        if name == WORKER_REQUESTS and worker is not None:
            counts[worker] = counts.get(worker, 0.0) + value
    return dict(sorted(counts.items(), key=lambda item: _worker_order(item[0])))


def worker_deltas(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """Requests each worker answered between two scrapes (``requests_per_worker`` of each)."""
    first, last = requests_per_worker(before), requests_per_worker(after)
    return {worker: count - first.get(worker, 0.0) for worker, count in last.items()}


def worker_balance(per_worker: Mapping[str, float]) -> dict[str, Any] | None:
    """How one step's requests (``worker_deltas``) spread over the server's workers; None when not reported.

    ``shares``: each worker's fraction of the requests; ``max_min_ratio``: the busiest worker's count over
    the idlest one's (None when one answered none); ``unbalanced``: some worker answered less than
    ``UNBALANCED_SHARE`` of its fair share (requests / workers). Judged only with at least
    ``BALANCE_MIN_REQUESTS`` per worker and no worker restarted in the window; ``note`` says what was found.
    """
    workers = {worker: count for worker, count in per_worker.items() if worker != "replaced"}
    if not workers:
        return None
    total = sum(workers.values())
    replaced = per_worker.get("replaced", 0.0)
    balance: dict[str, Any] = {
        "workers": len(workers),
        "requests": total + replaced,
        "shares": {worker: count / total if total > 0 else None for worker, count in workers.items()},
        "max_min_ratio": None,
        "unbalanced": False,
    }
    if len(workers) == 1:
        return balance | {"max_min_ratio": 1.0, "note": "1 worker"}
    fewest, most = min(workers.values()), max(workers.values())
    if fewest > 0:
        balance["max_min_ratio"] = most / fewest
    if replaced > 0 or fewest < 0:
        return balance | {"note": "a worker was restarted in the window: spread not judged"}
    fair = total / len(workers)
    if fair < BALANCE_MIN_REQUESTS:
        return balance | {"note": f"too few requests to judge the spread ({total:.0f})"}
    starved = [worker for worker, count in workers.items() if count < UNBALANCED_SHARE * fair]
    if not starved:
        return balance | {"note": f"{len(workers)} workers, balanced"}
    shares = ", ".join(f"worker {worker} {workers[worker] / total:.0%}" for worker in starved)
    return balance | {
        "unbalanced": True,
        "note": f"UNBALANCED: {shares} of the requests (fair share {1 / len(workers):.0%} each; "
        f"under {UNBALANCED_SHARE:.0%} of it)",
    }


def metric_deltas(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, Any]:
    """Server-side breakdown between two scrapes: mean queue/compute/request time, mean batch size, counts
    (by status code, and by worker process: ``requests_per_worker``)."""

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    codes = {
        key.split('code="', 1)[1].rstrip('"}'): delta(key)
        for key in after
        if key.startswith("inference_requests_total{")
    }
    return {
        "queue_ms_mean": _ratio(
            delta("inference_queue_duration_seconds_sum"), delta("inference_queue_duration_seconds_count"), 1e3
        ),
        "compute_ms_mean": _ratio(
            delta("inference_compute_duration_seconds_sum"), delta("inference_compute_duration_seconds_count"), 1e3
        ),
        "request_ms_mean": _ratio(
            delta("inference_request_duration_seconds_sum"), delta("inference_request_duration_seconds_count"), 1e3
        ),
        "batch_size_mean": _ratio(delta("inference_batch_size_sum"), delta("inference_batch_size_count")),
        "executions": delta("inference_executions_total"),
        "rows": delta("inference_rows_total"),
        "requests_by_code": {code: count for code, count in codes.items() if count},
        "requests_per_worker": worker_deltas(before, after),
    }


def resource_stats(ticks: Sequence[Tick], start: float, end: float) -> dict[str, Any]:
    """CPU (% of one core), RSS, GPU and the metric breakdown from the ticks inside [start, end]."""
    span = inside(ticks, start, end)
    other = _cpu_pct(span, lambda tick: tick.other_cpu_s)
    gpu_util = _gauge(span, _series("gpu_utilization_ratio"))
    gpu_memory = _gauge(span, _series("gpu_memory_used_bytes"))
    scraped = [tick for tick in span if tick.metrics]
    server_metrics = (
        metric_deltas(scraped[0].metrics, scraped[-1].metrics) if len(scraped) > 1 else metric_deltas({}, {})
    )
    return {
        "resource_window_s": round(span[-1].t - span[0].t, 3) if len(span) > 1 else 0.0,
        "server_cpu_pct": _cpu_pct(span, lambda tick: tick.server_cpu_s),
        "server_rss_bytes": _gauge(span, lambda tick: tick.server_rss),
        "generator_cpu_pct": _cpu_pct(span, lambda tick: tick.generator_cpu_s),
        # A difference of separately sampled counters: clamp the noise below zero.
        "other_cpu_pct": {k: v if v is None else max(v, 0.0) for k, v in other.items()},
        "gpu": None
        if gpu_util["mean"] is None
        else {"utilization_pct_mean": 100.0 * gpu_util["mean"], "memory_used_bytes_max": gpu_memory["max"]},
        "server_metrics": server_metrics,
        "worker_balance": worker_balance(server_metrics["requests_per_worker"]),
    }


# ---------------------------------------------------------------- deciding between servers


def separation_p_value(n: int, m: int) -> float:
    """Two-sided chance that n and m exchangeable values fall into non-overlapping ranges: 2 / C(n+m, n)."""
    return min(1.0, 2.0 / math.comb(n + m, n))


#: Two-sided 95 % quantiles of Student's t (its 0.975 quantile) by degrees of freedom, 1 to 30.
T_975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


def t_975(df: int) -> float:
    """Student's t 0.975 quantile for ``df`` degrees of freedom: the table to 30, then the Cornish-Fisher
    expansion around the normal quantile (within 0.001 of the exact value beyond 30)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, not {df}")
    if df <= len(T_975):
        return T_975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_interval(values: Sequence[float]) -> dict[str, Any]:
    """Mean of ``values`` (one per repeat) with its 95 % Student-t confidence interval:
    ``mean ± t_975(n-1) · s / √n``; ``half_width_pct`` is the half-width relative to the mean.
    With fewer than two values there is no interval (None)."""
    n = len(values)
    if n == 0:
        return {"mean": None, "interval": None, "half_width": None, "half_width_pct": None, "n": 0}
    mean = statistics.fmean(values)
    if n < 2:
        return {"mean": mean, "interval": None, "half_width": None, "half_width_pct": None, "n": n}
    half = t_975(n - 1) * statistics.stdev(values) / math.sqrt(n)
    return {
        "mean": mean,
        "interval": [mean - half, mean + half],
        "half_width": half,
        "half_width_pct": 100.0 * half / mean if mean else None,
        "n": n,
    }


def decide(values: Mapping[str, Sequence[float]], higher_is_better: bool) -> dict[str, Any]:
    """Winner of two servers' values by ``DECISION_RULE``; margin (% relative to the loser) either way.

    ``winner`` is a server name, or None: ``verdict`` then says why ("no difference beyond
    noise", "too few values", "not measured").
    """
    (a, a_values), (b, b_values) = values.items()
    decision: dict[str, Any] = {"winner": None, "margin_pct": None, "p_value": None, "leader": None}
    if not a_values or not b_values:
        return decision | {"verdict": "not measured"}
    mean_a, mean_b = statistics.fmean(a_values), statistics.fmean(b_values)
    if mean_a != mean_b:
        leader = a if (mean_a > mean_b) == higher_is_better else b
        loser_mean = mean_b if leader == a else mean_a
        decision["leader"] = leader
        decision["margin_pct"] = abs(mean_a - mean_b) / abs(loser_mean) * 100.0 if loser_mean else None
    else:
        decision["margin_pct"] = 0.0
    n, m = len(a_values), len(b_values)
    if min(n, m) < MIN_VALUES:
        return decision | {"verdict": f"too few values to judge (n={n}, {m}; at least {MIN_VALUES} each)"}
    decision["p_value"] = separation_p_value(n, m)
    better_a = (min(a_values) > max(b_values)) if higher_is_better else (max(a_values) < min(b_values))
    better_b = (min(b_values) > max(a_values)) if higher_is_better else (max(b_values) < min(a_values))
    if better_a or better_b:
        winner = a if better_a else b
        return decision | {"winner": winner, "verdict": f"{winner} better"}
    return decision | {"verdict": "no difference beyond noise"}

"""Where a request's time goes: pure functions from a step's samples and ticks to its ``breakdown``.

Mean milliseconds per successful request in the step's window:

- ``client_ms``: send to response, as the generator saw it (each success's latency minus its send
  lag: an open-loop request's wait in the generator is left out);
- ``server_ms``: the server's own time for a success, decode to reply (ModelStatistics ``success``);
- ``network_serialization_ms`` = client − server: everything outside the server's handler: the
  wire, gRPC and protobuf on both sides, and the wait for a free gRPC handler thread (under
  overload, most of it);
- ``queue_ms``, ``compute_input_ms``, ``compute_infer_ms``, ``compute_output_ms``: ModelStatistics'
  durations per request, as Triton charges them (each request of a batch is charged the batch's
  compute durations);
- ``server_other_ms`` = server − queue − compute input − infer − output: decoding, validation,
  batching and encoding around the model.

``PARTS`` add up to ``client_ms``. The server's figures are differences of its cumulative
ModelStatistics (``flatten``: count and nanoseconds per duration) between the first and the last tick
inside the window that read them (``Tick.statistics``, taken by ``loadtest.sampling.StatisticsReader``);
a figure the server did not report, or whose counter went back (a restart), is None, and so is every
difference that needs it. ``client_requests`` and ``server_requests`` count the successes behind each
side's means: far apart (a server so overloaded that it refused most statistics calls), client and
server figures describe different requests.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from contract.protocol import inference_pb2 as pb
from loadtest.stats import Tick, inside
from loadtest.users.latency_file import Samples

#: ModelStatistics' InferStatistics durations, each flattened to ``<name>_count`` and ``<name>_ns``.
DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
#: The server's parts of its time, each from the duration of the same name.
SERVER_PARTS = ("queue_ms", "compute_input_ms", "compute_infer_ms", "compute_output_ms")
#: The stack that makes up ``client_ms``, outermost first.
PARTS = ("network_serialization_ms", "server_other_ms", *SERVER_PARTS)
KEYS = ("client_ms", "server_ms", *PARTS)


def flatten(stats: Iterable[pb.ModelStatistics]) -> dict[str, float]:
    """Cumulative figures of a ModelStatistics reply (every version of the model together)."""
    flat = dict.fromkeys([f"{name}_{unit}" for name in DURATIONS for unit in ("count", "ns")], 0.0)
    flat |= {"inference_count": 0.0, "execution_count": 0.0}
    for model in stats:
        for name in DURATIONS:
            duration = getattr(model.inference_stats, name)
            flat[f"{name}_count"] += duration.count
            flat[f"{name}_ns"] += duration.ns
        flat["inference_count"] += model.inference_count
        flat["execution_count"] += model.execution_count
    return flat


def statistics_deltas(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float | None]:
    """``after - before`` of each cumulative figure; None for one missing from either or gone back."""
    deltas: dict[str, float | None] = {}
    for key, value in after.items():
        first = before.get(key)
        deltas[key] = None if first is None or value < first else value - first
    return deltas


def mean_ms(deltas: Mapping[str, float | None], name: str) -> float | None:
    """Mean milliseconds per request of duration ``name`` between two readings (None without a count)."""
    count, ns = deltas.get(f"{name}_count"), deltas.get(f"{name}_ns")
    if count is None or ns is None or count <= 0:
        return None
    return ns / count / 1e6


def _successes(samples: Samples, start: float, end: float) -> np.ndarray:
    return samples.ok & (samples.start_s >= start) & (samples.start_s < end)


def client_ms(samples: Samples, start: float, end: float) -> float | None:
    """Mean send-to-response time (ms) of the successes sent in [start, end)."""
    chosen = _successes(samples, start, end)
    if not chosen.any():
        return None
    return float(np.mean(samples.latency_us[chosen] - np.maximum(samples.lag_us[chosen], 0.0))) / 1000.0


def _minus(total: float | None, parts: Sequence[float | None]) -> float | None:
    if total is None or any(part is None for part in parts):
        return None
    return total - sum(part for part in parts if part is not None)


def time_breakdown(client: float | None, deltas: Mapping[str, float | None]) -> dict[str, float | None]:
    """The breakdown (``KEYS``, see the module docstring) of a client mean and the server's figures."""
    server = mean_ms(deltas, "success")
    parts = {part: mean_ms(deltas, part.removesuffix("_ms")) for part in SERVER_PARTS}
    return {
        "client_ms": client,
        "server_ms": server,
        "network_serialization_ms": _minus(client, [server]),
        "server_other_ms": _minus(server, list(parts.values())),
        **parts,
    }


def step_breakdown(samples: Samples, ticks: Sequence[Tick], start: float, end: float) -> dict[str, Any]:
    """A step's breakdown: its window's client mean, and the server's figures between the first and last
    tick inside [start, end] that read them; the successes behind each (``client_requests``, ``server_requests``)."""
    read = [tick.statistics for tick in inside(ticks, start, end) if tick.statistics]
    deltas = statistics_deltas(read[0], read[-1]) if len(read) > 1 else {}
    return {
        **time_breakdown(client_ms(samples, start, end), deltas),
        "client_requests": int(np.count_nonzero(_successes(samples, start, end))),
        "server_requests": deltas.get("success_count"),
    }


def mean_breakdown(steps: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """Each ``KEYS`` figure's mean over the steps that have it (None where none has)."""
    means: dict[str, float | None] = {}
    for key in KEYS:
        values = [value for step in steps if (value := (step.get("breakdown") or {}).get(key)) is not None]
        means[key] = float(np.mean(values)) if values else None
    return means

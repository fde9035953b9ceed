"""Exact per-request latencies of a load run: the file format, its writer and its one reader.

Locust rounds its own percentiles to whole milliseconds, so every load-generating process
keeps each request's figures exact (1 µs) with a ``LatencyRecorder`` and writes them at
test stop as ``<prefix>.<pid>.npz`` (``<prefix>.<pid>.<n>.npz`` for later runs of the same
process), one element per request Locust counted:

- ``start_us`` int64: Unix time in microseconds the request was scheduled for (open loop)
  or sent at (closed loop);
- ``latency_us`` int64: from ``start_us`` to the response or error; -1 if never sent (an
  open-loop arrival the generator dropped);
- ``ok`` bool: a successful response;
- ``lag_us`` int64: actual send time minus scheduled time (0 in closed loop, -1 if never
  sent);
- ``meta``: a JSON string (pid, model, batch size, encoding, deadline, mode, CPU time, ...).

``read_latencies`` merges the files of every process of a run into one ``Samples``.
Free of gevent and Locust: the runner imports it without patching its process.
"""

from __future__ import annotations

import glob
import json
import os
import time
from array import array
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

COLUMNS = ("start_us", "latency_us", "ok", "lag_us")


class LatencyRecorder:
    """Per-request (start, latency, ok, send lag) of one process, kept exact (see the module docstring)."""

    def __init__(self) -> None:
        # Flat doubles, 4 per request (32 bytes): compact enough for long runs.
        self._values = array("d")
        #: Record one request as (perf_counter start, latency s, ok, lag s); latency and lag -1 when never sent.
        self.record: Callable[[tuple[float, float, bool, float]], None] = self._values.extend
        self._saved = 0
        self._anchor = (time.time(), time.perf_counter())

    def __len__(self) -> int:
        return len(self._values) // 4

    def clear(self) -> None:
        del self._values[:]
        self._anchor = (time.time(), time.perf_counter())

    def save(self, prefix: str | os.PathLike[str], meta: Mapping[str, Any]) -> Path:
        """Write the requests recorded so far (and forget them); returns the file written."""
        suffix = f".{os.getpid()}" + (f".{self._saved}" if self._saved else "")
        path = Path(f"{prefix}{suffix}.npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = np.frombuffer(self._values, dtype=np.float64).reshape(-1, 4).copy()
        wall, perf = self._anchor
        sent = rows[:, 1] >= 0
        np.savez(
            path,
            start_us=np.rint((rows[:, 0] - perf + wall) * 1e6).astype(np.int64),
            latency_us=np.where(sent, np.rint(rows[:, 1] * 1e6), -1).astype(np.int64),
            ok=rows[:, 2].astype(bool),
            lag_us=np.where(sent, np.rint(rows[:, 3] * 1e6), -1).astype(np.int64),
            meta=np.array(json.dumps({"pid": os.getpid(), **meta})),
        )
        self._saved += 1
        self.clear()
        return path


@dataclass
class Samples:
    """The requests of one run, all processes merged, sorted by start time.

    ``latency_us`` and ``lag_us`` are -1 for requests never sent; ``ok`` is False for them.
    """

    start_s: np.ndarray
    latency_us: np.ndarray
    ok: np.ndarray
    lag_us: np.ndarray
    metas: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.start_s)

    @property
    def sent(self) -> np.ndarray:
        return self.latency_us >= 0

    @property
    def end_s(self) -> np.ndarray:
        """When each request ended (its start for one never sent)."""
        return self.start_s + np.maximum(self.latency_us, 0) / 1e6


def read_latencies(prefix: str | os.PathLike[str]) -> Samples:
    """Merge every ``<prefix>.*.npz`` of a run; ``FileNotFoundError`` when there is none."""
    prefix = Path(prefix)
    files = sorted(prefix.parent.glob(f"{glob.escape(prefix.name)}.*.npz"))
    if not files:
        raise FileNotFoundError(f"no {prefix}.*.npz latency file")
    parts: dict[str, list[np.ndarray]] = {name: [] for name in COLUMNS}
    metas = []
    for path in files:
        with np.load(path) as data:
            for name, arrays in parts.items():
                arrays.append(data[name])
            metas.append(json.loads(str(data["meta"])))
    start_us, latency_us, ok, lag_us = (np.concatenate(arrays) for arrays in parts.values())
    order = np.argsort(start_us, kind="stable")
    latency = latency_us[order].astype(np.float64)
    return Samples(
        start_s=start_us[order] / 1e6,
        latency_us=latency,
        ok=ok[order].astype(bool) & (latency >= 0),
        lag_us=lag_us[order].astype(np.float64),
        metas=metas,
    )

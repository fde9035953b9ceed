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
- ``status`` int16: the request's outcome, an index into ``statuses``;
- ``statuses``: the outcomes' labels (str): ``OK``, ``UNSENT`` (never sent: the generator
  dropped it), else the gRPC status code's name, followed for a refusal by its reason
  (``status_label``: ``RESOURCE_EXHAUSTED: queue full (N requests waiting)``);
- ``meta``: a JSON string (pid, model, batch size, encoding, deadline, mode, CPU time, ...).

``read_latencies`` merges the files of every process of a run into one ``Samples``. Files
written before ``status`` existed still read: their failures get ``NOT_RECORDED``.
Free of gevent and Locust: the runner imports it without patching its process.
"""

from __future__ import annotations

import glob
import json
import os
import re
import time
from array import array
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

COLUMNS = ("start_us", "latency_us", "ok", "lag_us")
OK = "OK"
#: An arrival the generator never sent (open loop, too many requests in flight).
UNSENT = "UNSENT"
#: The outcome numbers of ``OK`` and ``UNSENT`` in every recorder.
OK_ID, UNSENT_ID = 0, 1
#: A failure read from a file written before outcomes were recorded.
NOT_RECORDED = "NOT_RECORDED"
#: Status codes whose label carries the reason (the details, numbers masked): why a request was refused.
REASON_CODES = frozenset({"RESOURCE_EXHAUSTED"})
#: Most distinct labels one recorder keeps; beyond it a failure is labelled by its code alone.
MAX_LABELS = 64
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def status_label(code: str, details: str | None) -> str:
    """A failure's label: its status code's name, and for ``REASON_CODES`` the reason, numbers masked and cut
    at the first ``;`` (``RESOURCE_EXHAUSTED: would wait about N ms for its batch, past its deadline in N ms``)."""
    if code not in REASON_CODES or not details:
        return code
    reason = _NUMBER.sub("N", details).split(";", 1)[0].strip()
    return f"{code}: {reason}" if reason else code


def status_code(label: str) -> str:
    """The status code of a label (its part before the reason)."""
    return label.split(":", 1)[0]


class LatencyRecorder:
    """Per-request (start, latency, ok, send lag, outcome) of one process, kept exact (see the module docstring)."""

    def __init__(self) -> None:
        # Flat doubles, 5 per request (40 bytes): compact enough for long runs.
        self._values = array("d")
        #: Record one request as (perf_counter start, latency s, ok, lag s, outcome); latency and lag -1 when
        #: never sent; outcome ``OK_ID``, ``UNSENT_ID`` or ``status_id(code, details)`` of a failure.
        self.record: Callable[[tuple[float, float, bool, float, int]], None] = self._values.extend
        self._labels: dict[str, int] = {OK: OK_ID, UNSENT: UNSENT_ID}
        self._saved = 0
        self._anchor = (time.time(), time.perf_counter())

    def __len__(self) -> int:
        return len(self._values) // 5

    def status_id(self, code: str, details: str | None = None) -> int:
        """The outcome number of a failure with gRPC status ``code`` (a name) and ``details`` (``status_label``);
        labels are kept for the recorder's life, so numbers recorded before a save stay valid after it."""
        label = status_label(code, details)
        found = self._labels.get(label)
        if found is None:
            if len(self._labels) >= MAX_LABELS:
                label = code
                found = self._labels.get(code)
            if found is None:
                found = self._labels[label] = len(self._labels)
        return found

    def clear(self) -> None:
        del self._values[:]
        self._anchor = (time.time(), time.perf_counter())

    def save(self, prefix: str | os.PathLike[str], meta: Mapping[str, Any]) -> Path:
        """Write the requests recorded so far (and forget them); returns the file written."""
        suffix = f".{os.getpid()}" + (f".{self._saved}" if self._saved else "")
        path = Path(f"{prefix}{suffix}.npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = np.frombuffer(self._values, dtype=np.float64).reshape(-1, 5).copy()
        wall, perf = self._anchor
        sent = rows[:, 1] >= 0
        np.savez(
            path,
            start_us=np.rint((rows[:, 0] - perf + wall) * 1e6).astype(np.int64),
            latency_us=np.where(sent, np.rint(rows[:, 1] * 1e6), -1).astype(np.int64),
            ok=rows[:, 2].astype(bool),
            lag_us=np.where(sent, np.rint(rows[:, 3] * 1e6), -1).astype(np.int64),
            status=rows[:, 4].astype(np.int16),
            statuses=np.array(list(self._labels), dtype=str),
            meta=np.array(json.dumps({"pid": os.getpid(), **meta})),
        )
        self._saved += 1
        self.clear()
        return path


@dataclass
class Samples:
    """The requests of one run, all processes merged, sorted by start time.

    ``latency_us`` and ``lag_us`` are -1 for requests never sent; ``ok`` is False for them.
    ``status``: each request's outcome, an index into ``statuses`` (None: not recorded, see ``outcomes``).
    """

    start_s: np.ndarray
    latency_us: np.ndarray
    ok: np.ndarray
    lag_us: np.ndarray
    metas: list[dict[str, Any]] = field(default_factory=list)
    status: np.ndarray | None = None
    statuses: list[str] = field(default_factory=list)

    def outcomes(self) -> tuple[np.ndarray, list[str]]:
        """(each request's outcome index, the labels): ``status`` and ``statuses`` when recorded, else
        ``OK``, ``UNSENT`` (never sent) or ``NOT_RECORDED`` from what the other columns tell."""
        if self.status is not None:
            return self.status, self.statuses
        return _outcomes_of(self.ok, self.latency_us), [OK, UNSENT, NOT_RECORDED]

    def __len__(self) -> int:
        return len(self.start_s)

    @property
    def sent(self) -> np.ndarray:
        return self.latency_us >= 0

    @property
    def end_s(self) -> np.ndarray:
        """When each request ended (its start for one never sent)."""
        return self.start_s + np.maximum(self.latency_us, 0) / 1e6


def _outcomes_of(ok: np.ndarray, latency_us: np.ndarray) -> np.ndarray:
    """Outcome indexes into ``[OK, UNSENT, NOT_RECORDED]`` of requests whose status was not recorded."""
    return np.where(ok & (latency_us >= 0), 0, np.where(latency_us < 0, 1, 2)).astype(np.int16)


def read_latencies(prefix: str | os.PathLike[str]) -> Samples:
    """Merge every ``<prefix>.*.npz`` of a run; ``FileNotFoundError`` when there is none."""
    prefix = Path(prefix)
    files = sorted(prefix.parent.glob(f"{glob.escape(prefix.name)}.*.npz"))
    if not files:
        raise FileNotFoundError(f"no {prefix}.*.npz latency file")
    parts: dict[str, list[np.ndarray]] = {name: [] for name in COLUMNS}
    outcomes: list[np.ndarray] = []
    labels: dict[str, int] = {}
    metas = []
    for path in files:
        with np.load(path) as data:
            for name, arrays in parts.items():
                arrays.append(data[name])
            metas.append(json.loads(str(data["meta"])))
            if "status" in data:  # each file numbers its own labels: renumber them into one list
                status, names = data["status"], [str(name) for name in data["statuses"]]
            else:
                status, names = _outcomes_of(data["ok"], data["latency_us"]), [OK, UNSENT, NOT_RECORDED]
            index = np.array([labels.setdefault(name, len(labels)) for name in names], dtype=np.int16)
            outcomes.append(index[status] if len(status) else status.astype(np.int16))
    start_us, latency_us, ok, lag_us = (np.concatenate(arrays) for arrays in parts.values())
    order = np.argsort(start_us, kind="stable")
    latency = latency_us[order].astype(np.float64)
    return Samples(
        start_s=start_us[order] / 1e6,
        latency_us=latency,
        ok=ok[order].astype(bool) & (latency >= 0),
        lag_us=lag_us[order].astype(np.float64),
        metas=metas,
        status=np.concatenate(outcomes)[order],
        statuses=list(labels),
    )

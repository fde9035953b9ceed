"""Device names shared by both frameworks: parsing ``cuda:N`` and naming the CPU."""

from __future__ import annotations

import os
import platform


def cuda_index(device: str) -> int | None:
    """GPU index of ``"cuda"``, ``"gpu"``, ``"cuda:N"`` or ``"gpu:N"``; None for anything else."""
    kind, _, index = device.partition(":")
    if kind not in ("cuda", "gpu"):
        return None
    if not index:
        return 0
    return int(index) if index.isdigit() else None


def cpu_model() -> str:
    """The CPU model, from /proc/cpuinfo on Linux."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_name() -> str:
    """The CPU model and its logical core count, as reported for a CPU device."""
    return f"{cpu_model()} ({os.cpu_count()} logical cores)"

"""NVML (nvidia-ml-py) for the serving core and the load suite: set up once per process,
which NVML device a CUDA device is, and reads that never fail their caller.

``library()`` initialises NVML once per process (NvmlUnavailable, with the reason, without
it: no library, no driver, a CPU host). ``open_gpu(N)`` is the NVML device that this
process's CUDA calls ``cuda:N``; its reads answer None for a figure NVML will not give
that device (a MIG instance has no utilisation: NotSupported), count it in ``errors()``
and log it once, so one figure never takes the others down with it.

Which device is ``cuda:N`` (``cuda_device_uuid``, a pure function of the environment and
NVML's inventory). NVML numbers whole GPUs in PCI bus order; CUDA numbers the devices of
``CUDA_VISIBLE_DEVICES`` in the order listed, all GPUs in its own order when it is unset:

- an entry that is a UUID (``GPU-…``, ``MIG-…``, or a prefix naming one device, as CUDA
  accepts) is that device, whatever the order: exact;
- an entry that is an index, and the N-th GPU when the variable is unset, is the N-th GPU
  in CUDA's order. Under ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` that is NVML's order. Under the
  default, ``FASTEST_FIRST``, CUDA puts faster GPUs first and keeps PCI order among equals:
  NVML's order again when every GPU is the same model (or there is one), and unknown on a
  host of mixed models, where no device is chosen (NvmlUnavailable says why and what to set:
  ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, or UUIDs in ``CUDA_VISIBLE_DEVICES``);
- the list ends at the first entry CUDA would reject (an unknown index or UUID), as in CUDA
  (and at a repeated one: never a wrong device, whatever CUDA makes of repeats);
- a caller that knows the UUID CUDA reports for its device (a framework's own device
  properties) passes it: exact, and the environment is not read.

Per-process GPU memory (``process_memory``): NVML lists the processes on a device with their
memory, by pid. On the host, and in a container sharing the host's PID namespace, those are
our pids. In a container of its own, drivers that predate PID-namespace translation list
host pids (ours are not among them: a match would be a coincidence with another process),
and drivers that translate list our pids but no memory for them (NVML's per-pid query is not
translated). So a figure is attributed to a pid only when NVML's pids are this namespace's
(the host's namespace, or every pid listed exists here) and NVML gives the figure; nothing
is ever reported as 0 for want of a figure.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The inode of the host's (initial) PID namespace, Linux's PROC_PID_INIT_INO.
HOST_PID_NAMESPACE = 0xEFFFFFFC
PROC = Path("/proc")

_lock = threading.Lock()
#: Per pynvml module: "" once initialised, else why it could not be.
_initialised: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
_logged: set[str] = set()


class NvmlUnavailable(Exception):
    """NVML cannot answer: no library or driver, or the CUDA device is not among its devices
    (the message says why, in one line)."""


class Unmapped(NvmlUnavailable):
    """The CUDA device cannot be told apart among NVML's devices."""


def _log_once(message: str, *args: object) -> None:
    text = message % args
    with _lock:
        if text in _logged:
            return
        _logged.add(text)
    log.warning("%s", text)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def library() -> Any:
    """pynvml, initialised once in this process (NvmlUnavailable where it cannot be)."""
    try:
        import pynvml  # nvidia-ml-py
    except ImportError as err:
        raise NvmlUnavailable(f"no NVML bindings ({err})") from None
    with _lock:
        failure = _initialised.get(pynvml)
        if failure is None:
            try:
                pynvml.nvmlInit()
                failure = ""
            except Exception as err:  # no library or no driver: a CPU host
                failure = str(err) or type(err).__name__
            _initialised[pynvml] = failure
    if failure:
        raise NvmlUnavailable(f"NVML unavailable ({failure})")
    return pynvml


@dataclass(frozen=True)
class NvmlDevice:
    """One device as NVML knows it: a whole GPU, or a MIG instance of one."""

    uuid: str
    name: str
    #: NVML's index of the GPU (of its parent GPU for a MIG instance): PCI bus order.
    index: int
    mig: bool = False


def _by_uuid(text: str, devices: Sequence[NvmlDevice], bare: bool = False) -> NvmlDevice | None:
    """The one device whose UUID starts with ``text`` (``bare``: also without its GPU-/MIG- prefix)."""
    found = [
        device
        for device in devices
        if device.uuid.startswith(text) or (bare and device.uuid.partition("-")[2].startswith(text))
    ]
    return found[0] if len(found) == 1 else None


def _visible(value: str, devices: Sequence[NvmlDevice], gpus: int) -> list[str]:
    """The entries of ``CUDA_VISIBLE_DEVICES`` that CUDA accepts: up to the first it rejects."""
    entries: list[str] = []
    for entry in (part.strip() for part in value.split(",")):
        if entry.isdigit():
            known = int(entry) < gpus
        else:
            named = entry.startswith(("GPU-", "MIG-")) and len(entry) > len("GPU-")
            known = named and _by_uuid(entry, devices) is not None
        if not known or entry in entries:
            break
        entries.append(entry)
    return entries


def cuda_device_uuid(
    cuda_index: int, devices: Sequence[NvmlDevice], environ: Mapping[str, str], uuid: str | None = None
) -> str:
    """The UUID of the NVML device that CUDA calls ``cuda:<cuda_index>`` in a process with
    ``environ`` (the rule: the module docstring); Unmapped, with the reason, where it cannot
    be told. ``uuid``: what CUDA itself reports for the device (its bare or prefixed UUID)."""
    if uuid:
        device = _by_uuid(uuid, devices, bare=True)
        if device is None:
            raise Unmapped(f"cuda:{cuda_index}: UUID {uuid} is none of NVML's devices")
        return device.uuid
    gpus = [device for device in devices if not device.mig]
    value = environ.get("CUDA_VISIBLE_DEVICES")
    entries = [str(index) for index in range(len(gpus))] if value is None else _visible(value, devices, len(gpus))
    if cuda_index >= len(entries):
        shown = "unset" if value is None else repr(value)
        raise Unmapped(f"cuda:{cuda_index} is not visible: {len(entries)} device(s) (CUDA_VISIBLE_DEVICES {shown})")
    entry = entries[cuda_index]
    if not entry.isdigit():
        found = _by_uuid(entry, devices)
        assert found is not None  # _visible kept only entries naming one device
        return found.uuid
    order = environ.get("CUDA_DEVICE_ORDER", "FASTEST_FIRST").strip().upper()
    models = sorted({gpu.name for gpu in gpus})
    if order != "PCI_BUS_ID" and len(models) > 1:
        raise Unmapped(
            f"cuda:{cuda_index}: CUDA orders GPUs fastest first and these differ ({', '.join(models)}), so its "
            "numbering is not NVML's; set CUDA_DEVICE_ORDER=PCI_BUS_ID, or name GPUs by UUID in CUDA_VISIBLE_DEVICES"
        )
    return gpus[int(entry)].uuid


def inventory(nvml: Any) -> dict[str, tuple[NvmlDevice, Any]]:
    """Every device NVML lists, whole GPUs (in NVML's order) then MIG instances: by UUID,
    with its handle."""
    found: dict[str, tuple[NvmlDevice, Any]] = {}
    migs: list[tuple[NvmlDevice, Any]] = []
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        name = _text(nvml.nvmlDeviceGetName(handle))
        gpu = NvmlDevice(_text(nvml.nvmlDeviceGetUUID(handle)), name, index)
        found[gpu.uuid] = (gpu, handle)
        try:
            enabled = nvml.nvmlDeviceGetMigMode(handle)[0]
            slots = nvml.nvmlDeviceGetMaxMigDeviceCount(handle) if enabled else 0
        except Exception:  # a GPU without MIG: NotSupported
            slots = 0
        for slot in range(slots):
            try:
                instance = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
                uuid = _text(nvml.nvmlDeviceGetUUID(instance))
            except Exception:  # an empty slot: NotFound
                continue
            migs.append((NvmlDevice(uuid, name, index, mig=True), instance))
    found.update((device.uuid, (device, handle)) for device, handle in migs)
    return found


class Gpu:
    """One device through NVML, named ``label`` in metrics. Every read answers None where
    NVML fails for that figure (counted by figure in ``errors()``, logged once)."""

    def __init__(self, nvml: Any, handle: Any, device: NvmlDevice, label: str) -> None:
        self.nvml = nvml
        self.handle = handle
        self.device = device
        self.label = label
        self._errors: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._logged: set[tuple[str, str]] = set()

    def _read(self, field: str, call: Callable[[Any], T]) -> T | None:
        try:
            return call(self.handle)
        except Exception as err:  # NVMLError_NotSupported (MIG), GPU lost, ...: this figure only
            reason = type(err).__name__
            with self._lock:
                self._errors[field] += 1
                first = (field, reason) not in self._logged
                self._logged.add((field, reason))
            if first:
                log.warning("GPU %s (%s): no %s from NVML, left out (%s: %s)", self.label, self.device.uuid, field,
                            reason, err)  # fmt: skip
            return None

    def errors(self) -> dict[str, int]:
        """Failed reads so far, by figure."""
        with self._lock:
            return dict(self._errors)

    def utilization(self) -> float | None:
        """Busy fraction over NVML's last sample period."""
        rates = self._read("utilization", self.nvml.nvmlDeviceGetUtilizationRates)
        return None if rates is None else rates.gpu / 100.0

    def memory(self) -> tuple[int, int] | None:
        """(used, total) bytes of the device."""
        info = self._read("memory", self.nvml.nvmlDeviceGetMemoryInfo)
        return None if info is None else (int(info.used), int(info.total))

    def memory_used(self) -> int | None:
        memory = self.memory()
        return None if memory is None else memory[0]

    def processes(self) -> list[tuple[int, int | None]]:
        """(pid, bytes) of the compute processes NVML lists: its pids, None where it has no figure."""
        listed = self._read("processes", self.nvml.nvmlDeviceGetComputeRunningProcesses) or []
        return [(int(process.pid), _bytes(process.usedGpuMemory)) for process in listed]

    def process_used(self, pid: int) -> int | None:
        """GPU memory of process ``pid`` of this namespace on this device (``process_memory``'s rule)."""
        return process_memory([self]).get(pid)


def _bytes(value: int | None) -> int | None:
    # pynvml gives None for NVML_VALUE_NOT_AVAILABLE
    return None if value is None else int(value)


def open_gpu(cuda_index: int, environ: Mapping[str, str] | None = None, uuid: str | None = None) -> Gpu:
    """The NVML device of ``cuda:<cuda_index>`` in this process (``environ``: the process's
    environment, os.environ by default); NvmlUnavailable, with the reason, where there is none."""
    nvml = library()
    try:
        devices = inventory(nvml)
    except Exception as err:
        raise NvmlUnavailable(f"NVML lists no devices ({type(err).__name__}: {err})") from None
    chosen = cuda_device_uuid(
        cuda_index, [device for device, _ in devices.values()], os.environ if environ is None else environ, uuid
    )
    device, handle = devices[chosen]
    return Gpu(nvml, handle, device, str(cuda_index))


def all_gpus() -> list[Gpu]:
    """Every whole GPU NVML lists (labelled by NVML index); none without NVML."""
    try:
        nvml = library()
        devices = inventory(nvml)
    except Exception:  # no NVML, or it lists nothing: a CPU host
        return []
    return [Gpu(nvml, handle, device, str(device.index)) for device, handle in devices.values() if not device.mig]


def in_host_pid_namespace() -> bool:
    """Whether this process lives in the host's PID namespace (where NVML's pids are ours)."""
    try:
        return (PROC / "self/ns/pid").stat().st_ino == HOST_PID_NAMESPACE
    except OSError:  # no namespaces to tell apart
        return True


def pids_are_local(pids: Iterable[int]) -> bool:
    """Whether NVML's ``pids`` are this PID namespace's: in the host's namespace, or where every
    one exists here (a driver that lists host pids in a container lists ones that do not)."""
    return in_host_pid_namespace() or all((PROC / str(pid)).exists() for pid in pids)


def process_memory(gpus: Iterable[Gpu]) -> dict[int, int]:
    """GPU memory by pid of this namespace, summed over ``gpus``: NVML's per-process figures,
    only where its pids are ours and it gives the figure (the module docstring says why)."""
    listed = [entry for gpu in gpus for entry in gpu.processes()]
    if not pids_are_local(pid for pid, _ in listed):
        _log_once(
            "per-process GPU memory unavailable: NVML lists host pids, and this is a PID namespace of its own "
            "(a container); share the host's (docker --pid=host) or use a driver that translates pids"
        )
        return {}
    used: dict[int, int] = {}
    for pid, figure in listed:
        if figure is None:
            _log_once(
                "NVML lists process %d on a GPU without its memory (in a container: NVML's per-pid query is not "
                "namespace-aware); its GPU memory is left out",
                pid,
            )
            continue
        used[pid] = used.get(pid, 0) + figure
    return used

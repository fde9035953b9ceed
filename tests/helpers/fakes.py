"""A framework-free model and Framework for testing the serving core quickly.

``double``: y = 2x on FP32 [-1, 4]. Its backend can be gated (each forward pass
waits for an event), made slow, or made to fail, so queueing, deadlines, drain and
error paths are deterministic. ``FakeNvml`` stands in for pynvml: several GPUs (``FakeGpu``)
with UUIDs, MIG instances whose utilisation is NotSupported, failing reads, and process lists
as a container sees them (host pids, or pids without figures).
"""

from __future__ import annotations

import threading
import time
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from contract.datatypes import TensorSpec
from contract.signature import ModelSignature
from modelzoo.base import ModelDefinition
from serving.artifacts import ArtifactSignature
from serving.backend import Backend, BackendOptions, FrameworkInfo


class Double(ModelDefinition):
    name = "double"
    defaults: Mapping[str, Any] = {"width": 4}

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("x", "FP32", (-1, self.params["width"])),)

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("y", "FP32", (-1, self.params["width"])), TensorSpec("sum", "FP64", (-1, 1)))

    def build_weights(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {}

    def example_inputs(self, batch_size: int, rng: np.random.Generator, **kwargs: Any) -> dict[str, np.ndarray]:
        return {"x": rng.standard_normal((batch_size, self.params["width"])).astype(np.float32)}


#: The intra-op threads a FakeFramework reports when none were configured (its "own default").
FAKE_DEFAULT_THREADS = 3
#: The models a FakeFramework serves (``InferenceServer(..., zoo=ZOO)``).
ZOO: dict[str, type[ModelDefinition]] = {"double": Double}


class Controls:
    """Knobs shared by a FakeFramework's backends (set from the test thread)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.load_gate = threading.Event()
        self.load_gate.set()
        self.load_error: Exception | None = None
        self.delay_s = 0.0
        self.fail = False
        self.batches: list[int] = []
        self.closed = False


class FakeBackend(Backend):
    platform = "fake_numpy"

    def __init__(
        self,
        model: ModelSignature,
        artifact_dir: Path,
        options: BackendOptions,
        controls: Controls,
    ) -> None:
        super().__init__(model, artifact_dir, options)
        self.controls = controls

    def load(self) -> None:
        assert self.controls.load_gate.wait(30)
        if self.controls.load_error is not None:
            raise self.controls.load_error

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.controls.entered.set()
        assert self.controls.gate.wait(30)
        if self.controls.delay_s:
            time.sleep(self.controls.delay_s)
        if self.controls.fail:
            raise RuntimeError("secret internal detail")
        x = inputs["x"]
        self.controls.batches.append(x.shape[0])
        return {"y": x * 2, "sum": x.sum(axis=1, keepdims=True, dtype=np.float64)}

    def close(self) -> None:
        self.controls.closed = True


class FakeFramework:
    name = "fake"
    server_name = "fake_server"
    env_prefix = "FAKE_SERVER_"
    default_port = 0

    def __init__(self) -> None:
        self.controls = Controls()
        self.threads: int | None = None

    def configure(self, threads: int | None, device: str) -> None:
        self.threads = threads

    def check_options(self, device: str, precision: str, compile: str) -> None:
        if precision == "tf32" and not device.startswith("cuda"):
            raise ValueError(f"--precision tf32: it changes only CUDA matmul/convolution math, and {device} has none")

    def resolve_device(self, device: str) -> str:
        return "cpu"

    def export(self, model: ModelDefinition, version_dir: Path) -> None:
        (version_dir / "model.txt").write_text(model.name)

    def signature(self, version_dir: Path) -> ArtifactSignature:
        model = Double()  # the only model the fake exports, at its default width
        return ArtifactSignature(model.inputs, model.outputs)

    def create_backend(
        self,
        model: ModelSignature,
        version_dir: Path,
        options: BackendOptions,
    ) -> Backend:
        return FakeBackend(model, version_dir, options, self.controls)

    def info(self, device: str) -> FrameworkInfo:
        # Like a real framework, it resolves its own default when no count was configured.
        return FrameworkInfo(name="fake", version="0", device="cpu", threads=self.threads or FAKE_DEFAULT_THREADS)

    def gpu_memory(self, device: str) -> int | None:
        return None

    def reference(
        self, model: ModelSignature, version_dir: Path, device: str, precision: str = "fp32"
    ) -> Callable[[Mapping[str, np.ndarray]], Callable[[], object]]:
        def prepare(inputs: Mapping[str, np.ndarray]) -> Callable[[], object]:
            x = inputs["x"]
            return lambda: x * 2

        return prepare


class NVMLError(Exception):
    """pynvml's base error."""


class NVMLError_NotSupported(NVMLError):
    """What NVML answers for a figure a device does not have (a MIG instance's utilisation)."""


class NVMLError_NotFound(NVMLError):
    """An empty MIG slot, an unknown device."""


@dataclass
class FakeGpu:
    """One device of a FakeNvml: its identity, readings, processes and failing reads."""

    uuid: str = "GPU-5f0c2e53-0000-4000-8000-000000000000"
    name: str = "NVIDIA H100 80GB HBM3"
    utilization: int = 37  # percent
    used: int = 3 << 30
    total: int = 80 << 30
    #: (pid as NVML gives it, bytes or None where NVML has no figure): in a container of its
    #: own, an older driver gives host pids, a newer one the container's pids without bytes.
    processes: list[tuple[int, int | None]] = field(default_factory=list)
    #: MIG instances of this GPU (MIG mode is on when there are any).
    mig: list[FakeGpu] = field(default_factory=list)
    #: Figure ("utilization", "memory", "processes") -> the error its read raises.
    errors: dict[str, Exception] = field(default_factory=dict)

    def read(self, figure: str) -> None:
        if figure in self.errors:
            raise self.errors[figure]


def mig_instance(uuid: str, used: int = 1 << 30, total: int = 10 << 30) -> FakeGpu:
    """A MIG instance: memory and processes, but no utilisation (NVML: NotSupported)."""
    return FakeGpu(uuid=uuid, used=used, total=total, errors={"utilization": NVMLError_NotSupported("Not Supported")})


class FakeNvml(types.ModuleType):
    """The part of pynvml that serving.nvml uses, over ``gpus`` (in NVML's order: PCI bus
    order); one H100 by default. Counts ``nvmlInit`` calls in ``inits``."""

    NVMLError = NVMLError
    NVMLError_NotSupported = NVMLError_NotSupported
    NVMLError_NotFound = NVMLError_NotFound

    def __init__(self, gpus: Sequence[FakeGpu] | None = None, fail: bool = False) -> None:
        super().__init__("pynvml")
        self.gpus = list(gpus) if gpus is not None else [FakeGpu()]
        self.fail = fail
        self.inits = 0

    def nvmlInit(self) -> None:
        self.inits += 1
        if self.fail:
            raise NVMLError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        if not 0 <= index < len(self.gpus):
            raise NVMLError_NotFound("Not Found")
        return self.gpus[index]

    def nvmlDeviceGetUUID(self, handle: FakeGpu) -> str:
        return handle.uuid

    def nvmlDeviceGetName(self, handle: FakeGpu) -> str:
        return handle.name

    def nvmlDeviceGetMigMode(self, handle: FakeGpu) -> list[int]:
        mode = 1 if handle.mig else 0
        return [mode, mode]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: FakeGpu) -> int:
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: FakeGpu, index: int) -> FakeGpu:
        if index >= len(handle.mig):
            raise NVMLError_NotFound("Not Found")
        return handle.mig[index]

    def nvmlDeviceGetUtilizationRates(self, handle: FakeGpu) -> Any:
        handle.read("utilization")
        return types.SimpleNamespace(gpu=handle.utilization, memory=12)

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGpu) -> Any:
        handle.read("memory")
        return types.SimpleNamespace(used=handle.used, total=handle.total, free=handle.total - handle.used)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeGpu) -> list[Any]:
        handle.read("processes")
        return [types.SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in handle.processes]

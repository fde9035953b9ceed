"""A framework-free model and Framework for testing the serving core quickly.

``double``: y = 2x on FP32 [-1, 4]. Its backend can be gated (each forward pass
waits for an event), made slow, or made to fail, so queueing, deadlines, drain and
error paths are deterministic. ``FakeNvml`` stands in for pynvml, with fixed readings.
"""

from __future__ import annotations

import threading
import time
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from contract.datatypes import TensorSpec
from modelzoo.base import ModelDefinition
from serving.backend import Backend, FrameworkInfo


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
        model: ModelDefinition,
        artifact_dir: Path,
        device: str,
        controls: Controls,
        precision: str = "fp32",
        compile: str = "off",
        instances: int = 1,
    ) -> None:
        super().__init__(model, artifact_dir, device, precision, compile, instances)
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

    def configure(self, threads: int | None, device: str) -> None:
        pass

    def check_options(self, device: str, precision: str, compile: str) -> None:
        if precision == "tf32" and not device.startswith("cuda"):
            raise ValueError(f"--precision tf32: it changes only CUDA matmul/convolution math, and {device} has none")

    def resolve_device(self, device: str) -> str:
        return "cpu"

    def export(self, model: ModelDefinition, version_dir: Path) -> None:
        (version_dir / "model.txt").write_text(model.name)

    def create_backend(
        self,
        model: ModelDefinition,
        version_dir: Path,
        device: str,
        precision: str = "fp32",
        compile: str = "off",
        instances: int = 1,
    ) -> Backend:
        return FakeBackend(model, version_dir, device, self.controls, precision, compile, instances)

    def info(self, device: str) -> FrameworkInfo:
        return FrameworkInfo(name="fake", version="0", device="cpu")


class FakeNvml(types.ModuleType):
    """The part of pynvml that GpuCollector uses, with fixed readings."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__("pynvml")
        self.fail = fail
        self.handles: list[int] = []

    def nvmlInit(self) -> None:
        if self.fail:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        self.handles.append(index)
        return f"gpu{index}"

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> Any:
        return types.SimpleNamespace(gpu=37, memory=12)

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> Any:
        return types.SimpleNamespace(used=3 << 30, total=80 << 30, free=77 << 30)

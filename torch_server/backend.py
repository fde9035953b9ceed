"""TorchBackend: serves a ``torch.export`` artifact (``model.pt2``) on CPU or CUDA."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch.export.passes import move_to_device_pass

from modelzoo.base import ModelDefinition
from serving.backend import Backend

#: File name of the exported program inside a version directory.
ARTIFACT = "model.pt2"


def _consume_readonly_warning() -> None:
    """Request tensors are often read-only zero-copy views of the wire bytes, and torch warns
    (once per process) when it wraps one. The forward pass never writes to its inputs, so
    sharing their memory is safe: take that one warning here, silenced, instead of copying."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.from_numpy(np.frombuffer(bytes(4), dtype=np.float32))


class TorchBackend(Backend):
    """One exported zoo model; inputs are passed positionally in contract order."""

    platform = "pytorch_torch_export"

    def __init__(self, model: ModelDefinition, artifact_dir: Path, device: str = "cpu") -> None:
        super().__init__(model, artifact_dir, device)
        self._module: torch.nn.Module | None = None
        self._input_names = tuple(spec.name for spec in model.inputs)
        self._input_dtypes = tuple(spec.numpy_dtype for spec in model.inputs)
        self._torch_device = torch.device(device)

    def load(self) -> None:
        program = torch.export.load(str(self.artifact_dir / ARTIFACT))
        if self._torch_device.type != "cpu":
            program = move_to_device_pass(program, self._torch_device)
        self._module = program.module()
        _consume_readonly_warning()

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        module = self._module
        if module is None:
            raise RuntimeError(f"model {self.name!r} is not loaded")
        device = self._torch_device
        with torch.inference_mode():
            args = [
                torch.from_numpy(np.ascontiguousarray(inputs[name], dtype=dtype)).to(device)
                for name, dtype in zip(self._input_names, self._input_dtypes, strict=True)
            ]
            outputs = module(*args)
            return {
                name: np.ascontiguousarray(tensor.to("cpu", torch.float32).numpy()) for name, tensor in outputs.items()
            }

    def close(self) -> None:
        self._module = None
        if self._torch_device.type == "cuda":
            torch.cuda.empty_cache()

"""The Backend contract: what a framework package implements, and nothing more.

A Backend is one loaded model in one framework. The serving core owns everything
around it (gRPC, validation, batching, deadlines, metrics, health); a backend only
loads an artifact, runs a forward pass on numpy batches, and releases resources.
``predict`` is called from a worker thread, never on the event loop, and at most
``instances`` calls run at once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from contract.datatypes import TensorSpec

if TYPE_CHECKING:
    from modelzoo.base import ModelDefinition


class Backend(ABC):
    """One model served by one framework."""

    #: Triton-style platform string reported in metadata, e.g. "pytorch_torch_export".
    platform: str = ""

    def __init__(self, model: ModelDefinition, artifact_dir: Path, device: str = "cpu") -> None:
        self.model = model
        self.artifact_dir = artifact_dir
        self.device = device

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.model.inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.model.outputs

    @abstractmethod
    def load(self) -> None:
        """Load the artifact onto ``self.device``; called once, off the event loop."""

    @abstractmethod
    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one forward pass on a batch: every input (optional ones filled in), each
        with the batch dimension first. Returns every output as a numpy array."""

    def close(self) -> None:
        """Release the model (memory, device handles). Default: nothing to release."""


@dataclass(frozen=True)
class FrameworkInfo:
    """What the framework reports about itself (versions, device)."""

    name: str
    version: str
    device: str
    extra: dict[str, str] = field(default_factory=dict)


class Reference(Protocol):
    """``reference(inputs)`` converts numpy inputs to the framework's own tensors once and
    returns a callable that runs one forward pass on them."""

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> Callable[[], object]: ...


class Framework(Protocol):
    """A framework package's entry points, as used by the shared CLI and core."""

    #: Short name: "torch" or "tensorflow".
    name: str
    #: Server name reported by ServerMetadata, e.g. "torch_server".
    server_name: str
    #: Environment variable prefix of this server's settings, e.g. "TORCH_SERVER_".
    env_prefix: str
    #: Default gRPC port; the metrics port defaults to the next one.
    default_port: int

    def configure(self, threads: int | None, device: str) -> None:
        """Apply thread settings; must run before the framework's first op."""

    def resolve_device(self, device: str) -> str:
        """Map "auto"/"cpu"/"cuda"/"cuda:N" to the concrete device to use."""

    def export(self, model: ModelDefinition, version_dir: Path) -> None:
        """Build ``model`` from its canonical weights and write the native serving
        artifact into ``version_dir`` (which exists and is empty)."""

    def create_backend(self, model: ModelDefinition, version_dir: Path, device: str) -> Backend:
        """A Backend for the artifact in ``version_dir``; not loaded yet."""

    def info(self, device: str) -> FrameworkInfo:
        """Framework version and device description."""

    def reference(self, model: ModelDefinition, version_dir: Path, device: str) -> Reference:
        """The fastest in-process call of this model that the framework offers, the yardstick
        of ``predict`` (``python -m <server> forward``). Its docstring says what it runs."""

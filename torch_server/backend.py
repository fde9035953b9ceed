"""TorchBackend: serves a ``torch.export`` artifact (``model.pt2``) on CPU or CUDA.

The exported program is run as a lean FX graph (``lean_module``): the artifact's own
graph and weights, minus what ``ExportedProgram.module()`` adds around every call, which
cost more than the mlp's whole forward pass (193 µs vs 56 µs eager at batch 1):

- its input-constraint and pytree hooks: the serving core has validated every input's
  dtype and shape against the model's contract before ``predict`` runs;
- pytree flattening of inputs and outputs: inputs go in positionally, outputs come
  back as a flat tuple in the program's output order;
- ATen calls through ``torch.ops.aten.*`` overload objects (the boxed dispatcher path):
  each call is rebound to torch's own generated binding of the same operator (what
  ``torch.relu`` or ``F.linear`` call), which dispatches to the same kernel.

The lean graph is checked against ``ExportedProgram.module()`` on the model's example
inputs at load: any difference and it falls back to the plain graph (logged).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import BuiltinFunctionType

import numpy as np
import torch
from torch.export.passes import move_to_device_pass
from torch.utils import _pytree as pytree

from modelzoo.base import ModelDefinition
from serving.backend import Backend

log = logging.getLogger(__name__)

#: File name of the exported program inside a version directory.
ARTIFACT = "model.pt2"

#: Where torch's generated operator bindings live (public as torch.*, torch.nn.functional.*, ...).
_BINDINGS = tuple(
    getattr(torch._C, name)
    for name in ("_VariableFunctions", "_nn", "_special", "_linalg", "_fft")
    if hasattr(torch._C, name)
)


def _consume_readonly_warning() -> None:
    """Request tensors are often read-only zero-copy views of the wire bytes, and torch warns
    (once per process) when it wraps one. The forward pass never writes to its inputs, so
    sharing their memory is safe: take that one warning here, silenced, instead of copying."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.from_numpy(np.frombuffer(bytes(4), dtype=np.float32))


def lean_module(program: torch.export.ExportedProgram, rebind: bool = True) -> tuple[torch.fx.GraphModule, list[str]]:
    """The program's graph as a plain GraphModule (see the module docstring) and the names of
    its outputs, in the order it returns them."""
    module = program.module(check_guards=False)
    module._forward_pre_hooks.clear()
    module._forward_hooks.clear()
    module.graph._codegen = torch.fx.graph.CodeGen()
    if rebind:
        for node in list(module.graph.nodes):
            if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
                continue
            if node.target is torch.ops.aten._assert_tensor_metadata.default:
                module.graph.erase_node(node)
                continue
            name = node.target._schema.name.partition("::")[2]
            for namespace in _BINDINGS:
                binding = getattr(namespace, name, None)
                if isinstance(binding, BuiltinFunctionType):
                    node.target = binding
                    break
    module.recompile()
    out_spec = program.call_spec.out_spec
    positions = pytree.tree_unflatten(list(range(out_spec.num_leaves)), out_spec)
    if not isinstance(positions, dict):
        raise TypeError(f"the exported program returns {type(positions).__name__}, not a dict of named outputs")
    names = sorted(positions, key=positions.__getitem__)
    return module, names


class TorchBackend(Backend):
    """One exported zoo model; inputs are passed positionally in contract order."""

    platform = "pytorch_torch_export"

    def __init__(self, model: ModelDefinition, artifact_dir: Path, device: str = "cpu") -> None:
        super().__init__(model, artifact_dir, device)
        self._module: torch.nn.Module | None = None
        self._output_names: list[str] = []
        self._input_names = tuple(spec.name for spec in model.inputs)
        self._input_dtypes = tuple(spec.numpy_dtype for spec in model.inputs)
        self._torch_device = torch.device(device)
        self._on_cpu = self._torch_device.type == "cpu"

    def load(self) -> None:
        program = torch.export.load(str(self.artifact_dir / ARTIFACT))
        if not self._on_cpu:
            program = move_to_device_pass(program, self._torch_device)
        _consume_readonly_warning()
        self._module, self._output_names = lean_module(program)
        reference = program.module()
        rng = np.random.default_rng(0)
        for rows in (1, 3):
            inputs = self.model.complete_inputs(self.model.example_inputs(rows, rng))
            with torch.inference_mode():
                expected = reference(*self._tensors(inputs))
            actual = self.predict(inputs)
            if any(not np.allclose(actual[name], expected[name].cpu(), rtol=1e-5, atol=1e-6) for name in actual):
                log.warning("%s: the rebound graph differs from the exported program; running it unbound", self.name)
                self._module, self._output_names = lean_module(program, rebind=False)
                break

    def _tensors(self, inputs: Mapping[str, np.ndarray]) -> list[torch.Tensor]:
        tensors = [
            torch.from_numpy(np.ascontiguousarray(inputs[name], dtype=dtype))
            for name, dtype in zip(self._input_names, self._input_dtypes, strict=True)
        ]
        if self._on_cpu:
            return tensors
        return [tensor.to(self._torch_device) for tensor in tensors]

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        module = self._module
        if module is None:
            raise RuntimeError(f"model {self.name!r} is not loaded")
        with torch.inference_mode():
            outputs = module(*self._tensors(inputs))
            if self._on_cpu:
                return {name: tensor.numpy() for name, tensor in zip(self._output_names, outputs, strict=True)}
            return {
                name: tensor.to("cpu", torch.float32).numpy()
                for name, tensor in zip(self._output_names, outputs, strict=True)
            }

    def close(self) -> None:
        self._module = None
        if self._torch_device.type == "cuda":
            torch.cuda.empty_cache()

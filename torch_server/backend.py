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

Precision and compilation (``--precision``, ``--compile``):

- bf16 and fp16 serve their own export (``torch_server.model.export_program``: weights and
  computation in that dtype, casts at the edges), written once beside the artifact as
  ``derived/torch-<version>/<precision>/model.pt2``; fp32 and tf32 serve the artifact itself
  (tf32 turns on TF32 CUDA matmul/convolution math, process-wide).
- ``--compile on`` serves an AOTInductor package of that program, compiled for this device
  with the program's dynamic dimensions (every batch size and sequence length: one
  compilation), cached as ``derived/torch-<version>/<precision>/aoti-<device key>.pt2``
  with one runner per instance. At load it is checked against the exported program on
  the model's example inputs, within the precision's tolerance, and refused if it differs.
- On CUDA each batch goes to the device in one non-blocking copy from pinned memory (every
  input packed into one staging buffer) and comes back in one copy (every output packed
  into one pinned buffer), on the CUDA stream of the instance running it. Streams and
  staging buffers are pooled: each forward pass takes one lane and gives it back, so at
  most ``instances`` lanes exist. On CPU tensors share the request arrays' memory.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import BuiltinFunctionType

import numpy as np
import torch
from torch._inductor.package import load_package
from torch.export.passes import move_to_device_pass
from torch.utils import _pytree as pytree

from contract.datatypes import TensorSpec, bf16_to_float32
from contract.signature import ModelSignature
from modelzoo.base import ModelDefinition
from serving.artifacts import ArtifactError, ArtifactSignature
from serving.backend import DEFAULT_OPTIONS, TOLERANCES, Backend, BackendOptions

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


def lean_module(program: torch.export.ExportedProgram, rebind: bool = True) -> torch.fx.GraphModule:
    """The program's graph as a plain GraphModule (see the module docstring): flat tensors in,
    a flat tuple of its outputs out."""
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
    return module


def output_names(program: torch.export.ExportedProgram) -> list[str] | None:
    """The names of the program's outputs, in the order its flat outputs come; None when it
    returns no dict of named tensors (a tensor, a tuple)."""
    out_spec = program.call_spec.out_spec
    positions = pytree.tree_unflatten(list(range(out_spec.num_leaves)), out_spec)
    if not isinstance(positions, dict) or not all(isinstance(value, int) for value in positions.values()):
        return None
    return sorted(positions, key=positions.__getitem__)


#: Protocol datatype of each torch dtype a served tensor may have.
DATATYPES: dict[torch.dtype, str] = {
    torch.bool: "BOOL", torch.uint8: "UINT8", torch.uint16: "UINT16", torch.uint32: "UINT32",
    torch.uint64: "UINT64", torch.int8: "INT8", torch.int16: "INT16", torch.int32: "INT32", torch.int64: "INT64",
    torch.float16: "FP16", torch.float32: "FP32", torch.float64: "FP64", torch.bfloat16: "BF16",
}  # fmt: skip


def program_signature(program: torch.export.ExportedProgram, source: Path) -> ArtifactSignature:
    """Inputs and outputs of an exported program: names (its forward's parameter names; its dict's
    keys, else output_0 ...), datatypes, shapes (a symbolic dimension is -1)."""
    nodes = {node.name: node for node in program.graph.nodes}

    def spec(name: str, node_name: str, role: str) -> TensorSpec:
        value = nodes[node_name].meta.get("val") if node_name in nodes else None
        if not isinstance(value, torch.Tensor):
            raise ArtifactError(f"{source}: {role} {name!r} is not a tensor ({type(value).__name__})")
        datatype = DATATYPES.get(value.dtype)
        if datatype is None:
            raise ArtifactError(f"{source}: {role} {name!r} has dtype {value.dtype}, which the protocol cannot carry")
        return TensorSpec(name, datatype, tuple(dim if isinstance(dim, int) else -1 for dim in value.shape))

    user_inputs = program.graph_signature.user_inputs
    user_outputs = [str(name) for name in program.graph_signature.user_outputs]
    inputs = tuple(spec(str(name), str(name), "input") for name in user_inputs)
    symbols: dict[str, list[tuple[str, int]]] = {}
    for name in user_inputs:
        for axis, dim in enumerate(nodes[str(name)].meta["val"].shape):
            if axis and isinstance(dim, torch.SymInt):
                symbols.setdefault(str(dim.node.expr), []).append((str(name), axis))
    groups = tuple(tuple(group) for group in symbols.values() if len(group) > 1)
    names = output_names(program)
    named = names is not None and len(names) == len(user_outputs)
    if not named:
        names = [f"output_{index}" for index in range(len(user_outputs))]
    assert names is not None
    outputs = tuple(spec(name, node, "output") for name, node in zip(names, user_outputs, strict=True))
    return ArtifactSignature(inputs, outputs, named_outputs=named, dim_groups=groups)


#: Where derived artifacts live inside a version directory.
DERIVED = "derived"
#: Byte alignment of each tensor packed into one staging buffer (any dtype's view is aligned).
_ALIGN = 64

Run = Callable[..., Sequence[torch.Tensor]]


def derived_dir(artifact_dir: Path, precision: str) -> Path:
    """Folder of the artifacts derived for ``precision`` by this torch version."""
    return artifact_dir / DERIVED / f"torch-{torch.__version__}" / precision


def device_key(device: str) -> str:
    """What a compiled package is specific to: the CPU's vector ISA, or the GPU model and
    its compute capability."""
    if device == "cpu":
        return f"cpu-{torch.backends.cpu.get_cpu_capability().lower()}"
    index = torch.device(device).index or 0
    major, minor = torch.cuda.get_device_capability(index)
    name = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(index).lower()).strip("-")
    return f"cuda-{name}-sm{major}{minor}"


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """``write(temporary path)``, then rename it to ``path``: a crash leaves no half-written
    file, and two processes writing the same artifact both leave a whole one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    try:
        write(Path(name))
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


class _Lane:
    """One instance's CUDA resources: a stream and a pinned staging buffer for inputs."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device)
        self.staging = torch.empty(0, dtype=torch.uint8, pin_memory=True)

    def stage(self, nbytes: int) -> tuple[torch.Tensor, np.ndarray]:
        """The staging buffer (at least ``nbytes``) and a numpy view of it."""
        if self.staging.numel() < nbytes:
            self.staging = torch.empty(max(nbytes, 2 * self.staging.numel()), dtype=torch.uint8, pin_memory=True)
        return self.staging, self.staging.numpy()


def _offsets(sizes: Sequence[int]) -> tuple[list[int], int]:
    offsets, total = [], 0
    for size in sizes:
        offsets.append(total)
        total += -(-size // _ALIGN) * _ALIGN
    return offsets, total


class TorchBackend(Backend):
    """One exported zoo model; inputs are passed positionally in contract order."""

    platform = "pytorch_torch_export"

    def __init__(
        self,
        model: ModelSignature,
        artifact_dir: Path,
        options: BackendOptions = DEFAULT_OPTIONS,
    ) -> None:
        super().__init__(model, artifact_dir, options)
        self._run: Run | None = None
        self._output_names: list[str] = []
        self._output_datatypes = {spec.name: spec.datatype for spec in model.outputs}
        self._input_names = tuple(spec.name for spec in model.inputs)
        self._input_dtypes = tuple(spec.numpy_dtype for spec in model.inputs)
        # BF16 travels as raw uint16 words: viewed as bfloat16 in, and back out.
        self._bf16_inputs = tuple(spec.datatype == "BF16" for spec in model.inputs)
        self._torch_input_dtypes = tuple(
            torch.bfloat16 if bf16 else torch.from_numpy(np.empty(0, dtype)).dtype
            for dtype, bf16 in zip(self._input_dtypes, self._bf16_inputs, strict=True)
        )
        self._torch_device = torch.device(self.device)
        self._on_cpu = self._torch_device.type == "cpu"
        self._lanes: queue.SimpleQueue[_Lane] = queue.SimpleQueue()

    def program_path(self) -> Path:
        """The exported program this precision serves, exported first if it is not there yet."""
        if self.precision in ("fp32", "tf32"):
            return self.artifact_dir / ARTIFACT
        path = derived_dir(self.artifact_dir, self.precision) / ARTIFACT
        if not path.is_file():
            from torch_server.model import export_program

            if not isinstance(self.model, ModelDefinition):
                raise ValueError(f"--precision {self.precision}: {self.name} is served as exported (fp32 or tf32)")

            started = time.perf_counter()
            program = export_program(self.model, self.precision)
            write_atomically(path, lambda target: torch.export.save(program, str(target)))
            self.timings["export_s"] = time.perf_counter() - started
            log.info("%s: exported the %s program to %s in %.1f s", self.name, self.precision, path,
                     self.timings["export_s"])  # fmt: skip
        return path

    def package_path(self) -> Path:
        """Where the AOTInductor package of this precision and device is cached."""
        return derived_dir(self.artifact_dir, self.precision) / f"aoti-{device_key(self.device)}.pt2"

    def load(self) -> None:
        if self._torch_device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = self.precision == "tf32"
            torch.backends.cudnn.allow_tf32 = self.precision == "tf32"
        program = torch.export.load(str(self.program_path()))
        if not self._on_cpu:
            program = move_to_device_pass(program, self._torch_device)
        _consume_readonly_warning()
        reference = program.module()
        # A program returning a dict names its outputs; else they come in the order the model's specs list them.
        self._output_names = output_names(program) or [spec.name for spec in self.model.outputs]
        if self.compile == "on":
            self._run = self._compiled(program)
            self._check(reference, "the AOTInductor package", strict=False)
            return
        self._run = lean_module(program)
        if not self._check(reference, "the rebound graph", strict=True):
            log.warning("%s: the rebound graph differs from the exported program; running it unbound", self.name)
            self._run = lean_module(program, rebind=False)

    def _compiled(self, program: torch.export.ExportedProgram) -> Run:
        """The AOTInductor package of ``program``: built and cached if missing, then loaded."""
        path = self.package_path()
        started = time.perf_counter()
        built = not path.is_file()
        if built:

            def build(target: Path) -> None:
                # Inductor's own modules warn of their deprecated internals on import: not ours to act on.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    warnings.simplefilter("ignore", FutureWarning)
                    torch._inductor.aoti_compile_and_package(program, package_path=str(target))

            write_atomically(path, build)
        index = -1 if self._on_cpu else self._torch_device.index or 0
        # One runner per instance: a runner computes one pass at a time.
        package = load_package(str(path), "model", False, self.instances, index)
        self.timings["compile_s"] = time.perf_counter() - started
        log.info("%s: %s the AOTInductor package %s in %.1f s", self.name, "compiled" if built else "loaded the cached",
                 path, self.timings["compile_s"])  # fmt: skip
        loader = package.loader

        def run(*tensors: torch.Tensor) -> Sequence[torch.Tensor]:
            return loader.boxed_run(list(tensors))

        return run

    def _check(self, reference: torch.nn.Module, what: str, strict: bool) -> bool:
        """Whether this backend's outputs match ``reference`` on example inputs: to 1e-5 when
        ``strict`` (the same kernels), else within the precision's tolerance (raises if not)."""
        tolerance = TOLERANCES[self.precision]
        rng = np.random.default_rng(0)
        for rows in (1, 3):
            inputs = self.model.complete_inputs(self.model.example_inputs(rows, rng))
            with torch.inference_mode():
                leaves = pytree.tree_leaves(reference(*self._tensors(inputs)))
            expected = dict(zip(self._output_names, (to_numpy(leaf.cpu()) for leaf in leaves), strict=True))
            actual = self.predict(inputs)
            for name, datatype in self._output_datatypes.items():
                if datatype == "BF16":  # compared as values, not as raw words
                    actual[name], expected[name] = bf16_to_float32(actual[name]), bf16_to_float32(expected[name])
            for name in actual:
                wanted = expected[name]
                if strict and not np.allclose(actual[name], wanted, rtol=1e-5, atol=1e-6):
                    return False
                if not strict and not tolerance.holds(actual[name], wanted):
                    error, relative = tolerance.errors(actual[name], wanted)
                    raise RuntimeError(
                        f"{self.name}: {what} differs from the exported program on {name!r} (max abs {error:.3g}, "
                        f"{relative:.3g} of the largest value) beyond the {self.precision} tolerance"
                    )
        return True

    def _tensors(self, inputs: Mapping[str, np.ndarray]) -> list[torch.Tensor]:
        tensors = [
            torch.from_numpy(np.ascontiguousarray(inputs[name], dtype=dtype))
            for name, dtype in zip(self._input_names, self._input_dtypes, strict=True)
        ]
        if any(self._bf16_inputs):
            tensors = [
                tensor.view(torch.int16).view(torch.bfloat16) if bf16 else tensor
                for tensor, bf16 in zip(tensors, self._bf16_inputs, strict=True)
            ]
        if self._on_cpu:
            return tensors
        return [tensor.to(self._torch_device) for tensor in tensors]

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        run = self._run
        if run is None:
            raise RuntimeError(f"model {self.name!r} is not loaded")
        if not self._on_cpu:
            return self._predict_cuda(run, inputs)
        with torch.inference_mode():
            outputs = run(*self._tensors(inputs))
            return {name: to_numpy(tensor) for name, tensor in zip(self._output_names, outputs, strict=True)}

    def _predict_cuda(self, run: Run, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One forward pass on a lane: one copy in, one copy out (see the module docstring)."""
        try:
            lane = self._lanes.get_nowait()
        except queue.Empty:
            lane = _Lane(self._torch_device)
        try:
            with torch.inference_mode(), torch.cuda.stream(lane.stream):
                return self._to_host(run(*self._to_device(inputs, lane)))
        finally:
            self._lanes.put(lane)

    def _to_device(self, inputs: Mapping[str, np.ndarray], lane: _Lane) -> list[torch.Tensor]:
        arrays = [
            np.ascontiguousarray(inputs[name], dtype=dtype)
            for name, dtype in zip(self._input_names, self._input_dtypes, strict=True)
        ]
        offsets, total = _offsets([array.nbytes for array in arrays])
        staging, host = lane.stage(total)
        for array, offset in zip(arrays, offsets, strict=True):
            host[offset : offset + array.nbytes] = array.reshape(-1).view(np.uint8)
        packed = staging[:total].to(self._torch_device, non_blocking=True)
        return [
            packed[offset : offset + array.nbytes].view(dtype).view(array.shape)
            for array, offset, dtype in zip(arrays, offsets, self._torch_input_dtypes, strict=True)
        ]

    def _to_host(self, outputs: Sequence[torch.Tensor]) -> dict[str, np.ndarray]:
        flat = [tensor.contiguous().view(-1).view(torch.uint8) for tensor in outputs]
        packed = flat[0] if len(flat) == 1 else torch.cat(flat)
        host = torch.empty(packed.numel(), dtype=torch.uint8, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        torch.cuda.current_stream().synchronize()
        array, offset, result = host.numpy(), 0, {}
        for name, tensor, part in zip(self._output_names, outputs, flat, strict=True):
            view = array[offset : offset + part.numel()].view(_numpy_dtype(tensor))
            result[name] = view.reshape(tuple(tensor.shape))
            offset += part.numel()
        return result

    def close(self) -> None:
        self._run = None
        while not self._lanes.empty():
            self._lanes.get_nowait()
        if self._torch_device.type == "cuda":
            torch.cuda.empty_cache()


def _numpy_dtype(tensor: torch.Tensor) -> np.dtype:
    """The numpy dtype of a tensor's elements as they travel (bfloat16 as raw uint16 words)."""
    if tensor.dtype == torch.bfloat16:
        return np.dtype("<u2")
    return torch.empty(0, dtype=tensor.dtype).numpy().dtype


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor as numpy, sharing its memory; bfloat16 as its raw uint16 words."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()

"""The PyTorch Framework: thread/device settings, export to ``model.pt2``, a program's signature,
TorchBackend factory.

``FRAMEWORK`` is the instance the shared serving core uses. torch is imported lazily, so
importing this module stays cheap (the CLI can parse flags and configure threads first).
Devices are reported as ``"cpu"`` or ``"cuda:N"``, the same strings as tf_server uses.
"""

from __future__ import annotations

import ctypes.util
import logging
import os
import shutil
import sysconfig
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from serving.backend import Backend, BackendOptions, FrameworkInfo, Reference
from serving.devices import cpu_name, cuda_index

if TYPE_CHECKING:
    import numpy as np

    from contract.signature import ModelSignature
    from modelzoo.base import ModelDefinition
    from serving.artifacts import ArtifactSignature

log = logging.getLogger(__name__)


class TorchFramework:
    """PyTorch entry points (implements ``serving.backend.Framework``)."""

    name = "torch"
    server_name = "torch_server"
    env_prefix = "TORCH_SERVER_"
    #: gRPC port (metrics on the next one); tf_server defaults to 8003, so both run side by side.
    default_port = 8001

    def configure(self, threads: int | None, device: str) -> None:
        """Set intra-op and inter-op thread counts (both to ``threads``), validate ``device``, and
        make CUDA float32 matmuls and convolutions strict IEEE fp32 (no TF32), as tf_server does.

        The inter-op count can only be set once per process, before any parallel work; if it
        is already fixed to another value, a warning is logged and the old value stays.
        """
        import torch

        self.resolve_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        if threads is None:
            return
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(threads)
        except RuntimeError:
            if torch.get_num_interop_threads() != threads:
                log.warning(
                    "torch inter-op threads already fixed at %d (wanted %d): configure() ran after parallel work",
                    torch.get_num_interop_threads(),
                    threads,
                )

    def check_options(self, device: str, precision: str, compile: str) -> None:
        """Refuse what torch cannot run here: tf32 off CUDA, bf16 on a GPU without bf16 kernels,
        compilation without everything Inductor needs (``missing_for_compile``), each missing
        part named in one line."""
        import torch

        on_cuda = device.startswith("cuda")
        if precision == "tf32" and not on_cuda:
            raise ValueError(f"--precision tf32: it changes only CUDA matmul/convolution math, and {device} has none")
        if precision == "bf16" and on_cuda and not torch.cuda.is_bf16_supported():
            name = torch.cuda.get_device_name(torch.device(device))
            raise ValueError(f"--precision bf16: {name} has no bf16 kernels (compute capability 8.0 or newer needed)")
        if compile == "on":
            missing = missing_for_compile(on_cuda)
            if missing:
                raise ValueError(f"--compile on: torch's AOTInductor cannot compile here; missing {'; '.join(missing)}")

    def resolve_device(self, device: str) -> str:
        """``"auto"`` -> ``"cuda:0"`` when CUDA is available, else ``"cpu"``; ``"cuda"``/``"gpu"``
        -> ``"cuda:0"``; ``"cuda:N"`` checked against the visible GPUs. Raises ValueError."""
        import torch

        wanted = device.strip().lower()
        if wanted == "auto":
            return "cuda:0" if torch.cuda.is_available() else "cpu"
        if wanted == "cpu":
            return "cpu"
        index = cuda_index(wanted)
        if index is None:
            raise ValueError(f"unknown device {device!r}; expected auto, cpu, cuda, cuda:N or gpu")
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r} requested but CUDA is not available to torch {torch.__version__} "
                f"(built with CUDA {torch.version.cuda}); use --device cpu or auto"
            )
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} requested but only {torch.cuda.device_count()} GPU(s) are visible")
        return f"cuda:{index}"

    def export(self, model: ModelDefinition, version_dir: Path) -> None:
        """Write ``version_dir / "model.pt2"``: ``torch.export`` with a dynamic batch dimension
        (and a dynamic sequence dimension for the encoder)."""
        import torch

        from torch_server.backend import ARTIFACT
        from torch_server.model import export_program

        torch.export.save(export_program(model), str(Path(version_dir) / ARTIFACT))

    def signature(self, version_dir: Path) -> ArtifactSignature:
        """What ``version_dir/model.pt2`` (``torch.export.save``) takes and returns."""
        import torch

        from serving.artifacts import ArtifactError
        from torch_server.backend import ARTIFACT, program_signature

        path = Path(version_dir) / ARTIFACT
        if not path.is_file():
            raise ArtifactError(f"{version_dir}: no {ARTIFACT} (a program saved with torch.export.save)")
        # A .pt2 is a zip archive: a damaged one is told here in one line (torch would log a traceback first).
        if not zipfile.is_zipfile(path):
            raise ArtifactError(f"{path}: not a whole .pt2 archive (a zip; truncated or another kind of file)")
        try:
            program = torch.export.load(str(path))
        except Exception as err:
            raise ArtifactError(f"{path}: not a loadable exported program ({type(err).__name__}: {err})") from None
        return program_signature(program, path)

    def create_backend(
        self,
        model: ModelSignature,
        version_dir: Path,
        options: BackendOptions,
    ) -> Backend:
        from torch_server.backend import TorchBackend

        return TorchBackend(model, Path(version_dir), replace(options, device=self.resolve_device(options.device)))

    def reference(self, model: ModelSignature, version_dir: Path, device: str, precision: str = "fp32") -> Reference:
        """The eager ``nn.Module`` of the same layers and weights (torch_server.model.build) in
        the same precision, on torch tensors, under ``torch.inference_mode``; for a model of the
        user's own, the exported program's ``module()``. On a GPU each call waits for its
        kernels (``torch.cuda.synchronize``), as the served pass waits for its outputs."""
        import numpy as np
        import torch

        from modelzoo.base import ModelDefinition
        from torch_server.backend import ARTIFACT
        from torch_server.model import build

        module: torch.nn.Module
        if isinstance(model, ModelDefinition):
            module = build(model, precision).to(self.resolve_device(device))
        else:
            module = torch.export.load(str(Path(version_dir) / ARTIFACT)).module().to(self.resolve_device(device))
        names = [spec.name for spec in model.inputs]

        def prepare(inputs: Mapping[str, np.ndarray]) -> Callable[[], object]:
            tensors = [torch.from_numpy(np.array(inputs[name])).to(module_device) for name in names]

            def run() -> object:
                with torch.inference_mode():
                    outputs = module(*tensors)
                if on_cuda:  # kernels are queued, not done, when the call returns
                    torch.cuda.synchronize(module_device)
                return outputs

            return run

        module_device = self.resolve_device(device)
        on_cuda = module_device.startswith("cuda")
        prepare.__doc__ = self.reference.__doc__
        return prepare

    def info(self, device: str) -> FrameworkInfo:
        """torch version; device name (the GPU's for CUDA); its intra-op threads (torch's own count: the
        configured one, or torch's default, one per physical core it may use); inter-op threads in ``extra``."""
        import torch

        resolved = self.resolve_device(device)
        extra = {"device": resolved, "interop_threads": str(torch.get_num_interop_threads())}
        if resolved.startswith("cuda"):
            name = torch.cuda.get_device_name(torch.device(resolved))
            extra["cuda"] = str(torch.version.cuda)
            extra["cudnn"] = str(torch.backends.cudnn.version())
        else:
            name = cpu_name()
        return FrameworkInfo(
            name=self.name, version=torch.__version__, device=name, threads=torch.get_num_threads(), extra=extra
        )

    def gpu_memory(self, device: str) -> int | None:
        """What torch's caching allocator holds on ``device`` (``torch.cuda.memory_reserved``)."""
        return _reserved(device)


def _reserved(device: str) -> int | None:
    import torch

    if not device.startswith("cuda"):
        return None
    return int(torch.cuda.memory_reserved(torch.device(device)))


def missing_for_compile(on_cuda: bool, at_run_time: bool = True) -> list[str]:
    """What ``--compile on`` needs and this host lacks, each named with where to get it.

    Everywhere: a C++ compiler (AOTInductor compiles the model's kernels and wrapper to a
    shared library). On CUDA also: Triton (it generates the GPU kernels), a C compiler and
    Python's headers (Triton builds its kernel launchers at run time), the CUDA headers
    (the wrapper includes cuda.h; found through CUDA_HOME, nvcc on PATH or /usr/local/cuda)
    and the driver's libcuda. ``at_run_time=False`` (an image build, no GPU there) leaves out
    what only a GPU host can have: a usable Triton and the driver library.
    """
    import torch

    missing = []
    if _cpp_compiler() is None:
        missing.append("a C++ compiler (g++ or clang++ on PATH, or CXX; the image's TOOLCHAIN=1 build)")
    if not on_cuda:
        return missing
    if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
        missing.append("a C compiler for Triton's kernel launchers (gcc or clang on PATH, or CC)")
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        missing.append(f"Python's C headers ({sysconfig.get_paths()['include']}/Python.h: python3-dev)")
    home = _cuda_home()
    if home is None or not (Path(home) / "include" / "cuda.h").is_file():
        where = f"CUDA_HOME={home} has no include/cuda.h" if home else "no CUDA_HOME, nvcc or /usr/local/cuda"
        missing.append(
            f"the CUDA headers ({where}: a CUDA toolkit, or CUDA_HOME set to the nvidia-cuda-runtime wheel's folder)"
        )
    if at_run_time:
        from torch.utils._triton import has_triton

        if not has_triton():
            missing.append(f"a Triton that torch {torch.__version__} can use on this GPU")
        if ctypes.util.find_library("cuda") is None:
            missing.append("the CUDA driver library (libcuda.so, from the NVIDIA driver)")
    return missing


def _cpp_compiler() -> str | None:
    """The C++ compiler Inductor would use (its own choice, else CXX or g++/clang++ on PATH)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return shutil.which(get_cpp_compiler())
    except Exception:  # its lookup raises when it finds none
        return None


def _cuda_home() -> str | None:
    """Where torch's C++ builds look for CUDA (CUDA_HOME or CUDA_PATH, else nvcc's folder, else
    /usr/local/cuda when it exists)."""
    from torch.utils.cpp_extension import _find_cuda_home

    return _find_cuda_home()


FRAMEWORK = TorchFramework()

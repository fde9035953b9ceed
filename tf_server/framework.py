"""The TensorFlow Framework: thread/device settings, SavedModel export, TFBackend factory.

``FRAMEWORK`` is the instance the shared serving core uses. TensorFlow is imported lazily,
so importing this module stays cheap. Devices are reported as ``"cpu"`` or ``"cuda:N"``,
the same strings as torch_server uses; ``"gpu"``/``"gpu:N"`` are accepted as aliases.
"""

from __future__ import annotations

import os
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


def pool_size(configured: int, env_var: str) -> int:
    """A TensorFlow thread pool's size as TensorFlow resolves it when it creates the pool: the
    configured count (``tf.config.threading``; 0 is unset), else the count in ``env_var``
    (``TF_NUM_INTRAOP_THREADS``, ``TF_NUM_INTEROP_THREADS``), else one thread per core this
    process may run on (its CPU affinity: TensorFlow's ``port::MaxParallelism``)."""
    if configured > 0:
        return configured
    try:
        from_env = int(os.environ.get(env_var, ""))
    except ValueError:
        from_env = 0
    return from_env if from_env > 0 else len(os.sched_getaffinity(0))


class TensorFlowFramework:
    """TensorFlow entry points (implements ``serving.backend.Framework``)."""

    name = "tensorflow"
    server_name = "tf_server"
    env_prefix = "TF_SERVER_"
    #: gRPC port (metrics on the next one); torch_server defaults to 8001, so both run side by side.
    default_port = 8003

    def configure(self, threads: int | None, device: str) -> None:
        """Set intra-op and inter-op pool sizes (both to ``threads``); make only the chosen GPU
        visible (none for ``cpu``), with memory growth; turn TF32 off (strict fp32, as
        torch_server). Must run before TensorFlow's first op.

        TensorFlow opens a context, and reserves memory, on every GPU it can see: without
        narrowing, each tf_server process would hold all of a host's GPUs. The chosen GPU keeps
        its name (``cuda:N``, N among the GPUs CUDA_VISIBLE_DEVICES leaves); inside TensorFlow
        it is then ``/GPU:0`` (``tf_server.backend.tf_device_name``)."""
        import tensorflow as tf

        resolved = self.resolve_device(device)
        tf.config.experimental.enable_tensor_float_32_execution(False)
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        try:
            if threads is not None:
                tf.config.threading.set_intra_op_parallelism_threads(threads)
                tf.config.threading.set_inter_op_parallelism_threads(threads)
            gpus = tf.config.list_physical_devices("GPU")
            chosen = [] if resolved == "cpu" else [gpus[int(resolved.partition(":")[2])]]
            if gpus:
                tf.config.set_visible_devices(chosen, "GPU")
            for gpu in chosen:
                tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError as exc:
            raise RuntimeError(
                f"TensorFlow is already initialized, so threads={threads} / device={device!r} cannot be applied: "
                f"configure() must run before the first TensorFlow op ({exc})"
            ) from exc

    def check_options(self, device: str, precision: str, compile: str) -> None:
        """Refuse what TensorFlow cannot run here: tf32 off CUDA, bf16 on a GPU older than
        compute capability 8.0. XLA (``--compile on``) comes with every TensorFlow build."""
        import tensorflow as tf

        on_cuda = device.startswith("cuda")
        if precision == "tf32" and not on_cuda:
            raise ValueError(f"--precision tf32: it changes only CUDA matmul/convolution math, and {device} has none")
        if precision == "bf16" and on_cuda:
            gpu = tf.config.list_physical_devices("GPU")[int(device.partition(":")[2] or 0)]
            details = tf.config.experimental.get_device_details(gpu)
            if tuple(details.get("compute_capability", (0, 0))) < (8, 0):
                name = details.get("device_name", gpu.name)
                raise ValueError(f"--precision bf16: {name} has no bf16 kernels (compute capability 8.0 or newer)")

    def resolve_device(self, device: str) -> str:
        """``"auto"`` -> ``"cuda:0"`` when a GPU is visible, else ``"cpu"``; ``"cuda"``/``"gpu"``
        -> ``"cuda:0"``; ``"cuda:N"``/``"gpu:N"`` checked against the visible GPUs. Raises ValueError."""
        import tensorflow as tf

        wanted = device.strip().lower()
        # Physical, not visible: configure() may have narrowed visibility to the chosen GPU.
        gpus = tf.config.list_physical_devices("GPU")
        if wanted == "auto":
            return "cuda:0" if gpus else "cpu"
        if wanted == "cpu":
            return "cpu"
        index = cuda_index(wanted)
        if index is None:
            raise ValueError(f"unknown device {device!r}; expected auto, cpu, cuda, cuda:N or gpu")
        if not gpus:
            raise ValueError(
                f"device {device!r} requested but TensorFlow {tf.__version__} sees no GPU "
                f"(CUDA build: {tf.test.is_built_with_cuda()}); use --device cpu or auto"
            )
        if index >= len(gpus):
            raise ValueError(f"device {device!r} requested but only {len(gpus)} GPU(s) are visible")
        return f"cuda:{index}"

    def export(self, model: ModelDefinition, version_dir: Path) -> None:
        """Write a SavedModel into ``version_dir`` with a ``serving_default`` signature whose
        inputs and outputs carry the contract names (batch and sequence dimensions None)."""
        from tf_server.model import save

        save(model, str(version_dir))

    def signature(self, version_dir: Path) -> ArtifactSignature:
        """What the SavedModel in ``version_dir`` takes and returns: its ``serving_default`` signature."""
        from tf_server.backend import saved_model_signature

        return saved_model_signature(Path(version_dir))

    def create_backend(
        self,
        model: ModelSignature,
        version_dir: Path,
        options: BackendOptions,
    ) -> Backend:
        from tf_server.backend import TFBackend

        return TFBackend(model, Path(version_dir), replace(options, device=self.resolve_device(options.device)))

    def reference(self, model: ModelSignature, version_dir: Path, device: str, precision: str = "fp32") -> Reference:
        """The same SavedModel (of the same precision) and its ``serving_default`` graph through
        its inference function's ``call_flat`` on TF tensors, outputs left as tensors: its
        fastest in-process call. On a GPU each call waits for its kernels
        (``tf.test.experimental.sync_devices``), as the served pass waits for its outputs."""
        import tensorflow as tf

        from tf_server.backend import TFBackend, flat_input_names, load_saved_model, tf_device_name

        resolved = self.resolve_device(device)
        tf_device = tf_device_name(resolved)
        on_gpu = resolved != "cpu"
        backend = TFBackend(model, Path(version_dir), BackendOptions(resolved, precision))
        with tf.device(tf_device):
            signature = load_saved_model(backend.saved_model_dir()).signatures["serving_default"]
        function = signature._inference_function
        captured = tuple(signature.captured_inputs)
        names = flat_input_names(signature)

        def prepare(inputs: Mapping[str, np.ndarray]) -> Callable[[], object]:
            feed = backend._feed(inputs)
            with tf.device(tf_device):
                tensors = [tf.constant(feed[name]) for name in names]

            def run() -> object:
                with tf.device(tf_device):
                    outputs = function.call_flat(*tensors, *captured)
                if on_gpu:  # kernels are queued, not done, when the call returns
                    tf.test.experimental.sync_devices()
                return outputs

            return run

        prepare.__doc__ = self.reference.__doc__
        return prepare

    def info(self, device: str) -> FrameworkInfo:
        """TensorFlow version; device name (the GPU's for CUDA); the intra-op pool's size, and the
        inter-op pool's in ``extra``, as TensorFlow resolves them (``pool_size``), not its 0 for "unset"."""
        import tensorflow as tf

        resolved = self.resolve_device(device)
        threading = tf.config.threading
        extra = {
            "device": resolved,
            "inter_op_threads": str(pool_size(threading.get_inter_op_parallelism_threads(), "TF_NUM_INTEROP_THREADS")),
        }
        if resolved.startswith("cuda"):
            index = int(resolved.partition(":")[2])
            gpu = tf.config.list_physical_devices("GPU")[index]
            name = tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name)
            build = tf.sysconfig.get_build_info()
            extra["cuda"] = str(build.get("cuda_version", ""))
            extra["cudnn"] = str(build.get("cudnn_version", ""))
        else:
            name = cpu_name()
        threads = pool_size(threading.get_intra_op_parallelism_threads(), "TF_NUM_INTRAOP_THREADS")
        return FrameworkInfo(name=self.name, version=tf.__version__, device=name, threads=threads, extra=extra)

    def gpu_memory(self, device: str) -> int | None:
        """What TensorFlow's allocator holds on ``device`` (``get_memory_info``'s ``current``)."""
        if device == "cpu":
            return None
        import tensorflow as tf

        from tf_server.backend import tf_device_name

        return int(tf.config.experimental.get_memory_info(tf_device_name(device).lstrip("/"))["current"])


FRAMEWORK = TensorFlowFramework()

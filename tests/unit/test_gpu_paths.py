"""The GPU paths, shown on the CPU with fakes (no GPU here): forward passes on a GPU run on a
fixed set of threads, warm-up on a GPU reaches every batch size, and the in-process
references wait for their kernels before the clock stops."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import modelzoo
from contract.protocol import inference_pb2 as pb
from serving.backend import Backend, BackendOptions
from serving.loader import warm_up
from serving.metrics import ModelMetrics
from serving.runtime import ModelRuntime
from serving.settings import BatchingSettings

pytestmark = pytest.mark.timeout(120)

MODEL = modelzoo.get("mlp")


class Recording(Backend):
    """y = the mlp's shape of zeros; records the thread of every load, predict and close, and
    the batch size of every predict."""

    platform = "recording"

    def __init__(self, device: str, instances: int) -> None:
        super().__init__(MODEL, Path("."), BackendOptions(device, instances=instances))
        self.threads: dict[str, set[int]] = {"load": set(), "predict": set(), "close": set()}
        self.sizes: list[int] = []
        self.lock = threading.Lock()

    def _record(self, what: str) -> None:
        with self.lock:
            self.threads[what].add(threading.get_ident())

    def load(self) -> None:
        self._record("load")

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._record("predict")
        rows = next(iter(inputs.values())).shape[0]
        with self.lock:
            self.sizes.append(rows)
        threading.Event().wait(0.002)  # long enough for callers to pile up behind a busy instance
        return {spec.name: np.zeros((rows, *spec.shape[1:]), spec.numpy_dtype) for spec in MODEL.outputs}

    def close(self) -> None:
        self._record("close")


def request(rows: int) -> pb.ModelInferRequest:
    arrays = MODEL.example_inputs(rows, np.random.default_rng(rows))
    message = pb.ModelInferRequest(model_name=MODEL.name)
    for spec in MODEL.inputs:
        array = arrays[spec.name]
        message.inputs.add(name=spec.name, datatype=spec.datatype, shape=array.shape)
        message.raw_input_contents.append(array.tobytes())
    return message


def serve_concurrently(backend: Recording, instances: int, callers: int = 24, each: int = 10) -> set[int]:
    """Load, warm up and serve ``callers`` threads x ``each`` requests as the server does; the
    caller threads' idents."""
    batching = BatchingSettings(max_batch_size=8, instances=instances)
    backend.start()
    warm_up(backend, batching, "off")
    runtime = ModelRuntime(MODEL, backend, batching, ModelMetrics(MODEL.name), "fake", {})
    runtime.start()
    callers_seen: set[int] = set()
    lock = threading.Lock()

    def call(index: int) -> None:
        with lock:
            callers_seen.add(threading.get_ident())
        for _ in range(each):
            reply = runtime.infer(request(1 + index % 3), timeout=60)
            assert reply.outputs[0].shape[0] == 1 + index % 3

    with concurrent.futures.ThreadPoolExecutor(callers) as pool:
        list(pool.map(call, range(callers)))
    assert runtime.batcher.drain(10)
    backend.shutdown()
    return callers_seen


@pytest.mark.parametrize("instances", [1, 2])
def test_a_gpu_backend_runs_on_at_most_instances_threads(instances: int) -> None:
    """Every load and forward pass (warm-up and served) on a GPU runs on one of ``instances``
    fixed threads, never on the many handler threads that call it."""
    backend = Recording("cuda:0", instances)
    callers = serve_concurrently(backend, instances)
    device_threads = backend.threads["load"] | backend.threads["predict"]
    assert len(backend.sizes) > 24  # warm-up plus the served batches really ran
    assert 1 <= len(device_threads) <= instances
    assert not device_threads & callers
    assert backend.threads["load"]
    assert threading.get_ident() not in device_threads
    assert backend.threads["close"] == {threading.get_ident()}  # closing creates no device state


def test_a_gpu_backend_closes_while_a_pass_is_stuck() -> None:
    """A version retired past its grace period is closed anyway: its close must not wait behind
    a forward pass that never returns on the device thread."""
    backend = Recording("cuda:0", 1)
    release = threading.Event()

    def stuck(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        release.wait(30)
        return {}

    backend.predict = stuck  # type: ignore[method-assign]
    caller = threading.Thread(target=backend.forward, args=(MODEL.example_inputs(1, np.random.default_rng(0)),))
    caller.start()
    closer = threading.Thread(target=backend.shutdown)
    closer.start()
    closer.join(5)
    try:
        assert not closer.is_alive()
        assert backend.threads["close"]
    finally:
        release.set()
        caller.join(10)


def test_a_cpu_backend_runs_on_the_calling_threads() -> None:
    """On the CPU there is no per-thread device state: the caller runs the pass itself."""
    backend = Recording("cpu", 2)
    callers = serve_concurrently(backend, 2)
    assert backend.threads["load"] == {threading.get_ident()}
    assert backend.threads["predict"] - {threading.get_ident()} <= callers
    assert backend.threads["predict"] & callers


def test_a_failing_forward_pass_on_a_gpu_reaches_its_caller() -> None:
    backend = Recording("cuda:0", 1)

    def broken(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    backend.predict = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="illegal memory access"):
        backend.forward(MODEL.example_inputs(1, np.random.default_rng(0)))
    backend.shutdown()


@pytest.mark.parametrize(
    ("device", "preferred", "expected"),
    [
        ("cuda:0", [], list(range(1, 13))),
        ("cuda:0", [4, 8], [4, 8, 9, 10, 11, 12]),
        ("cpu", [], [1, 12]),
        ("cpu", [4, 8], [1, 4, 8, 12]),
    ],
)
def test_warm_up_on_a_gpu_reaches_every_batch_size(device: str, preferred: list[int], expected: list[int]) -> None:
    """cuDNN autotunes, and cuBLAS picks its kernels, per shape on first use: on a GPU warm-up
    runs every size the batcher can form, so no request pays for it."""
    backend = Recording(device, 1)
    backend.start()
    seconds = warm_up(backend, BatchingSettings(max_batch_size=12, preferred_batch_sizes=preferred), "off")
    backend.shutdown()
    assert backend.sizes == expected
    assert seconds >= 0
    assert backend.warmed_up


# ---- the in-process references wait for the GPU


def test_torch_reference_synchronises_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """``python -m torch_server forward`` times the reference with the clock stopped after the
    kernels finish: on CUDA each call ends in ``torch.cuda.synchronize`` of its device."""
    import torch

    from torch_server.framework import FRAMEWORK

    events: list[str] = []
    monkeypatch.setattr(FRAMEWORK, "resolve_device", lambda device: "cuda:0")
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *args, **kwargs: self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *args, **kwargs: self)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(f"sync {device}"))
    forward = torch.nn.Module.__call__

    def call(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        events.append("call")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "__call__", call)
    reference = FRAMEWORK.reference(MODEL, Path("."), "cuda:0")
    run = reference(MODEL.example_inputs(2, np.random.default_rng(0)))
    events.clear()
    run()
    assert events[0] == "call"
    assert events[-1] == "sync cuda:0"


def test_torch_reference_does_not_synchronise_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from torch_server.framework import FRAMEWORK

    synced: list[Any] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    FRAMEWORK.reference(MODEL, Path("."), "cpu")(MODEL.example_inputs(2, np.random.default_rng(0)))()
    assert synced == []


def test_tensorflow_reference_synchronises_on_a_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The same for ``python -m tf_server forward``: each call ends in
    ``tf.test.experimental.sync_devices`` on a GPU, and never on the CPU."""
    import tensorflow as tf

    from tf_server.framework import FRAMEWORK

    FRAMEWORK.export(MODEL, tmp_path)
    synced: list[int] = []
    monkeypatch.setattr(tf.test.experimental, "sync_devices", lambda: synced.append(1))
    inputs = MODEL.example_inputs(2, np.random.default_rng(0))
    FRAMEWORK.reference(MODEL, tmp_path, "cpu")(inputs)()
    assert synced == []
    # Eager TensorFlow places ops softly, so "/GPU:0" runs on the CPU here.
    monkeypatch.setattr(FRAMEWORK, "resolve_device", lambda device: "cuda:0")
    run = FRAMEWORK.reference(MODEL, tmp_path, "cuda:0")(inputs)
    run()
    run()
    assert synced == [1, 1]


# ---- --compile on refuses at start, naming everything it lacks


def bare_host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A host with none of what compiling needs: no compilers, headers, CUDA or Triton."""
    import torch.utils._triton

    from torch_server import framework

    monkeypatch.setattr(framework, "_cpp_compiler", lambda: None)
    monkeypatch.setattr(framework.shutil, "which", lambda name: None)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(framework.sysconfig, "get_paths", lambda: {"include": str(tmp_path / "no-headers")})
    monkeypatch.setattr(framework, "_cuda_home", lambda: None)
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: False)
    monkeypatch.setattr(framework.ctypes.util, "find_library", lambda name: None)


def test_compile_on_cuda_names_every_missing_prerequisite(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from torch_server.framework import FRAMEWORK

    bare_host(monkeypatch, tmp_path)
    with pytest.raises(ValueError, match="--compile on") as refused:
        FRAMEWORK.check_options("cuda:0", "fp32", "on")
    message = str(refused.value)
    assert "\n" not in message
    for part in ("C++ compiler", "C compiler for Triton", "Python.h", "CUDA headers", "Triton that torch", "libcuda"):
        assert part in message
    FRAMEWORK.check_options("cuda:0", "fp32", "off")  # nothing of it is needed uncompiled


def test_compile_on_cuda_needs_the_cuda_headers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Everything else there, but CUDA_HOME without headers: refused at start, not in load."""
    import torch.utils._triton

    from torch_server import framework

    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "Python.h").write_text("")
    monkeypatch.setattr(framework, "_cpp_compiler", lambda: "/usr/bin/g++")
    monkeypatch.setenv("CC", "gcc")
    monkeypatch.setattr(framework.sysconfig, "get_paths", lambda: {"include": str(tmp_path / "include")})
    monkeypatch.setattr(framework, "_cuda_home", lambda: str(tmp_path / "cuda"))
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)
    monkeypatch.setattr(framework.ctypes.util, "find_library", lambda name: "libcuda.so.1")
    with pytest.raises(ValueError, match=r"CUDA headers \(CUDA_HOME=.*cuda has no include/cuda.h"):
        framework.FRAMEWORK.check_options("cuda:0", "fp32", "on")
    (tmp_path / "cuda" / "include").mkdir(parents=True)
    (tmp_path / "cuda" / "include" / "cuda.h").write_text("")
    assert framework.missing_for_compile(on_cuda=True) == []


def test_compile_on_the_cpu_needs_only_a_cpp_compiler(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from torch_server import framework

    bare_host(monkeypatch, tmp_path)
    assert framework.missing_for_compile(on_cuda=False) == [
        "a C++ compiler (g++ or clang++ on PATH, or CXX; the image's TOOLCHAIN=1 build)"
    ]
    monkeypatch.setattr(framework, "_cpp_compiler", lambda: "/usr/bin/g++")
    framework.FRAMEWORK.check_options("cpu", "fp32", "on")


# ---- TensorFlow on a host of several GPUs


class FakeTfConfig:
    """tf.config's device calls on a host of ``count`` GPUs: what is visible, and which GPUs got
    memory growth. Refuses changes once "initialised", as TensorFlow does after its first op."""

    def __init__(self, count: int) -> None:
        import tensorflow as tf

        self.physical = [tf.config.PhysicalDevice(f"/physical_device:GPU:{i}", "GPU") for i in range(count)]
        self.visible = list(self.physical)
        self.growth: list[str] = []
        self.initialised = False

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import tensorflow as tf

        monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: list(self.physical))
        monkeypatch.setattr(tf.config, "get_visible_devices", lambda kind=None: list(self.visible))
        monkeypatch.setattr(tf.config, "set_visible_devices", self.set_visible)
        monkeypatch.setattr(tf.config.experimental, "set_memory_growth", lambda gpu, on: self.growth.append(gpu.name))
        monkeypatch.setattr(tf.config.experimental, "enable_tensor_float_32_execution", lambda on: None)
        monkeypatch.setattr(tf.config.threading, "set_intra_op_parallelism_threads", lambda n: None)
        monkeypatch.setattr(tf.config.threading, "set_inter_op_parallelism_threads", lambda n: None)

    def set_visible(self, devices: list[Any], kind: str | None = None) -> None:
        if self.initialised:
            raise RuntimeError("Visible devices cannot be modified after being initialized")
        self.visible = list(devices)


@pytest.mark.parametrize("chosen", [0, 2])
def test_tensorflow_sees_only_its_own_gpu(monkeypatch: pytest.MonkeyPatch, chosen: int) -> None:
    """Before its first op tf_server narrows TensorFlow to the chosen GPU (else it opens a context
    and reserves memory on every GPU of the host), grows memory on that one only, and places
    its work on it: TensorFlow's /GPU:0 once it is the only one visible."""
    from tf_server.backend import tf_device_name
    from tf_server.framework import FRAMEWORK

    fake = FakeTfConfig(4)
    fake.install(monkeypatch)
    FRAMEWORK.configure(2, f"cuda:{chosen}")
    assert [gpu.name for gpu in fake.visible] == [f"/physical_device:GPU:{chosen}"]
    assert fake.growth == [f"/physical_device:GPU:{chosen}"]
    fake.initialised = True
    assert FRAMEWORK.resolve_device(f"cuda:{chosen}") == f"cuda:{chosen}"  # still known by its own number
    assert tf_device_name(f"cuda:{chosen}") == "/GPU:0"
    with pytest.raises(ValueError, match="configured for another GPU"):
        tf_device_name(f"cuda:{(chosen + 1) % 4}")


def test_tensorflow_on_the_cpu_sees_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from tf_server.backend import tf_device_name
    from tf_server.framework import FRAMEWORK

    fake = FakeTfConfig(2)
    fake.install(monkeypatch)
    FRAMEWORK.configure(None, "cpu")
    assert fake.visible == []
    assert fake.growth == []
    assert tf_device_name("cpu") == "/CPU:0"
    with pytest.raises(ValueError, match="configured for another GPU"):
        tf_device_name("cuda:1")
    fake.visible = list(fake.physical)  # a process that never narrowed: each GPU at its own position
    assert tf_device_name("cuda:1") == "/GPU:1"


def test_tensorflow_loads_with_soft_placement_when_an_op_has_no_gpu_kernel(tmp_path: Path) -> None:
    """Strict placement first; when an op cannot run on the GPU (here: no GPU at all, so none
    can), the model loads again with soft placement, serves, and ModelConfig says so and why."""
    import tensorflow as tf

    from tf_server.backend import TFBackend
    from tf_server.framework import FRAMEWORK

    FRAMEWORK.export(MODEL, tmp_path)
    before = tf.config.get_soft_device_placement()
    backend = TFBackend(MODEL, tmp_path, BackendOptions("cuda:0"))
    try:
        backend.start()
        assert backend.reported["soft_placement"].startswith("on: Could not satisfy device specification")
        inputs = MODEL.example_inputs(3, np.random.default_rng(0))
        assert backend.forward(inputs)["logits"].shape == (3, *MODEL.outputs[0].shape[1:])
    finally:
        backend.shutdown()
        tf.config.set_soft_device_placement(before)
    cpu = TFBackend(MODEL, tmp_path, BackendOptions("cpu"))
    cpu.start()
    assert "soft_placement" not in cpu.reported  # nothing to place on the CPU
    cpu.shutdown()


# ---- each framework's own figure of the GPU memory it holds (NVML's per-process list is empty in containers)


def test_frameworks_report_the_gpu_memory_their_allocator_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    import tensorflow as tf
    import torch

    from tf_server.framework import FRAMEWORK as TF
    from torch_server.framework import FRAMEWORK as TORCH

    asked: list[Any] = []

    def memory_reserved(device: Any) -> int:
        asked.append(device)
        return 3 << 30

    def get_memory_info(name: str) -> dict[str, int]:
        asked.append(name)
        return {"current": 5}

    monkeypatch.setattr(torch.cuda, "memory_reserved", memory_reserved)
    monkeypatch.setattr(tf.config.experimental, "get_memory_info", get_memory_info)
    assert TORCH.gpu_memory("cpu") is None
    assert TF.gpu_memory("cpu") is None
    assert TORCH.gpu_memory("cuda:1") == 3 << 30
    assert TF.gpu_memory("cuda:0") == 5
    assert asked == [torch.device("cuda:1"), "GPU:0"]


def test_a_gpu_server_exports_its_frameworks_gpu_memory() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from serving.metrics import ServerMetrics

    registry = CollectorRegistry()
    metrics = ServerMetrics(registry)
    assert b"process_gpu_memory_framework_bytes" not in generate_latest(registry)  # none bound: a CPU server
    figures = iter([7 << 20, None])
    metrics.bind_gpu_memory(lambda: next(figures))
    assert b"process_gpu_memory_framework_bytes 7.340032e+06" in generate_latest(registry)
    assert b"process_gpu_memory_framework_bytes" not in generate_latest(registry)  # nothing to report: left out

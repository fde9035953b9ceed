"""NVML without a GPU (tests.helpers.fakes.FakeNvml): which NVML device a CUDA device is, one failing
figure never failing a scrape, NVML set up once per process, per-process memory only where
NVML's pids are ours."""

from __future__ import annotations

import logging
import os
import sys

import pytest
from prometheus_client import CollectorRegistry

from loadtest.sampling import environment
from serving import nvml
from serving.metrics import GpuCollector, register_gpu_collector
from serving.nvml import NvmlDevice, Unmapped, cuda_device_uuid
from serving.workers import WorkerProcesses
from tests.helpers.fakes import FakeGpu, FakeNvml, NVMLError, mig_instance

A100, T4 = "NVIDIA A100-SXM4-80GB", "Tesla T4"
UUIDS = [f"GPU-{digit * 8}-0000-4000-8000-00000000000{digit}" for digit in "0123"]
MIG = "MIG-9f8e7d6c-0000-4000-8000-000000000000"
#: Three A100s in NVML's (PCI bus) order, the last split into MIG instances.
SAME = [NvmlDevice(UUIDS[i], A100, i) for i in range(3)] + [NvmlDevice(MIG, A100, 2, mig=True)]
#: The second GPU a T4: CUDA's default order (fastest first) is not NVML's.
MIXED = [NvmlDevice(UUIDS[0], A100, 0), NvmlDevice(UUIDS[1], T4, 1), NvmlDevice(UUIDS[2], A100, 2)]
#: A pid no process can have (above Linux's largest pid_max): a host pid seen from a container.
HOST_PID = 4_194_305


@pytest.mark.parametrize(
    ("cuda", "environ", "devices", "expected"),
    [
        (0, {}, SAME, UUIDS[0]),
        (2, {}, SAME, UUIDS[2]),  # unset: every GPU; the same model throughout: PCI order
        (0, {"CUDA_VISIBLE_DEVICES": "2,0"}, SAME, UUIDS[2]),
        (1, {"CUDA_VISIBLE_DEVICES": "2,0"}, SAME, UUIDS[0]),
        (0, {"CUDA_VISIBLE_DEVICES": "GPU-22222222"}, SAME, UUIDS[2]),  # a UUID prefix, as CUDA takes it
        (0, {"CUDA_VISIBLE_DEVICES": MIG}, SAME, MIG),
        (1, {"CUDA_VISIBLE_DEVICES": f" 1 , {UUIDS[0]}"}, MIXED, UUIDS[0]),  # by UUID: exact in any order
        (1, {"CUDA_VISIBLE_DEVICES": "2,1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}, MIXED, UUIDS[1]),
        (0, {}, [NvmlDevice(UUIDS[3], T4, 0)], UUIDS[3]),  # one GPU: nothing to confuse
    ],
)
def test_cuda_device_is_found_by_identity(
    cuda: int, environ: dict[str, str], devices: list[NvmlDevice], expected: str
) -> None:
    assert cuda_device_uuid(cuda, devices, environ) == expected


@pytest.mark.parametrize(
    ("cuda", "environ", "devices", "reason"),
    [
        (1, {"CUDA_VISIBLE_DEVICES": "0,7,1"}, SAME, "not visible"),  # CUDA stops at the unknown index 7
        (0, {"CUDA_VISIBLE_DEVICES": ""}, SAME, "not visible"),
        (0, {"CUDA_VISIBLE_DEVICES": ""}, SAME[:1], "not visible"),  # empty: no device, even where one exists
        (0, {"CUDA_VISIBLE_DEVICES": "G"}, SAME[:1], "not visible"),  # a UUID is written GPU-… or MIG-…
        (0, {"CUDA_VISIBLE_DEVICES": "GPU-"}, SAME, "not visible"),  # a prefix of every UUID names none
        (0, {}, MIXED, "CUDA_DEVICE_ORDER=PCI_BUS_ID"),  # fastest first over mixed models: unknown
        (0, {"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "FASTEST_FIRST"}, MIXED, "fastest first"),
    ],
)
def test_cuda_device_that_cannot_be_told_apart_is_not_guessed(
    cuda: int, environ: dict[str, str], devices: list[NvmlDevice], reason: str
) -> None:
    with pytest.raises(Unmapped, match=reason):
        cuda_device_uuid(cuda, devices, environ)


def test_a_uuid_from_the_framework_wins_over_the_environment() -> None:
    """torch.cuda.get_device_properties(i).uuid is the bare UUID, without NVML's prefix."""
    bare = UUIDS[1].removeprefix("GPU-")
    assert cuda_device_uuid(0, MIXED, {"CUDA_VISIBLE_DEVICES": "0"}, uuid=bare) == UUIDS[1]
    with pytest.raises(Unmapped, match="none of NVML's devices"):
        cuda_device_uuid(0, MIXED, {}, uuid="0badc0de")


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """One collection of ``registry``: {(sample name, sorted labels): value}."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in registry.collect()
        for sample in family.samples
    }


def four_gpus() -> list[FakeGpu]:
    """Four H100s, each with its own readings: device i uses i + 1 GiB and is 10 * i % busy."""
    return [FakeGpu(uuid=UUIDS[i], utilization=10 * i, used=(i + 1) << 30) for i in range(4)]


def test_gpu_metrics_read_the_visible_device_not_nvml_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA_VISIBLE_DEVICES=3,1: the server's cuda:0 is NVML's device 3 (it was read as NVML's 0)."""
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(four_gpus()))
    registry = CollectorRegistry()
    assert register_gpu_collector(registry, "cuda:0", {"CUDA_VISIBLE_DEVICES": "3,1"})
    labels = {"device": "0"}
    assert registry.get_sample_value("gpu_memory_used_bytes", labels) == 4 << 30
    assert registry.get_sample_value("gpu_utilization_ratio", labels) == pytest.approx(0.3)
    assert registry.get_sample_value("gpu_info", {**labels, "uuid": UUIDS[3], "name": FakeGpu.name}) == 1


def test_gpu_metrics_by_uuid_from_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(four_gpus()))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", UUIDS[2][:12])
    registry = CollectorRegistry()
    assert register_gpu_collector(registry, "cuda")
    assert registry.get_sample_value("gpu_memory_used_bytes", {"device": "0"}) == 3 << 30


def test_no_gpu_metrics_where_the_device_cannot_be_told(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    gpus = [FakeGpu(uuid=UUIDS[0]), FakeGpu(uuid=UUIDS[1], name=T4)]
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(gpus))
    registry = CollectorRegistry()
    with caplog.at_level(logging.WARNING):
        assert not register_gpu_collector(registry, "cuda:1", {})
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in caplog.text
    assert registry.get_sample_value("gpu_memory_used_bytes", {"device": "1"}) is None


def test_a_figure_nvml_refuses_leaves_the_others(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A MIG instance has no utilisation (NotSupported): its memory is still exported, the
    failure counted per scrape and logged once."""
    gpu = FakeGpu(uuid=UUIDS[0], mig=[mig_instance(MIG, used=2 << 30)])
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([gpu]))
    registry = CollectorRegistry()
    assert register_gpu_collector(registry, "cuda:0", {"CUDA_VISIBLE_DEVICES": MIG})
    with caplog.at_level(logging.WARNING, logger="serving.nvml"):
        scrapes = [scrape(registry) for _ in range(2)]
    device = (("device", "0"),)
    for number, samples in enumerate(scrapes, 1):
        assert samples[("gpu_memory_used_bytes", device)] == 2 << 30
        assert samples[("gpu_memory_total_bytes", device)] == 10 << 30
        assert ("gpu_utilization_ratio", device) not in samples
        assert samples[("gpu_read_errors_total", (*device, ("field", "utilization")))] == number
    assert caplog.text.count("no utilization from NVML") == 1


def test_the_first_device_refusing_a_figure_does_not_fail_the_scrape(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = FakeGpu(uuid=UUIDS[0], errors={"utilization": NVMLError("Not Supported")})
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([gpu]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    registry = CollectorRegistry()
    assert register_gpu_collector(registry, "cuda:0")
    assert registry.get_sample_value("gpu_memory_used_bytes", {"device": "0"}) == 3 << 30


def test_each_device_on_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = four_gpus()
    gpus[1].errors["memory"] = NVMLError("GPU is lost")
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(gpus))
    registry = CollectorRegistry()
    registry.register(GpuCollector(nvml.all_gpus()))
    samples = scrape(registry)
    assert ("gpu_memory_used_bytes", (("device", "1"),)) not in samples
    assert samples[("gpu_utilization_ratio", (("device", "1"),))] == pytest.approx(0.1)
    assert samples[("gpu_read_errors_total", (("device", "1"), ("field", "memory")))] == 1
    for index in (0, 2, 3):
        assert samples[("gpu_memory_used_bytes", (("device", str(index)),))] == (index + 1) << 30
        assert ("gpu_read_errors_total", (("device", str(index)), ("field", "memory"))) not in samples


def test_nvml_is_set_up_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    registry = CollectorRegistry()
    assert register_gpu_collector(registry, "cuda:0")
    registry.register(WorkerProcesses(list))
    environment()
    assert fake.inits == 1


def test_without_nvml_nothing_is_retried_on_every_use(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(fail=True)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    for _ in range(3):
        with pytest.raises(nvml.NvmlUnavailable, match="Library Not Found"):
            nvml.open_gpu(0, {})
    assert nvml.all_gpus() == []
    assert environment()["gpus"] == []
    assert fake.inits == 1


def test_what_the_gpu_check_reads_for_a_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Device memory used, and a process's memory by pid (what gpucheck.measure.GpuMemory watches)."""
    me = os.getpid()
    gpus = four_gpus()
    gpus[1].processes = [(me, 5 << 30), (1, 1 << 30)]
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(gpus))
    monkeypatch.setattr(nvml, "in_host_pid_namespace", lambda: True)
    gpu = nvml.open_gpu(0, {"CUDA_VISIBLE_DEVICES": "1"})
    assert gpu.memory_used() == 2 << 30
    assert gpu.process_used(me) == 5 << 30
    assert gpu.process_used(me + 1) is None
    assert environment()["gpus"] == [FakeGpu.name] * 4


@pytest.mark.parametrize(
    ("host_namespace", "listed", "expected"),
    [
        (True, [(os.getpid(), 3 << 30), (HOST_PID, 1 << 30)], {os.getpid(): 3 << 30, HOST_PID: 1 << 30}),
        # A container of its own, an older driver: host pids. One equal to ours is another process.
        (False, [(os.getpid(), 3 << 30), (HOST_PID, 1 << 30)], {}),
        # A container, a driver that translates pids: ours, but without figures: none, never 0.
        (False, [(os.getpid(), None), (1, 2 << 30)], {1: 2 << 30}),
    ],
)
def test_process_memory_only_where_nvml_pids_are_ours(
    monkeypatch: pytest.MonkeyPatch,
    host_namespace: bool,
    listed: list[tuple[int, int | None]],
    expected: dict[int, int],
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([FakeGpu(processes=listed)]))
    monkeypatch.setattr(nvml, "in_host_pid_namespace", lambda: host_namespace)
    assert nvml.process_memory(nvml.all_gpus()) == expected

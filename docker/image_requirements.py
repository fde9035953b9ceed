"""What one image installs, and the check that it holds what it should (run by docker/Dockerfile).

    python3 image_requirements.py requirements EXTRAS > FILE   pyproject's dependencies + those of EXTRAS
    python3 image_requirements.py install EXTRAS FILE          pip-install FILE into /opt/venv
    python image_requirements.py verify EXTRAS FILE            (the venv's python) refuse an image that
                                                               is not what EXTRAS and FILE say
    python image_requirements.py cuda-home LINK                (the venv's python) link LINK to the CUDA
                                                               headers' folder of an installed nvidia
                                                               wheel (include/cuda.h); none: no link

The list is written in a stage of its own, so that the install layer's cache depends on the
requirements alone, not on the rest of pyproject.toml (tool settings). EXTRAS is a comma-separated
list of pyproject's optional dependencies (``torch``, ``tf``, ``tf-gpu``, ``gpu``, ``loadtest``).
Without ``gpu`` the image is a CPU image: torch comes from the CPU wheel in the wheelhouse
(``make wheelhouse``; PyPI's Linux torch is the CUDA build), and the image may hold no CUDA
library. Only the standard library is used: this runs before anything is installed.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

_HERE = Path(__file__).resolve().parent
#: Beside this file in the image (/build), one folder up in the repository.
PYPROJECT = next((p for p in (_HERE / "pyproject.toml", _HERE.parent / "pyproject.toml") if p.exists()), _HERE)
WHEELS = Path("/wheels")
VENV_PIP = "/opt/venv/bin/pip"
#: Framework distributions, by the name pyproject's extras give them.
FRAMEWORKS = {"torch": ("torch",), "tensorflow": ("tensorflow", "tensorflow-cpu")}
SITE_PACKAGES = Path("/opt/venv/lib")
#: TensorFlow's C++ headers (about 290 MB), for building custom ops: nothing reads them at run time
#: (XLA's JIT included). torch keeps its own: AOTInductor compiles against them.
BUILD_ONLY = "python3*/site-packages/tensorflow/include"
#: NVIDIA's distributions that are no CUDA library (NVML's Python bindings).
NOT_CUDA = {"nvidia-ml-py"}


def parse_extras(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def requirements(extras: list[str], pyproject: Path = PYPROJECT) -> list[str]:
    """pyproject's dependencies plus those of ``extras`` (``ValueError`` naming an unknown extra)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        raise ValueError(f"unknown extra(s) {', '.join(unknown)}; pyproject has {', '.join(sorted(optional))}")
    return [*project["dependencies"], *(req for extra in extras for req in optional[extra])]


def framework_of(requirement: str) -> str | None:
    name = normalize(re.split(r"[\s;\[=<>!~]", requirement.strip(), maxsplit=1)[0])
    return next((framework for framework, names in FRAMEWORKS.items() if name in names), None)


def install(extras: list[str], reqs: list[str]) -> None:
    args = [VENV_PIP, "install", "--quiet"]
    if "gpu" not in extras:
        wheels = sorted(WHEELS.glob("torch-*+cpu-*.whl"))
        if any(framework_of(req) == "torch" for req in reqs) and not wheels:
            raise SystemExit(
                "error: a CPU torch image needs torch's CPU wheel in docker/wheelhouse (PyPI's Linux torch is the "
                "CUDA build): run `make wheelhouse` on the host first, or build with EXTRAS=torch,gpu"
            )
        args += ["--find-links", str(WHEELS)]
    subprocess.run([*args, *reqs], check=True)
    for tree in SITE_PACKAGES.glob(BUILD_ONLY):
        shutil.rmtree(tree)


def installed() -> dict[str, str]:
    """Every distribution in the running environment: normalized name (PEP 503) -> version."""
    return {normalize(dist.metadata["Name"]): dist.version for dist in importlib.metadata.distributions()}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def verify(extras: list[str], reqs: list[str], installed: dict[str, str]) -> list[str]:
    """The problems with ``installed`` as the image for ``extras`` that installed ``reqs`` (empty: as it should be)."""
    wanted = {framework_of(req) for req in reqs} - {None}
    problems = []
    for framework, names in FRAMEWORKS.items():
        present = [name for name in names if name in installed]
        if framework in wanted and not present:
            problems.append(f"{framework} is missing")
        if framework not in wanted and present:
            problems.append(f"{', '.join(present)} installed, but this image is not a {framework} image")
    if "gpu" not in extras:
        cuda = sorted(name for name in installed if name.startswith("nvidia-") and name not in NOT_CUDA)
        if cuda:
            problems.append(f"a CPU image with CUDA libraries: {', '.join(cuda)}")
        if "torch" in installed and not cuda:
            import torch

            if torch.version.cuda is not None:
                problems.append(f"torch {torch.__version__} is a CUDA build (CUDA {torch.version.cuda})")
    return problems


def read_requirements(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def cuda_home(link: Path) -> Path | None:
    """Link ``link`` to the folder holding ``include/cuda.h`` in an installed nvidia wheel (the CUDA
    runtime that torch's CUDA build depends on), so that CUDA_HOME=``link`` finds the headers.
    Returns that folder, or None (a CPU image: nothing linked)."""
    for dist in importlib.metadata.distributions():
        if not (dist.metadata["Name"] or "").lower().startswith("nvidia-cuda-runtime"):
            continue
        for file in dist.files or ():
            if file.name == "cuda.h" and file.parent.name == "include":
                home = Path(str(dist.locate_file(file))).parent.parent
                link.symlink_to(home, target_is_directory=True)
                return home
    return None


def main(argv: list[str]) -> int:
    command, args = (argv[0], argv[1:]) if argv else ("", [])
    if command == "cuda-home" and len(args) == 1:
        home = cuda_home(Path(args[0]))
        print(f"CUDA headers: {home or 'none (a CPU image)'}", file=sys.stderr)
        return 0
    if (command, len(args)) not in (("requirements", 1), ("install", 2), ("verify", 2)):
        print(__doc__, file=sys.stderr)
        return 2
    extras = parse_extras(args[0])
    try:
        if command == "requirements":
            print("\n".join(requirements(extras)))
            return 0
        reqs = read_requirements(Path(args[1]))
        if command == "install":
            install(extras, reqs)
            return 0
        present = installed()
        problems = verify(extras, reqs, present)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    names = {name for group in FRAMEWORKS.values() for name in group}
    frameworks = [f"{name} {version}" for name, version in sorted(present.items()) if name in names]
    print(f"image for extras {','.join(extras)}: {', '.join(frameworks) or 'no framework'}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

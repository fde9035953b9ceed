"""The model repository on disk: ``<root>/<model>/<version>/`` as TF Serving lays it out.

This module keeps the zoo's exports there; the user's own models in the same layout are read
by ``serving.artifacts`` (a zoo export is such an artifact, plus the identity below).

Each zoo model folder holds ``zoo.json``: the zoo identity (name, parameters, seed, weight
fingerprint) and framework of the artifact beside it, and the SHA-256 of each of its
files. A server reuses an artifact only when that identity matches what it was asked to
serve and every file still hashes the same; a damaged artifact (a truncated or altered
file) is exported anew, with a warning. Exports go to a temporary folder first and are
renamed into place, so a crash never leaves a half-written artifact that looks valid.

One repository per framework: a folder holding another framework's export of a model is
refused (``RepositoryError``), never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from modelzoo.base import ModelDefinition
from serving.backend import Framework

log = logging.getLogger(__name__)

VERSION = "1"
IDENTITY_FILE = "zoo.json"


class RepositoryError(ValueError):
    """The repository cannot serve as configured; one line naming the folder."""


def default_root(framework: Framework) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "oip-serving" / framework.name


def _identity(framework: Framework, model: ModelDefinition) -> dict[str, Any]:
    return {**model.identity(), "framework": framework.name}


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest(version_dir: Path) -> dict[str, str]:
    return {
        str(path.relative_to(version_dir)): _digest(path) for path in sorted(version_dir.rglob("*")) if path.is_file()
    }


def recorded(framework: Framework, name: str, root: Path) -> dict[str, Any] | None:
    """What ``zoo.json`` says of model ``name``'s artifact (None: absent or unreadable, so no zoo
    export); refuses another framework's export."""
    try:
        identity = json.loads((root / name / IDENTITY_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(identity, dict):
        return None
    other = identity.get("framework")
    if other is not None and other != framework.name:
        raise RepositoryError(
            f"--model-dir {root}: {name} there is a {other} export; give each server its own model repository"
        )
    return identity


def _recorded(framework: Framework, model: ModelDefinition, root: Path) -> dict[str, Any] | None:
    return recorded(framework, model.name, root)


def damage(framework: Framework, model: ModelDefinition, root: Path, version: str = VERSION) -> str | None:
    """Why the artifact of ``model`` in ``root`` cannot be reused (None: it can)."""
    recorded = _recorded(framework, model, root)
    version_dir = root / model.name / version
    if recorded is None or not version_dir.is_dir():
        return "not exported yet"
    files = recorded.pop("files", None)
    if recorded != _identity(framework, model) or not isinstance(files, dict):
        return "exported for other parameters or weights"
    for name, digest in files.items():
        path = version_dir / name
        if not path.is_file() or _digest(path) != digest:
            return f"{path} is missing or damaged"
    return None


def export(framework: Framework, model: ModelDefinition, root: Path, version: str = VERSION) -> Path:
    """Export ``model`` with ``framework`` into ``root``; returns the version folder."""
    _recorded(framework, model, root)  # never overwrite another framework's export
    model_root = root / model.name
    model_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=model_root))
    try:
        framework.export(model, staging)
        files = _manifest(staging)
        target = model_root / version
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    identity = {**_identity(framework, model), "files": files}
    (model_root / IDENTITY_FILE).write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n")
    log.info("exported %s (%s) to %s", model.name, framework.name, target)
    return target


def ensure(framework: Framework, model: ModelDefinition, root: Path, version: str = VERSION) -> Path:
    """The version folder of a matching, intact artifact, exporting it first if needed."""
    reason = damage(framework, model, root, version)
    if reason is None:
        return root / model.name / version
    if (root / model.name / IDENTITY_FILE).exists():
        log.warning("artifact of %s in %s cannot be reused (%s): exporting it again", model.name, root, reason)
    return export(framework, model, root, version)


def check(framework: Framework, models: Iterable[ModelDefinition], root: Path) -> None:
    """Fail early, in one line naming the folder, if serving ``models`` from ``root`` cannot
    work: another framework's export there, or an export needed where nothing can be written."""
    needs_export = [model.name for model in models if damage(framework, model, root) is not None]
    if not needs_export:
        return
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as err:
        raise RepositoryError(
            f"--model-dir {root}: cannot write there ({err.strerror or err}), and {', '.join(needs_export)} "
            "must be exported there first"
        ) from None

"""The model repository on disk: ``<root>/<model>/<version>/`` as TF Serving lays it out.

Each model folder holds ``zoo.json``: the zoo identity (name, parameters, seed,
weight fingerprint) of the artifact beside it. A server reuses an artifact only
when that identity matches what it was asked to serve; otherwise it exports anew.
Exports go to a temporary folder first and are renamed into place, so a crash
never leaves a half-written artifact that looks valid.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from modelzoo.base import ModelDefinition
from serving.backend import Framework

log = logging.getLogger(__name__)

VERSION = "1"
IDENTITY_FILE = "zoo.json"


def default_root(framework: Framework) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "oip-serving" / framework.name


def artifact_matches(model: ModelDefinition, root: Path, version: str = VERSION) -> bool:
    identity = root / model.name / IDENTITY_FILE
    if not (root / model.name / version).is_dir() or not identity.is_file():
        return False
    try:
        return bool(json.loads(identity.read_text()) == model.identity())
    except (OSError, ValueError):
        return False


def export(framework: Framework, model: ModelDefinition, root: Path, version: str = VERSION) -> Path:
    """Export ``model`` with ``framework`` into ``root``; returns the version folder."""
    model_root = root / model.name
    model_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=model_root))
    try:
        framework.export(model, staging)
        target = model_root / version
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    (model_root / IDENTITY_FILE).write_text(json.dumps(model.identity(), indent=2, sort_keys=True) + "\n")
    log.info("exported %s (%s) to %s", model.name, framework.name, target)
    return target


def ensure(framework: Framework, model: ModelDefinition, root: Path, version: str = VERSION) -> Path:
    """The version folder of a matching artifact, exporting it first if needed."""
    if artifact_matches(model, root, version):
        return root / model.name / version
    return export(framework, model, root, version)

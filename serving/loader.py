"""What a server serves, loaded and kept current: names, versions, warm-up, new versions.

Each name (``--model``; without it, every model folder of the repository) resolves, in order,
to (``resolve``):

1. a folder holding a zoo identity (``zoo.json``, written by ``export``): that zoo model, with
   the parameters recorded there unless ``--model-arg`` gives others; exported again when the
   artifact is damaged or was exported for other parameters (``serving.repository``);
2. a folder holding version folders: the user's own artifact (``serving.artifacts``): its
   signature and config.json describe it;
3. a zoo model: exported into the repository on first use.

Each version to serve is loaded, warmed up and wrapped in a ModelRuntime. A user model whose
artifact cannot be served (corrupt, unsupported, a bad config.json) is logged in one line and
answered UNAVAILABLE with the reason, while the others serve; a zoo model that cannot be loaded
stops the start, as before.

``watch`` polls the repository every ``--repository-poll-s`` seconds: a new version folder of
a user model is loaded and warmed up beside the serving one, then requests switch to it;
versions the policy no longer wants are taken out of routing and closed once every request
routed to them has its answer. A version that fails to load is logged once (again only if its
folder changes) and the versions serving go on. Version folders should appear whole (written
elsewhere, then renamed into the repository), as TF Serving asks.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modelzoo.base import ModelDefinition
from serving import repository
from serving.artifacts import ArtifactError, ArtifactModel, ModelConfigFile, batch_limit, discover, versions
from serving.backend import Backend, BackendOptions, Framework, FrameworkInfo
from serving.metrics import ModelMetrics, ServerMetrics
from serving.runtime import VERSION, ModelRuntime
from serving.servicer import InferenceServicer
from serving.settings import BatchingSettings, ServerSettings

log = logging.getLogger(__name__)

#: Longest reason kept in a log line or a client's message (a framework's error can be pages long).
REASON_CHARS = 400


@dataclass(frozen=True)
class Source:
    """Where a served model comes from: a zoo model (``zoo``) or the user's artifact (``zoo`` None,
    described by its versions' signatures and its config.json, read when loading)."""

    name: str
    root: Path
    zoo: ModelDefinition | None

    @property
    def model_root(self) -> Path:
        return self.root / self.name


#: What a server serves when given neither --model nor a repository (its own cache): the zoo's mlp.
DEFAULT_MODEL = "mlp"


def model_names(settings: ServerSettings, framework: Framework) -> list[str]:
    """``--model``; else every model folder of ``--model-repository`` (``ValueError``, one line, when it
    holds none); with neither, the zoo's mlp, exported into the server's cache."""
    if settings.model:
        return list(settings.model)
    root = settings.model_dir
    if root is None:
        return [DEFAULT_MODEL]
    found = discover(root)
    if not found:
        raise ValueError(
            f"--model-repository {root}: no <model>/<version>/ folders there; put models there or name zoo models "
            "with --model (mlp, resnet, encoder)"
        )
    return found


def resolve(
    name: str, root: Path, zoo: Mapping[str, type[ModelDefinition]], params: Mapping[str, str], framework: Framework
) -> Source:
    """The source of ``name`` (see the module docstring); ``ValueError`` naming what is wrong."""
    recorded = repository.recorded(framework, name, root)
    if recorded is not None and name in zoo:
        given = dict(params) or dict(recorded.get("params", {}))
        return Source(name, root, zoo[name](**given))
    if versions(root / name):
        return Source(name, root, None)
    if name in zoo:
        return Source(name, root, zoo[name](**params))
    raise ValueError(f"unknown model {name!r}: {root / name} holds no version folder, and the zoo has {sorted(zoo)}")


def artifact_model(
    framework: Framework, source: Source, config: ModelConfigFile, version: int
) -> tuple[ArtifactModel, Path]:
    """One version of a user model as the core serves it (its signature and config.json), and its folder."""
    version_dir = source.model_root / str(version)
    return ArtifactModel(source.name, framework.signature(version_dir), config, version_dir), version_dir


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 3] + "..."


class ModelLoader:
    """Loads a server's models into its servicer and keeps their versions current."""

    def __init__(
        self,
        settings: ServerSettings,
        framework: Framework,
        device: str,
        info: FrameworkInfo,
        metrics: ServerMetrics,
        servicer: InferenceServicer,
        workers: int = 1,
    ) -> None:
        self.settings = settings
        self.framework = framework
        self.device = device
        self.info = info
        self.metrics = metrics
        self.servicer = servicer
        self.workers = workers
        self.sources: dict[str, Source] = {}
        #: Start-up seconds of each model's latest loaded version, by part (export, load, compile, warm-up).
        self.timings: dict[str, dict[str, float]] = {}
        self._metrics: dict[str, ModelMetrics] = {}
        #: Versions that failed to load, with their folder's modification time then: not tried again unchanged.
        self._failed: dict[tuple[str, int], float] = {}
        self._logged: set[tuple[str, str]] = set()

    # ---- start-up

    def load_all(self, names: list[str], zoo: Mapping[str, type[ModelDefinition]]) -> None:
        """Resolve and load every model; user models that cannot be served are reported and skipped."""
        settings = self.settings
        root = settings.model_dir or repository.default_root(self.framework)
        params = settings.model_params()
        for name in names:
            if self.servicer.draining:
                return
            source = resolve(name, root, zoo, params, self.framework)
            self.sources[name] = source
            if source.zoo is not None:
                self._serve(self.load_zoo(source))
                continue
            try:
                self._load_versions(source, ModelConfigFile.read(source.model_root))
            except Exception as err:  # whatever a user's artifact raises: the other models serve
                self._fail(name, one_line(err))
        if not self.servicer.models and not self.servicer.draining:
            reasons = "; ".join(f"{name}: {reason}" for name, reason in self.servicer.failed.items())
            raise RuntimeError(f"no model could be served ({reasons})")

    def _fail(self, name: str, reason: str) -> None:
        log.error("model %s cannot be served: %s", name, reason)
        self.servicer.failed[name] = reason

    def _load_versions(self, source: Source, config: ModelConfigFile) -> None:
        """Load the versions ``config``'s policy wants of a user model (at least one must load)."""
        wanted = config.version_policy.select(versions(source.model_root))
        if not wanted:
            raise ArtifactError(f"{source.model_root}: no version folder the version policy selects")
        errors = []
        for version in wanted:
            try:
                self._serve(self.load_artifact(source, config, version))
            except Exception as err:  # whatever a user's artifact raises
                errors.append(f"version {version}: {one_line(err)}")
                self._remember_failure(source, version)
        if errors and source.name not in self.servicer.models:
            raise ArtifactError("; ".join(errors))  # the caller logs it: one line for the model
        for error in errors:
            log.error("model %s %s; its other versions serve", source.name, error)

    def load_zoo(self, source: Source) -> ModelRuntime:
        """A zoo model: exported into the repository if needed, then loaded (version 1)."""
        assert source.zoo is not None
        started = time.perf_counter()
        version_dir = repository.ensure(self.framework, source.zoo, source.root)
        return self._runtime(source.zoo, version_dir, VERSION, self.settings.batching(), time.perf_counter() - started)

    def load_artifact(self, source: Source, config: ModelConfigFile, version: int) -> ModelRuntime:
        """One version of a user model, described by its own signature and config.json."""
        model, version_dir = artifact_model(self.framework, source, config, version)
        batching = self.settings.batching()
        limit = batch_limit(batching.max_batch_size, config)
        batching = dataclasses.replace(
            batching,
            max_batch_size=limit,
            preferred_batch_sizes=[size for size in batching.preferred_batch_sizes if size <= limit],
        )
        return self._runtime(model, version_dir, str(version), batching, 0.0)

    def _runtime(
        self, model: ModelDefinition | ArtifactModel, version_dir: Path, version: str, batching: BatchingSettings,
        exported: float,
    ) -> ModelRuntime:  # fmt: skip
        settings = self.settings
        backend = self.framework.create_backend(
            model, version_dir, BackendOptions(self.device, settings.precision, settings.compile, settings.instances)
        )
        started = time.perf_counter()
        try:
            backend.start()
            loaded = time.perf_counter() - started
            warmed = warm_up(backend, batching, settings.compile) if settings.warmup else 0.0
        except BaseException:
            backend.shutdown()
            raise
        compiled = settings.compile == "on"
        inner = {key: backend.timings.get(key, 0.0) for key in ("export_s", "compile_s")}
        timings = self.timings[model.name] = {
            "export_s": exported + inner["export_s"],
            "load_s": loaded - inner["export_s"] - inner["compile_s"],
            "compile_s": inner["compile_s"] + warmed if compiled else 0.0,
            "warmup_s": 0.0 if compiled else warmed,
        }
        info = self.info
        # info.extra carries the resolved device ("cpu", "cuda:0"); its description (CPU model
        # or GPU name) goes beside it rather than under the same key.
        parameters = {
            "framework_version": info.version,
            "device_name": info.device,
            "threads": str(info.threads),
            "workers": str(self.workers),
            **info.extra,
            "precision": settings.precision,
            "compile": settings.compile,
            **backend.reported,
            **{key: f"{value:.3f}" for key, value in timings.items()},
            # Integer inputs' accepted values, so that load generators stay within them.
            **{f"range.{spec.name}": f"{spec.value_range[0]},{spec.value_range[1]}"
               for spec in model.inputs if spec.value_range is not None},
        }  # fmt: skip
        metrics = self._metrics.get(model.name)
        if metrics is None:
            metrics = self._metrics[model.name] = self.metrics.for_model(
                model.name, max_batch_size=settings.max_batch_size
            )
        log.info(
            "model %s version %s ready (%s on %s, %s, compile %s): export %.2f s, load %.2f s, compile %.2f s, "
            "warm-up %.2f s", model.name, version, self.framework.name, info.device, settings.precision,
            settings.compile, timings["export_s"], timings["load_s"], timings["compile_s"], timings["warmup_s"],
        )  # fmt: skip
        return ModelRuntime(model, backend, batching, metrics, self.framework.name, parameters, version)

    def _serve(self, runtime: ModelRuntime) -> None:
        """Start ``runtime`` and route to it, unless the server is draining (then close it)."""
        if self.servicer.draining:
            runtime.backend.shutdown()
            return
        runtime.start()
        self.servicer.add(runtime)
        self.servicer.failed.pop(runtime.model.name, None)

    # ---- while serving

    def watch(self, stop: threading.Event, interval: float) -> None:
        """``poll`` every ``interval`` seconds until ``stop`` (or the server drains)."""
        while not stop.wait(interval) and not self.servicer.draining:
            try:
                self.poll()
            except Exception:
                log.exception("polling the model repository failed; trying again in %.1f s", interval)

    def poll(self) -> None:
        """Load new versions of the user models, then retire the versions no longer wanted."""
        for name, source in list(self.sources.items()):
            if source.zoo is not None or self.servicer.draining:
                continue
            try:
                config = ModelConfigFile.read(source.model_root)
            except ArtifactError as err:
                self._log_once(("config", name), f"model {name}: {err}; keeping the versions that serve")
                continue
            wanted = config.version_policy.select(versions(source.model_root))
            served = self.servicer.models.get(name)
            loaded = {int(version) for version in served.versions} if served else set()
            for version in wanted:
                if version in loaded or self._failed_unchanged(source, version):
                    continue
                try:
                    runtime = self.load_artifact(source, config, version)
                except Exception as err:  # whatever a user's artifact raises
                    self._remember_failure(source, version)
                    log.error("model %s version %d cannot be served: %s; the versions serving go on", name, version,
                              one_line(err))  # fmt: skip
                    continue
                self._serve(runtime)
                log.info("model %s: version %d serves (requests without a version go to %s)", name, version,
                         self.servicer.models[name].versions[-1])  # fmt: skip
            served = self.servicer.models.get(name)
            serving = {int(version) for version in served.versions} if served else set()
            if serving & set(wanted):  # never retire the last version serving
                for version in sorted(serving - set(wanted)):
                    self.retire(name, str(version))

    def retire(self, name: str, version: str) -> None:
        """Take a version out of routing, let what was routed to it finish, close it."""
        served = self.servicer.models.get(name)
        runtime = served.remove(version) if served else None
        if runtime is None:
            return
        grace = self.settings.grace_period_s
        if not runtime.wait_idle(grace) or not runtime.batcher.drain(grace):
            log.error("model %s version %s: still busy %.1f s after it was retired; closing it anyway", name,
                      version, grace)  # fmt: skip
        runtime.backend.shutdown()
        log.info("model %s: version %s retired", name, version)

    def _remember_failure(self, source: Source, version: int) -> None:
        self._failed[(source.name, version)] = _mtime(source.model_root / str(version))

    def _failed_unchanged(self, source: Source, version: int) -> bool:
        then = self._failed.get((source.name, version))
        return then is not None and then == _mtime(source.model_root / str(version))

    def _log_once(self, key: tuple[str, str], message: str) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.error("%s", message)


def _mtime(path: Path) -> float:
    """The latest modification time under ``path`` (a version rewritten in place counts as changed)."""
    try:
        return max([path.stat().st_mtime, *(child.stat().st_mtime for child in path.rglob("*"))])
    except OSError:
        return 0.0


def warm_up(backend: Backend, batching: BatchingSettings, compile: str) -> float:
    """Run every warm-up shape: each batch size times ``backend.warm_up_inputs``, as served
    (``backend.forward``); seconds taken.

    Compiled, or on a GPU, the sizes are every size the batcher can produce (the preferred
    sizes and every size above the largest of them; without preferred sizes 1..max_batch_size):
    a compiled graph is specialised per shape, and cuDNN/cuBLAS pick (cuDNN autotunes) their
    kernels per shape on first use. Otherwise (eager, CPU) 1, the preferred sizes and the largest."""
    started = time.perf_counter()
    preferred, largest = batching.preferred_batch_sizes, batching.max_batch_size
    if compile != "on" and backend.device == "cpu":
        sizes = sorted({1, *preferred, largest})
    elif preferred:
        sizes = sorted({*preferred, *range(max(preferred) + 1, largest + 1)})
    else:
        sizes = list(range(1, largest + 1))
    rng = np.random.default_rng(0)
    for size in sizes:
        for inputs in backend.warm_up_inputs(size, rng):
            backend.forward(inputs)
    backend.warmed_up = True
    return time.perf_counter() - started

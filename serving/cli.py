"""The command line both servers share: ``python -m torch_server|tf_server {serve,export}``.

serve   export the model into the repository if needed, load, warm up, serve
export  write the native serving artifact(s) into a repository folder
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import modelzoo
from contract.signature import ModelSignature
from modelzoo.base import ModelDefinition
from serving import repository
from serving.artifacts import ModelConfigFile, versions
from serving.backend import BackendOptions, Framework
from serving.loader import artifact_model, model_names, resolve
from serving.settings import (
    COMPILE_MODES,
    PRECISIONS,
    StartupError,
    add_arguments,
    from_namespace,
    parse_model_args,
    worker_count,
)


def build_parser(framework: Framework) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m {framework.server_name}",
        description=f"{framework.server_name}: Open Inference Protocol gRPC server for {framework.name} models.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="serve zoo models over gRPC",
        description=f"Every flag can also be set by an environment variable {framework.env_prefix}<FLAG_NAME>.",
    )
    add_arguments(serve)
    export = commands.add_parser("export", help="export zoo models to a model repository")
    export.add_argument("--model", required=True, help=f"comma-separated zoo models: {', '.join(modelzoo.names())}")
    export.add_argument("--model-arg", default="", help="zoo model parameters as KEY=VALUE, comma-separated")
    export.add_argument("--out", type=Path, default=None, help="repository folder (default: the serving cache)")
    forward = commands.add_parser(
        "forward",
        help="time the model's own forward pass in-process (the serving ceiling), print JSON",
        description="Loads the artifact exactly as `serve` does and times the served forward pass (backend.forward: "
        "on a GPU, on the device threads as served) per batch size, beside the framework's fastest in-process call "
        "of the same model (the reference; on a GPU it waits for its kernels, as the served pass does).",
    )
    forward.add_argument("--model", default="mlp", help="a zoo model, or a model of --model-dir (its highest version)")
    forward.add_argument("--model-arg", default="", help="zoo model parameters as KEY=VALUE, comma-separated")
    forward.add_argument("--model-dir", "--model-repository", type=Path, default=None)
    forward.add_argument("--batch-sizes", default="1,2,4,8,16,32", help="comma-separated")
    forward.add_argument("--seconds", type=float, default=1.0, help="timing budget per batch size")
    forward.add_argument("--threads", type=int, default=None)
    forward.add_argument("--device", default="auto")
    forward.add_argument("--precision", default="fp32", choices=PRECISIONS, help="as serve's --precision")
    forward.add_argument("--compile", default="off", choices=COMPILE_MODES, help="as serve's --compile")
    return parser


FORWARD_ROUNDS = 4


def _median_us(run: Callable[[], object], seconds: float) -> float:
    """Median wall time of ``run()`` in µs: at least 20 calls, for about ``seconds``."""
    timings: list[float] = []
    budget_end = time.perf_counter() + seconds
    while time.perf_counter() < budget_end or len(timings) < 20:
        started = time.perf_counter()
        run()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings) * 1e6


def forward_benchmark(framework: Framework, args: argparse.Namespace) -> dict[str, object]:
    """Median latency and rows/s of the served forward pass (backend.forward) at each batch size, beside the framework's
    fastest in-process call of the same model (``Framework.reference``: same precision,
    uncompiled), timed alternately. Compile time (``--compile on``) is reported apart."""
    import numpy as np

    framework.configure(args.threads, args.device)
    device = framework.resolve_device(args.device)
    framework.check_options(device, args.precision, args.compile)
    root = args.model_dir or repository.default_root(framework)
    source = resolve(args.model, root, modelzoo.MODELS, parse_model_args(args.model_arg), framework)
    model: ModelSignature
    if source.zoo is not None:
        model = source.zoo
        version_dir = repository.ensure(framework, source.zoo, root)
    else:  # the user's own artifact: its highest version
        config = ModelConfigFile.read(source.model_root)
        model, version_dir = artifact_model(framework, source, config, versions(source.model_root)[-1])
    backend = framework.create_backend(model, version_dir, BackendOptions(device, args.precision, args.compile))
    started = time.perf_counter()
    backend.start()
    load_s = time.perf_counter() - started
    reference = framework.reference(model, version_dir, device, args.precision)
    rng = np.random.default_rng(0)
    results = []
    for size in (int(part) for part in args.batch_sizes.split(",") if part.strip()):
        inputs = model.complete_inputs(model.example_inputs(size, rng, seq_len=16))
        served = functools.partial(backend.forward, inputs)
        fastest = reference(inputs)
        started = time.perf_counter()
        served()  # compiles this shape, where the backend compiles per shape
        first_us = (time.perf_counter() - started) * 1e6
        for _ in range(5):
            served()
            fastest()
        served_runs, reference_runs = [], []
        for _ in range(FORWARD_ROUNDS):  # alternating, so drift on a shared machine hits both
            served_runs.append(_median_us(served, args.seconds / FORWARD_ROUNDS))
            reference_runs.append(_median_us(fastest, args.seconds / FORWARD_ROUNDS))
        served_us, reference_us = statistics.median(served_runs), statistics.median(reference_runs)
        results.append({
            "batch_size": size,
            "median_us": served_us,
            "rows_per_s": size / served_us * 1e6,
            "reference_us": reference_us,
            "vs_reference": served_us / reference_us,
            "first_call_us": first_us,
        })  # fmt: skip
    backend.shutdown()
    info = framework.info(device)
    described = " ".join((reference.__doc__ or "").split())
    return {"framework": framework.name, "version": info.version, "device": info.device, "model": args.model,
            "threads": info.threads, "precision": args.precision, "compile": args.compile, "load_s": load_s,
            "timings": backend.timings, "reference": described, "results": results}  # fmt: skip


def main(
    framework: Framework,
    argv: Sequence[str] | None = None,
    zoo: Mapping[str, type[ModelDefinition]] = modelzoo.MODELS,
) -> int:
    args = build_parser(framework).parse_args(argv)
    if args.command == "forward":
        try:
            print(json.dumps(forward_benchmark(framework, args)))
        except ValueError as err:  # options the framework cannot run here
            return _refuse(err)
        return 0
    if args.command == "export":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        framework.configure(None, "cpu")
        root = args.out or repository.default_root(framework)
        for name in filter(None, args.model.split(",")):
            model = modelzoo.get(name.strip(), **parse_model_args(args.model_arg))
            print(repository.export(framework, model, root))
        return 0
    try:
        settings = from_namespace(
            args,
            framework.env_prefix,
            defaults={"port": framework.default_port, "metrics_port": framework.default_port + 1},
        )
        root = settings.model_dir or repository.default_root(framework)
        # Resolved once here: a supervisor's workers get the same list (--model).
        settings.model = model_names(settings, framework)
        sources = [resolve(name, root, zoo, settings.model_params(), framework) for name in settings.model]
        own = [source.name for source in sources if source.zoo is None]
        if own and settings.precision in ("bf16", "fp16"):
            raise ValueError(
                f"--precision {settings.precision}: {', '.join(own)} are artifacts of your own, served in the "
                "precision they were exported in (fp32; tf32 on CUDA); only zoo models are exported in another"
            )
    except ValueError as err:
        return _refuse(err)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    # Imported here, not at the top: export and forward start no gRPC server.
    from serving.server import run
    from serving.workers import WorkerPlace, supervise

    workers = worker_count(settings.workers)
    if workers > 1 and WorkerPlace.from_environment() is None:
        try:
            return supervise(settings, workers)  # its workers run this same command line
        except StartupError as err:
            return _refuse(err)
    try:
        # Thread settings must precede the framework's first op.
        framework.configure(settings.threads, settings.device)
    except ValueError as err:
        return _refuse(ValueError(f"--device {settings.device}: {err}"))
    try:
        framework.check_options(framework.resolve_device(settings.device), settings.precision, settings.compile)
        repository.check(framework, [source.zoo for source in sources if source.zoo is not None], root)
        return run(settings, framework, zoo)
    except (ValueError, StartupError) as err:
        return _refuse(err)


def _refuse(error: Exception) -> int:
    """An operator error: one line on stderr, exit status 2."""
    print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
    return 2

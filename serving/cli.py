"""The command line both servers share: ``python -m torch_server|tf_server {serve,export}``.

    serve   export the model into the repository if needed, load, warm up, serve
    export  write the native serving artifact(s) into a repository folder
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import modelzoo
from serving import repository
from serving.backend import Framework
from serving.settings import add_arguments, from_namespace, parse_model_args


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
    return parser


def main(framework: Framework, argv: Sequence[str] | None = None) -> int:
    args = build_parser(framework).parse_args(argv)
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
        for name in settings.model:
            modelzoo.get(name, **settings.model_params())
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    # Thread settings must precede the framework's first op.
    framework.configure(settings.threads, settings.device)
    from serving.server import run

    return asyncio.run(run(settings, framework))

"""Command line: ``python -m client --target HOST:PORT [--timeout S] [--attempts N] [--tls] [--token T] CMD``.

Commands: health, metadata, infer. Every call has the deadline ``--timeout`` (10 s);
a call that finds the server unavailable is tried up to ``--attempts`` times (3) when
that cannot run it twice (``client.RetryPolicy``).

health
    Prints the grpc.health.v1 status, then liveness and readiness (ServerLive/ServerReady);
    exits 0 when SERVING, 1 otherwise. Only the health status decides: it is open on a server
    that requires a token, so a probe without the token still works (liveness and readiness
    then read ``unknown (UNAUTHENTICATED)``). For container probes, ``python -m serving.probe``
    asks the same question at a fraction of the start-up cost.
metadata [--model M] [--json]
    Server metadata, or a model's metadata and config.
infer --model M [--input NAME=FILE.npy ...] [--random] [--batch-size N] [--dim NAME=AXIS:SIZE ...]
      [--output NAME ...] [--typed] [--save DIR] [--json]
    Runs one inference and prints each output's name, dtype, shape and values (large
    arrays summarised) and the round-trip latency.

    ``--random`` fills every input not given with ``--input`` from the model's
    metadata: floats standard normal, integers uniform in [0, 100), BOOL random.
    Axis 0 of size -1 is the batch (``--batch-size``); other -1 axes take ``--dim`` or
    16. Metadata cannot say which inputs are optional, so all are generated, except
    BYTES inputs, which cannot be made up: pass those with ``--input`` (a note on
    stderr names what was skipped).

Every failure prints ``error: <CODE>: <message>`` on stderr (``error: <message>`` for
local problems such as an unreadable file) and exits 2, without a traceback; a server
that is down or unreachable reads ``error: UNAVAILABLE: cannot reach the server at
HOST:PORT: <reason> (<n> attempts over <s> s)``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import json_format, text_format

from client._base import DEFAULT_TIMEOUT
from client._calls import ModelMetadata
from client._retry import RetryPolicy
from client.errors import InferenceServerError, PermissionDeniedError, UnauthenticatedError, UnimplementedError
from client.sync import InferenceClient
from contract.datatypes import TensorSpec, datatype_of
from contract.random_tensors import random_array

DEFAULT_DIM = 16
_UNSAFE_IN_FILENAME = re.compile(r"[/\\]")
PRINT_OPTIONS: dict[str, Any] = {"threshold": 200, "edgeitems": 3, "linewidth": 120}


class UsageError(ValueError):
    """A command-line value that cannot be used."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m client", description="Open Inference Protocol gRPC client.")
    parser.add_argument(
        "--target",
        required=True,
        help="server address, HOST:PORT; dns:///NAME:PORT (every address of NAME, round-robin); or "
        "HOST:PORT,HOST:PORT (the calls take turns)",
    )
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="deadline per call, seconds")
    parser.add_argument(
        "--attempts",
        type=int,
        default=RetryPolicy.attempts,
        help="tries per call when the server is unavailable (1: no retry; see client.RetryPolicy)",
    )
    parser.add_argument("--tls", action="store_true", help="use TLS (system roots unless --root-certs)")
    parser.add_argument("--root-certs", metavar="PEM", help="trust these root certificates (implies --tls)")
    parser.add_argument(
        "--client-cert", metavar="PEM", help="present this certificate chain (mutual TLS; implies --tls)"
    )
    parser.add_argument("--client-key", metavar="PEM", help="the private key of --client-cert")
    parser.add_argument("--token", help="bearer token sent as 'authorization' metadata")
    commands = parser.add_subparsers(dest="command", required=True)

    health = commands.add_parser("health", help="liveness, readiness and grpc.health.v1 status")
    health.add_argument("--service", default="", help="grpc.health.v1 service name (default: the whole server)")
    health.set_defaults(handler=run_health)

    metadata = commands.add_parser("metadata", help="server metadata, or a model's metadata and config")
    metadata.add_argument("--model", help="show this model instead of the server")
    metadata.add_argument("--model-version", default="", help="model version (default: the server's choice)")
    metadata.add_argument("--json", action="store_true", help="print JSON")
    metadata.set_defaults(handler=run_metadata)

    infer = commands.add_parser("infer", help="run one inference")
    infer.add_argument("--model", required=True)
    infer.add_argument("--model-version", default="")
    infer.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy", help="an input from a file")
    infer.add_argument("--random", action="store_true", help="generate the inputs not given, from model metadata")
    infer.add_argument("--batch-size", type=int, default=1, help="size of a variable batch axis (--random)")
    infer.add_argument(
        "--dim",
        action="append",
        default=[],
        metavar="NAME=AXIS:SIZE",
        help=f"size of another variable axis of input NAME (--random; default {DEFAULT_DIM})",
    )
    infer.add_argument("--seed", type=int, help="seed of --random")
    infer.add_argument("--output", action="append", metavar="NAME", help="request only these outputs")
    infer.add_argument("--typed", action="store_true", help="send typed contents instead of raw bytes")
    infer.add_argument("--save", metavar="DIR", help="write each output to DIR/NAME.npy")
    infer.add_argument("--json", action="store_true", help="print JSON")
    infer.set_defaults(handler=run_infer)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        root_certificates = Path(args.root_certs).read_bytes() if args.root_certs else None
        client_certificate = Path(args.client_cert).read_bytes() if args.client_cert else None
        client_key = Path(args.client_key).read_bytes() if args.client_key else None
        with InferenceClient(
            args.target,
            timeout=args.timeout,
            tls=args.tls,
            root_certificates=root_certificates,
            token=args.token,
            retry=RetryPolicy(attempts=args.attempts),
            client_certificate=client_certificate,
            client_key=client_key,
        ) as client:
            status: int = args.handler(client, args)
            return status
    except InferenceServerError as error:
        print(f"error: {error}", file=sys.stderr)
    except (OSError, ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
    return 2


def run_health(client: InferenceClient, args: argparse.Namespace) -> int:
    status = client.health(args.service)
    print(f"health{f'({args.service})' if args.service else ''}: {status}")
    for name, ask in (("live", client.server_live), ("ready", client.server_ready)):
        try:
            print(f"{name}: {str(ask()).lower()}")
        except (UnauthenticatedError, PermissionDeniedError) as error:
            print(f"{name}: unknown ({error.code.name})")
    return 0 if status == "SERVING" else 1


def run_metadata(client: InferenceClient, args: argparse.Namespace) -> int:
    if not args.model:
        server = client.server_metadata()
        if args.json:
            print(json.dumps({"name": server.name, "version": server.version, "extensions": list(server.extensions)}))
        else:
            print(f"name: {server.name}\nversion: {server.version}\nextensions: {', '.join(server.extensions)}")
        return 0
    metadata = client.model_metadata(args.model, args.model_version)
    try:
        config = client.model_config(args.model, args.model_version)
    except UnimplementedError as error:
        config, missing = None, str(error)
    if args.json:
        document: dict[str, Any] = {
            "name": metadata.name,
            "versions": list(metadata.versions),
            "platform": metadata.platform,
            "inputs": [_spec_json(spec) for spec in metadata.inputs],
            "outputs": [_spec_json(spec) for spec in metadata.outputs],
            "config": None if config is None else json_format.MessageToDict(config, preserving_proto_field_name=True),
        }
        print(json.dumps(document, indent=2))
        return 0
    print(f"model: {metadata.name}")
    print(f"versions: {', '.join(metadata.versions)}")
    print(f"platform: {metadata.platform}")
    for title, specs in (("inputs", metadata.inputs), ("outputs", metadata.outputs)):
        print(f"{title}:")
        for spec in specs:
            print(f"  {spec.name}  {spec.datatype}  {list(spec.shape)}")
    if config is None:
        print(f"config: not available ({missing})")
    else:
        print("config:")
        print(text_format.MessageToString(config, indent=2).rstrip("\n"))
    return 0


def _spec_json(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}


def run_infer(client: InferenceClient, args: argparse.Namespace) -> int:
    inputs = load_inputs(args.input)
    datatypes: dict[str, str] = {}
    if args.random:
        metadata = client.model_metadata(args.model, args.model_version)
        generated, skipped = random_inputs(
            metadata, args.batch_size, parse_dims(args.dim), np.random.default_rng(args.seed), exclude=inputs
        )
        for name in skipped:
            print(f"note: BYTES input {name!r} cannot be generated; pass it with --input", file=sys.stderr)
        inputs.update(generated)
        datatypes = {spec.name: "BF16" for spec in metadata.inputs if spec.datatype == "BF16" and spec.name in inputs}
    elif args.dim:
        raise UsageError("--dim needs --random")
    start = time.perf_counter()
    outputs = client.infer(
        args.model,
        inputs,
        args.output,
        version=args.model_version,
        raw=not args.typed,
        datatypes=datatypes or None,
    )
    latency_ms = (time.perf_counter() - start) * 1000.0
    if args.save:
        save_outputs(outputs, Path(args.save))
    if args.json:
        print(json.dumps(_outputs_json(args.model, outputs, latency_ms), default=_json_default))
        return 0
    with np.printoptions(**PRINT_OPTIONS):
        for name, array in outputs.items():
            print(f"{name}  dtype={array.dtype} ({datatype_of(array)})  shape={array.shape}")
            print(np.array2string(array, separator=", "))
    print(f"latency: {latency_ms:.2f} ms")
    return 0


def load_inputs(specs: Sequence[str]) -> dict[str, np.ndarray]:
    """``NAME=FILE.npy`` arguments as arrays (strings as ``S``/``U`` arrays; pickles refused)."""
    inputs: dict[str, np.ndarray] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--input {spec!r}: expected NAME=FILE.npy")
        inputs[name] = np.load(path, allow_pickle=False)
    return inputs


def parse_dims(specs: Sequence[str]) -> dict[str, dict[int, int]]:
    """``NAME=AXIS:SIZE`` arguments as {name: {axis: size}}."""
    dims: dict[str, dict[int, int]] = {}
    for spec in specs:
        name, _, rest = spec.partition("=")
        axis, _, size = rest.partition(":")
        try:
            axis_number, size_number = int(axis), int(size)
        except ValueError:
            raise UsageError(f"--dim {spec!r}: expected NAME=AXIS:SIZE") from None
        if not name or axis_number < 0 or size_number < 0:
            raise UsageError(f"--dim {spec!r}: expected NAME=AXIS:SIZE with AXIS and SIZE >= 0")
        dims.setdefault(name, {})[axis_number] = size_number
    return dims


def random_inputs(
    metadata: ModelMetadata,
    batch_size: int,
    dims: Mapping[str, Mapping[int, int]],
    rng: np.random.Generator,
    exclude: Collection[str] = (),
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Random inputs for every input of ``metadata`` not in ``exclude``; returns (inputs, skipped BYTES names)."""
    if batch_size < 0:
        raise UsageError("--batch-size must not be negative")
    names = {spec.name for spec in metadata.inputs}
    unknown = sorted(set(dims) - names)
    if unknown:
        raise UsageError(f"--dim names unknown inputs {unknown}; the model's inputs are {sorted(names)}")
    inputs: dict[str, np.ndarray] = {}
    skipped: list[str] = []
    for spec in metadata.inputs:
        if spec.name in exclude:
            continue
        if spec.datatype == "BYTES":
            skipped.append(spec.name)
            continue
        shape = concrete_shape(spec, batch_size, dims.get(spec.name, {}))
        inputs[spec.name] = random_array(spec.datatype, shape, rng)
    return inputs, skipped


def concrete_shape(spec: TensorSpec, batch_size: int, dims: Mapping[int, int]) -> tuple[int, ...]:
    """Fill the -1 axes of a spec: axis 0 is the batch, others take ``dims`` or DEFAULT_DIM."""
    for axis in dims:
        if axis >= len(spec.shape) or spec.shape[axis] != -1:
            raise UsageError(f"--dim {spec.name}={axis}:...: axis {axis} of {list(spec.shape)} is not variable")
    shape = []
    for axis, size in enumerate(spec.shape):
        if size >= 0:
            shape.append(size)
        elif axis in dims:
            shape.append(dims[axis])
        else:
            shape.append(batch_size if axis == 0 else DEFAULT_DIM)
    return tuple(shape)


def save_outputs(outputs: Mapping[str, np.ndarray], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in outputs.items():
        # Output names may contain path separators (e.g. TF's "scope/out"): keep files inside DIR.
        np.save(directory / (_UNSAFE_IN_FILENAME.sub("_", name) + ".npy"), array)


def _outputs_json(model: str, outputs: Mapping[str, np.ndarray], latency_ms: float) -> dict[str, Any]:
    return {
        "model": model,
        "latency_ms": round(latency_ms, 3),
        "outputs": {
            name: {
                "datatype": datatype_of(array),
                "dtype": str(array.dtype),
                "shape": list(array.shape),
                "data": array.tolist(),
            }
            for name, array in outputs.items()
        },
    }


def _json_default(value: object) -> object:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")

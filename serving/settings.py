"""One typed settings object per server, from command-line flags and env vars.

Every field is a flag (``--max-batch-size``) and an environment variable with the
server's prefix (``TORCH_SERVER_MAX_BATCH_SIZE``, ``TF_SERVER_MAX_BATCH_SIZE``).
Precedence: flag > environment > default. The field docstrings are the help text.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _doc(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class BatchingSettings:
    """The dynamic batcher's policy; identical for every framework."""

    max_batch_size: int = _doc("Most rows in one forward pass; also the most rows one request may carry.", default=32)
    dynamic_batching: bool = _doc(
        "Merge concurrent requests into one forward pass (off: one request per pass).", default=True
    )
    max_queue_delay_us: int = _doc(
        "How long the oldest queued request may wait for more to join its batch (µs); 0: natural batching, a free "
        "model takes whatever is queued at once.",
        default=0,
    )
    max_queue_size: int = _doc(
        "Most requests waiting per model; beyond it requests get RESOURCE_EXHAUSTED.", default=1024
    )
    preferred_batch_sizes: list[int] = _doc(
        "Comma-separated batch sizes to pad each batch up to (buckets for compiled graphs); empty: no padding.",
        default_factory=list,
    )
    instances: int = _doc("Model instances: forward passes that may run at once per model.", default=1)


@dataclass
class ServerSettings(BatchingSettings):
    """Everything a server needs to start, in one object."""

    model: list[str] = _doc("Comma-separated zoo models to serve.", default_factory=lambda: ["mlp"])
    model_arg: str = _doc(
        "Zoo model parameters as KEY=VALUE, comma-separated (e.g. image_size=224 or hidden=[512,512]).", default=""
    )
    model_dir: Path | None = _doc(
        "Model repository (<model>/<version>/); exported there on first use if missing.", default=None
    )
    host: str = _doc("Address to bind.", default="0.0.0.0")
    grpc_threads: int = _doc(
        "gRPC handler threads: the most RPCs handled at once (a request waiting for its batch holds one).",
        default=256,
    )
    port: int = _doc("gRPC port; 0 picks a free one (printed and written to --port-file).", default=8001)
    metrics_port: int = _doc("Prometheus metrics HTTP port; 0 picks a free one, -1 disables.", default=8002)
    port_file: Path | None = _doc("Write the bound gRPC and metrics ports here as JSON once SERVING.", default=None)
    device: str = _doc("auto, cpu, cuda or cuda:N.", default="auto")
    threads: int | None = _doc("Intra-op threads of the framework (default: the framework's own choice).", default=None)
    warmup: bool = _doc("Run warm-up passes at each batch size bucket before reporting SERVING.", default=True)
    grace_period_s: float = _doc("On SIGTERM/SIGINT, how long in-flight requests may take to finish.", default=10.0)
    max_message_bytes: int = _doc("Largest gRPC message accepted or sent.", default=64 * 1024 * 1024)
    auth_token: str | None = _doc("When set, every RPC but health needs 'authorization: Bearer <token>'.", default=None)
    tls_cert: Path | None = _doc("PEM certificate chain; with --tls-key, serve TLS.", default=None)
    tls_key: Path | None = _doc("PEM private key for --tls-cert.", default=None)
    log_level: str = _doc("Python logging level.", default="INFO")

    def batching(self) -> BatchingSettings:
        return BatchingSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(BatchingSettings)})

    def model_params(self) -> dict[str, str]:
        return parse_model_args(self.model_arg)

    def validate(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if self.max_queue_size < 1 or self.instances < 1 or self.max_queue_delay_us < 0:
            raise ValueError("max_queue_size and instances must be >= 1, max_queue_delay_us >= 0")
        if self.grpc_threads < 2:
            raise ValueError("grpc_threads must be >= 2")
        if any(size < 1 or size > self.max_batch_size for size in self.preferred_batch_sizes):
            raise ValueError("preferred_batch_sizes must lie in 1..max_batch_size")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")


def parse_model_args(text: str) -> dict[str, str]:
    """``"a=1,b=[2,3]"`` -> ``{"a": "1", "b": "[2,3]"}`` (commas inside brackets kept)."""
    params = {}
    for item in re.split(r",(?![^\[]*\])", text):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"model argument {item!r} is not KEY=VALUE")
        params[key.strip()] = value.strip()
    return params


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(inner type, optional?) of an annotation such as ``int | None``."""
    hint = typing.get_origin(annotation)
    if hint in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def _converter(annotation: Any) -> Any:
    base, optional = _base_type(annotation)
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base)
        return lambda text: [item(part.strip()) for part in text.split(",") if part.strip()]
    if base is bool:
        return lambda text: text.strip().lower() in ("1", "true", "yes", "on")
    if optional:
        return lambda text: None if text.strip().lower() in ("", "none") else base(text)
    return base


def add_arguments(parser: argparse.ArgumentParser, cls: type = ServerSettings) -> None:
    """Add one flag per settings field (defaults are resolved later, with env vars)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        base, _ = _base_type(hints[f.name])
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=_converter(hints[f.name]), default=None, help=f.metadata["help"])


def from_namespace(
    namespace: argparse.Namespace,
    env_prefix: str,
    environ: typing.Mapping[str, str] | None = None,
    defaults: typing.Mapping[str, Any] | None = None,
) -> ServerSettings:
    """Resolve flag > environment (``<PREFIX><FIELD>``) > ``defaults`` > field default."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(ServerSettings)
    values: dict[str, Any] = dict(defaults or {})
    for f in dataclasses.fields(ServerSettings):
        given = getattr(namespace, f.name, None)
        if given is not None:
            values[f.name] = given
            continue
        env_name = env_prefix + f.name.upper()
        if env_name in environ:
            try:
                values[f.name] = _converter(hints[f.name])(environ[env_name])
            except ValueError as err:
                raise ValueError(f"environment variable {env_name}: {err}") from None
    settings = ServerSettings(**values)
    settings.validate()
    return settings

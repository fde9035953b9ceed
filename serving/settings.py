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
import ssl
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: ``--precision`` values: the dtype of weights and computation (tf32: fp32 with TF32 CUDA math).
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
#: ``--compile`` values.
COMPILE_MODES = ("off", "on")


def _doc(text: str, aliases: tuple[str, ...] = (), **kwargs: Any) -> Any:
    return field(metadata={"help": text, "aliases": aliases}, **kwargs)


#: ``--workers auto`` starts one worker per usable CPU, at most this many (each holds a model copy).
AUTO_WORKERS_MAX = 8


class StartupError(Exception):
    """The server cannot start as configured; the message is one line naming the option."""


def worker_count(text: str) -> int:
    """``--workers``: a count, or ``auto`` (the CPUs this process may use, at most AUTO_WORKERS_MAX)."""
    if text.strip().lower() == "auto":
        return max(1, min(len(os.sched_getaffinity(0)), AUTO_WORKERS_MAX))
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"--workers {text}: must be auto or a count >= 1")
    return count


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
    max_queue_wait_ms: float = _doc(
        "Refuse a request at once (RESOURCE_EXHAUSTED) when its estimated wait for a batch exceeds this many ms "
        "(0: no bound of its own); one that would outlive its deadline is always refused.",
        default=0.0,
    )
    preferred_batch_sizes: list[int] = _doc(
        "Comma-separated batch sizes to pad each batch up to (buckets for compiled graphs); empty: no padding.",
        default_factory=list,
    )
    instances: int = _doc("Model instances: forward passes that may run at once per model.", default=1)


@dataclass
class ServerSettings(BatchingSettings):
    """Everything a server needs to start, in one object."""

    model: list[str] = _doc(
        "Comma-separated models to serve: folders of the model repository (the user's own artifacts, or zoo "
        "exports) or zoo models (mlp, resnet, encoder: exported there on first use); empty: every model folder of "
        "--model-repository, or with no repository given the zoo's mlp.",
        default_factory=list,
    )
    model_arg: str = _doc(
        "Zoo model parameters as KEY=VALUE, comma-separated (e.g. image_size=224 or hidden=[512,512]).", default=""
    )
    model_dir: Path | None = _doc(
        "Model repository, <model>/<version>/ as TF Serving and Triton lay it out (also --model-repository): a "
        "SavedModel (tf_server) or a model.pt2 of torch.export (torch_server) per version, an optional "
        "<model>/config.json; zoo models are exported there on first use (default: a cache in ~/.cache).",
        default=None,
        aliases=("--model-repository",),
    )
    repository_poll_s: float = _doc(
        "Look for new versions of the repository's models every this many seconds (load, warm up, then switch "
        "to them); 0: never.",
        default=2.0,
    )
    host: str = _doc("Address to bind.", default="0.0.0.0")
    workers: str = _doc(
        "Server processes behind the one port (SO_REUSEPORT), each with its own model copy; auto: one per usable "
        "CPU, at most 8. The kernel spreads connections, not requests: a client needs several channels to spread.",
        default="1",
    )
    grpc_threads: int = _doc(
        "gRPC handler threads, and the most RPCs in flight (a request waiting for its batch holds one): a "
        "last-resort bound, beyond which grpcio refuses calls (RESOURCE_EXHAUSTED) before any work (0: room for a "
        "full queue, --max-queue-size, plus a full batch per instance, plus 16).",
        default=0,
    )
    port: int = _doc("gRPC port; 0 picks a free one (printed and written to --port-file).", default=8001)
    metrics_port: int = _doc("Prometheus metrics HTTP port; 0 picks a free one, -1 disables.", default=8002)
    port_file: Path | None = _doc("Write the bound gRPC and metrics ports here as JSON once SERVING.", default=None)
    device: str = _doc("auto, cpu, cuda or cuda:N.", default="auto")
    precision: str = _doc(
        "fp32, tf32, bf16 or fp16: the dtype of the weights and the computation (tf32: fp32 storage, TF32 CUDA "
        "matmul/convolution math). The wire contract does not change: inputs and outputs keep their datatypes.",
        default="fp32",
    )
    compile: str = _doc(
        "off or on: compile the model (torch: an AOTInductor package cached in the model repository; tensorflow: "
        "XLA); warm-up then compiles every batch shape before SERVING.",
        default="off",
    )
    threads: int | None = _doc("Intra-op threads of the framework (default: the framework's own choice).", default=None)
    warmup: bool = _doc("Run warm-up passes at each batch size bucket before reporting SERVING.", default=True)
    grace_period_s: float = _doc("On SIGTERM/SIGINT, how long in-flight requests may take to finish.", default=10.0)
    max_message_bytes: int = _doc("Largest gRPC message accepted or sent.", default=64 * 1024 * 1024)
    auth_token: str | None = _doc(
        "When set, every inference-service RPC (ServerLive/ServerReady included) and reflection need "
        "'authorization: Bearer <token>'; only grpc.health.v1 stays open (prefer the environment variable or "
        "--auth-token-file: a flag shows in the process list).",
        default=None,
    )
    auth_token_file: Path | None = _doc("Read the bearer token from this file (its first line).", default=None)
    tls_cert: Path | None = _doc("PEM certificate chain; with --tls-key, serve TLS.", default=None)
    tls_key: Path | None = _doc("PEM private key for --tls-cert.", default=None)
    tls_client_ca: Path | None = _doc(
        "PEM CA certificates; with TLS on, clients must present a certificate they signed (mutual TLS).", default=None
    )
    log_level: str = _doc("Python logging level.", default="INFO")

    def batching(self) -> BatchingSettings:
        return BatchingSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(BatchingSettings)})

    def model_params(self) -> dict[str, str]:
        return parse_model_args(self.model_arg)

    def validate(self) -> None:
        """Raise ValueError with one line naming the flag when a value cannot work."""
        if self.max_batch_size < 1:
            raise ValueError(f"--max-batch-size {self.max_batch_size}: must be >= 1")
        for name in ("max_queue_size", "instances"):
            if getattr(self, name) < 1:
                raise ValueError(f"{_flag(name)} {getattr(self, name)}: must be >= 1")
        if self.max_queue_delay_us < 0:
            raise ValueError(f"--max-queue-delay-us {self.max_queue_delay_us}: must be >= 0")
        if self.max_queue_wait_ms < 0:
            raise ValueError(f"--max-queue-wait-ms {self.max_queue_wait_ms}: must be >= 0")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision {self.precision}: must be one of {', '.join(PRECISIONS)}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"--compile {self.compile}: must be one of {', '.join(COMPILE_MODES)}")
        if self.precision == "tf32" and self.device.strip().lower() == "cpu":
            raise ValueError("--precision tf32: it changes only CUDA matmul/convolution math; --device cpu has none")
        worker_count(self.workers)  # raises ValueError naming --workers
        if self.grpc_threads and self.grpc_threads < 2:
            raise ValueError(f"--grpc-threads {self.grpc_threads}: must be 0 (auto) or >= 2")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads {self.threads}: must be >= 1")
        if any(size < 1 or size > self.max_batch_size for size in self.preferred_batch_sizes):
            raise ValueError(f"--preferred-batch-sizes {self.preferred_batch_sizes}: must lie in 1..--max-batch-size")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port {self.port}: must be a port number in 0..65535 (0: any free port)")
        if not -1 <= self.metrics_port <= 65535:
            raise ValueError(f"--metrics-port {self.metrics_port}: must be in 0..65535, or -1 to disable")
        if self.grace_period_s < 0:
            raise ValueError(f"--grace-period-s {self.grace_period_s}: must be >= 0")
        if self.repository_poll_s < 0:
            raise ValueError(f"--repository-poll-s {self.repository_poll_s}: must be >= 0 (0: never)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
        if self.auth_token is not None and self.auth_token_file is not None:
            raise ValueError("--auth-token and --auth-token-file: give one, not both")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file"):
            path = getattr(self, name)
            if path is not None and not os.access(path, os.R_OK):
                reason = "no such file" if not Path(path).exists() else "not readable"
                raise ValueError(f"{_flag(name)} {path}: {reason}")
        if self.tls_cert is not None and self.tls_key is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            try:
                context.load_cert_chain(self.tls_cert, self.tls_key)
            except (ssl.SSLError, OSError) as err:
                pair = f"--tls-cert {self.tls_cert} / --tls-key {self.tls_key}"
                raise ValueError(f"{pair}: not a usable PEM certificate and key ({err})") from None
            if self.tls_client_ca is not None:
                try:
                    context.load_verify_locations(cafile=self.tls_client_ca)
                except (ssl.SSLError, OSError) as err:
                    raise ValueError(f"--tls-client-ca {self.tls_client_ca}: not PEM CA certificates ({err})") from None
        if self.auth_token_file is not None:
            lines = Path(self.auth_token_file).read_text().splitlines()
            if not lines or not lines[0].strip():
                raise ValueError(f"--auth-token-file {self.auth_token_file}: empty")
        if self.auth_token is not None and not self.auth_token.strip():
            raise ValueError("--auth-token: empty")

    def handler_threads(self) -> int:
        """gRPC handler threads (and RPCs in flight): enough for a full queue
        (``max_queue_size``) to wait while every instance runs a full batch, and for health and
        metadata calls beside them. Threads start as calls need them, not all at once."""
        return self.grpc_threads or self.max_queue_size + self.max_batch_size * self.instances + HANDLER_RESERVE

    def token(self) -> str | None:
        """The bearer token every RPC but grpc.health.v1 must carry (None: no authentication)."""
        if self.auth_token_file is not None:
            return Path(self.auth_token_file).read_text().splitlines()[0].strip()
        return self.auth_token

    def __repr__(self) -> str:
        # Settings may be logged or shown in a traceback: never with the token.
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if shown["auth_token"] is not None:
            shown["auth_token"] = "<hidden>"
        return f"{type(self).__name__}({', '.join(f'{key}={value!r}' for key, value in shown.items())})"


#: Handler threads kept, beyond the queued requests, for health, metadata and statistics calls.
HANDLER_RESERVE = 16


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


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
        flags = ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ())]
        base, _ = _base_type(hints[f.name])
        if base is bool:
            parser.add_argument(
                *flags, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=f.metadata["help"]
            )
        else:
            parser.add_argument(
                *flags, dest=f.name, type=_converter(hints[f.name]), default=None, help=f.metadata["help"]
            )


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
        names = [f.name, *(alias.removeprefix("--").replace("-", "_") for alias in f.metadata.get("aliases", ()))]
        env_name = next((env_prefix + name.upper() for name in names if env_prefix + name.upper() in environ), "")
        if env_name:
            try:
                values[f.name] = _converter(hints[f.name])(environ[env_name])
            except ValueError as err:
                raise ValueError(f"environment variable {env_name}: {err}") from None
    settings = ServerSettings(**values)
    settings.validate()
    return settings

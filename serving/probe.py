"""A container health probe: one ``grpc.health.v1.Health/Check``, exit 0 when SERVING.

    python -m serving.probe --target localhost:8001 [--service NAME] [--tls-ca PEM ...]

The standard health service stays open when the server requires a bearer token, so the
probe needs none; with TLS it needs the trust (``--tls-ca``) and, where the certificate
does not name the target's host, ``--tls-server-name``; with mutual TLS a client
certificate. It imports grpc and nothing heavier (no numpy, no framework): a compose
healthcheck runs it every few seconds on the server's own cores, so it must cost little.
Exit status: 0 SERVING, 1 anything else (NOT_SERVING while loading or draining, or no
answer), 2 bad options. One line on stdout says which.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serving.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="localhost:8001", help="HOST:PORT (%(default)s)")
    parser.add_argument("--service", default="", help="health service name (default: the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (%(default)s)")
    parser.add_argument("--tls-ca", type=Path, help="PEM roots to trust; turns TLS on")
    parser.add_argument("--tls-server-name", help="check the certificate against this name, not the target's host")
    parser.add_argument("--tls-client-cert", type=Path, help="PEM client certificate (mutual TLS)")
    parser.add_argument("--tls-client-key", type=Path, help="PEM key of --tls-client-cert")
    return parser


def channel_for(args: argparse.Namespace) -> grpc.Channel:
    """The channel the options ask for (``OSError`` for a file that cannot be read)."""
    if args.tls_ca is None:
        return grpc.insecure_channel(args.target)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=args.tls_ca.read_bytes(),
        private_key=args.tls_client_key.read_bytes() if args.tls_client_key else None,
        certificate_chain=args.tls_client_cert.read_bytes() if args.tls_client_cert else None,
    )
    options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
    return grpc.secure_channel(args.target, credentials, options=options)


def check(args: argparse.Namespace) -> str:
    """The server's health status name, or ``no answer: <CODE>``."""
    with channel_for(args) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as err:
            code = err.code() if isinstance(err, grpc.Call) else None
            return f"no answer: {code.name if code else 'UNKNOWN'}"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (args.tls_client_cert is None) != (args.tls_client_key is None):
        print("error: --tls-client-cert and --tls-client-key go together", file=sys.stderr)
        return 2
    if args.tls_ca is None and (args.tls_client_cert or args.tls_server_name):
        print("error: --tls-client-cert and --tls-server-name need --tls-ca (TLS)", file=sys.stderr)
        return 2
    try:
        status = check(args)
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.target}{f' ({args.service})' if args.service else ''}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())

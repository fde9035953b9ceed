"""How the load test's channels reach a server behind TLS, mutual TLS or a bearer token.

The locustfile's options (each also ``LOADTEST_<OPTION>``):

- ``--tls-ca PEM``: trust these root certificates; turns TLS on;
- ``--tls-client-cert PEM`` and ``--tls-client-key PEM``: present this certificate (mutual
  TLS; both or neither; TLS with the system roots unless ``--tls-ca``);
- ``--tls-server-name NAME``: check the server's certificate against NAME instead of the
  target's host (``grpc.ssl_target_name_override``: a certificate for ``localhost`` while
  the target is ``127.0.0.1``);
- ``--auth-token-file FILE``: send its first line as ``authorization: Bearer <token>`` on
  every call (``LOADTEST_AUTH_TOKEN`` may hold the token itself instead; no flag takes it,
  so that it shows neither in the process list nor in the web UI).

Files are read once, when the options are checked (``ChannelSecurity.from_options``),
which names the first bad one in a one-line ``ValueError``. Free of gevent, like
``loadtest.workload``. The credentials and metadata come from the client's own helpers.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from client import auth_metadata, channel_credentials
from client.targets import balancing_options
from loadtest.workload import CHANNEL_OPTIONS

#: Environment variable that may hold the bearer token itself (instead of --auth-token-file).
TOKEN_ENV = "LOADTEST_AUTH_TOKEN"


@dataclass(frozen=True)
class ChannelSecurity:
    """TLS material and bearer token of the load test's channels (all empty: plaintext, no token)."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = field(default=None, repr=False)
    server_name: str = ""
    token: str | None = field(default=None, repr=False)

    @property
    def tls(self) -> bool:
        return self.root_certificates is not None or self.certificate_chain is not None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Sent with every call: the bearer token, if any."""
        return auth_metadata(self.token)

    def channel_options(self) -> list[tuple[str, Any]]:
        if self.server_name:
            return [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", self.server_name)]
        return list(CHANNEL_OPTIONS)

    def open_channel(self, target: str) -> grpc.Channel:
        """A channel to ``target`` with these credentials (not yet connected); a resolver target's
        (``dns:///NAME:PORT``) sends round-robin over every address (``client.targets``)."""
        options = [*self.channel_options(), *balancing_options(target)]
        if self.tls:
            credentials = channel_credentials(self.root_certificates, self.certificate_chain, self.private_key)
            return grpc.secure_channel(target, credentials, options=options)
        return grpc.insecure_channel(target, options=options)

    @classmethod
    def from_options(cls, options: Any, environ: Mapping[str, str] = os.environ) -> ChannelSecurity:
        """From Locust's parsed options (missing ones: not set); ``ValueError`` names a bad one."""

        def path(name: str) -> Path | None:
            value = getattr(options, name, None)
            if not value:
                return None
            flag = "--" + name.replace("_", "-")
            if not os.access(value, os.R_OK):
                raise ValueError(f"{flag} {value}: {'not readable' if Path(value).exists() else 'no such file'}")
            return Path(value)

        ca, cert, key = path("tls_ca"), path("tls_client_cert"), path("tls_client_key")
        token_file = path("auth_token_file")
        server_name = getattr(options, "tls_server_name", None) or ""
        if key is not None and cert is None:
            raise ValueError("--tls-client-key needs --tls-client-cert (mutual TLS presents both)")
        if cert is not None and key is None:
            raise ValueError("--tls-client-cert needs --tls-client-key (mutual TLS presents both)")
        if server_name and ca is None and cert is None:
            raise ValueError("--tls-server-name needs TLS: give --tls-ca (or a client certificate)")
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if ca is not None:
            try:
                context.load_verify_locations(cafile=ca)
            except (ssl.SSLError, OSError) as err:
                raise ValueError(f"--tls-ca {ca}: not PEM certificates ({err})") from None
        if cert is not None and key is not None:
            try:
                context.load_cert_chain(cert, key)
            except (ssl.SSLError, OSError) as err:
                pair = f"--tls-client-cert {cert} / --tls-client-key {key}"
                raise ValueError(f"{pair}: not a usable PEM certificate and key ({err})") from None
        token = environ.get(TOKEN_ENV) or None
        if token_file is not None:
            if token is not None:
                raise ValueError(f"--auth-token-file and {TOKEN_ENV}: give one, not both")
            lines = token_file.read_text().splitlines()
            token = lines[0].strip() if lines else ""
            if not token:
                raise ValueError(f"--auth-token-file {token_file}: empty")
        elif token is not None:
            token = token.strip()
            if not token:
                raise ValueError(f"{TOKEN_ENV}: empty")
        if token is not None and not (token.isascii() and token.isprintable()):
            raise ValueError("the bearer token must be one line of printable ASCII (gRPC metadata)")
        return cls(
            root_certificates=ca.read_bytes() if ca else None,
            certificate_chain=cert.read_bytes() if cert else None,
            private_key=key.read_bytes() if key else None,
            server_name=server_name,
            token=token,
        )


NO_SECURITY = ChannelSecurity()

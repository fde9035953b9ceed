"""Test certificates, made with openssl at test time: a CA, a server certificate for
127.0.0.1 and localhost, a client certificate from the CA and a self-signed stranger.

The session-wide ``pki`` fixture (tests/integration/conftest.py) makes one set for all tests.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)


class Pki:
    """A test CA, a server certificate for 127.0.0.1 and client certificates (one from the CA, one not)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca_key, self.ca = directory / "ca.key", directory / "ca.pem"
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
                 "-keyout", str(self.ca_key), "-out", str(self.ca))  # fmt: skip
        self.server_key, self.server_cert = self._signed("server", "subjectAltName=IP:127.0.0.1,DNS:localhost")
        self.client_key, self.client_cert = self._signed("client", "extendedKeyUsage=clientAuth")
        self.stranger_key, self.stranger_cert = directory / "stranger.key", directory / "stranger.pem"
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=stranger",
                 "-keyout", str(self.stranger_key), "-out", str(self.stranger_cert))  # fmt: skip

    def _signed(self, name: str, extension: str) -> tuple[Path, Path]:
        key, request, cert, ext = (self.dir / f"{name}{suffix}" for suffix in (".key", ".csr", ".pem", ".ext"))
        ext.write_text(extension + "\n")
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(request)
        )
        _openssl("x509", "-req", "-in", str(request), "-CA", str(self.ca), "-CAkey", str(self.ca_key),
                 "-CAcreateserial", "-days", "1", "-extfile", str(ext), "-out", str(cert))  # fmt: skip
        return key, cert

    def channel(self, target: str, client: tuple[Path, Path] | None = None) -> grpc.Channel:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=client[0].read_bytes() if client else None,
            certificate_chain=client[1].read_bytes() if client else None,
        )
        return grpc.secure_channel(target, credentials)

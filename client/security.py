"""How a channel reaches a server behind TLS, mutual TLS or a bearer token: public helpers.

The clients build their channels and call metadata with these; code that opens channels of
its own (the load test's Locust users) uses them too, so that every caller sends the same
credentials and the same ``authorization`` header.
"""

from __future__ import annotations

import grpc


def channel_credentials(
    root_certificates: bytes | None = None, certificate_chain: bytes | None = None, private_key: bytes | None = None
) -> grpc.ChannelCredentials:
    """TLS credentials: trust ``root_certificates`` (PEM; the system roots when None) and, for
    mutual TLS, present ``certificate_chain`` with its ``private_key`` (PEM, both or neither)."""
    if (certificate_chain is None) != (private_key is None):
        raise ValueError("a client certificate and its private key go together")
    return grpc.ssl_channel_credentials(
        root_certificates=root_certificates, private_key=private_key, certificate_chain=certificate_chain
    )


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries ``token`` (``authorization: Bearer <token>``); none without one."""
    return (("authorization", f"Bearer {token}"),) if token else ()

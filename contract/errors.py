"""The protocol's error vocabulary: each error names the gRPC status code it travels as.

    ServingError                 base; carries a one-line, client-safe message
    ├── InvalidInput             INVALID_ARGUMENT   shape, datatype, byte length,
    │                                               missing/unknown input or output,
    │                                               batch too large, malformed request
    ├── ModelNotFound            NOT_FOUND          unknown model or version
    ├── Unavailable              UNAVAILABLE        not ready yet, or draining
    ├── ResourceExhausted        RESOURCE_EXHAUSTED queue full
    ├── DeadlineExceeded         DEADLINE_EXCEEDED  expired while queued: never computed
    ├── Cancelled                CANCELLED          the client went away while queued
    └── Unauthenticated          UNAUTHENTICATED    auth on, token bad or missing

Any other exception is a bug: it is logged server-side with the request id and the
client sees INTERNAL with that id, never the exception text or a stack trace.
"""

from __future__ import annotations

import grpc


class ServingError(Exception):
    """Base of the expected, client-visible errors."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        # Status details travel in a header: keep them to one short line.
        self.message = " ".join(message.split())[:1000]


class InvalidInput(ServingError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(ServingError):
    code = grpc.StatusCode.NOT_FOUND


class Unavailable(ServingError):
    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(ServingError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ServingError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ServingError):
    code = grpc.StatusCode.CANCELLED


class Unauthenticated(ServingError):
    code = grpc.StatusCode.UNAUTHENTICATED

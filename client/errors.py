"""The client's exceptions: one per gRPC status code, mapped in one place.

    InferenceServerError            base; .code (grpc.StatusCode), .message, .details
    ├── InvalidArgumentError        INVALID_ARGUMENT    bad shape, datatype, byte length, input name
    ├── NotFoundError               NOT_FOUND           unknown model or version
    ├── UnavailableError            UNAVAILABLE         unreachable, not ready, or draining
    ├── ResourceExhaustedError      RESOURCE_EXHAUSTED  queue full, message too large
    ├── DeadlineExceededError       DEADLINE_EXCEEDED   the call's deadline passed
    ├── UnauthenticatedError        UNAUTHENTICATED     token missing or wrong
    ├── PermissionDeniedError       PERMISSION_DENIED
    ├── CancelledError              CANCELLED           the call was cancelled
    ├── UnimplementedError          UNIMPLEMENTED       the server lacks this RPC
    ├── InternalError               INTERNAL            a server bug (its log has the request id)
    └── InvalidResponseError        UNKNOWN             the reply could not be decoded

Any other status code raises the base class with that code. ``message`` is the
server's status message (one line); ``details`` is gRPC's debug string when the
transport supplies one (peer, file, line of the failure), else None.

Streaming replies carry errors as text (``ModelStreamInferResponse.error_message``);
``from_stream_error`` reads a leading status-code name (``"NOT_FOUND: no model 'x'"``)
into its class and falls back to UNKNOWN for free text.
"""

from __future__ import annotations

import re

import grpc

__all__ = [
    "CancelledError",
    "DeadlineExceededError",
    "InferenceServerError",
    "InternalError",
    "InvalidArgumentError",
    "InvalidResponseError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "error_for",
    "from_rpc_error",
    "from_stream_error",
]


class InferenceServerError(Exception):
    """A call failed: the server (or the transport) answered with a non-OK status."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None, details: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.details = details

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidArgumentError(InferenceServerError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(InferenceServerError):
    code = grpc.StatusCode.NOT_FOUND


class UnavailableError(InferenceServerError):
    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhaustedError(InferenceServerError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceededError(InferenceServerError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnauthenticatedError(InferenceServerError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(InferenceServerError):
    code = grpc.StatusCode.PERMISSION_DENIED


class CancelledError(InferenceServerError):
    code = grpc.StatusCode.CANCELLED


class UnimplementedError(InferenceServerError):
    code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(InferenceServerError):
    code = grpc.StatusCode.INTERNAL


class InvalidResponseError(InferenceServerError):
    """The server answered OK but its reply does not decode (wrong byte length, unknown datatype)."""


_BY_CODE: dict[grpc.StatusCode, type[InferenceServerError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        UnavailableError,
        ResourceExhaustedError,
        DeadlineExceededError,
        UnauthenticatedError,
        PermissionDeniedError,
        CancelledError,
        UnimplementedError,
        InternalError,
    )
}

_CODE_PREFIX = re.compile(r"^\s*([A-Z_]+)\s*:\s*(.*)$", re.DOTALL)


def error_for(code: grpc.StatusCode, message: str, details: str | None = None) -> InferenceServerError:
    """The exception for a status code: its subclass, or the base class carrying the code."""
    cls = _BY_CODE.get(code, InferenceServerError)
    return cls(message, code=code, details=details)


def from_rpc_error(err: grpc.RpcError) -> InferenceServerError:
    """Map a failed call (sync or grpc.aio) to its exception; raise it ``from err``."""
    code_of = getattr(err, "code", None)
    code = code_of() if callable(code_of) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    details_of = getattr(err, "details", None)
    message = details_of() if callable(details_of) else None
    debug_of = getattr(err, "debug_error_string", None)
    debug = debug_of() if callable(debug_of) else None
    return error_for(code, message or code.name.lower().replace("_", " "), debug or None)


def from_stream_error(error_message: str) -> InferenceServerError:
    """Map a stream response's ``error_message``: ``"CODE: text"`` gives that code, anything else UNKNOWN."""
    match = _CODE_PREFIX.match(error_message)
    if match and match.group(1) in grpc.StatusCode.__members__ and match.group(1) != "OK":
        return error_for(grpc.StatusCode[match.group(1)], match.group(2).strip())
    return error_for(grpc.StatusCode.UNKNOWN, error_message.strip())

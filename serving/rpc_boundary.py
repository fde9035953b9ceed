"""The one place where errors become gRPC status codes, and the bearer token is checked.

``guard(servicer, service, token)`` wraps every method of a gRPC service (unary or
streaming) once, when the server is built:

- an expected error (``contract.errors.ServingError``) ends the RPC with its status
  code and one-line message;
- any other exception is a bug: logged with the request id, answered INTERNAL with
  that id and nothing else (no exception text, no stack trace);
- with a token set, an RPC without ``authorization: Bearer <token>`` ends
  UNAUTHENTICATED before the method runs (health checks are not guarded: they stay open).
"""

from __future__ import annotations

import functools
import hmac
import logging
import uuid
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any, NoReturn

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from contract.errors import ServingError, Unauthenticated

log = logging.getLogger(__name__)


def guard(servicer: object, service: ServiceDescriptor, token: str | None = None) -> SimpleNamespace:
    """An object with ``servicer``'s methods of ``service``, each guarded (see the module docstring)."""
    expected = None if token is None else f"Bearer {token}".encode()
    methods: dict[str, Callable[..., Any]] = {}
    for method in service.methods:
        implementation = getattr(servicer, method.name)
        if method.server_streaming:
            methods[method.name] = _streaming(implementation, expected)
        else:
            methods[method.name] = _unary(implementation, expected)
    return SimpleNamespace(**methods)


def _unary(method: Callable[[Any, grpc.ServicerContext], Any], expected: bytes | None) -> Callable[..., Any]:
    @functools.wraps(method)
    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            if expected is not None:
                _authenticate(context, expected)
            return method(request, context)
        except Exception as err:
            _abort(context, err, request, method.__name__)

    return unary


def _streaming(
    method: Callable[[Any, grpc.ServicerContext], Iterator[Any]], expected: bytes | None
) -> Callable[..., Iterator[Any]]:
    @functools.wraps(method)
    def streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            if expected is not None:
                _authenticate(context, expected)
            yield from method(request, context)
        except Exception as err:
            _abort(context, err, None, method.__name__)

    return streaming


def _authenticate(context: grpc.ServicerContext, expected: bytes) -> None:
    given: str | bytes = ""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            given = value
            break
    given_bytes = given.encode() if isinstance(given, str) else bytes(given)
    if not hmac.compare_digest(given_bytes, expected):
        raise Unauthenticated("missing or invalid bearer token")


def status_of(error: BaseException, request: Any, method: str) -> tuple[grpc.StatusCode, str]:
    """The status code and one-line message that ``error`` travels as; a bug (anything but
    a ServingError) is logged here with the request's id, which is all the client sees."""
    if isinstance(error, ServingError):
        return error.code, error.message
    request_id = getattr(request, "id", "") or uuid.uuid4().hex[:12]
    log.error("internal error in %s (request id %s)", method, request_id, exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error (request id {request_id}); see the server log"


def _abort(context: grpc.ServicerContext, error: Exception, request: Any, method: str) -> NoReturn:
    context.abort(*status_of(error, request, method))

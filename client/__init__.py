"""Client library for the Open Inference Protocol servers: numpy in, numpy out.

    from client import InferenceClient
    with InferenceClient("localhost:8001", timeout=5.0) as c:
        outputs = c.infer("mlp", {"input": batch})

``AsyncInferenceClient`` offers the same API as coroutines (grpc.aio). Every call has a
deadline (the client's ``timeout`` by default); UNAVAILABLE is retried with backoff when
that cannot run a call twice (``RetryPolicy``). Every failure raises an
``InferenceServerError`` subclass chosen by the gRPC status code (see ``client.errors``);
a server that cannot be reached raises ``UnavailableError`` naming the target.
``channel_credentials`` and ``auth_metadata`` (``client.security``) give channels opened
elsewhere the clients' TLS credentials and bearer-token metadata.
``client.metrics`` reads a server's Prometheus metrics endpoint (one model's series).
``python -m client --help`` is the command-line interface.
"""

from client._calls import ModelMetadata, ServerMetadata
from client._retry import RetryPolicy
from client.aio import AsyncInferenceClient
from client.errors import (
    CancelledError,
    DeadlineExceededError,
    InferenceServerError,
    InternalError,
    InvalidArgumentError,
    InvalidResponseError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    from_rpc_error,
    from_stream_error,
)
from client.security import auth_metadata, channel_credentials
from client.sync import InferenceClient
from contract.datatypes import TensorSpec

__all__ = [
    "AsyncInferenceClient",
    "CancelledError",
    "DeadlineExceededError",
    "InferenceClient",
    "InferenceServerError",
    "InternalError",
    "InvalidArgumentError",
    "InvalidResponseError",
    "ModelMetadata",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "RetryPolicy",
    "ServerMetadata",
    "TensorSpec",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "auth_metadata",
    "channel_credentials",
    "from_rpc_error",
    "from_stream_error",
]

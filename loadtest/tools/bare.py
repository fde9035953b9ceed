"""The plumbing ceiling: a bare identity Open Inference Protocol server, no model, same grpcio.

    python -m loadtest bare --model mlp --port 0 --port-file ports.json [--mode aio|sync|refuse]

It answers ServerLive/Ready, ModelReady, ServerMetadata, ModelMetadata, ModelConfig,
ModelInfer and grpc.health.v1 for one zoo model's inputs: every output is its input,
bytes for bytes (ModelMetadata lists the inputs as outputs too), so OIP load tools
(our driver, Locust user, tritonclient, perf_analyzer) build the same requests as for
the real servers. No validation, batching, metrics or model: what a server costs
beyond this is ours. ``--mode aio`` is a ``grpc.aio`` server, ``--mode sync`` a
thread-pool ``grpc.server``; the bench measures both, in the same run as the servers.

``--mode refuse`` is the sync server refusing every ModelInfer call the way our servers
refuse overload (``serving.admission``: RESOURCE_EXHAUSTED in grpcio's polling thread, before
a handler thread, nothing read): the floor of what a refusal costs a server's CPU, which
``loadtest overload`` measures in the same run to bound the goodput a core can keep when it
must refuse the excess.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import message_factory
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer as AsyncHealthServicer

import modelzoo
from contract.datatypes import CONFIG_DATATYPES, TensorSpec
from contract.protocol import inference_pb2 as pb

MODES = ("aio", "sync")
#: ``--mode refuse``'s answer to every ModelInfer call.
REFUSAL = ("queue_full", "queue full (a bare server that refuses every request); retry later")
SERVER_NAME = "bare_identity"
SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]


class Identity:
    """The replies of an identity model over ``inputs``, whatever the transport."""

    def __init__(self, model: str, inputs: Sequence[TensorSpec]) -> None:
        self.model = model
        tensors = [
            pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape) for s in inputs
        ]
        self.metadata = pb.ModelMetadataResponse(
            name=model, versions=["1"], platform=SERVER_NAME, inputs=tensors, outputs=tensors
        )
        datatype: Any = CONFIG_DATATYPES  # proto enum values, typed as plain ints here
        self.config = pb.ModelConfigResponse(
            config=pb.ModelConfig(
                name=model,
                platform=SERVER_NAME,
                max_batch_size=1 << 20,
                input=[
                    pb.ModelInput(name=s.name, data_type=datatype[s.datatype], dims=s.shape[1:], optional=s.optional)
                    for s in inputs
                ],
                output=[pb.ModelOutput(name=s.name, data_type=datatype[s.datatype], dims=s.shape[1:]) for s in inputs],
            )
        )

    def replies(self) -> dict[str, Callable[[Any], Any]]:
        """RPC name -> reply to its request (the RPCs not listed answer UNIMPLEMENTED)."""
        return {
            "ServerLive": lambda request: pb.ServerLiveResponse(live=True),
            "ServerReady": lambda request: pb.ServerReadyResponse(ready=True),
            "ModelReady": lambda request: pb.ModelReadyResponse(ready=True),
            "ServerMetadata": lambda request: pb.ServerMetadataResponse(name=SERVER_NAME, version="0"),
            "ModelMetadata": lambda request: self.metadata,
            "ModelConfig": lambda request: self.config,
            "ModelInfer": self.infer,
        }

    def infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        response = pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        for tensor in request.inputs:
            response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        response.raw_output_contents.extend(request.raw_input_contents)
        return response

    def handler(self, asynchronous: bool) -> grpc.GenericRpcHandler:
        """The GRPCInferenceService handler, with coroutine methods for grpc.aio."""
        methods = {}
        for name, reply in self.replies().items():
            method = SERVICE.methods_by_name[name]
            request_type = message_factory.GetMessageClass(method.input_type)
            behavior = _coroutine(reply) if asynchronous else _plain(reply)
            methods[name] = grpc.unary_unary_rpc_method_handler(
                behavior, request_deserializer=request_type.FromString, response_serializer=_serialize
            )
        return grpc.method_handlers_generic_handler(SERVICE.full_name, methods)


def _serialize(message: Any) -> bytes:
    return bytes(message.SerializeToString())


def _plain(reply: Callable[[Any], Any]) -> Callable[[Any, Any], Any]:
    return lambda request, context: reply(request)


def _coroutine(reply: Callable[[Any], Any]) -> Callable[[Any, Any], Any]:
    async def call(request: Any, context: Any) -> Any:
        return reply(request)

    return call


OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


def _write_port_file(path: Path | None, port: int) -> None:
    print(f"{SERVER_NAME} listening on port {port}", file=sys.stderr, flush=True)
    if path is not None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps({"port": port, "metrics_port": None, "ready_after_s": 0.0}))
        tmp.replace(path)


async def serve_aio(identity: Identity, host: str, port: int, port_file: Path | None) -> None:
    server = grpc.aio.server(options=OPTIONS)
    server.add_generic_rpc_handlers((identity.handler(asynchronous=True),))
    health_servicer = AsyncHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    _write_port_file(port_file, bound)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def serve_sync(
    identity: Identity, host: str, port: int, port_file: Path | None, threads: int, refuse: bool = False
) -> None:
    if refuse:
        from serving import admission

        if not admission.SUPPORTED:
            raise SystemExit("--mode refuse: this grpcio has no hook for refusing before a handler thread")
        admitting = admission.AdmittingPool(threads)
        admitting.admit(lambda deadline, arriving: REFUSAL)
        pool: futures.ThreadPoolExecutor = admitting
    else:
        pool = futures.ThreadPoolExecutor(max_workers=threads)
    server = grpc.server(pool, options=OPTIONS)
    server.add_generic_rpc_handlers((identity.handler(asynchronous=False),))
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    _write_port_file(port_file, bound)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(1.0).wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mlp", help="zoo model whose inputs it echoes (default: %(default)s)")
    parser.add_argument("--model-arg", default="", help="zoo model parameters as KEY=VALUE, comma-separated")
    parser.add_argument("--mode", choices=(*MODES, "refuse"), default="aio")
    parser.add_argument("--threads", type=int, default=16, help="sync mode: handler threads (%(default)s)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", type=Path, default=None)
    args = parser.parse_args(argv)
    from serving.settings import parse_model_args

    model = modelzoo.get(args.model, **parse_model_args(args.model_arg))
    identity = Identity(model.name, model.inputs)
    if args.mode == "aio":
        asyncio.run(serve_aio(identity, args.host, args.port, args.port_file))
    else:
        serve_sync(identity, args.host, args.port, args.port_file, args.threads, refuse=args.mode == "refuse")
    return 0


if __name__ == "__main__":
    sys.exit(main())

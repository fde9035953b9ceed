"""Build and run a server: gRPC (inference, health, reflection), metrics, shutdown.

``InferenceServer(settings, framework)`` binds its ports first (any port, 0
included, reported back), answers health NOT_SERVING while the models load and
warm up, then SERVING. ``stop()`` drains: NOT_SERVING, no new requests, in-flight
ones finish within the grace period. ``run()`` wires that to SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2
from prometheus_client import CollectorRegistry, start_http_server

import modelzoo
from serving import repository
from serving.backend import Framework
from serving.metrics import ServerMetrics, register_gpu_collector
from serving.protocol import inference_pb2 as pb
from serving.protocol import inference_pb2_grpc as pb_grpc
from serving.servicer import InferenceServicer, ModelRuntime
from serving.settings import ServerSettings

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_VERSION = "0.1.0"
HEALTH_PREFIX = "/grpc.health.v1.Health/"


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` on every RPC but health checks."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(HEALTH_PREFIX):
            return handler
        given = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        given_bytes = given.encode() if isinstance(given, str) else bytes(given)
        if hmac.compare_digest(given_bytes, self._expected):
            return handler
        return _deny(handler)


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    message = "missing or invalid bearer token"

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary)
    return grpc.unary_unary_rpc_method_handler(unary)


def _reflection_pool() -> Any:
    """Our private descriptor pool plus the health and reflection protos."""
    pool = pb.DESCRIPTOR.pool
    for module in (health_pb2, reflection_pb2):
        try:
            pool.FindFileByName(module.DESCRIPTOR.name)
        except KeyError:
            pool.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    return pool


class InferenceServer:
    """One server process: a framework's backends behind the shared core."""

    def __init__(
        self, settings: ServerSettings, framework: Framework, registry: CollectorRegistry | None = None
    ) -> None:
        self.settings = settings
        self.framework = framework
        self.registry = registry or CollectorRegistry()
        self.metrics = ServerMetrics(self.registry)
        self.servicer = InferenceServicer(framework.server_name, SERVER_VERSION)
        self.health = HealthServicer()
        self.port = 0
        self.metrics_port: int | None = None
        self.device = framework.resolve_device(settings.device)
        self.started_at = time.monotonic()
        self.ready_after_s: float | None = None
        self._server: grpc.aio.Server | None = None
        self._metrics_http: Any = None
        self._stopped = asyncio.Event()

    async def start(self) -> int:
        """Bind and start answering (NOT_SERVING until load_models finishes)."""
        settings = self.settings
        options = [
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        interceptors = [TokenAuthInterceptor(settings.auth_token)] if settings.auth_token else []
        server = grpc.aio.server(options=options, interceptors=interceptors)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            server,
            pool=_reflection_pool(),
        )
        address = f"{settings.host}:{settings.port}"
        if settings.tls_cert and settings.tls_key:
            credentials = grpc.ssl_server_credentials([(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())])
            self.port = server.add_secure_port(address, credentials)
        else:
            self.port = server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"could not bind {address}")
        await server.start()
        self._server = server
        if settings.metrics_port >= 0:
            register_gpu_collector(self.registry, self.device)
            http_server, _thread = start_http_server(settings.metrics_port, settings.host, registry=self.registry)
            self._metrics_http = http_server
            self.metrics_port = int(http_server.server_address[1])
        log.info("%s listening on %s:%d (metrics: %s)", self.framework.server_name, settings.host, self.port,
                 self.metrics_port)  # fmt: skip
        return self.port

    async def load_models(self) -> None:
        """Export if needed, load and warm up every model, then report SERVING."""
        settings = self.settings
        root = settings.model_dir or repository.default_root(self.framework)
        params = settings.model_params()
        info = self.framework.info(self.device)
        for name in settings.model:
            model = modelzoo.get(name, **params)
            version_dir = await asyncio.to_thread(repository.ensure, self.framework, model, root)
            backend = self.framework.create_backend(model, version_dir, self.device)
            await asyncio.to_thread(backend.load)
            if settings.warmup:
                await asyncio.to_thread(self._warm_up, model, backend)
            # info.extra carries the resolved device ("cpu", "cuda:0"); its description
            # (CPU model or GPU name) goes beside it rather than under the same key.
            parameters = {
                "framework_version": info.version,
                "device_name": info.device,
                "threads": str(settings.threads or "default"),
                **info.extra,
            }
            runtime = ModelRuntime(
                model, backend, settings.batching(), self.metrics.for_model(name), self.framework.name, parameters
            )
            runtime.batcher.start()
            runtime.ready = True
            self.servicer.add(runtime)
            log.info("model %s ready (%s on %s)", name, self.framework.name, info.device)
        self.ready_after_s = time.monotonic() - self.started_at
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        if settings.port_file:
            self._write_port_file(settings.port_file)
        log.info("SERVING after %.2f s", self.ready_after_s)

    def _warm_up(self, model: modelzoo.ModelDefinition, backend: Any) -> None:
        rng = np.random.default_rng(0)
        sizes = sorted({1, *self.settings.preferred_batch_sizes, self.settings.max_batch_size})
        for size in sizes:
            backend.predict(model.complete_inputs(model.example_inputs(size, rng)))

    def _write_port_file(self, path: Path) -> None:
        payload = {"port": self.port, "metrics_port": self.metrics_port, "ready_after_s": self.ready_after_s}
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(payload))
        tmp.replace(path)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new work, let in-flight requests finish."""
        if self._stopped.is_set():
            return
        grace = self.settings.grace_period_s if grace is None else grace
        self.servicer.draining = True
        await self.health.enter_graceful_shutdown()
        runtimes = list(self.servicer.models.values())
        # Health and metadata keep answering (NOT_SERVING) while queued and running
        # requests finish; new inference requests get UNAVAILABLE. Then the
        # transport stops, with what is left of the grace period for open RPCs.
        started = time.monotonic()
        drained = asyncio.gather(*(runtime.batcher.drain() for runtime in runtimes))
        try:
            await asyncio.wait_for(drained, grace)
        except TimeoutError:
            log.warning("grace period of %.1f s over with requests still queued or running", grace)
        if self._server is not None:
            await self._server.stop(max(0.0, grace - (time.monotonic() - started)))
        for runtime in runtimes:
            await runtime.batcher.close()
            runtime.backend.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self._stopped.set()
        log.info("stopped")

    async def wait_for_termination(self) -> None:
        await self._stopped.wait()


async def run(settings: ServerSettings, framework: Framework) -> int:
    """Serve until SIGTERM/SIGINT, then drain and return the exit code (0)."""
    server = InferenceServer(settings, framework)
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    await server.start()
    print(f"{framework.server_name} listening on port {server.port}", flush=True)
    loader = loop.create_task(server.load_models())
    stopper = loop.create_task(stop_requested.wait())
    done, _ = await asyncio.wait({loader, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if loader in done and loader.exception() is not None:
        log.error("model loading failed: %s", loader.exception())
        await server.stop(0)
        return 1
    await stopper
    log.info("signal received: draining for up to %.1f s", settings.grace_period_s)
    loader.cancel()
    await server.stop()
    return 0

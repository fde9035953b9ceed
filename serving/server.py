"""Build and run a server: gRPC (inference, health, reflection), metrics, shutdown.

``InferenceServer(settings, framework)`` binds its ports first (any port, 0 included,
reported back), answers health NOT_SERVING while the models load and warm up, then
SERVING. ``stop()`` drains: NOT_SERVING, no new requests, in-flight ones finish within
the grace period. ``run()`` wires that to SIGTERM/SIGINT.

The transport is grpcio's synchronous server: a pool of handler threads, each request
handled start to finish on one of them, and the model run by whichever of them finds
it free (see serving.batcher). On one core it answered the same identity requests
1.28x faster than ``grpc.aio`` (docs/benchmarks.md, ``python -m loadtest bare``).
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry, start_http_server

import modelzoo
from contract.protocol import inference_pb2 as pb
from contract.protocol import inference_pb2_grpc as pb_grpc
from modelzoo.base import ModelDefinition
from serving import admission
from serving.admission import AdmittingPool
from serving.backend import Framework
from serving.loader import ModelLoader, model_names
from serving.metrics import MetricsTable, ServerMetrics, register_gpu_collector
from serving.rpc_boundary import guard
from serving.servicer import SERVICE, InferenceServicer
from serving.settings import ServerSettings, StartupError
from serving.workers import Readiness, WorkerPlace

log = logging.getLogger(__name__)

SERVICE_NAME = SERVICE.full_name
SERVER_VERSION = "0.1.0"
#: How often a worker looks whether every worker of its server serves.
PEER_POLL_S = 0.05
#: While draining, the transport stops once no request was refused for QUIET_S seconds,
#: or LINGER_MAX_S after the queues emptied (within the grace period).
QUIET_S = 0.2
LINGER_MAX_S = 2.0
REFLECTION_SERVICE = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]


def _check_port_free(host: str, port: int, flag: str) -> None:
    """Refuse, in one line, a port that something else listens on (grpcio would log a
    multi-line error of its own first)."""
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise StartupError(f"--host {host}: not an address here ({err.strerror})") from None
    for family, kind, protocol, _, address in addresses:
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as err:
                raise StartupError(f"{flag} {port}: cannot listen on {host}:{port} ({err.strerror or err})") from None


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
        self,
        settings: ServerSettings,
        framework: Framework,
        registry: CollectorRegistry | None = None,
        zoo: Mapping[str, type[ModelDefinition]] = modelzoo.MODELS,
    ) -> None:
        self.settings = settings
        self.framework = framework
        self.zoo = zoo
        try:
            #: What is served: --model, or every model folder of the repository.
            self.model_names = model_names(settings, framework)
        except ValueError as err:
            raise StartupError(str(err)) from None
        self.registry = registry or CollectorRegistry()
        #: Set when this process is one of several workers behind one port (serving.workers).
        self.place = WorkerPlace.from_environment()
        self.readiness: Readiness | None = None
        table = None
        if self.place is not None:
            table = MetricsTable(
                self.model_names, settings.max_batch_size, workers=self.place.count + 1, path=self.place.table
            )
            self.readiness = Readiness(self.place.readiness, self.place.count)
        self.metrics = ServerMetrics(self.registry, table, worker=self.place.index if self.place else 0)
        self.servicer = InferenceServicer(framework.server_name, SERVER_VERSION)
        self.servicer.configured = set(self.model_names)
        self.loader: ModelLoader | None = None
        # Watch streams get their own small pool, so they never hold a request thread.
        self.health = health.HealthServicer(
            experimental_non_blocking=True, experimental_thread_pool=futures.ThreadPoolExecutor(2)
        )
        self.port = 0
        self.metrics_port: int | None = None
        self.device = framework.resolve_device(settings.device)
        if self.device != "cpu":
            self.metrics.bind_gpu_memory(functools.partial(framework.gpu_memory, self.device))
        self.started_at = time.monotonic()
        self.ready_after_s: float | None = None
        self._server: grpc.Server | None = None
        #: The handler pool, with ModelInfer's admission in front (serving.admission).
        self.pool: AdmittingPool | None = None
        self._metrics_http: Any = None
        self._stop_lock = threading.Lock()
        self._stopped = threading.Event()
        self._drained = True

    def start(self) -> int:
        """Bind and start answering (NOT_SERVING until load_models finishes)."""
        settings = self.settings
        options = [
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            # Workers share their port (the supervisor reserved it); a lone server owns it.
            ("grpc.so_reuseport", 1 if self.place else 0),
        ]
        threads = settings.handler_threads()
        # Every call in flight holds a handler thread (a request waiting for its batch too),
        # so the pool holds a full queue: the batcher's rules (queue bound, deadline, max
        # wait) decide admission, not a thread count. The pool refuses ModelInfer calls those
        # rules would refuse before they reach a thread (serving.admission): a refusal in a
        # handler thread takes the core from the model. Beyond ``threads`` calls in flight
        # grpcio refuses new ones itself: the last-resort bound, so a flood cannot exhaust memory.
        pool = AdmittingPool(max_workers=threads, thread_name_prefix="grpc")
        server = grpc.server(pool, options=options, maximum_concurrent_rpcs=threads)
        token = settings.token()
        guarded = guard(self.servicer, SERVICE, token)
        pool.admit(self.servicer.refusal, self.servicer.over_cap)
        self.servicer.screened = admission.SUPPORTED
        self.pool = pool
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(guarded, server)  # type: ignore[arg-type]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        names = [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
        reflector = reflection.ReflectionServicer(names, pool=_reflection_pool())
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(guard(reflector, REFLECTION_SERVICE, token), server)
        address = f"{settings.host}:{settings.port}"
        if self.place is None:
            _check_port_free(settings.host, settings.port, "--port")
        try:
            if settings.tls_cert and settings.tls_key:
                self.port = server.add_secure_port(address, self._credentials())
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise StartupError(f"--port {settings.port}: cannot listen on {address} (in use, or not an address here)")
        server.start()
        self._server = server
        if settings.metrics_port >= 0:
            register_gpu_collector(self.registry, self.device)
            try:
                http_server, _thread = start_http_server(settings.metrics_port, settings.host, registry=self.registry)
            except OSError as err:
                server.stop(0)
                raise StartupError(
                    f"--metrics-port {settings.metrics_port}: cannot listen on {settings.host}:{settings.metrics_port}"
                    f" ({err.strerror or err})"
                ) from None
            self._metrics_http = http_server
            self.metrics_port = int(http_server.server_address[1])
        log.info("%s listening on %s:%d (metrics: %s)", self.framework.server_name, settings.host, self.port,
                 self.metrics_port)  # fmt: skip
        return self.port

    def _credentials(self) -> grpc.ServerCredentials:
        """TLS credentials; with a client CA, clients must present a certificate it signed."""
        settings = self.settings
        assert settings.tls_cert is not None
        assert settings.tls_key is not None
        pair = [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())]
        if settings.tls_client_ca is None:
            return grpc.ssl_server_credentials(pair)
        return grpc.ssl_server_credentials(
            pair, root_certificates=settings.tls_client_ca.read_bytes(), require_client_auth=True
        )

    def load_models(self) -> None:
        """Resolve, export if needed, load and warm up every model (``serving.loader``), then
        report SERVING, and from then on watch the repository for new versions.

        Each model's start-up is reported in parts (log line and ModelConfig parameters):
        ``export_s`` (artifacts written: the export, a precision's own export), ``load_s``,
        ``compile_s`` (with ``--compile on``: ahead-of-time compilation or loading its cached
        result, plus the warm-up passes, which compile every batch shape) and ``warmup_s``
        (with ``--compile off``: the warm-up passes).
        """
        settings = self.settings
        self.framework.check_options(self.device, settings.precision, settings.compile)
        loader = self.loader = ModelLoader(
            settings,
            self.framework,
            self.device,
            self.framework.info(self.device),
            self.metrics,
            self.servicer,
            workers=self.place.count if self.place else 1,
        )
        loader.load_all(self.model_names, self.zoo)
        if self.servicer.draining:
            return
        # Everything loaded so far lives as long as the process: keep the cyclic garbage
        # collector from scanning it again on every full collection while serving.
        gc.collect()
        gc.freeze()
        self.ready_after_s = time.monotonic() - self.started_at
        if self.readiness is not None and self.place is not None:
            self.readiness.set(self.place.index, True)
            self.servicer.peers_ready = self.readiness.all
            threading.Thread(target=self._follow_peers, name="peer-health", daemon=True).start()
        else:
            self._set_health(True)
        if settings.port_file:
            self._write_port_file(settings.port_file)
        log.info("SERVING after %.2f s", self.ready_after_s)
        if settings.repository_poll_s > 0 and any(source.zoo is None for source in loader.sources.values()):
            threading.Thread(
                target=loader.watch, args=(self._stopped, settings.repository_poll_s), name="repository", daemon=True
            ).start()

    @property
    def model_timings(self) -> dict[str, dict[str, float]]:
        """Start-up seconds of each model's latest loaded version, by part."""
        return self.loader.timings if self.loader is not None else {}

    def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            self.health.set(service, status)

    def _follow_peers(self) -> None:
        """A worker's health: SERVING only while every worker of the server serves."""
        assert self.readiness is not None
        serving = None
        while not self._stopped.is_set() and not self.servicer.draining:
            now = self.readiness.all()
            if now != serving:
                self._set_health(now)
                serving = now
            time.sleep(PEER_POLL_S)

    def _write_port_file(self, path: Path) -> None:
        payload = {
            "port": self.port,
            "metrics_port": self.metrics_port,
            "ready_after_s": self.ready_after_s,
            "models": self.model_timings,  # per model: export, load, compile, warm-up seconds
        }
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(payload))
        tmp.replace(path)

    def stop(self, grace: float | None = None) -> bool:
        """Drain: NOT_SERVING, refuse new work, let in-flight requests finish within the grace
        period. True when they all did; False when a forward pass was still running at its end
        (the model is then left as it is: closing it under a running pass is not safe)."""
        with self._stop_lock:
            if self._stopped.is_set():
                return self._drained
            grace = self.settings.grace_period_s if grace is None else grace
            started = time.monotonic()
            self.servicer.draining = True
            if self.readiness is not None and self.place is not None:
                self.readiness.set(self.place.index, False)
            self.health.enter_graceful_shutdown()
            runtimes = self.servicer.runtimes()
            # Health and metadata keep answering (NOT_SERVING) while queued and running
            # requests finish; new inference requests are refused (UNAVAILABLE) before
            # anything of them is computed. Then the transport stops, with what is left of
            # the grace period for replies still being sent.
            for runtime in runtimes:
                runtime.unavailable = "server is shutting down; not accepting new requests"
            drained = True
            for runtime in runtimes:
                left = max(0.0, grace - (time.monotonic() - started))
                if not runtime.batcher.drain(left):
                    drained = False
                    log.error("%s: grace period of %.1f s over with a forward pass still running", runtime.model.name,
                              grace)  # fmt: skip
            # Callers may still be sending: refuse them ourselves (UNAVAILABLE, safe to retry
            # elsewhere) until they have stopped for a moment; a closing transport would
            # cancel the calls it holds instead, and a cancelled call may or may not have run.
            # (Callers answered just now may send again: the quiet time counts from now.)
            drained_at = time.monotonic()
            linger_until = min(drained_at + LINGER_MAX_S, started + grace)
            while time.monotonic() < linger_until:
                last = max([drained_at, *(runtime.last_refused for runtime in runtimes)])
                if time.monotonic() - last >= QUIET_S:
                    break
                time.sleep(QUIET_S / 4)
            if self._server is not None:
                self._server.stop(max(0.0, grace - (time.monotonic() - started))).wait()
            if self.pool is not None:  # every call is over: let the handler threads go
                self.pool.shutdown(wait=False)
            if drained:
                for runtime in runtimes:
                    runtime.backend.shutdown()
            if self._metrics_http is not None:
                self._metrics_http.shutdown()
                self._metrics_http.server_close()
            self._drained = drained
            self._stopped.set()
            log.info("stopped")
            return drained

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)


def _exit_now(reason: str) -> None:
    """Leave at once, status 1: threads stuck in a forward pass cannot be joined."""
    log.error("%s", reason)
    logging.shutdown()
    sys.stdout.flush()
    os._exit(1)


def run(
    settings: ServerSettings, framework: Framework, zoo: Mapping[str, type[ModelDefinition]] = modelzoo.MODELS
) -> int:
    """Serve until SIGTERM/SIGINT, then drain and return the exit code (0; 1 if loading failed).

    Raises StartupError (before serving anything) when the server cannot listen as configured.
    """
    server = InferenceServer(settings, framework, zoo=zoo)
    stop_requested = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop_requested.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        print(f"{framework.server_name} listening on port {server.port}", flush=True)
        failure: list[BaseException] = []

        def load() -> None:
            try:
                server.load_models()
            except BaseException as err:
                failure.append(err)
                stop_requested.set()

        threading.Thread(target=load, name="loader", daemon=True).start()
        while not stop_requested.wait(1.0):
            pass
        if failure:
            reason = " ".join(str(failure[0]).split()) or repr(failure[0])
            log.error("model loading failed: %s", reason)
            if settings.port_file:  # what a supervisor reports for this worker
                settings.port_file.with_suffix(".error").write_text(reason + "\n")
            server.stop(0)
            return 1
        log.info("signal received: draining for up to %.1f s", settings.grace_period_s)
        # Whatever hangs (a forward pass, a close), the process is gone one second after
        # the grace period.
        watchdog = threading.Timer(settings.grace_period_s + 1.0, _exit_now, ("shutdown did not finish in time",))
        watchdog.daemon = True
        watchdog.start()
        drained = server.stop()
        watchdog.cancel()
        if not drained:
            _exit_now("exiting with a forward pass still running")
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

"""Real servers in this process (grpcio's own threads) on a free port, for tests that talk to them over gRPC."""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Any

from prometheus_client import CollectorRegistry

from modelzoo import MODELS
from serving.backend import Framework
from serving.server import InferenceServer
from serving.settings import ServerSettings
from tests.helpers.fakes import ZOO, FakeFramework

FRAMEWORKS = ("torch", "tensorflow")


def framework_for(name: str) -> Framework:
    if name == "torch":
        from torch_server.framework import FRAMEWORK as torch_framework

        return torch_framework
    from tf_server.framework import FRAMEWORK as tf_framework

    return tf_framework


class BackgroundServer:
    """An InferenceServer in this process on a free port; tests talk to it over gRPC."""

    def __init__(self, framework: Any, load: bool = True, **settings: Any) -> None:
        settings.setdefault("host", "127.0.0.1")
        settings.setdefault("port", 0)
        settings.setdefault("metrics_port", 0)
        settings.setdefault("device", "cpu")
        self.settings = ServerSettings(**settings)
        self.framework = framework
        self.registry = CollectorRegistry()
        zoo = {**MODELS, **ZOO} if isinstance(framework, FakeFramework) else MODELS
        self.server = InferenceServer(self.settings, framework, registry=self.registry, zoo=zoo)
        self.server.start()
        self.loading: concurrent.futures.Future[None] = concurrent.futures.Future()
        if load:
            self.server.load_models()
            self.loading.set_result(None)
        else:
            threading.Thread(target=self._load, daemon=True).start()

    def _load(self) -> None:
        try:
            self.server.load_models()
            self.loading.set_result(None)
        except BaseException as err:
            self.loading.set_exception(err)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.server.metrics_port}/metrics"

    def stop(self, grace: float = 5.0) -> None:
        self.server.stop(grace)

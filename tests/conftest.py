"""Shared fixtures: real servers in-process (a background event loop) on port 0."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from serving.backend import Framework
from serving.server import InferenceServer
from serving.settings import ServerSettings
from tests.fakes import FakeFramework

FRAMEWORKS = ("torch", "tensorflow")


def framework_for(name: str) -> Framework:
    if name == "torch":
        from torch_server.framework import FRAMEWORK as torch_framework

        return torch_framework
    from tf_server.framework import FRAMEWORK as tf_framework

    return tf_framework


class BackgroundServer:
    """An InferenceServer on its own event loop thread; tests talk to it over gRPC."""

    def __init__(self, framework: Any, load: bool = True, **settings: Any) -> None:
        settings.setdefault("host", "127.0.0.1")
        settings.setdefault("port", 0)
        settings.setdefault("metrics_port", 0)
        settings.setdefault("device", "cpu")
        self.settings = ServerSettings(**settings)
        self.framework = framework
        self.registry = CollectorRegistry()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = InferenceServer(self.settings, framework, registry=self.registry)
        self.call(self.server.start())
        self.loading: Any = None
        if load:
            self.call(self.server.load_models(), timeout=600)
        else:
            self.loading = asyncio.run_coroutine_threadsafe(self.server.load_models(), self.loop)

    def call(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.server.metrics_port}/metrics"

    def stop(self, grace: float = 5.0) -> None:
        if self.thread.is_alive():
            self.call(self.server.stop(grace))
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model repository per test session (exports are reused across tests)."""
    return tmp_path_factory.mktemp("repo")


@pytest.fixture(scope="session")
def real_servers(model_repo: Path) -> Iterator[dict[str, BackgroundServer]]:
    """torch_server and tf_server serving mlp, resnet and encoder, in-process."""
    servers: dict[str, BackgroundServer] = {}
    try:
        for name in FRAMEWORKS:
            framework = framework_for(name)
            framework.configure(1, "cpu")
            servers[name] = BackgroundServer(
                framework,
                model=["mlp", "resnet", "encoder"],
                model_dir=model_repo / name,
                max_batch_size=8,
                max_queue_delay_us=2000,
            )
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture
def fake_server(tmp_path: Path) -> Iterator[BackgroundServer]:
    """The framework-free ``double`` model behind the real serving core."""
    server = BackgroundServer(FakeFramework(), model=["double"], model_dir=tmp_path, max_batch_size=8)
    yield server
    server.stop()

"""Shared fixtures: real servers in this process (grpcio's own threads) on port 0, and the frameworks."""

from __future__ import annotations

import concurrent.futures
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from modelzoo import MODELS
from serving.backend import Framework
from serving.server import InferenceServer
from serving.settings import ServerSettings
from tests.fakes import ZOO, FakeFramework
from tests.pki import Pki

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


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Test certificates (tests/pki.py), made once per session."""
    try:
        return Pki(tmp_path_factory.mktemp("pki"))
    except (OSError, subprocess.SubprocessError) as err:
        pytest.fail(f"openssl cannot make test certificates: {err}")

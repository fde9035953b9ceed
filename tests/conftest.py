"""Shared fixtures: real servers in this process on port 0 (tests.helpers.servers), the fake framework, PKI."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.fakes import FakeFramework
from tests.helpers.pki import Pki
from tests.helpers.servers import FRAMEWORKS, BackgroundServer, framework_for


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
    """Test certificates (tests/helpers/pki.py), made once per session."""
    try:
        return Pki(tmp_path_factory.mktemp("pki"))
    except (OSError, subprocess.SubprocessError) as err:
        pytest.fail(f"openssl cannot make test certificates: {err}")

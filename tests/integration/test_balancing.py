"""Client-side balancing over several servers, as over a Kubernetes headless Service's pods: our
client and our Locust user against two real servers, each of which must answer.

``ipv4:A,B`` is the resolver target a ``dns:///`` name of two addresses becomes (the same
round_robin policy over what the resolver yields); a plain ``A,B`` list is one channel per server.
Counts come from each server's own metrics.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from client import InferenceClient
from client.targets import split_targets
from tests.helpers.fakes import FakeFramework
from tests.helpers.servers import BackgroundServer

ROOT = Path(__file__).resolve().parents[2]
ROW = {"x": np.ones((1, 4), np.float32)}
CALLS = 40


def answered(server: BackgroundServer) -> int:
    """Inference requests this server answered OK, from its own metrics."""
    value = server.registry.get_sample_value("inference_requests_total", {"model": "double", "code": "OK"})
    return int(value or 0)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[BackgroundServer, BackgroundServer]]:
    first = BackgroundServer(FakeFramework(), model=["double"], model_dir=tmp_path / "first")
    second = BackgroundServer(FakeFramework(), model=["double"], model_dir=tmp_path / "second")
    try:
        yield first, second
    finally:
        first.stop()
        second.stop()


def counts_after(servers: tuple[BackgroundServer, BackgroundServer], target: str) -> tuple[int, int]:
    """Each server's answers to CALLS inferences of one client on ``target`` (warm-up's excluded)."""
    before = [answered(server) for server in servers]
    with InferenceClient(target, timeout=10) as client:
        client.wait_until_ready(model="double")
        for _ in range(CALLS):
            np.testing.assert_array_equal(client.infer("double", ROW)["y"], 2 * ROW["x"])
    after = [answered(server) for server in servers]
    return after[0] - before[0], after[1] - before[1]


def test_a_resolver_target_sends_round_robin_to_every_address(
    servers: tuple[BackgroundServer, BackgroundServer],
) -> None:
    target = f"ipv4:{servers[0].target},{servers[1].target}"
    counts = counts_after(servers, target)
    assert sum(counts) == CALLS
    # round_robin over two READY subchannels alternates; pick_first would give (CALLS, 0)
    assert min(counts) >= CALLS // 4, f"{target}: per-server answers {counts}"


def test_a_list_target_takes_turns_on_its_servers(servers: tuple[BackgroundServer, BackgroundServer]) -> None:
    target = f"{servers[0].target},{servers[1].target}"
    assert counts_after(servers, target) == (CALLS // 2, CALLS // 2)


def test_a_plain_target_reaches_one_server(servers: tuple[BackgroundServer, BackgroundServer]) -> None:
    assert counts_after(servers, servers[0].target) == (CALLS, 0)


def test_split_targets() -> None:
    assert split_targets("a:1, b:2") == ["a:1", "b:2"]
    assert split_targets("dns:///svc-headless:8001") == ["dns:///svc-headless:8001"]
    assert split_targets("ipv4:10.0.0.1:8001,10.0.0.2:8001") == ["ipv4:10.0.0.1:8001,10.0.0.2:8001"]
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        split_targets("a:1,")


@pytest.mark.parametrize("kind", ["resolver", "list"])
def test_locust_users_reach_both_servers(
    servers: tuple[BackgroundServer, BackgroundServer], kind: str, tmp_path: Path
) -> None:
    """Our Locust user, headless, on a resolver target and on a list: both servers answer, no failure."""
    pair = f"{servers[0].target},{servers[1].target}"
    host = f"ipv4:{pair}" if kind == "resolver" else pair
    before = [answered(server) for server in servers]
    command = [
        sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless",
        "--only-summary", "--host", host, "-u", "4", "-r", "4", "-t", "3s", "--model", "double",
        "--csv", str(tmp_path / "run"),
    ]  # fmt: skip
    result = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = [answered(server) - start for server, start in zip(servers, before, strict=True)]
    assert min(counts) > 0, f"{host}: per-server answers {counts}"

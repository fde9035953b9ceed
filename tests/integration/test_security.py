"""TLS, mutual TLS and bearer tokens on our own server, with certificates made at test time."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from client import InferenceClient
from client.cli import main as client_main
from contract import codec
from contract.protocol import inference_pb2 as pb
from contract.protocol import inference_pb2_grpc as pb_grpc
from serving import probe
from serving.settings import ServerSettings
from tests.helpers.fakes import FakeFramework
from tests.helpers.pki import Pki
from tests.helpers.servers import BackgroundServer

X = np.ones((1, 4), np.float32)
TOKEN = "s3cret-token-value"


def _infer(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> pb.ModelInferResponse:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    return stub.ModelInfer(codec.build_request("double", {"x": X}), timeout=10, metadata=metadata)


@pytest.fixture
def tls_server(pki: Pki, tmp_path: Path) -> Iterator[BackgroundServer]:
    server = BackgroundServer(
        FakeFramework(), model=["double"], model_dir=tmp_path, tls_cert=pki.server_cert, tls_key=pki.server_key
    )
    yield server
    server.stop()


def test_tls_serves_encrypted_and_refuses_plaintext(pki: Pki, tls_server: BackgroundServer) -> None:
    with pki.channel(tls_server.target) as channel:
        np.testing.assert_array_equal(codec.response_outputs(_infer(channel))["y"], X * 2)
    with grpc.insecure_channel(tls_server.target) as plain, pytest.raises(grpc.RpcError) as info:
        _infer(plain)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_needs_a_certificate_from_the_client_ca(pki: Pki, tmp_path: Path) -> None:
    server = BackgroundServer(
        FakeFramework(),
        model=["double"],
        model_dir=tmp_path,
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_client_ca=pki.ca,
    )
    try:
        with pki.channel(server.target, (pki.client_key, pki.client_cert)) as channel:
            np.testing.assert_array_equal(codec.response_outputs(_infer(channel))["y"], X * 2)
        # Our client and its command line present the certificate too.
        with InferenceClient(
            server.target,
            root_certificates=pki.ca.read_bytes(),
            client_certificate=pki.client_cert.read_bytes(),
            client_key=pki.client_key.read_bytes(),
        ) as client:
            np.testing.assert_array_equal(client.infer("double", {"x": X})["y"], X * 2)
        trust = ["--target", server.target, "--root-certs", str(pki.ca)]
        mutual = [*trust, "--client-cert", str(pki.client_cert), "--client-key", str(pki.client_key)]
        assert client_main([*mutual, "health"]) == 0
        assert client_main([*trust, "--attempts", "1", "health"]) != 0
        for identity in (None, (pki.stranger_key, pki.stranger_cert)):
            with pki.channel(server.target, identity) as channel, pytest.raises(grpc.RpcError) as info:
                _infer(channel)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


@pytest.fixture(params=["flag", "file"])
def token_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BackgroundServer]:
    if request.param == "file":
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN + "\n")
        server = BackgroundServer(FakeFramework(), model=["double"], model_dir=tmp_path, auth_token_file=token_file)
    else:
        server = BackgroundServer(FakeFramework(), model=["double"], model_dir=tmp_path, auth_token=TOKEN)
    yield server
    server.stop()


def test_token_guards_every_rpc_but_health(token_server: BackgroundServer) -> None:
    good = (("authorization", f"Bearer {TOKEN}"),)
    with grpc.insecure_channel(token_server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        calls = {
            "unary": lambda metadata: stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10, metadata=metadata),
            "infer": lambda metadata: _infer(channel, metadata),
            "stream": lambda metadata: list(
                stub.ModelStreamInfer(iter([codec.build_request("double", {"x": X})]), timeout=10, metadata=metadata)
            ),
            "reflection": lambda metadata: list(
                reflection.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10, metadata=metadata
                )
            ),
        }
        for name, call in calls.items():
            for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)):
                with pytest.raises(grpc.RpcError) as info:
                    call(metadata)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
                assert TOKEN not in (info.value.details() or "")
            assert call(good), name
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_health_probes_need_no_token(token_server: BackgroundServer, capsys: pytest.CaptureFixture[str]) -> None:
    # A container healthcheck carries no token: both probes must still see SERVING.
    assert probe.main(["--target", token_server.target]) == 0
    assert capsys.readouterr().out == f"{token_server.target}: SERVING\n"
    assert client_main(["--target", token_server.target, "health"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["health: SERVING", "live: unknown (UNAUTHENTICATED)", "ready: unknown (UNAUTHENTICATED)"]
    assert client_main(["--target", token_server.target, "--token", TOKEN, "health"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == ["live: true", "ready: true"]


def test_probe_with_tls(pki: Pki, tls_server: BackgroundServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert probe.main(["--target", tls_server.target, "--tls-ca", str(pki.ca)]) == 0
    # The certificate names 127.0.0.1 and localhost: another name fails, and so does plaintext.
    name = ["--tls-server-name", "tf_server"]
    assert probe.main(["--target", tls_server.target, "--tls-ca", str(pki.ca), *name, "--timeout", "2"]) == 1
    assert probe.main(["--target", tls_server.target, "--timeout", "2"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{tls_server.target}: SERVING"
    assert lines[1:] == [f"{tls_server.target}: no answer: UNAVAILABLE"] * 2
    assert probe.main(["--target", tls_server.target, "--tls-ca", str(pki.dir / "missing.pem")]) == 2
    assert probe.main(["--target", tls_server.target, "--tls-client-cert", str(pki.client_cert)]) == 2


def test_the_token_never_reaches_logs_or_settings_text(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = ServerSettings(auth_token=TOKEN)
    assert TOKEN not in repr(settings)
    assert TOKEN not in str(settings)
    with caplog.at_level(logging.DEBUG):
        server = BackgroundServer(FakeFramework(), model=["double"], model_dir=tmp_path, auth_token=TOKEN)
        try:
            with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError):
                _infer(channel, (("authorization", "Bearer nope"),))
        finally:
            server.stop()
    assert caplog.records
    assert all(TOKEN not in record.getMessage() for record in caplog.records)

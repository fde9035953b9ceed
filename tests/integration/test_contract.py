"""Contract and parity: a third-party OIP client (tritonclient) against BOTH real
servers, and the same outputs from both for every zoo model (|diff| <= 1e-4)."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

import modelzoo
from client import InferenceClient
from tests.helpers.servers import FRAMEWORKS, BackgroundServer

#: Parity tolerance between the two servers' fp32 outputs.
ATOL = 1e-4
RTOL = 1e-4
MODELS = ("mlp", "resnet", "encoder")


@pytest.fixture(scope="module", params=FRAMEWORKS)
def triton_client(request: pytest.FixtureRequest, real_servers: dict[str, BackgroundServer]) -> Iterator[Any]:
    client = triton.InferenceServerClient(url=real_servers[request.param].target)
    yield client
    client.close()


def triton_inputs(arrays: dict[str, np.ndarray]) -> list[Any]:
    inputs = []
    for name, array in arrays.items():
        tensor = triton.InferInput(name, list(array.shape), "INT64" if array.dtype == np.int64 else "FP32")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def example(model: str, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    return modelzoo.get(model).example_inputs(batch, np.random.default_rng(seed))


def test_liveness_readiness_metadata(triton_client: Any) -> None:
    assert triton_client.is_server_live()
    assert triton_client.is_server_ready()
    metadata = triton_client.get_server_metadata()
    assert metadata.name in ("torch_server", "tf_server")
    for model in MODELS:
        assert triton_client.is_model_ready(model)
        meta = triton_client.get_model_metadata(model)
        assert meta.name == model
        assert [i.name for i in meta.inputs] == [s.name for s in modelzoo.get(model).inputs]
        config = triton_client.get_model_config(model).config
        assert config.max_batch_size == 8
        assert config.dynamic_batching.max_queue_delay_microseconds == 2000


@pytest.mark.parametrize("model", MODELS)
def test_infer_with_tritonclient(triton_client: Any, model: str) -> None:
    arrays = example(model, 3)
    spec = modelzoo.get(model)
    result = triton_client.infer(model, triton_inputs(arrays), request_id="abc")
    assert result.get_response().id == "abc"
    for output in spec.outputs:
        value = result.as_numpy(output.name)
        assert value is not None
        assert value.shape[0] == 3
        assert value.dtype == np.float32
        assert np.isfinite(value).all()


def test_stream_infer_with_tritonclient(triton_client: Any) -> None:
    replies: queue.Queue[tuple[Any, Any]] = queue.Queue()
    triton_client.start_stream(callback=lambda result, error: replies.put((result, error)))
    try:
        for i in range(4):
            triton_client.async_stream_infer("mlp", triton_inputs(example("mlp", 1, seed=i)), request_id=str(i))
        bad = triton.InferInput("input", [1, 3], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 3), np.float32))
        triton_client.async_stream_infer("mlp", [bad], request_id="bad")
        got = [replies.get(timeout=30) for _ in range(5)]
    finally:
        triton_client.stop_stream()
    ok = {result.get_response().id: result for result, error in got if error is None}
    errors = [error for _, error in got if error is not None]
    assert sorted(ok) == ["0", "1", "2", "3"]
    assert len(errors) == 1
    assert "INVALID_ARGUMENT" in str(errors[0])
    for i in range(4):
        assert ok[str(i)].as_numpy("logits").shape == (1, 10)


def test_statistics_via_tritonclient(triton_client: Any) -> None:
    triton_client.infer("mlp", triton_inputs(example("mlp", 2)))
    stats = triton_client.get_inference_statistics("mlp").model_stats[0]
    assert stats.name == "mlp"
    assert stats.inference_count >= 2
    assert stats.inference_stats.success.count >= 1


def test_errors_via_tritonclient(triton_client: Any) -> None:
    with pytest.raises(InferenceServerException) as info:
        triton_client.infer("no_such_model", triton_inputs(example("mlp", 1)))
    assert info.value.status() == "StatusCode.NOT_FOUND"
    wrong = triton.InferInput("input", [1, 64], "FP64")
    wrong.set_data_from_numpy(np.zeros((1, 64), np.float64))
    with pytest.raises(InferenceServerException) as info:
        triton_client.infer("mlp", [wrong])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    too_big = triton.InferInput("input", [9, 64], "FP32")
    too_big.set_data_from_numpy(np.zeros((9, 64), np.float32))
    with pytest.raises(InferenceServerException) as info:
        triton_client.infer("mlp", [too_big])
    assert "max_batch_size" in info.value.message()
    ids = np.full((1, 5), 5000, np.int64)  # beyond the vocabulary
    with pytest.raises(InferenceServerException) as info:
        triton_client.infer("encoder", triton_inputs({"input_ids": ids}))
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    too_long = np.ones((1, 129), np.int64)
    with pytest.raises(InferenceServerException) as info:
        triton_client.infer("encoder", triton_inputs({"input_ids": too_long}))
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "max_len" in info.value.message()
    assert triton_client.is_server_ready()


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_parity_over_grpc(real_servers: dict[str, BackgroundServer], model: str, raw: bool) -> None:
    """Both servers, same inputs, same outputs within the stated tolerance."""
    outputs = {}
    arrays = example(model, 4, seed=7)
    for name, server in real_servers.items():
        with InferenceClient(server.target) as client:
            outputs[name] = client.infer(model, arrays, raw=raw)
    for output in modelzoo.get(model).outputs:
        torch_out, tf_out = outputs["torch"][output.name], outputs["tensorflow"][output.name]
        assert torch_out.shape == tf_out.shape
        assert float(np.max(np.abs(torch_out - tf_out))) <= ATOL
        np.testing.assert_allclose(torch_out, tf_out, rtol=RTOL, atol=ATOL)


def test_encoder_batched_equals_unbatched_over_grpc(real_servers: dict[str, BackgroundServer]) -> None:
    """Requests of different lengths batched together (padded) give the same
    outputs as each one alone, on both servers."""
    import concurrent.futures

    rng = np.random.default_rng(3)
    requests = [{"input_ids": rng.integers(1, 1000, size=(1, n), dtype=np.int64)} for n in (5, 17, 9, 30, 12, 3)]
    for server in real_servers.values():
        with InferenceClient(server.target) as client:
            alone = [client.infer("encoder", r) for r in requests]
            before = client.model_statistics("encoder")[0]
            with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
                together = list(pool.map(lambda r: client.infer("encoder", r), requests))
            after = client.model_statistics("encoder")[0]
        # Batched for real: fewer forward passes than requests (rows beyond the requests' own
        # are padding to the longest sequence, not extra rows).
        executions = after.execution_count - before.execution_count
        assert 1 <= executions < len(requests)
        assert after.inference_count - before.inference_count == len(requests)
        for request, a, b in zip(requests, alone, together, strict=True):
            assert b["last_hidden_state"].shape == (1, request["input_ids"].shape[1], a["pooled"].shape[1])
            np.testing.assert_allclose(a["last_hidden_state"], b["last_hidden_state"], atol=ATOL, rtol=RTOL)
            np.testing.assert_allclose(a["pooled"], b["pooled"], atol=ATOL, rtol=RTOL)

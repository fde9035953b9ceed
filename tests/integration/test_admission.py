"""Admission that matches the queue (docs/serving.md#admission), on a real server: a burst
below ``--max-queue-size`` is served whole, however many calls that keeps waiting; beyond
it, and when the queue cannot serve a request within its deadline, requests are refused at
once with RESOURCE_EXHAUSTED saying why, counted by reason, before a handler thread."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest
import requests

from contract import codec
from contract.protocol import inference_pb2_grpc as pb_grpc
from serving.admission import MODEL_INFER, AdmittingPool
from serving.batcher import DynamicBatcher
from tests.helpers.fakes import FakeFramework
from tests.helpers.servers import BackgroundServer

ONE = codec.build_request("double", {"x": np.ones((1, 4), np.float32)})


def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def outcome(call: Any, timeout: float) -> BaseException | None:
    """The error a call ended with (None: OK), waiting up to ``timeout`` seconds."""
    error: BaseException | None = call.exception(timeout)
    return error


def batcher_of(server: BackgroundServer) -> DynamicBatcher:
    return server.server.servicer.models["double"].latest.batcher


def refusals(server: BackgroundServer, reason: str) -> float:
    for line in requests.get(server.metrics_url, timeout=10).text.splitlines():
        if line.startswith(f'inference_refusals_total{{model="double",reason="{reason}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"no refusal counter for {reason}")


def refused_early(server: BackgroundServer) -> int:
    """Calls refused in grpcio's polling thread, before a handler thread (serving.admission)."""
    pool = server.server.pool
    assert pool is not None
    return pool.refused


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., BackgroundServer]]:
    made: list[BackgroundServer] = []

    def make(**settings: Any) -> BackgroundServer:
        server = BackgroundServer(FakeFramework(), model=["double"], model_dir=tmp_path, **settings)
        made.append(server)
        return server

    yield make
    for server in made:
        server.framework.controls.gate.set()
        server.stop()


def test_a_burst_below_the_queue_bound_is_served_whole(make_server: Callable[..., BackgroundServer]) -> None:
    # 1 computing + 120 queued: far more calls waiting than two full batches (the in-flight
    # cap of before: 2 x 4 + 16 = 24 refused the rest), fewer than --max-queue-size.
    server = make_server(max_batch_size=4, max_queue_size=128)
    controls = server.framework.controls
    controls.entered.clear()  # set by the warm-up
    controls.gate.clear()
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        first = stub.ModelInfer.future(ONE, timeout=60)
        assert controls.entered.wait(20)
        burst = [stub.ModelInfer.future(ONE, timeout=60) for _ in range(120)]
        wait_until(lambda: batcher_of(server).queue_depth == 120 or any(call.done() for call in burst))
        controls.gate.set()
        errors = [outcome(call, 60) for call in [first, *burst]]
    assert [err for err in errors if err is not None] == []


def test_a_burst_above_the_queue_bound_is_refused_as_queue_full(make_server: Callable[..., BackgroundServer]) -> None:
    server = make_server(max_batch_size=1, max_queue_size=8)
    controls = server.framework.controls
    controls.entered.clear()  # set by the warm-up
    controls.gate.clear()
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        held = [stub.ModelInfer.future(ONE, timeout=60)]
        assert controls.entered.wait(20)
        held += [stub.ModelInfer.future(ONE, timeout=60) for _ in range(8)]
        wait_until(lambda: batcher_of(server).queue_depth == 8)
        extra = [stub.ModelInfer.future(ONE, timeout=60) for _ in range(5)]
        refused = [outcome(call, 10) for call in extra]  # answered while the model is still held
        assert all(isinstance(err, grpc.RpcError) for err in refused), refused
        for err in refused:
            assert isinstance(err, grpc.RpcError)
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert (err.details() or "").startswith("queue full (8 requests waiting)"), err.details()
        assert refusals(server, "queue_full") == 5
        assert refused_early(server) == 5  # before a handler thread
        controls.gate.set()
        assert all(outcome(call, 30) is None for call in held)


def test_a_request_whose_deadline_cannot_be_met_is_refused_at_once(
    make_server: Callable[..., BackgroundServer],
) -> None:
    server = make_server(max_batch_size=1, max_queue_size=64)
    controls = server.framework.controls
    controls.delay_s = 0.05  # every batch takes 50 ms
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:  # a backlog: the batch cycle is learnt
            list(pool.map(lambda _: stub.ModelInfer(ONE, timeout=60), range(16)))
        assert batcher_of(server)._cycle is not None
        controls.entered.clear()
        controls.gate.clear()
        held = [stub.ModelInfer.future(ONE, timeout=60)]
        assert controls.entered.wait(20)
        held += [stub.ModelInfer.future(ONE, timeout=60) for _ in range(40)]  # about 2 s of batches ahead
        wait_until(lambda: batcher_of(server).queue_depth == 40)
        computed = len(controls.batches)
        # Queued, it would have waited behind the held model until its deadline (DEADLINE_EXCEEDED).
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(ONE, timeout=1.0)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
        assert "past its deadline" in (info.value.details() or "")
        assert refusals(server, "deadline") == 1
        assert refused_early(server) == 1
        # A deadline the queue can meet is admitted, and served once the model goes on.
        patient = stub.ModelInfer.future(ONE, timeout=60)
        wait_until(lambda: batcher_of(server).queue_depth == 41)
        controls.delay_s = 0.0
        controls.gate.set()
        assert all(outcome(call, 30) is None for call in [*held, patient])
        assert len(controls.batches) == computed + 42  # the refused one never reached the model


def test_calls_beyond_the_in_flight_bound_are_refused_by_grpcio_and_counted(
    make_server: Callable[..., BackgroundServer],
) -> None:
    server = make_server(max_batch_size=1, max_queue_size=8, grpc_threads=2)  # last-resort bound: 2 calls
    controls = server.framework.controls
    controls.entered.clear()
    controls.gate.clear()
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        held = [stub.ModelInfer.future(ONE, timeout=60)]
        assert controls.entered.wait(20)
        held.append(stub.ModelInfer.future(ONE, timeout=60))
        wait_until(lambda: batcher_of(server).queue_depth == 1)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(ONE, timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "Concurrent RPC limit" in (info.value.details() or "")
        assert refusals(server, "in_flight") == 1
        controls.gate.set()
        assert all(outcome(call, 30) is None for call in held)


def test_calls_admitted_but_not_yet_decoded_count_as_waiting(make_server: Callable[..., BackgroundServer]) -> None:
    # Admitted in the polling thread, a call is not in the batcher's queue until a handler
    # thread has decoded it; the calls after it must see it waiting all the same.
    server = make_server(max_batch_size=1, max_queue_size=64)
    controls = server.framework.controls
    controls.delay_s = 0.05  # every batch takes 50 ms
    servicer = server.server.servicer
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:  # a backlog: the batch cycle is learnt
            list(pool.map(lambda _: stub.ModelInfer(ONE, timeout=60), range(16)))
        controls.entered.clear()
        controls.gate.clear()
        held = [stub.ModelInfer.future(ONE, timeout=60)]
        assert controls.entered.wait(20)
        held += [stub.ModelInfer.future(ONE, timeout=60) for _ in range(4)]
        wait_until(lambda: batcher_of(server).queue_depth == 4)
        # The queue bound: 4 queued + 59 arriving leave room for one more; + 60 do not.
        assert servicer.refusal(None, 59) is None
        assert (servicer.refusal(None, 60) or ("",))[0] == "queue_full"
        # The deadline: about 5 batches of 50 ms ahead fit in 1 s; 4 + 20 arriving do not.
        assert servicer.refusal(time.time() + 1.0, 0) is None
        assert (servicer.refusal(time.time() + 1.0, 20) or ("",))[0] == "deadline"
        # An empty queue with calls arriving is judged too (not waved through as idle).
        controls.delay_s = 0.0
        controls.gate.set()
        assert all(outcome(call, 30) is None for call in held)
        wait_until(lambda: batcher_of(server).queue_depth == 0)
        assert (servicer.refusal(None, 64) or ("",))[0] == "queue_full"


def test_the_polling_thread_tells_the_check_how_many_calls_wait_for_a_handler_thread() -> None:
    seen: list[tuple[float | None, int]] = []
    pool = AdmittingPool(4)
    pool.admit(lambda deadline, arriving: seen.append((deadline, arriving)))  # admits (None)
    event = SimpleNamespace(call_details=SimpleNamespace(method=MODEL_INFER.encode(), deadline=12.5))
    method = SimpleNamespace(name=lambda: MODEL_INFER)
    for _ in range(3):  # work items no thread has taken yet
        pool._work_queue.put(None)  # type: ignore[arg-type]
    try:
        assert pool.screen(event, method) is None
        assert seen == [(12.5, 3)]
    finally:
        pool.shutdown(wait=False)

"""The model server's noisy-neighbour stall (Behavior.stall_rate), which the tail-latency benchmark uses."""

from __future__ import annotations

import time

import grpc
import pytest

from lbkit.testing import Behavior, ModelServer

from .conftest import pb2, pb2_grpc


def test_stalled_calls_wait_the_stall_and_are_counted(make_servers) -> None:
    (stalling,) = make_servers(1, stall_rate=1.0, stall=0.3)
    (steady,) = make_servers(1)
    for server, least, most in ((stalling, 0.3, 2.0), (steady, 0.0, 0.25)):
        with grpc.insecure_channel(server.address) as channel:
            stub = pb2_grpc.ModelServiceStub(channel)
            stub.Predict(pb2.PredictRequest(), timeout=5)  # connect first
            start = time.monotonic()
            reply = stub.Predict(pb2.PredictRequest(features=[1.0]), timeout=5)
            took = time.monotonic() - start
        assert reply.served_by == server.address and least <= took < most
    assert stalling.servicer is not None and stalling.servicer.stalled == 2
    assert steady.servicer is not None and steady.servicer.stalled == 0


def test_a_cancelled_stalled_call_frees_its_worker_early() -> None:
    # One worker: the second call can run only once the first, stalled for 30 s, has let it go.
    with ModelServer(behavior=Behavior(stall_rate=1.0, stall=30.0), max_workers=1) as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb2_grpc.ModelServiceStub(channel)
            with pytest.raises(grpc.RpcError) as raised:
                stub.Predict(pb2.PredictRequest(), timeout=0.3)
            assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            server.behavior.stall_rate = 0.0
            reply = stub.Predict(pb2.PredictRequest(), timeout=5)
        assert reply.served_by == server.address

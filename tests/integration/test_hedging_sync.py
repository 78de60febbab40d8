"""Hedged calls on real servers, sync (see test_hedging_aio.py for the asyncio twins): a stalled endpoint
is hedged and the hedge wins, the loser is cancelled on its server and counted neutral, hedges go to
endpoints not tried yet, a fatal status ends the call at once, a drained budget sends no hedge, nothing
outlives the deadline, done callbacks fire once, and nothing stays in flight."""

from __future__ import annotations

import gc
import threading
import time

import grpc
import pytest

import lbkit
from lbkit.testing import FakeClock
from tests.integration.conftest import SCHEDULING_MARGIN, pb2, pb2_grpc, wait_for

pytestmark = pytest.mark.timeout(60)

REQ = pb2.PredictRequest(features=[1.0, 2.0])
SERVICE = "/lbkit.inference.v1.ModelService"
STALL = 30.0
"""A stall far longer than any test waits: only a cancel can end it early."""


def hedged(delay: float | str = 0.05, **kw: object) -> dict[str, object]:
    return {f"{SERVICE}/*": lbkit.HedgingPolicy(hedging_delay=delay, **kw)}  # type: ignore[arg-type]


def call(stub: pb2_grpc.ModelServiceStub, kind: str, timeout: float = 10.0) -> str:
    """One call of ``kind``; the address of the server that answered."""
    if kind == "unary":
        return str(stub.Predict(REQ, timeout=timeout).served_by)
    if kind == "future":
        return str(stub.Predict.future(REQ, timeout=timeout).result().served_by)
    tokens = list(stub.StreamPredict(pb2.PredictRequest(max_tokens=3), timeout=timeout))
    assert [t.token for t in tokens] == ["tok0", "tok1", "tok2"]
    return str(tokens[0].served_by)


@pytest.mark.parametrize("kind", ["unary", "future", "stream"])
def test_a_stalled_endpoint_is_hedged_the_hedge_wins_and_the_loser_is_cancelled(make_servers, kind):
    (stalling,) = make_servers(1, stall_rate=1.0, stall=STALL)
    (steady,) = make_servers(1)
    with lbkit.Balancer([stalling.address, steady.address], retry=hedged()) as lb:
        lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        for _ in range(4):  # round robin: some of them start on the stalling server
            start = time.monotonic()
            assert call(stub, kind) == steady.address
            assert time.monotonic() - start < 0.05 + SCHEDULING_MARGIN + 1.0
        servicer = stalling.servicer
        assert servicer is not None and lb.hedges_won >= 1
        # Every attempt on the stalling server lost, and was cancelled by the steady one's answer.
        assert servicer.stalled == lb.hedges_cancelled == lb.hedges_sent
        # The server sees each loser's cancel long before its 30 s stall would end.
        wait_for(lambda: servicer.abandoned == servicer.stalled)
        wait_for(lambda: lb.stats.total_in_flight == 0)
        loser = lb.stats[stalling.address]
        assert (loser.failures, loser.successes) == (0, 0)  # cancelled: no failure for ejection
        assert lb.stats[steady.address].successes == 4  # one call each, hedged or not


def test_hedges_go_to_endpoints_not_tried_yet_and_never_outlive_the_deadline(make_servers):
    servers = make_servers(3, stall_rate=1.0, stall=STALL)
    policy = hedged(0.05, max_attempts=5)
    with lbkit.Balancer([s.address for s in servers], retry=policy) as lb:
        lb.wait_ready(count=3)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as raised:
            stub.Predict(REQ, timeout=0.6)
        took = time.monotonic() - start
        assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert took < 0.6 + SCHEDULING_MARGIN
        # Three endpoints: the first attempt and two hedges, one on each (max_attempts 5 allows more).
        assert [s.calls["Predict"] for s in servers] == [1, 1, 1]
        assert lb.hedges_sent == 2
        wait_for(lambda: lb.stats.total_in_flight == 0)
        assert sum(e.failures for e in lb.stats) == 1  # the call's one DEADLINE_EXCEEDED, not three


def test_a_fatal_status_ends_the_call_at_once_and_cancels_the_rest(make_servers):
    (stalling,) = make_servers(1, stall_rate=1.0, stall=STALL)
    (failing,) = make_servers(1, fail_rate=1.0, fail_code=grpc.StatusCode.INVALID_ARGUMENT)
    with lbkit.Balancer([stalling.address, failing.address], retry=hedged()) as lb:
        lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        for _ in range(2):  # a call that starts on the stalling server is hedged to the failing one
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as raised:
                stub.Predict(REQ, timeout=20)
            assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert time.monotonic() - start < 0.05 + SCHEDULING_MARGIN + 1.0
        servicer = stalling.servicer
        assert servicer is not None and servicer.stalled >= 1
        wait_for(lambda: servicer.abandoned == servicer.stalled)
        wait_for(lambda: lb.stats.total_in_flight == 0)
        assert lb.stats[stalling.address].failures == 0


def test_a_non_fatal_status_sends_the_next_hedge_at_once(make_servers):
    (failing,) = make_servers(1, fail_rate=1.0)  # UNAVAILABLE
    (steady,) = make_servers(1)
    policy = hedged(STALL, non_fatal_status_codes=[grpc.StatusCode.UNAVAILABLE])
    with lbkit.Balancer([failing.address, steady.address], retry=policy) as lb:
        lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        for _ in range(2):  # a call that starts on the failing server hedges now, not in 30 s
            start = time.monotonic()
            assert call(stub, "unary") == steady.address
            assert time.monotonic() - start < SCHEDULING_MARGIN + 1.0
        assert lb.hedges_sent == lb.hedges_won == failing.calls["Predict"] >= 1


def test_a_drained_budget_sends_no_hedge(make_servers):
    (stalling,) = make_servers(1, stall_rate=1.0, stall=0.3)
    (steady,) = make_servers(1)
    with lbkit.Balancer([stalling.address, steady.address], retry=hedged()) as lb:
        lb.wait_ready(count=2)
        lb.budget.tokens = 0.0
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        served = [call(stub, "unary") for _ in range(2)]
        assert sorted(served) == sorted([stalling.address, steady.address])  # the stalled call waited
        # The stalled call's hedge was due and refused (a slow answer from the steady one may be too).
        assert lb.budget.refused >= 1 and lb.hedges_sent == 0
        assert steady.calls["Predict"] == 1


def test_the_hedge_timer_runs_on_the_balancer_clock(make_servers):
    (stalling,) = make_servers(1, stall_rate=1.0, stall=STALL)
    (steady,) = make_servers(1)
    clock = FakeClock()
    with lbkit.Balancer([stalling.address, steady.address], retry=hedged(1000.0), clock=clock) as lb:
        lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        answers: list[str] = []
        done = threading.Event()

        def calls() -> None:
            for _ in range(2):
                answers.append(call(stub, "unary", timeout=None))  # type: ignore[arg-type]
            done.set()

        caller = threading.Thread(target=calls)
        caller.start()
        servicer = stalling.servicer
        assert servicer is not None
        wait_for(lambda: servicer.stalled == 1)
        for _ in range(200):  # the hedge's delay passes on the balancer's clock only
            clock.advance(1000.0)
            if done.wait(0.05):
                break
        caller.join(5)
        assert answers == [steady.address, steady.address]
        assert lb.hedges_won == servicer.stalled >= 1


def test_done_callbacks_fire_once_for_the_call(make_servers):
    (stalling,) = make_servers(1, stall_rate=1.0, stall=STALL)
    (steady,) = make_servers(1)
    with lbkit.Balancer([stalling.address, steady.address], retry=hedged()) as lb:
        lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        fired: list[object] = []
        futures = [stub.Predict.future(REQ, timeout=10) for _ in range(2)]
        for f in futures:
            f.add_done_callback(fired.append)
        assert {f.result().served_by for f in futures} == {steady.address}
        servicer = stalling.servicer
        assert servicer is not None
        wait_for(lambda: servicer.abandoned == 1 and lb.stats.total_in_flight == 0)
        assert sorted(map(id, fired)) == sorted(map(id, futures))  # once each, after the losers ended too


def test_a_cancelled_hedged_call_cancels_every_attempt(make_servers):
    servers = make_servers(2, stall_rate=1.0, stall=STALL)
    with lbkit.Balancer([s.address for s in servers], retry=hedged(0.0)) as lb:
        lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        future = stub.Predict.future(REQ, timeout=20)
        wait_for(lambda: sum(s.servicer.stalled for s in servers) == 2)
        assert future.cancel()
        with pytest.raises(grpc.FutureCancelledError):
            future.result()
        wait_for(lambda: sum(s.servicer.abandoned for s in servers) == 2)
        wait_for(lambda: lb.stats.total_in_flight == 0)
        assert sum(e.failures for e in lb.stats) == 0


def test_client_streams_under_a_hedging_policy_are_sent_once(make_servers):
    servers = make_servers(2, stall_rate=1.0, stall=0.2)
    with lbkit.Balancer([s.address for s in servers], retry=hedged(0.0)) as lb:
        lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        updates = (pb2.FeatureUpdate(entity_id="e", sequence=i) for i in range(3))
        assert stub.UploadFeatures(updates, timeout=5).count == 3
        assert sum(s.calls["UploadFeatures"] for s in servers) == 1 and lb.hedges_sent == 0


def test_an_abandoned_hedged_stream_is_cancelled(make_servers):
    servers = make_servers(2, delay=0.05)  # 1000 tokens: 50 s unless cancelled
    with lbkit.Balancer([s.address for s in servers], retry=hedged(0.0)) as lb:
        lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        stream = stub.StreamPredict(pb2.PredictRequest(max_tokens=1000), timeout=50)
        assert next(stream).token == "tok0"
        del stream
        gc.collect()
        wait_for(lambda: lb.stats.total_in_flight == 0)
        assert sum(e.failures for e in lb.stats) == 0


def test_a_hedged_stream_calls_its_callbacks_once_when_it_ends(make_servers):
    (stalling,) = make_servers(1, stall_rate=1.0, stall=STALL)
    (steady,) = make_servers(1)
    with lbkit.Balancer([stalling.address, steady.address], retry=hedged()) as lb:
        lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        for _ in range(2):  # one of them starts on the stalling server
            fired: list[object] = []
            stream = stub.StreamPredict(pb2.PredictRequest(max_tokens=3), timeout=10)
            assert stream.add_callback(lambda fired=fired: fired.append("callback"))
            stream.add_done_callback(fired.append)
            assert [t.token for t in stream] == ["tok0", "tok1", "tok2"]
            wait_for(lambda fired=fired: len(fired) == 2)
            assert fired.count("callback") == 1 and fired.count(stream) == 1
            assert stream.code() is grpc.StatusCode.OK and not stream.cancel()
        wait_for(lambda: lb.stats.total_in_flight == 0)


def test_a_future_the_caller_drops_still_ends_and_calls_back(make_servers):
    (stalling,) = make_servers(1, stall_rate=1.0, stall=STALL)
    (steady,) = make_servers(1)
    with lbkit.Balancer([stalling.address, steady.address], retry=hedged(0.2)) as lb:
        lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        answers: list[str] = []
        for _ in range(2):  # as grpc's futures: kept alive by the call until it ends
            stub.Predict.future(REQ, timeout=10).add_done_callback(
                lambda f: answers.append(f.result().served_by)
            )
            gc.collect()
        wait_for(lambda: len(answers) == 2)
        assert answers == [steady.address, steady.address]
        wait_for(lambda: lb.stats.total_in_flight == 0)

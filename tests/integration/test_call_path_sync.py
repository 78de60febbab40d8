"""The sync call path on real servers: each call kind retried alike, bounded by its deadline, counted
once, drained without running twice (see test_call_path_aio.py for the asyncio twins)."""

from __future__ import annotations

import gc
import queue
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

import lbkit
from lbkit.testing import FakeClock
from tests.integration.conftest import pb2, pb2_grpc, wait_for

pytestmark = pytest.mark.timeout(60)

REQ = pb2.PredictRequest(features=[1.0, 2.0])
SERVICE = "/lbkit.inference.v1.ModelService"


def updates(n: int) -> Iterator[pb2.FeatureUpdate]:
    return (pb2.FeatureUpdate(entity_id="e", sequence=i) for i in range(n))


def test_a_ping_pong_bidi_stream_finishes(make_servers):
    """Each request waits for the previous response (a chat): nothing on the call path may hold a lock
    the response side needs while the request iterator waits."""
    servers = make_servers(2)
    with lbkit.Balancer([s.address for s in servers]) as lb:
        lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        answers: queue.Queue[int] = queue.Queue()

        def requests() -> Iterator[pb2.FeatureUpdate]:
            for i in range(5):
                yield pb2.FeatureUpdate(entity_id="chat", sequence=i)
                assert answers.get(timeout=10) == i

        acks = []
        for ack in stub.UpdateFeatures(requests(), timeout=5):
            acks.append(ack.sequence)
            answers.put(ack.sequence)
        assert acks == [0, 1, 2, 3, 4]
        wait_for(lambda: lb.stats.total_in_flight == 0)


def test_a_drain_that_runs_out_fails_its_calls_unavailable_and_runs_none_twice(make_servers):
    (a,) = make_servers(1, delay=1.0)
    (b,) = make_servers(1)
    discovery = lbkit.StaticDiscovery([a.address])
    clock = FakeClock()
    policy = lbkit.RetryPolicy(retryable_codes=())
    with lbkit.Balancer(discovery, drain_timeout=5.0, clock=clock, retry=policy) as lb:
        lb.wait_ready()
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        errors: list[BaseException] = []

        def call() -> None:
            try:
                stub.Predict(REQ, timeout=30)
            except BaseException as exc:
                errors.append(exc)

        callers = [threading.Thread(target=call) for _ in range(8)]
        for t in callers:
            t.start()
        wait_for(lambda: lb.stats[a.address].in_flight == 8 and a.calls["Predict"] == 8)
        discovery.update([b.address])
        wait_for(lambda: lb.endpoint_states().get(a.address) == "draining")
        clock.advance(6.0)  # past drain_timeout with the calls still executing on a
        for t in callers:
            t.join(10)
    assert len(errors) == 8
    for err in errors:
        assert isinstance(err, lbkit.EndpointRemovedError) and err.code() is grpc.StatusCode.UNAVAILABLE
        assert err.address == a.address and a.address in err.details() and "drain" in err.details()
    assert b.calls["Predict"] == 0  # none executed a second time


def test_a_drained_stream_ends_unavailable_and_is_not_run_again(make_servers):
    (a,) = make_servers(1, delay=0.5, tokens=20)
    (b,) = make_servers(1)
    discovery = lbkit.StaticDiscovery([a.address])
    clock = FakeClock()
    with lbkit.Balancer(discovery, drain_timeout=5.0, clock=clock) as lb:
        lb.wait_ready()
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        stream = stub.StreamPredict(REQ, timeout=30)
        assert next(stream).served_by == a.address
        discovery.update([b.address])
        wait_for(lambda: lb.endpoint_states().get(a.address) == "draining")
        clock.advance(6.0)
        with pytest.raises(lbkit.EndpointRemovedError) as info:
            for _ in stream:
                pass
        assert info.value.address == a.address and stream.code() is grpc.StatusCode.UNAVAILABLE
        wait_for(lambda: lb.stats.total_in_flight == 0)
    assert b.calls["StreamPredict"] == 0  # it had answered: never retried


def test_a_drain_that_runs_out_follows_the_retry_policy(make_servers):
    (a,) = make_servers(1, delay=1.0)
    (b,) = make_servers(1)
    discovery = lbkit.StaticDiscovery([a.address])
    clock = FakeClock()
    with lbkit.Balancer(discovery, drain_timeout=5.0, clock=clock) as lb:
        lb.wait_ready()
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        replies: list[str] = []
        t = threading.Thread(target=lambda: replies.append(stub.Predict(REQ, timeout=30).served_by))
        t.start()
        wait_for(lambda: a.calls["Predict"] == 1)
        discovery.update([b.address])
        wait_for(lambda: lb.endpoint_states().get(a.address) == "draining")
        wait_for(lambda: lb.endpoint_states().get(b.address) == "ready")
        clock.advance(6.0)
        wait_for(lambda: lb.calls_retried == 1)  # UNAVAILABLE is retryable by default: a token spent
        clock.advance(1.0)  # past the backoff, on the balancer's clock
        t.join(10)
        assert replies == [b.address]


def test_a_picked_channel_counts_its_calls_and_the_drain_waits_for_them(make_servers):
    (a,) = make_servers(1, delay=0.5)
    (b,) = make_servers(1)
    discovery = lbkit.StaticDiscovery([a.address])
    with lbkit.Balancer(discovery, drain_timeout=30.0) as lb:
        channel = lb.pick(timeout=5)
        assert isinstance(channel, grpc.Channel)
        stub = pb2_grpc.ModelServiceStub(channel)
        replies: list[str] = []
        t = threading.Thread(target=lambda: replies.append(stub.Predict(REQ, timeout=10).served_by))
        t.start()
        wait_for(lambda: lb.stats[a.address].in_flight == 1)
        discovery.update([b.address])
        wait_for(lambda: lb.endpoint_states().get(a.address) == "draining")
        start = time.monotonic()
        with pytest.raises(lbkit.EndpointRemovedError) as info:
            stub.Predict(REQ, timeout=10)
        assert time.monotonic() - start < 1.0 and a.address in info.value.details()
        t.join(10)
        assert replies == [a.address]  # the call in flight finished: the drain waited for it
        wait_for(lambda: a.address not in lb.members)
        assert lb.stats.total_in_flight == 0


def test_a_call_without_deadline_waits_for_a_ready_endpoint_once():
    clock = FakeClock()
    with lbkit.Balancer(["127.0.0.1:1"], wait_timeout=10.0, clock=clock) as lb:
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        errors: list[BaseException] = []

        def call() -> None:
            try:
                stub.Predict(REQ)
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=call)
        t.start()
        clock.advance(5.0)
        assert t.is_alive()
        clock.advance(5.0)  # wait_timeout in all: the call ends now, not after a second wait
        t.join(5)
        assert not t.is_alive()
        assert len(errors) == 1 and isinstance(errors[0], lbkit.NoReadyEndpointError)
        assert lb.budget.tokens == lb.budget.max_tokens and lb.calls_retried == 0


@pytest.mark.parametrize("kind", ["unary", "stream"])
def test_backoff_never_runs_past_the_deadline(make_servers, kind):
    servers = make_servers(2, fail_rate=1.0)
    policy = lbkit.RetryPolicy(initial_backoff=5.0, max_backoff=5.0, max_attempts=5)
    with lbkit.Balancer([s.address for s in servers], retry=policy) as lb:
        lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        worst = 0.0
        for _ in range(6):
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                if kind == "unary":
                    stub.Predict(REQ, timeout=0.2)
                else:
                    list(stub.StreamPredict(REQ, timeout=0.2))
            worst = max(worst, time.monotonic() - start)
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    # Backoffs of up to 5 s, none slept past the 0.2 s deadline (the margin is for a loaded machine).
    assert worst < 0.2 + 0.8, worst


def test_no_exception_leaves_a_call_in_flight(make_servers):
    servers = make_servers(2)
    with lbkit.Balancer([s.address for s in servers]) as lb:
        lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        bad = [("x-n", 1)]  # grpc raises TypeError: metadata values must be str or bytes
        with pytest.raises(TypeError):
            stub.Predict(REQ, metadata=bad, timeout=5)
        with pytest.raises(TypeError):
            stub.Predict.with_call(REQ, metadata=bad, timeout=5)
        with pytest.raises(TypeError):
            stub.Predict.future(REQ, metadata=bad, timeout=5).result()
        with pytest.raises((TypeError, grpc.RpcError)):
            list(stub.StreamPredict(REQ, metadata=bad, timeout=5))
        with pytest.raises((TypeError, grpc.RpcError)):
            stub.UploadFeatures(updates(2), metadata=bad, timeout=5)
        assert lb.stats.total_in_flight == 0
        assert all(e.in_flight == 0 for e in lb.stats)


def test_every_way_a_call_ends_finishes_its_attempts_once(make_servers):
    servers = make_servers(2, tokens=50, delay=0.002)
    with lbkit.Balancer([s.address for s in servers]) as lb:
        lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        stub.Predict.future(REQ, timeout=5).result()
        assert stub.UploadFeatures(updates(3), timeout=5).count == 3
        assert stub.UploadFeatures.future(updates(4), timeout=5).result().count == 4
        stream = stub.StreamPredict(REQ, timeout=5)
        next(stream)
        stream.cancel()
        stream = stub.StreamPredict(REQ, timeout=5)
        next(stream)
        del stream  # abandoned
        gc.collect()
        bidi = stub.UpdateFeatures(iter([pb2.FeatureUpdate(entity_id="x")] * 3), timeout=5)
        next(bidi)
        del bidi
        gc.collect()

        def raising() -> Iterator[pb2.FeatureUpdate]:
            yield pb2.FeatureUpdate(sequence=1)
            raise ValueError("the request iterator failed")

        with pytest.raises(ValueError, match="the request iterator failed"):
            stub.UploadFeatures(raising(), timeout=5)
        with pytest.raises(ValueError, match="the request iterator failed"):
            list(stub.UpdateFeatures(raising(), timeout=5))
        wait_for(lambda: lb.stats.total_in_flight == 0)
        assert all(e.in_flight == 0 for e in lb.stats)
        ok = sum(e.successes for e in lb.stats)
        failed = sum(e.failures for e in lb.stats)
        assert failed == 0 and ok >= 3  # cancels and the caller's own errors are no endpoint's failures


def test_a_stream_done_callback_fires_once_for_the_call_the_caller_sees(make_servers):
    (bad,) = make_servers(1, fail_rate=1.0)
    (good,) = make_servers(1)
    with lbkit.Balancer([bad.address, good.address], selector="round_robin") as lb:
        lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        for _ in range(2):  # one of the two starts on the bad server
            seen: list[grpc.StatusCode] = []
            fired = threading.Event()
            call = stub.StreamPredict(pb2.PredictRequest(max_tokens=3), timeout=5)
            call.add_done_callback(lambda c, seen=seen, fired=fired: (seen.append(c.code()), fired.set()))
            assert [t.served_by for t in call] == [good.address] * 3
            assert fired.wait(5)
            assert seen == [grpc.StatusCode.OK]
            assert call.code() is grpc.StatusCode.OK
        assert bad.calls["StreamPredict"] in (1, 2)  # a random start: each call tries it at most once


def test_client_and_bidi_streams_are_retried_with_their_requests_replayed(make_servers):
    (bad,) = make_servers(1, fail_rate=1.0)
    (good,) = make_servers(1)
    with lbkit.Balancer([bad.address, good.address], selector="round_robin") as lb:
        lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        for _ in range(2):
            summary = stub.UploadFeatures(updates(5), timeout=5)
            assert (summary.count, summary.last_sequence, summary.served_by) == (5, 4, good.address)
            future = stub.UploadFeatures.future(updates(3), timeout=5)
            assert future.result().count == 3
            acks = list(stub.UpdateFeatures(updates(4), timeout=5))
            assert [a.sequence for a in acks] == [0, 1, 2, 3] and {a.served_by for a in acks} == {
                good.address
            }
        assert bad.calls["UploadFeatures"] >= 1 and bad.calls["UpdateFeatures"] >= 1


def test_futures_are_retried_like_blocking_calls(make_servers):
    (bad,) = make_servers(1, fail_rate=1.0)
    (good,) = make_servers(1)
    with lbkit.Balancer([bad.address, good.address], selector="round_robin") as lb:
        lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        futures = [stub.Predict.future(REQ, timeout=5) for _ in range(4)]
        fired = []
        for f in futures:
            f.add_done_callback(fired.append)
        assert {f.result().served_by for f in futures} == {good.address}
        assert all(f.code() is grpc.StatusCode.OK and not f.cancelled() for f in futures)
        wait_for(lambda: len(fired) == 4)
        assert bad.calls["Predict"] >= 1


def test_a_future_cancelled_while_its_call_runs_ends_cancelled_once(make_servers):
    (server,) = make_servers(1, stall_rate=1.0, stall=30.0)
    with lbkit.Balancer([server.address]) as lb:
        lb.wait_ready(count=1)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        future = stub.Predict.future(REQ, timeout=20)
        fired: list[object] = []
        future.add_done_callback(fired.append)
        wait_for(lambda: server.servicer.stalled == 1)  # on the server, running
        assert future.running() and not future.done()
        assert future.cancel()
        with pytest.raises(grpc.FutureCancelledError):
            future.result(timeout=5)
        assert future.cancelled() and future.done() and not future.cancel()
        assert future.code() is grpc.StatusCode.CANCELLED
        wait_for(lambda: server.servicer.abandoned == 1)  # cancelled on the server too
        wait_for(lambda: lb.stats.total_in_flight == 0)
        assert fired == [future] and sum(e.failures for e in lb.stats) == 0
        assert lb.calls_retried == 0


def test_a_future_cancelled_while_it_waits_for_an_endpoint_ends_at_once():
    clock = FakeClock()  # stands still: only the cancel can end the wait
    with lbkit.Balancer(["127.0.0.1:1"], wait_timeout=10.0, clock=clock) as lb:
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        future = stub.Predict.future(REQ)
        fired: list[object] = []
        future.add_done_callback(fired.append)
        assert future.cancel()
        with pytest.raises(grpc.FutureCancelledError):
            future.result(timeout=5)
        assert future.cancelled() and future.code() is grpc.StatusCode.CANCELLED
        wait_for(lambda: fired == [future])
        assert lb.stats.total_in_flight == 0 and lb.calls_retried == 0


def test_retries_follow_the_policy_of_each_method(make_servers):
    (bad,) = make_servers(1, fail_rate=1.0)
    (good,) = make_servers(1)
    retry = {
        f"{SERVICE}/UploadFeatures": lbkit.RetryPolicy(max_attempts=1),  # not idempotent
        "*": lbkit.RetryPolicy(),
    }
    with lbkit.Balancer([bad.address, good.address], selector="round_robin", retry=retry) as lb:
        lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        codes = []
        for _ in range(4):
            try:
                stub.UploadFeatures(updates(2), timeout=5)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                codes.append(err.code())
        assert codes.count(grpc.StatusCode.UNAVAILABLE) == 2
        assert {stub.Predict(REQ, timeout=5).served_by for _ in range(4)} == {good.address}


def test_the_key_header_is_not_sent_to_servers_unless_forwarded(make_servers):
    (server,) = make_servers(1)
    for forward in (False, True):
        with lbkit.Balancer([server.address], selector="consistent_hash", forward_key_header=forward) as lb:
            lb.wait_ready()
            stub = pb2_grpc.ModelServiceStub(lb.channel())
            stub.Predict(REQ, metadata=[("lb-key", "user-1"), ("x-trace", "t")], timeout=5)
            list(stub.StreamPredict(REQ, metadata=[("lb-key", "user-1")], timeout=5))
        assert server.servicer is not None
        assert server.servicer.headers["x-trace"] == (2 if forward else 1)
        assert server.servicer.headers["lb-key"] == (2 if forward else 0)


def test_close_with_grace_lets_calls_in_flight_finish_and_refuses_new_ones(make_servers):
    (server,) = make_servers(1, delay=0.3)
    lb = lbkit.Balancer([server.address]).start()
    lb.wait_ready()
    stub = pb2_grpc.ModelServiceStub(lb.channel())
    replies: list[str] = []
    t = threading.Thread(target=lambda: replies.append(stub.Predict(REQ, timeout=5).served_by))
    t.start()
    wait_for(lambda: lb.stats.total_in_flight == 1)
    closer = threading.Thread(target=lambda: lb.close(grace=5.0))
    closer.start()
    wait_for(lambda: lb.closed)
    with pytest.raises(lbkit.NoEndpointsError, match="closed"):
        stub.Predict(REQ, timeout=5)
    t.join(5)
    closer.join(5)
    assert replies == [server.address]


def test_close_cuts_calls_still_in_flight_after_the_grace(make_servers):
    (server,) = make_servers(1, hang=True)
    lb = lbkit.Balancer([server.address]).start()
    lb.wait_ready()
    stub = pb2_grpc.ModelServiceStub(lb.channel())
    errors: list[BaseException] = []

    def call() -> None:
        try:
            stub.Predict(REQ, timeout=30)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=call)
    t.start()
    wait_for(lambda: lb.stats.total_in_flight == 1)
    lb.close(grace=0.1)
    t.join(5)
    assert len(errors) == 1 and isinstance(errors[0], lbkit.EndpointRemovedError)
    assert "closed" in errors[0].details()


def test_bad_call_options_fail_at_construction():
    policy = lbkit.RetryPolicy()
    for retry in ({"Predict": policy}, {"/a.B/C/D": policy}, {"/a.B/*x": policy}, {"*": 3}, 3):
        with pytest.raises(lbkit.ConfigError, match="retry"):
            lbkit.Balancer(["127.0.0.1:1"], retry=retry)  # type: ignore[arg-type]
    with pytest.raises(lbkit.ConfigError, match="forward_key_header"):
        lbkit.Balancer(["127.0.0.1:1"], forward_key_header="yes")  # type: ignore[arg-type]
    lb = lbkit.Balancer(["127.0.0.1:1"])
    with pytest.raises(lbkit.ConfigError, match="grace"):
        lb.close(grace=-1.0)


def test_a_stream_without_a_first_response_within_attempt_timeout_moves_elsewhere(make_servers):
    (hung,) = make_servers(1, hang=True)
    (slow,) = make_servers(1, delay=0.1)  # 0.1 s per token: 0.5 s for five, well past attempt_timeout
    policy = lbkit.RetryPolicy(attempt_timeout=0.3)
    with lbkit.Balancer([hung.address, slow.address], selector="round_robin", retry=policy) as lb:
        lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        for _ in range(2):  # one of the two starts on the hung server
            start = time.monotonic()
            tokens = list(stub.StreamPredict(pb2.PredictRequest(max_tokens=5), timeout=10))
            assert [t.served_by for t in tokens] == [slow.address] * 5  # a stream that answers is not cut
            assert time.monotonic() - start < 5.0
            acks = list(stub.UpdateFeatures(updates(3), timeout=10))
            assert [a.served_by for a in acks] == [slow.address] * 3
        assert hung.calls["StreamPredict"] >= 1 and hung.calls["UpdateFeatures"] >= 1
        wait_for(lambda: lb.stats.total_in_flight == 0)
        assert lb.stats[hung.address].failures >= 2  # no answer in time: the endpoint's failure


def test_a_stream_backing_off_never_holds_up_the_balancers_timers(make_servers):
    """A stream whose first attempt failed waits out its backoff where the caller reads; the first-response
    timer of that attempt, due meanwhile, must not wait for the call (timers run on one thread: every
    other call's timers and the drains would wait too)."""
    (bad,) = make_servers(1, fail_rate=1.0)
    clock = FakeClock()
    policy = lbkit.RetryPolicy(attempt_timeout=0.3, initial_backoff=100.0, max_backoff=100.0)
    with lbkit.Balancer([bad.address], retry=policy, clock=clock) as lb:
        lb.wait_ready()
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        stream = stub.StreamPredict(REQ)
        errors: list[BaseException] = []

        def read() -> None:
            try:
                next(stream)
            except BaseException as exc:
                errors.append(exc)

        reader = threading.Thread(target=read)
        reader.start()
        wait_for(lambda: lb.calls_retried == 1)  # failed at once; now backing off (up to 100 s)
        clock.advance(0.3)  # the failed attempt's first-response timer is due
        fired = threading.Event()
        lb.call_at(clock(), fired.set)
        assert fired.wait(5), "the balancer's timer thread is held up by a call backing off"
        stream.cancel()
        reader.join(5)
        assert not reader.is_alive() and len(errors) == 1


def test_a_backoff_waits_without_spinning(make_servers):
    """A retry's backoff blocks on the balancer's clock: no busy loop (in asyncio, it would hold the
    event loop)."""
    (bad,) = make_servers(1, fail_rate=1.0)
    clock = FakeClock()
    policy = lbkit.RetryPolicy(initial_backoff=100.0, max_backoff=100.0)
    with lbkit.Balancer([bad.address], retry=policy, clock=clock) as lb:
        lb.wait_ready()
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        waits = [0]
        wait_change = lb.wait_change

        def counting(until: float, picker: object) -> None:
            waits[0] += 1
            wait_change(until, picker)  # type: ignore[arg-type]

        lb.wait_change = counting  # type: ignore[method-assign]
        errors: list[BaseException] = []

        def call() -> None:
            try:
                stub.Predict(REQ, timeout=1000)
            except BaseException as exc:
                errors.append(exc)

        caller = threading.Thread(target=call)
        caller.start()
        wait_for(lambda: lb.calls_retried == 1)
        real = time.monotonic()
        wait_for(lambda: time.monotonic() - real > 0.5 or waits[0] > 50)
        assert waits[0] <= 5, f"{waits[0]} waits in 0.5 s of a backoff on a clock that stood still"
        clock.advance(1000.0)
        caller.join(5)
        assert len(errors) == 1 and errors[0].code() is grpc.StatusCode.UNAVAILABLE

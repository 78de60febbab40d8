"""The asyncio call path on real servers: the twins of test_call_path_sync.py."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

import lbkit
import lbkit.aio
from lbkit.testing import FakeClock
from tests.integration.conftest import async_wait_for, pb2, pb2_grpc

pytestmark = pytest.mark.timeout(60)

REQ = pb2.PredictRequest(features=[1.0, 2.0])
SERVICE = "/lbkit.inference.v1.ModelService"


def updates(n: int) -> Iterator[pb2.FeatureUpdate]:
    return (pb2.FeatureUpdate(entity_id="e", sequence=i) for i in range(n))


async def aupdates(n: int) -> AsyncIterator[pb2.FeatureUpdate]:
    for i in range(n):
        yield pb2.FeatureUpdate(entity_id="e", sequence=i)


async def test_a_ping_pong_bidi_stream_finishes(make_servers):
    servers = make_servers(2)
    async with lbkit.aio.Balancer([s.address for s in servers]) as lb:
        await lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        answers: asyncio.Queue[int] = asyncio.Queue()

        async def requests() -> AsyncIterator[pb2.FeatureUpdate]:
            for i in range(5):
                yield pb2.FeatureUpdate(entity_id="chat", sequence=i)
                assert await asyncio.wait_for(answers.get(), 10) == i

        acks = []
        async for ack in stub.UpdateFeatures(requests(), timeout=5):
            acks.append(ack.sequence)
            answers.put_nowait(ack.sequence)
        assert acks == [0, 1, 2, 3, 4]
        await async_wait_for(lambda: lb.stats.total_in_flight == 0)


async def test_a_drain_that_runs_out_fails_its_calls_unavailable_and_runs_none_twice(make_servers):
    (a,) = make_servers(1, delay=1.0)
    (b,) = make_servers(1)
    discovery = lbkit.StaticDiscovery([a.address])
    clock = FakeClock()
    policy = lbkit.RetryPolicy(retryable_codes=())
    async with lbkit.aio.Balancer(discovery, drain_timeout=5.0, clock=clock, retry=policy) as lb:
        await lb.wait_ready()
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        calls = [asyncio.ensure_future(stub.Predict(REQ, timeout=30)) for _ in range(8)]
        await async_wait_for(lambda: lb.stats[a.address].in_flight == 8 and a.calls["Predict"] == 8)
        discovery.update([b.address])
        await async_wait_for(lambda: lb.endpoint_states().get(a.address) == "draining")
        clock.advance(6.0)
        results = await asyncio.gather(*calls, return_exceptions=True)
    for err in results:
        # Never a CancelledError the caller did not cause.
        assert isinstance(err, lbkit.EndpointRemovedError), repr(err)
        assert err.code() is grpc.StatusCode.UNAVAILABLE and err.address == a.address
    assert b.calls["Predict"] == 0


async def test_a_drain_that_runs_out_follows_the_retry_policy(make_servers):
    (a,) = make_servers(1, delay=1.0)
    (b,) = make_servers(1)
    discovery = lbkit.StaticDiscovery([a.address])
    clock = FakeClock()
    async with lbkit.aio.Balancer(discovery, drain_timeout=5.0, clock=clock) as lb:
        await lb.wait_ready()
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        call = asyncio.ensure_future(stub.Predict(REQ, timeout=30))
        await async_wait_for(lambda: a.calls["Predict"] == 1)
        discovery.update([b.address])
        await async_wait_for(lambda: lb.endpoint_states().get(a.address) == "draining")
        await async_wait_for(lambda: lb.endpoint_states().get(b.address) == "ready")
        clock.advance(6.0)
        await async_wait_for(lambda: lb.calls_retried == 1)  # UNAVAILABLE is retryable: a token spent
        clock.advance(1.0)  # past the backoff, on the balancer's clock
        assert (await asyncio.wait_for(call, 10)).served_by == b.address


async def test_a_drained_stream_ends_unavailable_not_cancelled(make_servers):
    (a,) = make_servers(1, delay=0.5, tokens=20)
    (b,) = make_servers(1)
    discovery = lbkit.StaticDiscovery([a.address])
    clock = FakeClock()
    async with lbkit.aio.Balancer(discovery, drain_timeout=5.0, clock=clock) as lb:
        await lb.wait_ready()
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        stream = stub.StreamPredict(REQ, timeout=30)
        first = await stream.read()
        assert first.served_by == a.address
        discovery.update([b.address])
        await async_wait_for(lambda: lb.endpoint_states().get(a.address) == "draining")
        clock.advance(6.0)
        with pytest.raises(lbkit.EndpointRemovedError):
            async for _ in stream:
                pass
        assert await stream.code() is grpc.StatusCode.UNAVAILABLE
    assert b.calls["StreamPredict"] == 0  # it had answered: never retried


async def test_a_picked_channel_counts_its_calls_and_the_drain_waits_for_them(make_servers):
    (a,) = make_servers(1, delay=0.5)
    (b,) = make_servers(1)
    discovery = lbkit.StaticDiscovery([a.address])
    async with lbkit.aio.Balancer(discovery, drain_timeout=30.0) as lb:
        channel = await lb.pick(timeout=5)
        assert isinstance(channel, grpc.aio.Channel)
        stub = pb2_grpc.ModelServiceStub(channel)
        call = asyncio.ensure_future(stub.Predict(REQ, timeout=10))
        await async_wait_for(lambda: lb.stats[a.address].in_flight == 1)
        discovery.update([b.address])
        await async_wait_for(lambda: lb.endpoint_states().get(a.address) == "draining")
        start = time.monotonic()
        with pytest.raises(lbkit.EndpointRemovedError):
            await stub.Predict(REQ, timeout=10)
        assert time.monotonic() - start < 1.0
        assert (await call).served_by == a.address
        await async_wait_for(lambda: a.address not in lb.members)
        assert lb.stats.total_in_flight == 0


async def test_a_call_without_deadline_waits_for_a_ready_endpoint_once():
    clock = FakeClock()
    async with lbkit.aio.Balancer(["127.0.0.1:1"], wait_timeout=10.0, clock=clock) as lb:
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        call = asyncio.ensure_future(stub.Predict(REQ))
        await asyncio.sleep(0.05)
        clock.advance(5.0)
        await asyncio.sleep(0.05)
        assert not call.done()
        clock.advance(5.0)
        with pytest.raises(lbkit.NoReadyEndpointError):
            await asyncio.wait_for(call, 5)
        assert lb.budget.tokens == lb.budget.max_tokens and lb.calls_retried == 0


@pytest.mark.parametrize("kind", ["unary", "stream"])
async def test_backoff_never_runs_past_the_deadline(make_servers, kind):
    servers = make_servers(2, fail_rate=1.0)
    policy = lbkit.RetryPolicy(initial_backoff=5.0, max_backoff=5.0, max_attempts=5)
    async with lbkit.aio.Balancer([s.address for s in servers], retry=policy) as lb:
        await lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        worst = 0.0
        for _ in range(6):
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                if kind == "unary":
                    await stub.Predict(REQ, timeout=0.2)
                else:
                    [t async for t in stub.StreamPredict(REQ, timeout=0.2)]
            worst = max(worst, time.monotonic() - start)
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    assert worst < 0.2 + 0.8, worst  # backoffs of up to 5 s, none slept past the deadline


async def test_no_exception_leaves_a_call_in_flight(make_servers):
    servers = make_servers(2)
    async with lbkit.aio.Balancer([s.address for s in servers]) as lb:
        await lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        bad = [("x-n", 1)]
        with pytest.raises((TypeError, grpc.RpcError)):
            await stub.Predict(REQ, metadata=bad, timeout=5)
        with pytest.raises((TypeError, grpc.RpcError)):
            [t async for t in stub.StreamPredict(REQ, metadata=bad, timeout=5)]
        with pytest.raises((TypeError, grpc.RpcError)):
            await stub.UploadFeatures(updates(2), metadata=bad, timeout=5)
        await async_wait_for(lambda: lb.stats.total_in_flight == 0)
        assert all(e.in_flight == 0 for e in lb.stats)


async def test_every_way_a_call_ends_finishes_its_attempts_once(make_servers):
    servers = make_servers(2, tokens=50, delay=0.002)
    async with lbkit.aio.Balancer([s.address for s in servers]) as lb:
        await lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        assert (await stub.UploadFeatures(updates(3), timeout=5)).count == 3
        stream = stub.StreamPredict(REQ, timeout=5)
        await stream.read()
        stream.cancel()
        stream = stub.StreamPredict(REQ, timeout=5)
        await stream.read()
        del stream
        gc.collect()
        task = asyncio.ensure_future(stub.Predict(pb2.PredictRequest(), timeout=5))
        await asyncio.sleep(0)
        task.cancel()  # the caller's own cancellation: theirs to see
        with pytest.raises(asyncio.CancelledError):
            await task

        async def raising() -> AsyncIterator[pb2.FeatureUpdate]:
            yield pb2.FeatureUpdate(sequence=1)
            raise ValueError("the request iterator failed")

        with pytest.raises(ValueError, match="the request iterator failed"):
            await stub.UploadFeatures(raising(), timeout=5)
        with pytest.raises(ValueError, match="the request iterator failed"):
            [a async for a in stub.UpdateFeatures(raising(), timeout=5)]
        await async_wait_for(lambda: lb.stats.total_in_flight == 0)
        assert all(e.in_flight == 0 for e in lb.stats)
        assert sum(e.failures for e in lb.stats) == 0


async def test_a_done_callback_fires_once_for_the_call_the_caller_sees(make_servers):
    (bad,) = make_servers(1, fail_rate=1.0)
    (good,) = make_servers(1)
    async with lbkit.aio.Balancer([bad.address, good.address], selector="round_robin") as lb:
        await lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        for _ in range(2):
            seen: list[bool] = []
            call = stub.Predict(REQ, timeout=5)
            call.add_done_callback(lambda c, seen=seen: seen.append(c.done()))
            assert (await call).served_by == good.address
            stream = stub.StreamPredict(pb2.PredictRequest(max_tokens=3), timeout=5)
            stream.add_done_callback(lambda c, seen=seen: seen.append(c.done()))
            assert [t.served_by async for t in stream] == [good.address] * 3
            assert seen == [True, True]
            assert await call.code() is grpc.StatusCode.OK and await stream.code() is grpc.StatusCode.OK
        assert 1 <= bad.calls["Predict"] + bad.calls["StreamPredict"] <= 4


async def test_client_and_bidi_streams_are_retried_with_their_requests_replayed(make_servers):
    (bad,) = make_servers(1, fail_rate=1.0)
    (good,) = make_servers(1)
    async with lbkit.aio.Balancer([bad.address, good.address], selector="round_robin") as lb:
        await lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        for _ in range(2):
            summary = await stub.UploadFeatures(aupdates(5), timeout=5)
            assert (summary.count, summary.last_sequence, summary.served_by) == (5, 4, good.address)
            acks = [a async for a in stub.UpdateFeatures(updates(4), timeout=5)]
            assert [a.sequence for a in acks] == [0, 1, 2, 3] and {a.served_by for a in acks} == {
                good.address
            }
        assert bad.calls["UploadFeatures"] >= 1 and bad.calls["UpdateFeatures"] >= 1


async def test_written_requests_are_replayed_too(make_servers):
    (bad,) = make_servers(1, fail_rate=1.0)
    (good,) = make_servers(1)
    async with lbkit.aio.Balancer([bad.address, good.address], selector="round_robin") as lb:
        await lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        for _ in range(2):
            call = stub.UploadFeatures(timeout=5)
            for i in range(3):
                await call.write(pb2.FeatureUpdate(sequence=i))
            await call.done_writing()
            summary = await call
            assert (summary.count, summary.served_by) == (3, good.address)
            bidi = stub.UpdateFeatures(timeout=5)
            got = []
            for i in range(3):
                await bidi.write(pb2.FeatureUpdate(sequence=i))
                got.append((await bidi.read()).sequence)
            await bidi.done_writing()
            assert await bidi.read() is grpc.aio.EOF
            assert got == [0, 1, 2]


async def test_retries_follow_the_policy_of_each_method(make_servers):
    (bad,) = make_servers(1, fail_rate=1.0)
    (good,) = make_servers(1)
    retry = {f"{SERVICE}/UploadFeatures": lbkit.RetryPolicy(max_attempts=1), "*": lbkit.RetryPolicy()}
    async with lbkit.aio.Balancer([bad.address, good.address], selector="round_robin", retry=retry) as lb:
        await lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        codes = []
        for _ in range(4):
            try:
                await stub.UploadFeatures(updates(2), timeout=5)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                codes.append(err.code())
        assert codes.count(grpc.StatusCode.UNAVAILABLE) == 2
        assert {(await stub.Predict(REQ, timeout=5)).served_by for _ in range(4)} == {good.address}


async def test_the_key_header_is_not_sent_to_servers_unless_forwarded(make_servers):
    (server,) = make_servers(1)
    for forward in (False, True):
        async with lbkit.aio.Balancer(
            [server.address], selector="consistent_hash", forward_key_header=forward
        ) as lb:
            await lb.wait_ready()
            stub = pb2_grpc.ModelServiceStub(lb.channel())
            await stub.Predict(REQ, metadata=[("lb-key", "user-1"), ("x-trace", "t")], timeout=5)
        assert server.servicer is not None
        assert server.servicer.headers["lb-key"] == (1 if forward else 0)
        assert server.servicer.headers["x-trace"] == (2 if forward else 1)


async def test_close_with_grace_lets_calls_in_flight_finish_and_refuses_new_ones(make_servers):
    (server,) = make_servers(1, delay=0.3)
    lb = await lbkit.aio.Balancer([server.address]).start()
    await lb.wait_ready()
    stub = pb2_grpc.ModelServiceStub(lb.channel())
    call = asyncio.ensure_future(stub.Predict(REQ, timeout=5))
    await async_wait_for(lambda: lb.stats.total_in_flight == 1)
    closing = asyncio.ensure_future(lb.aclose(grace=5.0))
    await async_wait_for(lambda: lb.closed)
    with pytest.raises(lbkit.NoEndpointsError, match="closed"):
        await stub.Predict(REQ, timeout=5)
    assert (await call).served_by == server.address
    await closing


async def test_close_cuts_calls_still_in_flight_after_the_grace(make_servers):
    (server,) = make_servers(1, hang=True)
    lb = await lbkit.aio.Balancer([server.address]).start()
    await lb.wait_ready()
    stub = pb2_grpc.ModelServiceStub(lb.channel())
    call = asyncio.ensure_future(stub.Predict(REQ, timeout=30))
    await async_wait_for(lambda: lb.stats.total_in_flight == 1)
    await lb.aclose(grace=0.1)
    with pytest.raises(lbkit.EndpointRemovedError, match="closed"):
        await call


async def test_bad_close_grace_is_a_config_error():
    lb = lbkit.aio.Balancer(["127.0.0.1:1"])
    with pytest.raises(lbkit.ConfigError, match="grace"):
        await lb.aclose(grace=-1.0)


async def test_a_stream_without_a_first_response_within_attempt_timeout_moves_elsewhere(make_servers):
    (hung,) = make_servers(1, hang=True)
    (slow,) = make_servers(1, delay=0.1)
    policy = lbkit.RetryPolicy(attempt_timeout=0.3)
    async with lbkit.aio.Balancer([hung.address, slow.address], selector="round_robin", retry=policy) as lb:
        await lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        for _ in range(2):
            tokens = [t async for t in stub.StreamPredict(pb2.PredictRequest(max_tokens=5), timeout=10)]
            assert [t.served_by for t in tokens] == [slow.address] * 5
            acks = [a async for a in stub.UpdateFeatures(aupdates(3), timeout=10)]
            assert [a.served_by for a in acks] == [slow.address] * 3
        assert hung.calls["StreamPredict"] >= 1 and hung.calls["UpdateFeatures"] >= 1
        await async_wait_for(lambda: lb.stats.total_in_flight == 0)
        assert lb.stats[hung.address].failures >= 2

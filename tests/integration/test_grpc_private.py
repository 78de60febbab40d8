"""The private grpcio parts lbkit uses (``lbkit._grpc_private``), checked on real channels and calls, so a
grpcio release that changes them fails here, loudly, rather than in production, quietly."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from lbkit._grpc_private import connectivity, finished_code, finished_trailing_metadata, keep_server_status

from .conftest import async_wait_for, pb2, pb2_grpc, wait_for

pytestmark = pytest.mark.timeout(30)


def test_connectivity_reads_a_sync_channel_and_asks_an_idle_one_to_connect(make_servers) -> None:
    (server,) = make_servers(1)
    channel = grpc.insecure_channel(server.address)
    try:
        # A new channel is IDLE and stays so when only read...
        assert connectivity(channel) is grpc.ChannelConnectivity.IDLE
        assert connectivity(channel) is grpc.ChannelConnectivity.IDLE
        # ...and connects when asked: the states are grpc's own enum, so READY compares by identity.
        states = [connectivity(channel, try_to_connect=True)]
        wait_for(lambda: states.append(connectivity(channel)) or states[-1] is grpc.ChannelConnectivity.READY)
        assert set(states) <= {
            grpc.ChannelConnectivity.IDLE,
            grpc.ChannelConnectivity.CONNECTING,
            grpc.ChannelConnectivity.READY,
        }
        server.stop(0)
        wait_for(lambda: connectivity(channel) is not grpc.ChannelConnectivity.READY)
    finally:
        channel.close()


def test_connectivity_of_a_closed_or_foreign_channel_is_none(make_servers) -> None:
    (server,) = make_servers(1)
    channel = grpc.insecure_channel(server.address)
    channel.close()
    assert connectivity(channel) is None
    assert connectivity(object()) is None


async def test_finished_code_reads_the_status_of_done_aio_calls(make_servers) -> None:
    (ok_server,) = make_servers(1)
    (failing,) = make_servers(1, fail_rate=1.0, fail_code=grpc.StatusCode.INTERNAL)
    (hanging,) = make_servers(1, hang=True)
    async with grpc.aio.insecure_channel(ok_server.address) as channel:
        call = pb2_grpc.ModelServiceStub(channel).Predict(pb2.PredictRequest(), timeout=5)
        await call
        assert finished_code(call) is grpc.StatusCode.OK
    async with grpc.aio.insecure_channel(failing.address) as channel:
        call = pb2_grpc.ModelServiceStub(channel).Predict(pb2.PredictRequest(), timeout=5)
        with pytest.raises(grpc.RpcError):
            await call
        assert finished_code(call) is grpc.StatusCode.INTERNAL
    async with grpc.aio.insecure_channel(hanging.address) as channel:
        call = pb2_grpc.ModelServiceStub(channel).Predict(pb2.PredictRequest(), timeout=5)
        await async_wait_for(lambda: hanging.calls["Predict"] == 1)
        assert finished_code(call) is None  # still running: no status yet
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert finished_code(call) is grpc.StatusCode.CANCELLED


async def test_finished_trailing_metadata_reads_the_trailers_of_done_aio_calls(make_servers) -> None:
    (ok_server,) = make_servers(1)
    (failing,) = make_servers(1, fail_rate=1.0)
    for server in (ok_server, failing):
        async with grpc.aio.insecure_channel(server.address) as channel:
            call = pb2_grpc.ModelServiceStub(channel).Predict(pb2.PredictRequest(), timeout=5)
            with contextlib.suppress(grpc.RpcError):
                await call
            trailers = finished_trailing_metadata(call)
            assert trailers is not None and dict(trailers)["lb-served-by"] == server.address
    assert finished_trailing_metadata(object()) is None


async def test_keep_server_status_reports_the_servers_status_when_a_write_loses_the_race(
    make_servers,
) -> None:
    (failing,) = make_servers(1, fail_rate=1.0, fail_code=grpc.StatusCode.UNAVAILABLE)

    def updates() -> list[pb2.FeatureUpdate]:
        return [pb2.FeatureUpdate(sequence=i) for i in range(50)]

    async with grpc.aio.insecure_channel(failing.address) as channel:
        stub = pb2_grpc.ModelServiceStub(channel)
        seen: list[grpc.StatusCode | None] = []
        for _ in range(20):  # the server ends each call while the client is still writing
            call = stub.UpdateFeatures(updates(), timeout=5)
            assert keep_server_status(call) is True
            call.add_done_callback(lambda c: seen.append(finished_code(c)))
            with pytest.raises(grpc.RpcError) as info:
                async for _ in call:
                    pass
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            upload = stub.UploadFeatures(updates(), timeout=5)
            assert keep_server_status(upload) is True
            with pytest.raises(grpc.RpcError) as info:
                await upload
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        await async_wait_for(lambda: len(seen) == 20)
        assert seen == [grpc.StatusCode.UNAVAILABLE] * 20  # one status per call, the server's
    assert keep_server_status(object()) is False


async def test_keep_server_status_leaves_a_late_half_close_to_the_calls_status(make_servers) -> None:
    """A half-close (or a write) made after grpc core ended the call, before grpc.aio saw the end: the
    writer would cancel the call (its caller then gets a CancelledError); with this it leaves the status
    to the call's end."""
    (server,) = make_servers(1, hang=True)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb2_grpc.ModelServiceStub(channel)
        for close in (True, False):
            upload = stub.UploadFeatures(timeout=0.05)  # writes by hand: grpc.aio's writer does nothing
            assert keep_server_status(upload) is True
            await upload.write(pb2.FeatureUpdate(sequence=1))
            await async_wait_for(lambda upload=upload: upload.done())  # the deadline ended it in core
            if close:
                await upload._cython_call.send_receive_close()  # no error: the status says it all
            else:
                with pytest.raises(grpc._cython.cygrpc.InternalError):  # grpc.aio's writer handles it
                    await upload._cython_call.send_serialized_message(b"")
            assert await upload.code() is grpc.StatusCode.DEADLINE_EXCEEDED

"""Model servers in a child process, steered by commands: lbkit.testing.server_process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any, cast

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lbkit.testing.proto import model_service_pb2 as pb2
from lbkit.testing.proto import model_service_pb2_grpc as pb2_grpc
from lbkit.testing.server_process import ServerProcess


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); treat it as gone once its state is Z.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _predict(address: str, timeout: float = 5.0) -> pb2.PredictResponse:
    with grpc.insecure_channel(address) as channel:
        stub: Any = pb2_grpc.ModelServiceStub(channel)  # type: ignore[no-untyped-call]
        return cast(
            pb2.PredictResponse, stub.Predict(pb2.PredictRequest(features=[1.0, 2.0]), timeout=timeout)
        )


@pytest.fixture(scope="module")
def servers() -> Iterator[ServerProcess]:
    with ServerProcess(count=3) as sp:
        yield sp


def test_ready_addresses_answer_and_name_themselves(servers: ServerProcess) -> None:
    assert len(servers.addresses) == 3
    assert len(set(servers.addresses)) == 3
    assert all(a.startswith("127.0.0.1:") for a in servers.addresses)
    for address in servers.addresses:
        reply = _predict(address)
        assert reply.served_by == address
        assert list(reply.predictions) == [3.0]


def test_calls_counts_per_server_and_reset(servers: ServerProcess) -> None:
    servers.command("reset")
    _predict(servers.addresses[1])
    _predict(servers.addresses[1])
    _predict(servers.addresses[2])
    assert servers.calls() == [0, 2, 1]
    servers.command("reset")
    assert servers.calls() == [0, 0, 0]


def test_slow_makes_calls_take_that_long(servers: ServerProcess) -> None:
    servers.command("slow 0 150")
    try:
        start = time.perf_counter()
        slow = _predict(servers.addresses[0])
        assert time.perf_counter() - start >= 0.15 and slow.latency_ms >= 150
    finally:
        servers.command("slow 0 0")
    # The server's own measure of the call: a busy machine may delay the reply, not the handler's sleep.
    assert _predict(servers.addresses[0]).latency_ms < 150 / 2


def test_fail_makes_every_call_unavailable(servers: ServerProcess) -> None:
    servers.command("fail 1 1.0")
    try:
        with pytest.raises(grpc.RpcError) as info:
            _predict(servers.addresses[1])
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        servers.command("fail 1 0")
    assert _predict(servers.addresses[1]).served_by == servers.addresses[1]


def test_hang_holds_calls_until_the_deadline(servers: ServerProcess) -> None:
    servers.command("hang 2 on")
    try:
        start = time.perf_counter()
        with pytest.raises(grpc.RpcError) as info:
            _predict(servers.addresses[2], timeout=0.3)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.perf_counter() - start >= 0.29
    finally:
        servers.command("hang 2 off")
    assert _predict(servers.addresses[2]).served_by == servers.addresses[2]


def test_serving_off_shows_in_the_health_service(servers: ServerProcess) -> None:
    def status() -> int:
        with grpc.insecure_channel(servers.addresses[0]) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5
            )
            return int(reply.status)

    servers.command("serving 0 off")
    try:
        assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        servers.command("serving 0 on")
    assert status() == health_pb2.HealthCheckResponse.SERVING


def test_stop_refuses_calls_and_start_serves_on_the_same_port(servers: ServerProcess) -> None:
    address = servers.addresses[1]
    servers.command("reset")
    _predict(address)
    assert servers.command("stop 1") == address
    try:
        with pytest.raises(grpc.RpcError) as info:
            _predict(address, timeout=1.0)
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        with pytest.raises(RuntimeError, match="stopped"):
            servers.command("serving 1 off")
    finally:
        assert servers.command("start 1") == address
    assert _predict(address).served_by == address
    assert servers.calls()[1] == 2  # counts survive a restart


@pytest.mark.parametrize("bad", ["bogus", "slow 9 10", "fail 0 2", "hang 0 maybe", "stop"])
def test_bad_commands_answer_err_and_keep_serving(servers: ServerProcess, bad: str) -> None:
    with pytest.raises(RuntimeError):
        servers.command(bad)
    assert _predict(servers.addresses[0]).served_by == servers.addresses[0]


def test_close_reaps_the_child_and_is_idempotent() -> None:
    sp = ServerProcess(count=1, slow={0: 5.0}).start()
    pid = sp.pid
    assert pid is not None and _alive(pid)
    sp.close()
    sp.close()
    assert not _alive(pid)
    with pytest.raises(RuntimeError):
        sp.command("calls")


def test_child_exits_when_stdin_closes() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "lbkit.testing.server_process", "--count", "1"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().startswith("READY 127.0.0.1:")
        proc.stdin.close()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_one_process_per_server_forwards_commands() -> None:
    with ServerProcess(count=2, processes=True, fail={1: 1.0}) as sp:
        assert len(set(sp.addresses)) == 2
        assert _predict(sp.addresses[0]).served_by == sp.addresses[0]
        with pytest.raises(grpc.RpcError):
            _predict(sp.addresses[1])
        sp.command("fail 1 0")
        assert _predict(sp.addresses[1]).served_by == sp.addresses[1]
        assert sp.calls() == [1, 2]


def test_kill_crashes_one_server_and_start_brings_it_back_on_its_port() -> None:
    with ServerProcess(count=2, processes=True) as sp:
        address = sp.addresses[1]
        _predict(address)
        assert sp.command("kill 1") == address
        with pytest.raises(grpc.RpcError) as info:
            _predict(address, timeout=1.0)
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert _predict(sp.addresses[0]).served_by == sp.addresses[0]  # the other one lives on
        with pytest.raises(RuntimeError, match="killed"):
            sp.command("slow 1 10")
        assert sp.calls() == [1, 1]  # the dead server's count is kept
        assert sp.command("start 1") == address
        assert _predict(address).served_by == address
        assert sp.calls() == [1, 2]


def test_kill_needs_one_process_per_server(servers: ServerProcess) -> None:
    with pytest.raises(RuntimeError, match="--processes"):
        servers.command("kill 0")


def test_ports_binds_the_given_port() -> None:
    with ServerProcess(count=1) as first:
        port = int(first.addresses[0].rpartition(":")[2])
    with ServerProcess(count=1, ports=[port]) as sp:
        assert sp.addresses == [f"127.0.0.1:{port}"]
        assert _predict(sp.addresses[0]).served_by == sp.addresses[0]


def test_a_killed_server_whose_port_is_taken_stays_killed_and_starts_later() -> None:
    with ServerProcess(count=2, processes=True) as sp:
        address = sp.addresses[1]
        host, _, port = address.rpartition(":")
        sp.command("kill 1")
        squatter = socket.socket()
        squatter.bind((host, int(port)))  # someone else takes the port while the server is down
        squatter.listen()
        try:
            with pytest.raises(RuntimeError):
                sp.command("start 1")
            with pytest.raises(RuntimeError, match="killed"):
                sp.command("slow 1 10")  # still killed, not a dead child taking commands
        finally:
            squatter.close()
        assert sp.command("start 1") == address
        assert _predict(address).served_by == address

"""lbkit.registration registration against lbkit's test Consul server: a gRPC check run against a real grpc
server's health service, a TTL check kept alive by the heartbeat, deregistration on exit."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import lbkit.registration
from lbkit.errors import ConfigError
from lbkit.registration import AsyncRegistration, GrpcCheck, Registration, RegistrationError, TtlCheck
from lbkit.testing.consul import ConsulServer, ConsulTimings

SERVICE = "model"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def server() -> Iterator[ConsulServer]:
    timings = ConsulTimings(
        min_check_interval=0.05, check_reap_interval=0.1, check_deregister_interval_min=0.1
    )
    with ConsulServer(timings=timings) as s:
        yield s


@pytest.fixture
def grpc_health_server() -> Iterator[tuple[str, health.HealthServicer]]:
    """A real grpc server on 127.0.0.1 with only grpc.health.v1.Health; yields (address, servicer)."""
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        srv.stop(0)


def eventually(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def check_status(server: ConsulServer, check_id: str) -> str | None:
    checks = server.client().agent.checks()
    return checks[check_id]["Status"] if check_id in checks else None


def passing_addresses(server: ConsulServer) -> set[str]:
    _, entries = server.client().health.service(SERVICE, passing=True)
    return {f"{e['Service']['Address']}:{e['Service']['Port']}" for e in entries}


def test_grpc_check_follows_the_servers_health_and_exit_deregisters(
    server: ConsulServer, grpc_health_server: tuple[str, Any]
) -> None:
    address, servicer = grpc_health_server
    servicer.set("", SERVING)
    check = GrpcCheck(interval=0.05, timeout=1.0)
    with lbkit.registration.register(
        SERVICE,
        address,
        tags=["v1", "gpu"],
        meta={"zone": "z1"},
        weight=5,
        warning_weight=2,
        check=check,
        consul_address=server.address,
        env={},
    ) as reg:
        agent_service = server.client().agent.services()[reg.service_id]
        assert agent_service["Tags"] == ["v1", "gpu"] and agent_service["Meta"] == {"zone": "z1"}
        assert agent_service["Weights"] == {"Passing": 5, "Warning": 2}
        assert agent_service["Port"] == int(address.rpartition(":")[2])
        eventually(lambda: passing_addresses(server) == {address})
        servicer.set("", NOT_SERVING)
        eventually(lambda: check_status(server, reg.check_id or "") == "critical")
        assert passing_addresses(server) == set()
        servicer.set("", SERVING)
        eventually(lambda: passing_addresses(server) == {address})
    assert reg.service_id not in server.client().agent.services()
    assert not reg.registered


def test_grpc_check_of_a_named_service(server: ConsulServer, grpc_health_server: tuple[str, Any]) -> None:
    address, servicer = grpc_health_server
    servicer.set("", SERVING)
    servicer.set("model.v1", NOT_SERVING)
    with Registration(
        SERVICE,
        address,
        check=GrpcCheck(service="model.v1", interval=0.05),
        consul_address=server.address,
        env={},
    ) as reg:
        definition = reg.definition["Checks"][0]
        assert definition["GRPC"] == f"{address}/model.v1" and definition["GRPCUseTLS"] is False
        eventually(lambda: check_status(server, reg.check_id or "") == "critical")
        servicer.set("model.v1", SERVING)
        eventually(lambda: check_status(server, reg.check_id or "") == "passing")


def test_ttl_heartbeat_keeps_the_check_passing_then_lapses_when_stopped(server: ConsulServer) -> None:
    ttl = 0.3
    with lbkit.registration.register(
        SERVICE, "127.0.0.1:7001", check=TtlCheck(ttl=ttl), consul_address=server.address, env={}
    ) as reg:
        assert check_status(server, "service:" + reg.service_id) == "passing"
        server.clear_requests()
        start = time.monotonic()
        time.sleep(4 * ttl)
        elapsed = time.monotonic() - start
        assert check_status(server, reg.check_id or "") == "passing"  # refreshed through 4 TTLs
        beats = [r for r in server.requests if r.path.startswith("/v1/agent/check/pass/")]
        # about one beat per ttl/3 (a loaded machine delays some: at least half of them)
        assert elapsed / (ttl / 3) / 2 <= len(beats) <= elapsed / (ttl / 3) + 1
        reg.set_status("warning", note="draining")
        assert check_status(server, reg.check_id or "") == "warning"
        time.sleep(2 * ttl)
        assert check_status(server, reg.check_id or "") == "warning"  # the heartbeat keeps the status
        reg.stop_heartbeat()
        eventually(lambda: check_status(server, reg.check_id or "") == "critical", timeout=3 * ttl + 1)
    assert reg.service_id not in server.client().agent.services()


def test_heartbeat_registers_again_when_the_agent_lost_the_service(server: ConsulServer) -> None:
    with Registration(
        SERVICE, "127.0.0.1:7001", check=TtlCheck(ttl=0.3), consul_address=server.address, env={}
    ) as reg:
        server.client().agent.service.deregister(reg.service_id)
        eventually(lambda: check_status(server, reg.check_id or "") == "passing", timeout=2.0)
        assert reg.service_id in server.client().agent.services()


def test_acl_token_is_sent_with_every_call() -> None:
    token = "b2c1-registration-secret"
    with ConsulServer(acl_token=token) as server:
        with Registration(
            SERVICE,
            "127.0.0.1:7001",
            check=TtlCheck(ttl=5.0),
            consul_address=server.address,
            token=token,
            env={},
        ):
            assert passing_addresses(server) == {"127.0.0.1:7001"}
        puts = [r for r in server.requests if r.method == "PUT"]
        assert len(puts) >= 3 and all(r.headers.get("X-Consul-Token") == token for r in puts)
        with pytest.raises(RegistrationError, match="403") as info:
            Registration(
                SERVICE, "127.0.0.1:7002", consul_address=server.address, token="wrong", env={}
            ).register()
        assert info.value.status == 403


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"address": "127.0.0.1"}, "127.0.0.1"),
        ({"address": "127.0.0.1:0"}, "127.0.0.1:0"),
        ({"address": "127.0.0.1:70000"}, "70000"),
        ({"weight": 0}, "0"),
        ({"warning_weight": -1}, "-1"),
        ({"weight": 1.5}, "1.5"),
        ({"name": "a/b"}, "a/b"),
        ({"tags": ["ok", ""]}, "''"),
        ({"meta": {"k": 1}}, "1"),
        ({"check": "ttl"}, "ttl"),
        ({"consul_address": "consul:abc"}, "consul:abc"),
    ],
)
def test_bad_inputs_raise_config_error_naming_them(kwargs: dict[str, Any], named: str) -> None:
    args: dict[str, Any] = {"name": SERVICE, "address": "127.0.0.1:7001", "env": {}}
    args.update(kwargs)
    with pytest.raises(ConfigError) as info:
        Registration(args.pop("name"), args.pop("address"), **args)
    assert named in str(info.value)


@pytest.mark.parametrize(
    ("factory", "named"),
    [
        (lambda: GrpcCheck(target="nohost"), "nohost"),
        (lambda: GrpcCheck(interval=0), "0"),
        (lambda: GrpcCheck(deregister_after=0.5), "0.5"),
        (lambda: TtlCheck(ttl=-1), "-1"),
    ],
)
def test_bad_checks_raise_config_error(factory: Callable[[], object], named: str) -> None:
    with pytest.raises(ConfigError) as info:
        factory()
    assert named in str(info.value)


def test_an_unreachable_agent_raises_registration_error() -> None:
    with ConsulServer() as gone:
        address = gone.address
    with pytest.raises(RegistrationError) as info:
        lbkit.registration.register(SERVICE, "127.0.0.1:7001", consul_address=address, env={})
    assert info.value.status == 0 and address in str(info.value)


def test_set_status_needs_a_ttl_check() -> None:
    reg = Registration(SERVICE, "127.0.0.1:7001", check=GrpcCheck(), env={})
    with pytest.raises(ConfigError):
        reg.set_status("warning")


async def test_async_registration_with_ttl_heartbeat(server: ConsulServer) -> None:
    ttl = 0.3
    async with AsyncRegistration(
        SERVICE, "127.0.0.1:7003", check=TtlCheck(ttl=ttl), consul_address=server.address, env={}
    ) as reg:
        await asyncio.sleep(3 * ttl)
        status = await asyncio.to_thread(check_status, server, reg.check_id or "")
        assert status == "passing"
        await reg.set_status("critical", note="shutting down")
        assert await asyncio.to_thread(passing_addresses, server) == set()
    services = await asyncio.to_thread(server.client().agent.services)
    assert reg.service_id not in services and not reg.registered


def test_registration_in_a_namespace_is_found_by_discovery_in_it() -> None:
    with (
        ConsulServer(enterprise=True) as srv,
        lbkit.registration.register(
            SERVICE, "127.0.0.1:7001", consul_address=srv.address, env={"CONSUL_NAMESPACE": "team-a"}
        ),
    ):
        scoped = srv.requests[-1]
        assert scoped.path == "/v1/agent/service/register" and scoped.query.get("ns") == ["team-a"]
        _, default_ns = srv.client().health.service(SERVICE)
        assert default_ns == []
        with urllib.request.urlopen(f"{srv.http_addr}/v1/health/service/{SERVICE}?ns=team-a", timeout=5) as r:
            (entry,) = json.loads(r.read())
        assert entry["Service"]["Namespace"] == "team-a" and entry["Service"]["Port"] == 7001

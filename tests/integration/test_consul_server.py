"""ConsulServer, tested through py-consul and raw HTTP as a client of a Consul agent would use it.

The ``agent`` fixture yields the test server, and also a real agent when CONSUL_HTTP_ADDR is set
(marked ``consul_agent``), so the behavioural tests check that the server matches Consul. Tests
that need the server's own hooks (faults, ACL tokens, restarts, timings) use ``server``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import consul
import consul.aio
import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from lbkit.testing.consul import ConsulServer
from tests.integration import consul_support
from tests.integration.consul_support import FAST, Agent, wait_for

agent, name, server = consul_support.agent, consul_support.name, consul_support.server  # fixtures


def check_status(client: Any, check_id: str) -> str:
    return str(client.agent.checks()[check_id]["Status"])


# ---- registration and what agent, catalog and health return ---------------------------------


def test_register_defaults_and_shapes(agent: Agent, name: str) -> None:
    c = agent.client
    assert c.agent.service.register(name, address="127.0.0.1", port=9001, tags=["v1"], meta={"zone": "a"})
    svc = c.agent.services()[name]  # ID defaults to Name
    assert svc["ID"] == name and svc["Service"] == name
    assert (svc["Address"], svc["Port"], svc["Tags"], svc["Meta"]) == (
        "127.0.0.1",
        9001,
        ["v1"],
        {"zone": "a"},
    )
    assert svc["Weights"] == {"Passing": 1, "Warning": 1}
    assert svc["EnableTagOverride"] is False and svc["Datacenter"] == "dc1"
    assert c.agent.service_definition(name)["ContentHash"]

    index, entries = c.health.service(name)
    assert int(index) >= 1 and len(entries) == 1
    node, service, checks = entries[0]["Node"], entries[0]["Service"], entries[0]["Checks"]
    assert {"ID", "Node", "Address", "Datacenter", "TaggedAddresses", "Meta"} <= node.keys()
    assert (service["ID"], service["Service"], service["Port"], service["Tags"]) == (name, name, 9001, ["v1"])
    assert service["Meta"] == {"zone": "a"} and service["Weights"] == {"Passing": 1, "Warning": 1}
    serf = [ch for ch in checks if ch["CheckID"] == "serfHealth"]
    assert serf and serf[0]["Status"] == "passing" and serf[0]["ServiceID"] == ""

    _, services = c.catalog.services()
    assert services[name] == ["v1"]
    _, nodes = c.catalog.service(name)
    assert (nodes[0]["ServiceID"], nodes[0]["ServiceAddress"], nodes[0]["ServicePort"]) == (
        name,
        "127.0.0.1",
        9001,
    )
    assert nodes[0]["ServiceTags"] == ["v1"] and nodes[0]["Node"] == node["Node"]
    _, catalog_nodes = c.catalog.nodes()
    assert node["Node"] in [n["Node"] for n in catalog_nodes]


def test_weights_and_checks_in_health_entries(agent: Agent, name: str) -> None:
    c = agent.client
    check = consul.Check.ttl("30s")
    c.agent.service.register(
        name, service_id=f"{name}-1", port=1, weights={"Passing": 10, "Warning": 2}, check=check
    )
    _, entries = c.health.service(name)
    assert entries[0]["Service"]["Weights"] == {"Passing": 10, "Warning": 2}
    svc_check = next(ch for ch in entries[0]["Checks"] if ch["ServiceID"] == f"{name}-1")
    assert svc_check["CheckID"] == f"service:{name}-1" and svc_check["Name"] == f"Service '{name}' check"
    assert svc_check["Status"] == "critical" and svc_check["Type"] == "ttl"
    assert svc_check["ServiceName"] == name
    c.agent.service.register(name, service_id=f"{name}-2", port=2, check=check | {"Status": "passing"})
    assert check_status(c, f"service:{name}-2") == "passing"
    assert _ids(c.health.service(name, passing=True)[1]) == {f"{name}-2"}


def test_reregistration_updates_in_place_and_keeps_check_status(agent: Agent, name: str) -> None:
    c = agent.client
    c.agent.service.register(name, port=1, check=consul.Check.ttl("30s"))
    c.agent.check.ttl_pass(f"service:{name}")
    index, _ = c.health.service(name)
    c.agent.service.register(name, port=2, tags=["new"], check=consul.Check.ttl("30s"))
    index2, entries = c.health.service(name)
    assert int(index2) > int(index)
    assert (
        len(entries) == 1 and entries[0]["Service"]["Port"] == 2 and entries[0]["Service"]["Tags"] == ["new"]
    )
    assert check_status(c, f"service:{name}") == "passing"


def test_deregister_removes_service_and_checks(agent: Agent, name: str) -> None:
    c = agent.client
    c.agent.service.register(name, check=consul.Check.ttl("30s"))
    assert c.agent.service.deregister(name)
    assert name not in c.agent.services()
    assert f"service:{name}" not in c.agent.checks()
    assert c.health.service(name)[1] == []
    assert name not in c.catalog.services()[1]
    status, _, body = agent.call("PUT", f"/v1/agent/service/deregister/{name}")
    assert status == 404 and "Unknown service ID" in body


def test_replace_existing_checks(agent: Agent, name: str) -> None:
    c = agent.client
    first = [
        consul.Check.ttl("30s") | {"CheckID": f"{name}-a"},
        consul.Check.ttl("30s") | {"CheckID": f"{name}-b"},
    ]
    c.agent.service.register(name, check=first[0], extra_checks=first[1:])
    c.agent.service.register(name, check=first[0])  # without the flag, the other check stays
    assert {f"{name}-a", f"{name}-b"} <= set(c.agent.checks())
    c.agent.service.register(name, check=first[0], replace_existing_checks=True)
    assert f"{name}-a" in c.agent.checks() and f"{name}-b" not in c.agent.checks()


def test_durations_are_written_as_go_writes_them(agent: Agent, name: str) -> None:
    c = agent.client
    c.agent.service.register(name, check=consul.Check.tcp("127.0.0.1", agent.port, "90s", timeout="1500ms"))
    definition = c.agent.checks()[f"service:{name}"]["Definition"]
    assert (definition["Interval"], definition["Timeout"]) == ("1m30s", "1.5s")


# ---- health filters ----------------------------------------------------------------------------


def _three_instances(c: Any, name: str) -> None:
    for i, tags in enumerate((["a"], ["a", "b"], ["b"])):
        meta = {"version": f"v{i}"}
        c.agent.service.register(
            name, service_id=f"{name}-{i}", port=i + 1, tags=tags, meta=meta, check=consul.Check.ttl("30s")
        )
    c.agent.check.ttl_pass(f"service:{name}-0")
    c.agent.check.ttl_pass(f"service:{name}-1")


def _ids(entries: list[dict[str, Any]]) -> set[str]:
    return {e["Service"]["ID"] for e in entries}


def test_passing_and_tag_filters(agent: Agent, name: str) -> None:
    c = agent.client
    _three_instances(c, name)
    assert _ids(c.health.service(name)[1]) == {f"{name}-0", f"{name}-1", f"{name}-2"}
    assert _ids(c.health.service(name, passing=True)[1]) == {f"{name}-0", f"{name}-1"}
    assert _ids(c.health.service(name, tag="b")[1]) == {f"{name}-1", f"{name}-2"}
    assert _ids(c.health.service(name, tag=["a", "b"])[1]) == {f"{name}-1"}
    assert _ids(c.health.service(name, tag="b", passing=True)[1]) == {f"{name}-1"}
    assert {n["ServiceID"] for n in c.catalog.service(name, tag="a")[1]} == {f"{name}-0", f"{name}-1"}


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ('"a" in Service.Tags', {0, 1}),
        ('"a" not in Service.Tags', {2}),
        ('Service.Meta.version == "v2"', {2}),
        ('Service.Meta.version != "v2" and "b" in Service.Tags', {1}),
        ('Service.Meta["version"] == "v0" or Service.Port == 3', {0, 2}),
        ('not ("a" in Service.Tags)', {2}),
        ('Checks.Status == "critical"', {2}),
        ("Service.Meta.version matches `^v[01]$`", {0, 1}),
        ("Service.Tags is not empty and Service.Meta.missing != x", {0, 1, 2}),
    ],
)
def test_filter_expressions(agent: Agent, name: str, expr: str, expected: set[int]) -> None:
    c = agent.client
    _three_instances(c, name)
    assert _ids(c.health.service(name, filter_expr=expr)[1]) == {f"{name}-{i}" for i in expected}


def test_filter_on_agent_services_and_checks(agent: Agent, name: str) -> None:
    c = agent.client
    _three_instances(c, name)
    found = c.agent.services(filter_expr=f'Service == "{name}" and "b" in Tags')
    assert set(found) == {f"{name}-1", f"{name}-2"}
    checks = c.agent.checks(filter_expr=f'ServiceName == "{name}" and Status == "passing"')
    assert set(checks) == {f"service:{name}-0", f"service:{name}-1"}


def test_bad_filter_expression_is_rejected(agent: Agent, name: str) -> None:
    for expr in ('Service.Bogus == "x"', "Service.Tags ==", '"a" in'):
        status, _, body = agent.call(
            "GET", f"/v1/health/service/{name}?" + urllib.parse.urlencode({"filter": expr})
        )
        assert status == 400 if agent.server else status >= 400
        assert body


def test_health_checks_and_state(agent: Agent, name: str) -> None:
    c = agent.client
    _three_instances(c, name)
    _, checks = c.health.checks(name)
    assert {ch["CheckID"]: ch["Status"] for ch in checks} == {
        f"service:{name}-0": "passing",
        f"service:{name}-1": "passing",
        f"service:{name}-2": "critical",
    }
    _, critical = c.health.state("critical")
    assert f"service:{name}-2" in {ch["CheckID"] for ch in critical}
    _, passing = c.health.state("passing")
    ids = {ch["CheckID"] for ch in passing}
    assert "serfHealth" in ids and f"service:{name}-0" in ids and f"service:{name}-2" not in ids


# ---- checks: TTL, check endpoints, active checks -------------------------------------------------


def test_ttl_pass_warn_fail_and_update(agent: Agent, name: str) -> None:
    c = agent.client
    c.agent.service.register(name, check=consul.Check.ttl("30s"))
    cid = f"service:{name}"
    for call, state in ((c.agent.check.ttl_pass, "passing"), (c.agent.check.ttl_warn, "warning")):
        assert call(cid, notes=f"now {state}")
        check = c.agent.checks()[cid]
        assert (check["Status"], check["Output"]) == (state, f"now {state}")
    c.agent.check.ttl_fail(cid)
    assert check_status(c, cid) == "critical"
    status, _, _ = agent.call("PUT", f"/v1/agent/check/update/{cid}", {"Status": "passing", "Output": "fine"})
    assert status == 200 and c.agent.checks()[cid]["Output"] == "fine"
    status, _, body = agent.call("PUT", f"/v1/agent/check/update/{cid}", {"Status": "sleepy"})
    assert status == 400 and "Invalid check status" in body


def test_ttl_expiry_turns_critical(agent: Agent, name: str) -> None:
    c = agent.client
    c.agent.service.register(name, check=consul.Check.ttl("300ms"))
    started = time.monotonic()  # the TTL restarts when the pass arrives, after this
    c.agent.check.ttl_pass(f"service:{name}", notes="alive")
    assert check_status(c, f"service:{name}") == "passing"
    check = wait_for(
        lambda: (ch := c.agent.checks()[f"service:{name}"])["Status"] == "critical" and ch, timeout=5
    )
    assert time.monotonic() - started >= 0.3
    assert check["Output"].startswith("TTL expired")


def test_check_register_and_deregister(agent: Agent, name: str) -> None:
    c = agent.client
    c.agent.service.register(name)
    assert c.agent.check.register(f"{name}-check", check=consul.Check.ttl("30s"), service_id=name, notes="n")
    check = c.agent.checks()[f"{name}-check"]  # CheckID defaults to the Name
    assert (check["ServiceID"], check["ServiceName"], check["Notes"], check["Status"]) == (
        name,
        name,
        "n",
        "critical",
    )
    assert f"{name}-check" in {ch["CheckID"] for ch in c.health.checks(name)[1]}
    assert c.agent.check.deregister(f"{name}-check")
    assert f"{name}-check" not in c.agent.checks()
    status, _, body = agent.call("PUT", f"/v1/agent/check/deregister/{name}-check")
    assert status == 404 and "Unknown check ID" in body
    status, _, body = agent.call(
        "PUT", "/v1/agent/check/register", {"Name": "x", "TTL": "1s", "ServiceID": "nope-" + name}
    )
    assert status == 404 and "does not exist" in body


@pytest.fixture
def grpc_health_server() -> Iterator[tuple[int, health.HealthServicer]]:
    """A grpc.health.v1 server on 127.0.0.1 serving ``svc``."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    servicer.set("svc", health_pb2.HealthCheckResponse.SERVING)
    server.start()
    yield port, servicer
    server.stop(None)


def test_grpc_check_follows_serving_status(
    agent: Agent, name: str, grpc_health_server: tuple[int, health.HealthServicer]
) -> None:
    port, servicer = grpc_health_server
    c = agent.client
    check = consul.Check.grpc(f"127.0.0.1:{port}/svc", "200ms", timeout="1s")
    c.agent.service.register(name, address="127.0.0.1", port=port, check=check)
    cid = f"service:{name}"
    wait_for(lambda: check_status(c, cid) == "passing")
    assert c.agent.checks()[cid]["Type"] == "grpc"
    assert _ids(c.health.service(name, passing=True)[1]) == {name}
    servicer.set("svc", health_pb2.HealthCheckResponse.NOT_SERVING)
    wait_for(lambda: check_status(c, cid) == "critical")
    assert "didn't report service healthy" in c.agent.checks()[cid]["Output"]
    assert c.health.service(name, passing=True)[1] == []


def test_tcp_and_http_checks(agent: Agent, name: str) -> None:
    c = agent.client
    closed = socket_port_closed()
    checks = [
        consul.Check.tcp("127.0.0.1", agent.port, "200ms", timeout="1s") | {"CheckID": f"{name}-tcp-up"},
        consul.Check.tcp("127.0.0.1", closed, "200ms", timeout="1s") | {"CheckID": f"{name}-tcp-down"},
        consul.Check.http(f"http://127.0.0.1:{agent.port}/v1/status/leader", "200ms", timeout="1s")
        | {"CheckID": f"{name}-http-up"},
        consul.Check.http(f"http://127.0.0.1:{agent.port}/v1/nowhere", "200ms", timeout="1s")
        | {"CheckID": f"{name}-http-down"},
    ]
    c.agent.service.register(name, check=checks[0], extra_checks=checks[1:])
    expected = {"tcp-up": "passing", "tcp-down": "critical", "http-up": "passing", "http-down": "critical"}

    def statuses() -> dict[str, str]:
        got = c.agent.checks()
        return {k: got[f"{name}-{k}"]["Status"] for k in expected if got[f"{name}-{k}"]["Output"]}

    wait_for(lambda: statuses() == expected)
    assert "HTTP GET" in c.agent.checks()[f"{name}-http-up"]["Output"]


def socket_port_closed() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- blocking queries and indexes ----------------------------------------------------------------


def test_index_is_monotonic_and_at_least_one(agent: Agent, name: str) -> None:
    c = agent.client
    assert int(c.health.service(name)[0]) >= 1  # a service that does not exist yet
    seen = [int(c.catalog.services()[0])]
    for port in (1, 2, 3):
        c.agent.service.register(name, port=port)
        seen.append(int(c.catalog.services()[0]))
    assert seen == sorted(seen) and seen[-1] > seen[0]
    assert agent.server is None or agent.server.index >= seen[-1]


def test_blocking_query_waits_for_wait_without_change(agent: Agent, name: str) -> None:
    c = agent.client
    c.agent.service.register(name)
    index, _ = c.health.service(name)
    started = time.monotonic()
    index2, entries = c.health.service(name, index=index, wait="300ms")
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 0.3 * 17 / 16 + 0.3
    assert index2 == index and len(entries) == 1


def parked(agent: Agent, path: str, param: str, before: int = 0) -> bool:
    """Whether the test server has received more than ``before`` blocking GETs of ``path`` (with ``param``:
    index or hash).

    A real agent shows nothing of the queries it holds: for it, 0.2 s is taken as enough to get there.
    """
    return blocking_gets(agent, path, param) > before


def blocking_gets(agent: Agent, path: str, param: str) -> int:
    """Blocking GETs of ``path`` the test server received (for a real agent: 1, after 0.2 s)."""
    if agent.server is None:
        time.sleep(0.2)
        return 1
    return sum(r.method == "GET" and r.path == path and param in r.query for r in agent.server.requests)


def test_blocking_query_wakes_on_change(agent: Agent, name: str) -> None:
    c = agent.client
    c.agent.service.register(name, port=1)
    index, _ = c.health.service(name)
    result: dict[str, Any] = {}

    def block() -> None:
        result["answer"] = c.health.service(name, index=index, wait="10s")
        result["at"] = time.monotonic()

    thread = threading.Thread(target=block)
    thread.start()
    wait_for(lambda: parked(agent, f"/v1/health/service/{name}", "index"))  # the agent holds it ...
    assert thread.is_alive() and "answer" not in result  # ... unanswered until the change
    changed_at = time.monotonic()
    agent.client.agent.service.register(name, port=2)
    thread.join(timeout=5)
    new_index, entries = result["answer"]
    assert int(new_index) > int(index) and entries[0]["Service"]["Port"] == 2
    assert result["at"] - changed_at < 0.1


def test_blocking_query_ignores_other_services(agent: Agent, name: str) -> None:
    c = agent.client
    c.agent.service.register(name)
    index, _ = c.health.service(name)
    started = time.monotonic()
    with futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(c.health.service, name, index=index, wait="400ms")
        wait_for(lambda: parked(agent, f"/v1/health/service/{name}", "index"))
        c.agent.service.register(name + "-other")
        assert pending.result(timeout=5)[0] == index
    assert time.monotonic() - started >= 0.4
    c.agent.service.deregister(name + "-other")


def test_agent_service_hash_blocking(agent: Agent, name: str) -> None:
    c = agent.client
    c.agent.service.register(name, port=1)
    status, headers, body = agent.call("GET", f"/v1/agent/service/{name}")
    digest = headers["X-Consul-ContentHash"]
    assert status == 200 and json.loads(body)["ContentHash"] == digest
    assert "X-Consul-Index" not in headers  # agent-local endpoints have no Raft index
    started = time.monotonic()
    status, headers, _ = agent.call("GET", f"/v1/agent/service/{name}?hash={digest}&wait=300ms")
    assert time.monotonic() - started >= 0.3 and headers["X-Consul-ContentHash"] == digest
    path = f"/v1/agent/service/{name}"
    before = 0 if agent.server is None else blocking_gets(agent, path, "hash")
    with futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(agent.call, "GET", f"{path}?hash={digest}&wait=10s")
        wait_for(lambda: parked(agent, path, "hash", before))
        assert not pending.done()
        c.agent.service.register(name, port=2)
        _, headers, body = pending.result(timeout=5)
    assert headers["X-Consul-ContentHash"] != digest and json.loads(body)["Port"] == 2


async def test_aio_client_blocking_query(agent: Agent, name: str) -> None:
    await asyncio.to_thread(agent.client.agent.service.register, name, port=1)
    aio = consul.aio.Consul(host=agent.host, port=agent.port, token=agent.token)
    try:
        index, _ = await aio.health.service(name)
        pending = asyncio.ensure_future(aio.health.service(name, index=index, wait="10s"))
        path = f"/v1/health/service/{name}"
        await asyncio.wait_for(asyncio.to_thread(wait_for, lambda: parked(agent, path, "index")), 6)
        assert not pending.done()
        await asyncio.to_thread(agent.client.agent.service.register, name, port=2)
        new_index, entries = await asyncio.wait_for(pending, 2)
        assert int(new_index) > int(index) and entries[0]["Service"]["Port"] == 2
    finally:
        await aio.close()


# ---- errors --------------------------------------------------------------------------------------


def test_error_statuses(agent: Agent, name: str) -> None:
    assert agent.call("GET", "/v1/no/such/endpoint")[0] == 404
    status, headers, body = agent.call("GET", "/v1/agent/service/register")
    assert status == 405 and "not allowed" in body and "PUT" in headers["Allow"]
    assert agent.call("PUT", "/v1/agent/service/register", "{not json")[0] == 400
    status, _, body = agent.call("PUT", "/v1/agent/service/register", {"Port": 1})
    assert (status, body) == (400, "Missing service name")
    status, _, body = agent.call(
        "PUT", "/v1/agent/service/register", {"Name": name, "Check": {"TTL": "1s", "Interval": "1s"}}
    )
    assert status == 400 and body.startswith("Invalid check")
    status, _, body = agent.call(
        "PUT", "/v1/agent/service/register", {"Name": name, "Weights": {"Passing": 0}}
    )
    assert status == 400 and "Passing must be greater than 0" in body
    status, _, body = agent.call("GET", f"/v1/health/service/{name}?index=1&wait=soon")
    assert (status, body) == (400, "Invalid wait time")
    status, _, body = agent.call("GET", f"/v1/health/service/{name}?passing=maybe")
    assert (status, body) == (400, "Invalid value for ?passing")
    assert agent.call("GET", f"/v1/health/service/{name}?dc=nowhere")[0] == 500
    assert agent.call("PUT", f"/v1/agent/check/pass/{name}-nope")[0] == 404
    assert agent.call("GET", f"/v1/agent/service/{name}-nope")[0] == 404


def test_read_headers(agent: Agent, name: str) -> None:
    status, headers, body = agent.call("GET", f"/v1/health/service/{name}")
    assert status == 200 and json.loads(body) == []
    assert int(headers["X-Consul-Index"]) >= 1
    assert headers["X-Consul-KnownLeader"] == "true" and headers["X-Consul-LastContact"] == "0"
    assert headers["Content-Type"] == "application/json"
    status, headers, _ = agent.call("GET", "/v1/agent/services")
    assert status == 200 and "X-Consul-Index" not in headers


def test_self_and_status(agent: Agent) -> None:
    me = agent.client.agent.self()
    assert me["Config"]["Datacenter"] == "dc1" and me["Member"]["Name"] == me["Config"]["NodeName"]
    leader = agent.client.status.leader()
    assert leader and leader in agent.client.status.peers()


# ---- test-server-only: ACLs, hooks, lifecycle, timings ---------------------------------------------


def test_acl_token(name: str) -> None:
    with ConsulServer(acl_token="s3cret", timings=FAST) as srv:
        anonymous = consul.Consul(host=srv.host, port=srv.port)
        with pytest.raises(consul.ACLPermissionDenied, match="Permission denied"):
            anonymous.agent.service.register(name)
        with pytest.raises(consul.ACLPermissionDenied, match="ACL not found"):
            consul.Consul(host=srv.host, port=srv.port, token="wrong").agent.services()
        assert srv.client().agent.service.register(name)
        assert anonymous.health.service(name)[1] == []  # anonymous reads are filtered, as Consul does
        assert len(srv.client().health.service(name)[1]) == 1
        agent = Agent(srv.host, srv.port, None, srv)
        assert agent.call("GET", "/v1/agent/self")[0] == 403
        assert agent.call("GET", "/v1/agent/self", headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert agent.call("GET", "/v1/agent/self?token=s3cret")[0] == 200
        assert agent.call("GET", "/v1/status/leader")[0] == 200
        tokens = [
            r.headers.get("X-Consul-Token") for r in srv.requests if r.path == "/v1/agent/service/register"
        ]
        assert tokens == [None, "s3cret"]


def test_fail_next_and_garbage_next(server: ConsulServer, name: str) -> None:
    c = server.client()
    server.fail_next(2, status=503, body="overloaded")
    for _ in range(2):
        with pytest.raises(consul.ConsulException, match="503 overloaded"):
            c.health.service(name)
    assert c.health.service(name)[1] == []
    server.garbage_next()
    with pytest.raises(consul.ConsulException, match="Failed to decode JSON"):
        c.health.service(name)
    assert c.health.service(name)[1] == []


def test_set_delay_and_requests(server: ConsulServer, name: str) -> None:
    c = server.client()
    server.set_delay(0.2)
    started = time.monotonic()
    c.catalog.services()
    assert time.monotonic() - started >= 0.2
    server.set_delay(0)
    c.health.service(name, passing=True, tag="x")
    last = server.requests[-1]
    assert (last.method, last.path) == ("GET", f"/v1/health/service/{name}")
    assert last.query == {"passing": ["1"], "tag": ["x"]}


def test_stop_start_keeps_state_and_port(server: ConsulServer, name: str) -> None:
    c = server.client()
    c.agent.service.register(name, port=7)
    port, index = server.port, server.index
    server.stop()
    with pytest.raises(Exception):  # noqa: B017 - any connection error will do
        c.agent.services()
    server.start()
    assert server.port == port and server.index == index
    assert c.agent.services()[name]["Port"] == 7
    server.restart()
    assert c.health.service(name)[1][0]["Service"]["Port"] == 7


def test_stop_ends_blocked_queries_and_check_threads(
    server: ConsulServer, name: str, grpc_health_server: tuple[int, health.HealthServicer]
) -> None:
    c = server.client()
    c.agent.service.register(name, check=consul.Check.grpc(f"127.0.0.1:{grpc_health_server[0]}/svc", "50ms"))
    wait_for(lambda: check_status(c, f"service:{name}") == "passing")
    index, _ = c.health.service(name)
    with futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(c.health.service, name, index=index, wait="30s")
        time.sleep(0.1)
        server.stop()
        with pytest.raises(Exception):  # noqa: B017 - the agent went away mid-query
            pending.result(timeout=5)
    assert not [
        t for t in threading.enumerate() if t.name.startswith(("consul-check-", "consul-ttl", "consul-http"))
    ]


def test_non_loopback_checks_are_not_probed(server: ConsulServer, name: str) -> None:
    c = server.client()
    c.agent.service.register(name, check=consul.Check.tcp("192.0.2.1", 80, "50ms"))
    check = wait_for(lambda: (ch := c.agent.checks()[f"service:{name}"])["Output"] and ch)
    assert check["Status"] == "critical" and "only loopback" in check["Output"]


def test_deregister_critical_service_after(server: ConsulServer, name: str) -> None:
    c = server.client()
    c.agent.service.register(
        name, check=consul.Check.ttl("10s") | {"DeregisterCriticalServiceAfter": "100ms"}
    )
    wait_for(lambda: name not in c.agent.services(), timeout=5)
    assert c.health.service(name)[1] == []


def test_minimum_check_interval_is_consuls_by_default(name: str) -> None:
    with ConsulServer() as srv:
        c = srv.client()
        leader = f"http://127.0.0.1:{srv.port}/v1/status/leader"
        c.agent.service.register(name, check=consul.Check.http(leader, "10ms"))
        time.sleep(1.2)  # Consul runs checks at most once a second, whatever the Interval
        probes = sum(1 for r in srv.requests if r.path == "/v1/status/leader")
        assert 1 <= probes <= 2
        assert c.agent.checks()[f"service:{name}"]["Definition"]["Interval"] == "10ms"


def test_cli_prints_address_and_stops_on_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "lbkit.testing.consul", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("CONSUL_HTTP_ADDR=127.0.0.1:")
        host, port = line.split("=", 1)[1].split(":")
        assert consul.Consul(host=host, port=int(port)).status.leader()
        proc.terminate()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

"""ConsulServer: what operators use beyond registration. Maintenance mode, catalog registration of external
nodes, health/node and health/checks, members, agent/self's leader and xDS, peers, consistency modes and
the agent cache, namespaces and partitions, datacenters joined over the WAN, and HTTPS with client
certificates; through py-consul and raw HTTP, as a client of a Consul agent uses them.

Tests taking ``agent`` also run against a real agent when CONSUL_HTTP_ADDR is set.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import consul
import pytest
import requests

from lbkit.testing.consul import ConsulServer, TestPKI, make_test_pki
from tests.integration import consul_support
from tests.integration.consul_support import FAST, Agent, wait_for

agent, name, server = consul_support.agent, consul_support.name, consul_support.server  # fixtures

DEFAULT_SERVICE_REASON = (
    "Maintenance mode is enabled for this service, but no reason was provided. This is a default message."
)


def _ttl_instances(c: Any, name: str, n: int = 2) -> list[str]:
    sids = [f"{name}-{i}" for i in range(n)]
    for i, sid in enumerate(sids):
        c.agent.service.register(name, service_id=sid, port=9000 + i, check=consul.Check.ttl("60s"))
        c.agent.check.ttl_pass(f"service:{sid}")
    return sids


def _passing_ids(c: Any, name: str) -> set[str]:
    return {e["Service"]["ID"] for e in c.health.service(name, passing=True)[1]}


# ---- agent/self, members, status --------------------------------------------------------------


def test_agent_self_has_leader_addr_and_xds(agent: Agent) -> None:
    me = agent.client.agent.self()
    leader = agent.client.status.leader()
    assert me["Stats"]["consul"]["leader"] == "true"
    assert me["Stats"]["consul"]["leader_addr"] == leader and leader.endswith(":8300")
    xds = me["xDS"]
    assert xds["SupportedProxies"]["envoy"] and all(
        isinstance(v, str) for v in xds["SupportedProxies"]["envoy"]
    )
    assert xds["Port"] == xds["Ports"]["Plaintext"] > 0


def test_agent_members(agent: Agent) -> None:
    me = agent.client.agent.self()
    lan = agent.client.agent.members()
    assert me["Config"]["NodeName"] in {m["Name"] for m in lan}
    assert all(m["Status"] == 1 and m["Tags"]["dc"] == me["Config"]["Datacenter"] for m in lan)
    wan = agent.client.agent.members(wan=True)
    assert f"{me['Config']['NodeName']}.{me['Config']['Datacenter']}" in {m["Name"] for m in wan}


def test_agent_self_meta_is_the_node_meta(name: str) -> None:
    with ConsulServer(node_meta={"zone": "eu-west-1a"}) as srv:
        meta = srv.client().agent.self()["Meta"]
        assert meta["zone"] == "eu-west-1a" and "consul-version" in meta
        nodes = srv.client().catalog.nodes()[1]
        assert nodes[0]["Meta"]["zone"] == "eu-west-1a"


# ---- maintenance mode -------------------------------------------------------------------------


def test_service_maintenance_takes_an_instance_out_and_back(agent: Agent, name: str) -> None:
    c = agent.client
    first, second = _ttl_instances(c, name)
    index, _ = c.health.service(name)
    woke = threading.Event()

    def block() -> None:
        c.health.service(name, index=index, wait="10s")
        woke.set()

    waiter = threading.Thread(target=block)
    waiter.start()
    assert c.agent.service.maintenance(first, True, "kernel upgrade")
    waiter.join(10)
    assert woke.is_set()  # the maintenance check is a catalog write: blocking queries wake
    assert _passing_ids(c, name) == {second}
    entry = next(e for e in c.health.service(name)[1] if e["Service"]["ID"] == first)
    maint = next(ch for ch in entry["Checks"] if ch["CheckID"] == f"_service_maintenance:{first}")
    assert maint["Status"] == "critical" and maint["Notes"] == "kernel upgrade"
    assert maint["Name"] == "Service Maintenance Mode" and maint["ServiceID"] == first
    assert f"_service_maintenance:{first}" in c.agent.checks()
    assert c.agent.service.maintenance(first, True, "again")  # already on: nothing changes
    assert c.agent.checks()[f"_service_maintenance:{first}"]["Notes"] == "kernel upgrade"
    assert c.agent.service.maintenance(first, False)
    assert _passing_ids(c, name) == {first, second}
    assert f"_service_maintenance:{first}" not in c.agent.checks()
    c.agent.service.maintenance(second, True)
    assert c.agent.checks()[f"_service_maintenance:{second}"]["Notes"] == DEFAULT_SERVICE_REASON
    c.agent.service.maintenance(second, False)


def test_service_maintenance_errors(agent: Agent, name: str) -> None:
    agent.client.agent.service.register(name, port=1)
    status, _, body = agent.call("PUT", f"/v1/agent/service/maintenance/{name}")
    assert (status, body) == (400, "Missing value for enable")
    status, _, body = agent.call("PUT", f"/v1/agent/service/maintenance/{name}?enable=maybe")
    assert (status, body) == (400, 'Invalid value for enable: "maybe"')
    status, _, body = agent.call("PUT", f"/v1/agent/service/maintenance/{name}-nope?enable=true")
    assert status == 404 and f"{name}-nope" in body
    status, _, body = agent.call("PUT", "/v1/agent/maintenance")
    assert (status, body) == (400, "Missing value for enable")


def test_node_maintenance_takes_every_service_of_the_node_out(agent: Agent, name: str) -> None:
    c = agent.client
    sids = set(_ttl_instances(c, name))
    try:
        assert c.agent.maintenance(True, "rack move")
        assert _passing_ids(c, name) == set()
        for entry in c.health.service(name)[1]:
            maint = next(ch for ch in entry["Checks"] if ch["CheckID"] == "_node_maintenance")
            assert (
                maint["Status"] == "critical" and maint["Notes"] == "rack move" and maint["ServiceID"] == ""
            )
        assert c.agent.checks()["_node_maintenance"]["Name"] == "Node Maintenance Mode"
    finally:
        c.agent.maintenance(False)
    assert _passing_ids(c, name) == sids


# ---- catalog registration of external nodes ------------------------------------------------------


def test_catalog_register_external_node_service_and_check(agent: Agent, name: str) -> None:
    c = agent.client
    node = f"{name}-ext"
    service = {"Service": name, "ID": f"{name}-a", "Port": 7001, "Tags": ["x"], "Meta": {"zone": "b"}}
    check = {"CheckID": f"{name}-check", "Name": "external", "ServiceID": f"{name}-a", "Status": "passing"}
    try:
        # py-consul sends node_meta as ?node-meta= query parameters, which registration ignores: the
        # node's metadata goes in the body.
        body = {
            "Node": node,
            "Address": "127.0.0.5",
            "NodeMeta": {"zone": "a"},
            "Service": service,
            "Check": check,
        }
        status, _, text = agent.call("PUT", "/v1/catalog/register", body)
        assert (status, text) == (200, "true")
        (entry,) = c.health.service(name, passing=True)[1]
        assert entry["Node"]["Node"] == node and entry["Node"]["Address"] == "127.0.0.5"
        assert entry["Node"]["Meta"]["zone"] == "a" and entry["Service"]["Meta"] == {"zone": "b"}
        assert [ch["CheckID"] for ch in entry["Checks"]] == [f"{name}-check"]  # no serfHealth: not an agent
        assert node in {n["Node"] for n in c.catalog.nodes()[1]}
        node_checks = c.health.node(node)[1]
        assert [(ch["CheckID"], ch["Status"]) for ch in node_checks] == [(f"{name}-check", "passing")]
        assert [ch["CheckID"] for ch in c.health.checks(name)[1]] == [f"{name}-check"]
        # A critical status, written by whoever watches the external service, takes it out.
        assert c.catalog.register(node, "127.0.0.5", service=service, check={**check, "Status": "critical"})
        assert c.catalog.nodes()[1] and entry["Node"]["Meta"]["zone"] == "a"
        assert c.health.service(name, passing=True)[1] == []
        assert c.catalog.deregister(node, service_id=f"{name}-a")
        assert c.health.service(name)[1] == [] and c.health.node(node)[1] == []
        assert node in {n["Node"] for n in c.catalog.nodes()[1]}
    finally:
        c.catalog.deregister(node)
    assert node not in {n["Node"] for n in c.catalog.nodes()[1]}


def test_catalog_register_node_without_address_is_refused(agent: Agent, name: str) -> None:
    status, _, body = agent.call("PUT", "/v1/catalog/register", {"Node": f"{name}-x"})
    assert status == 500 and "Must provide address" in body
    status, _, body = agent.call("PUT", "/v1/catalog/register", {"Address": "127.0.0.9"})
    assert status == 500 and "Must provide node" in body


def test_health_node_lists_the_agent_checks(agent: Agent, name: str) -> None:
    c = agent.client
    (sid,) = _ttl_instances(c, name, 1)
    me = c.agent.self()["Config"]["NodeName"]
    ids = {ch["CheckID"] for ch in c.health.node(me)[1]}
    assert {"serfHealth", f"service:{sid}"} <= ids
    assert c.health.node(f"{name}-no-such-node")[1] == []


# ---- peers, consistency, cache ------------------------------------------------------------------


def test_unknown_peer_has_no_instances(agent: Agent, name: str) -> None:
    _ttl_instances(agent.client, name, 1)
    assert len(agent.client.health.service(name)[1]) == 1
    for path in (f"/v1/health/service/{name}?peer=nope", f"/v1/catalog/service/{name}?peer=nope"):
        status, _, body = agent.call("GET", path)
        assert (status, json.loads(body)) == (200, [])


def test_consistency_modes_and_cached_reads(agent: Agent, name: str) -> None:
    _ttl_instances(agent.client, name, 1)
    base = f"/v1/health/service/{name}"
    for query, mode in (("", "leader"), ("?stale", "stale"), ("?consistent", "consistent")):
        status, headers, _ = agent.call("GET", base + query)
        assert status == 200 and headers["X-Consul-Effective-Consistency"] == mode
        assert headers["X-Consul-KnownLeader"] == "true" and headers["X-Consul-LastContact"].isdigit()
    status, headers, _ = agent.call("GET", base + "?cached")
    assert status == 200 and headers["X-Cache"] in ("MISS", "HIT")
    status, headers, _ = agent.call("GET", base + "?cached")
    assert headers["X-Cache"] == "HIT" and headers["Age"].isdigit()
    status, headers, _ = agent.call("GET", base + "?cached", headers={"Cache-Control": "max-age=0"})
    assert headers["X-Cache"] == "MISS"
    status, _, body = agent.call("GET", base + "?cached&consistent")
    assert (status, body) == (400, "Cannot specify ?cached with ?consistent, conflicting semantics.")
    status, _, body = agent.call("GET", base + "?stale&consistent")
    assert status == 400


def test_cached_entry_ages_until_max_age(server: ConsulServer, name: str) -> None:
    _ttl_instances(server.client(), name, 1)
    agent = Agent(server.host, server.port, server.client(), server)
    path = f"/v1/health/service/{name}?cached"
    assert agent.call("GET", path)[1]["X-Cache"] == "MISS"
    time.sleep(1.1)  # Age counts whole seconds: the entry must be old enough to show one
    _, headers, _ = agent.call("GET", path)
    assert headers["X-Cache"] == "HIT" and int(headers["Age"]) >= 1
    _, headers, _ = agent.call("GET", path, headers={"Cache-Control": "max-age=1"})
    assert headers["X-Cache"] == "MISS"  # older than max-age: fetched again
    _, headers, _ = agent.call("GET", path)
    assert headers["X-Cache"] == "HIT" and headers["Age"] == "0"


def test_without_a_leader_only_stale_reads_answer(server: ConsulServer, name: str) -> None:
    _ttl_instances(server.client(), name, 1)
    agent = Agent(server.host, server.port, server.client(), server)
    server.set_raft(leader=False, last_contact=2.5)
    try:
        status, _, body = agent.call("GET", f"/v1/health/service/{name}")
        assert (status, body) == (500, "No cluster leader")
        status, headers, body = agent.call("GET", f"/v1/health/service/{name}?stale")
        assert status == 200 and len(json.loads(body)) == 1
        assert headers["X-Consul-KnownLeader"] == "false" and headers["X-Consul-LastContact"] == "2500"
        status, _, _ = agent.call("GET", f"/v1/health/service/{name}?stale&max_stale=1s")
        assert status == 500  # too stale: re-run on the leader, and there is none
        assert server.client().status.leader() == ""
    finally:
        server.set_raft()
    assert agent.call("GET", f"/v1/health/service/{name}")[0] == 200


# ---- namespaces and partitions ----------------------------------------------------------------------


def test_community_edition_refuses_namespaces_and_partitions(agent: Agent, name: str) -> None:
    status, _, body = agent.call("GET", f"/v1/health/service/{name}?ns=team-a")
    assert status == 400 and "Namespaces are a Consul Enterprise feature" in body
    status, _, body = agent.call("GET", f"/v1/health/service/{name}?partition=p1")
    assert status == 400 and "Partitions are a Consul Enterprise feature" in body


def test_enterprise_namespaces_and_partitions_scope_reads(name: str) -> None:
    with ConsulServer(enterprise=True, timings=FAST) as srv:
        agent = Agent(srv.host, srv.port, srv.client(), srv)
        for ns, port in (("default", 1), ("team-a", 2)):
            status, _, _ = agent.call(
                "PUT", f"/v1/agent/service/register?ns={ns}", {"Name": name, "Port": port}
            )
            assert status == 200
        ext = {
            "Node": "ext-1",
            "Address": "127.0.0.7",
            "Partition": "p1",
            "Service": {"Service": name, "Port": 3, "Namespace": "team-a"},
        }
        assert agent.call("PUT", "/v1/catalog/register", ext)[0] == 200

        def ports(query: str) -> list[int]:
            status, _, body = agent.call("GET", f"/v1/health/service/{name}{query}")
            assert status == 200, body
            return [e["Service"]["Port"] for e in json.loads(body)]

        assert ports("") == [1]
        assert ports("?ns=team-a") == [2]
        assert ports("?ns=team-a&partition=p1") == [3]
        assert ports("?partition=p1") == []
        (entry,) = json.loads(agent.call("GET", f"/v1/health/service/{name}?ns=team-a")[2])
        assert entry["Service"]["Namespace"] == "team-a" and entry["Service"]["Partition"] == "default"
        assert ports("?ns=team-b") == []
        status, _, body = agent.call("PUT", "/v1/agent/service/register?partition=p1", {"Name": name})
        assert status == 400 and "partition" in body
        services = json.loads(agent.call("GET", "/v1/agent/services?ns=team-a")[2])
        assert [s["Port"] for s in services.values()] == [2]


# ---- datacenters joined over the WAN --------------------------------------------------------------


def test_datacenters_joined_over_the_wan(name: str) -> None:
    with ConsulServer(datacenter="dc1") as dc1, ConsulServer(datacenter="dc2", node_name="node-2") as dc2:
        dc1.join_wan(dc2)
        c1 = dc1.client()
        dc2.client().agent.service.register(name, port=2)
        assert c1.catalog.datacenters() == ["dc1", "dc2"]
        assert {m["Name"] for m in c1.agent.members(wan=True)} == {"lbkit-node.dc1", "node-2.dc2"}
        index, entries = c1.health.service(name, dc="dc2")
        assert [e["Node"]["Datacenter"] for e in entries] == ["dc2"]
        assert c1.health.service(name)[1] == []  # the local datacenter has none
        done: list[Any] = []
        waiter = threading.Thread(target=lambda: done.append(c1.health.service(name, dc="dc2", index=index)))
        waiter.start()
        time.sleep(0.05)
        dc2.client().agent.service.register(name, service_id=f"{name}-2", port=3)
        waiter.join(10)
        assert done and len(done[0][1]) == 2  # the blocking query through dc1 woke on dc2's change
        dc2.stop()
        status, _, body = Agent(dc1.host, dc1.port, c1, dc1).call("GET", f"/v1/health/service/{name}?dc=dc2")
        assert (status, body) == (500, "No path to datacenter")
        status, _, body = Agent(dc1.host, dc1.port, c1, dc1).call("GET", f"/v1/health/service/{name}?dc=dc9")
        assert (status, body) == (500, "No path to datacenter")


# ---- HTTPS -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


def test_https_with_a_client_certificate(pki: TestPKI, name: str) -> None:
    with ConsulServer(tls=pki.server_tls(verify_incoming=True)) as srv:
        assert srv.http_addr.startswith("https://")
        c = srv.client(verify=pki.ca_file, cert=(pki.client_cert, pki.client_key))
        c.agent.service.register(name, port=1)
        assert [e["Service"]["Port"] for e in c.health.service(name)[1]] == [1]
        url = f"{srv.http_addr}/v1/health/service/{name}"
        with pytest.raises(requests.exceptions.SSLError):  # no client certificate: the handshake fails
            requests.get(url, verify=pki.ca_file, timeout=5)
        with pytest.raises(requests.exceptions.SSLError):  # a CA that did not sign the server's certificate
            requests.get(url, verify=pki.other_ca_file, cert=(pki.client_cert, pki.client_key), timeout=5)
        with pytest.raises(requests.exceptions.ConnectionError):  # plain HTTP to an HTTPS port
            requests.get(f"http://{srv.address}/v1/health/service/{name}", timeout=5)
        ctx = ssl.create_default_context(cafile=pki.ca_file)
        ctx.load_cert_chain(pki.client_cert, pki.client_key)
        raw = socket.create_connection((srv.host, srv.port), 5)
        with ctx.wrap_socket(raw, server_hostname="localhost") as sock:
            assert sock.version() in ("TLSv1.2", "TLSv1.3")


def test_https_without_client_certificates(pki: TestPKI, name: str) -> None:
    with ConsulServer(tls=pki.server_tls(verify_incoming=False)) as srv:
        r = requests.get(f"{srv.http_addr}/v1/agent/self", verify=pki.ca_file, timeout=5)
        assert r.status_code == 200 and r.json()["Config"]["Datacenter"] == "dc1"


# ---- standalone ------------------------------------------------------------------------------------


def test_cli_serves_https_enterprise_and_node_meta(pki: TestPKI, tmp_path: Path) -> None:
    argv = [
        sys.executable,
        "-m",
        "lbkit.testing.consul",
        "--node-meta",
        "zone:eu-1a",
        "--enterprise",
        "--tls-cert",
        pki.server_cert,
        "--tls-key",
        pki.server_key,
    ]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()}
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("CONSUL_HTTP_ADDR=https://127.0.0.1:")
        url = line.split("=", 1)[1]
        me = wait_for(lambda: requests.get(f"{url}/v1/agent/self", verify=pki.ca_file, timeout=5).json())
        assert me["Meta"]["zone"] == "eu-1a" and me["Config"]["Partition"] == "default"
        ns = uuid.uuid4().hex[:6]
        r = requests.get(f"{url}/v1/health/service/x?ns={ns}", verify=pki.ca_file, timeout=5)
        assert r.status_code == 200 and r.json() == []
    finally:
        proc.terminate()
        assert proc.wait(10) == 0

"""ConsulDiscovery as its users run it, against lbkit's test Consul server: maintenance mode, tags and
filters, datacenter failover and return, namespaces and partitions, consistency and the agent cache,
HTTPS with a client certificate and tokens from files, the client's zone from the agent, and asyncio
decoding off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lbkit.discovery.consul import ConsulDiscovery
from lbkit.endpoint import EndpointHealth, EndpointSet
from lbkit.testing.consul import ConsulServer, TestPKI, make_test_pki
from tests.integration.test_consul_discovery import Recorder, awatching, health_gets, watching

SERVICE = "model"
FAST = {"wait": 5.0, "min_interval": 0.01, "backoff_initial": 0.05, "backoff_max": 0.2}
P, C, M = EndpointHealth.PASSING, EndpointHealth.CRITICAL, EndpointHealth.MAINTENANCE


def ttl_instance(client: Any, sid: str, port: int, *, status: str = "passing", **kwargs: Any) -> None:
    check = {"CheckID": f"service:{sid}", "Name": "ttl", "TTL": "60s", "Status": status}
    client.agent.service.register(
        SERVICE, service_id=sid, address="127.0.0.1", port=port, check=check, **kwargs
    )


def healths(s: EndpointSet) -> dict[int, EndpointHealth]:
    return {int(e.address.rsplit(":", 1)[1]): e.health for e in s}


@pytest.fixture
def server() -> Iterator[ConsulServer]:
    with ConsulServer() as s:
        yield s


def discovery(server: ConsulServer, **kwargs: Any) -> ConsulDiscovery:
    return ConsulDiscovery(SERVICE, address=server.address, env={}, **{**FAST, **kwargs})


# --- maintenance, tags, filters ---------------------------------------------------------------------


def test_maintenance_mode_is_published_and_lifted(server: ConsulServer) -> None:
    c = server.client()
    ttl_instance(c, "a", 7001)
    ttl_instance(c, "b", 7002)
    with watching(discovery(server)) as rec:
        rec.wait_for(lambda s: healths(s) == {7001: P, 7002: P})
        c.agent.service.maintenance("a", True, "kernel upgrade")
        rec.wait_for(lambda s: healths(s) == {7001: M, 7002: P})
        c.agent.service.maintenance("a", False)
        rec.wait_for(lambda s: healths(s) == {7001: P, 7002: P})
        c.agent.maintenance(True, "rack move")  # the whole node
        rec.wait_for(lambda s: healths(s) == {7001: M, 7002: M})
        c.agent.maintenance(False)
        rec.wait_for(lambda s: healths(s) == {7001: P, 7002: P})


def test_every_tag_must_match_and_the_filter_is_passed_through(server: ConsulServer) -> None:
    c = server.client()
    ttl_instance(c, "a", 7001, tags=["gpu", "a100"], meta={"tier": "gold"})
    ttl_instance(c, "b", 7002, tags=["gpu"], meta={"tier": "gold"})
    ttl_instance(c, "c", 7003, tags=["gpu", "a100"], meta={"tier": "bronze"})
    with watching(discovery(server, tags=["gpu", "a100"])) as rec:
        rec.wait_for(lambda s: set(healths(s)) == {7001, 7003})
    d = discovery(server, filter='Service.Meta.tier == "gold"', tags="gpu")
    with watching(d) as rec:
        rec.wait_for(lambda s: set(healths(s)) == {7001, 7002})
    assert all(r.query.get("filter") == ['Service.Meta.tier == "gold"'] for r in health_gets(server)[-1:])


def test_warning_instances_are_accepted_with_their_warning_weight(server: ConsulServer) -> None:
    c = server.client()
    ttl_instance(c, "a", 7001, weights={"Passing": 10, "Warning": 2})
    with watching(discovery(server, health="warning")) as rec:
        rec.wait_for(lambda s: [(e.weight, e.health) for e in s] == [(10, P)])
        c.agent.check.ttl_warn("service:a")
        rec.wait_for(lambda s: [(e.weight, e.health) for e in s] == [(2, P)])
    with watching(discovery(server)) as rec:
        rec.wait_for(lambda s: [e.health for e in s] == [C])  # passing only: warning is unhealthy


# --- datacenters ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def two_datacenters() -> Iterator[tuple[ConsulServer, ConsulServer]]:
    with ConsulServer(datacenter="dc1") as dc1, ConsulServer(datacenter="dc2", node_name="node-2") as dc2:
        dc1.join_wan(dc2)
        yield dc1, dc2


def test_datacenter_option_watches_that_datacenter() -> None:
    with two_datacenters() as (dc1, dc2):
        ttl_instance(dc2.client(), "far", 7201)
        with watching(ConsulDiscovery(SERVICE, address=dc1.address, datacenter="dc2", env={}, **FAST)) as rec:
            rec.wait_for(lambda s: healths(s) == {7201: P})
        assert all(r.query.get("dc") == ["dc2"] for r in health_gets(dc1))


def test_failover_to_the_next_datacenter_and_back() -> None:
    with two_datacenters() as (dc1, dc2):
        local, remote = dc1.client(), dc2.client()
        ttl_instance(local, "near", 7101)
        ttl_instance(remote, "far", 7201)
        d = ConsulDiscovery(
            SERVICE, address=dc1.address, failover=["dc2"], failover_warm=False, env={}, **FAST
        )
        with watching(d) as rec:
            rec.wait_for(lambda s: healths(s) == {7101: P})
            assert d.status.datacenter == ""
            assert not any(r.query.get("dc") for r in health_gets(dc1))  # dc2 is not watched while dc1 serves
            local.agent.check.ttl_fail("service:near")
            rec.wait_for(lambda s: healths(s) == {7201: P})
            assert d.status.datacenter == "dc2"
            # no set in between held only dc1's critical instance: the failover waited for dc2's answer
            assert all(healths(s) != {7101: C} for s in rec.sets)
            local.agent.check.ttl_pass("service:near")
            rec.wait_for(lambda s: healths(s) == {7101: P})
            assert d.status.datacenter == ""
            remote.agent.check.ttl_fail("service:far")
            time.sleep(0.2)  # dc2 is no longer watched: its change publishes nothing
            assert healths(rec.sets[-1]) == {7101: P}


def test_warm_failover_watches_the_next_datacenter_all_along() -> None:
    with two_datacenters() as (dc1, dc2):
        local, remote = dc1.client(), dc2.client()
        ttl_instance(local, "near", 7101)
        ttl_instance(remote, "far", 7201)
        d = ConsulDiscovery(SERVICE, address=dc1.address, failover=["dc2"], env={}, **FAST)
        with watching(d) as rec:
            rec.wait_for(lambda s: healths(s) == {7101: P})
            deadline = time.monotonic() + 5
            while (
                not any(r.query.get("dc") == ["dc2"] for r in health_gets(dc1))
                and time.monotonic() < deadline
            ):
                time.sleep(0.01)
            assert any(r.query.get("dc") == ["dc2"] for r in health_gets(dc1))  # watched before it is needed
            remote.agent.check.ttl_warn("service:far")
            time.sleep(0.1)
            assert healths(rec.sets[-1]) == {7101: P}  # dc2's changes publish nothing while dc1 serves
            local.agent.check.ttl_fail("service:near")
            # nothing usable anywhere (dc2's warning instance is not accepted): the first in force
            rec.wait_for(lambda s: healths(s) == {7101: C})
            remote.agent.check.ttl_pass("service:far")
            rec.wait_for(lambda s: healths(s) == {7201: P})  # dc2 usable: its endpoints at once


async def test_async_failover_to_the_next_datacenter_and_back() -> None:
    with two_datacenters() as (dc1, dc2):
        local, remote = dc1.client(), dc2.client()
        await asyncio.to_thread(ttl_instance, local, "near", 7101)
        await asyncio.to_thread(ttl_instance, remote, "far", 7201)
        d = ConsulDiscovery(SERVICE, address=dc1.address, failover=["dc2"], env={}, **FAST)
        async with awatching(d) as rec:
            await rec.await_for(lambda s: healths(s) == {7101: P})
            await asyncio.to_thread(local.agent.service.maintenance, "near", True)
            await rec.await_for(lambda s: healths(s) == {7201: P})
            await asyncio.to_thread(local.agent.service.maintenance, "near", False)
            await rec.await_for(lambda s: healths(s) == {7101: P})


def test_an_unreachable_failover_datacenter_leaves_the_local_set_in_force() -> None:
    with two_datacenters() as (dc1, dc2):
        local = dc1.client()
        ttl_instance(local, "near", 7101)
        dc2.stop()  # "No path to datacenter"
        d = ConsulDiscovery(SERVICE, address=dc1.address, failover=["dc2"], env={}, **FAST)
        with watching(d) as rec:
            rec.wait_for(lambda s: healths(s) == {7101: P})
            local.agent.check.ttl_fail("service:near")
            rec.wait_for(lambda s: healths(s) == {7101: C})  # panic mode may still use it
            assert not d.status.stale  # the local datacenter answers: its status is what counts


# --- namespaces, partitions, consistency, cache ------------------------------------------------------------


def test_namespace_and_partition_scope_the_watch() -> None:
    with ConsulServer(enterprise=True) as srv:
        agent = srv.client()
        agent.agent.service.register(SERVICE, service_id="default-ns", address="127.0.0.1", port=7001)
        body = json.dumps({"Name": SERVICE, "ID": "team", "Address": "127.0.0.1", "Port": 7002}).encode()
        req = urllib.request.Request(
            f"{srv.http_addr}/v1/agent/service/register?ns=team-a", body, method="PUT"
        )
        urllib.request.urlopen(req, timeout=5).close()
        with watching(
            ConsulDiscovery(SERVICE, address=srv.address, namespace="team-a", env={}, **FAST)
        ) as rec:
            rec.wait_for(lambda s: set(healths(s)) == {7002})
        env = {"CONSUL_NAMESPACE": "team-a", "CONSUL_PARTITION": "default"}
        with watching(ConsulDiscovery(SERVICE, address=srv.address, env=env, **FAST)) as rec:
            rec.wait_for(lambda s: set(healths(s)) == {7002})
        gets = health_gets(srv)
        assert gets[-1].query.get("ns") == ["team-a"] and gets[-1].query.get("partition") == ["default"]


def test_stale_reads_record_the_last_contact_and_leader(server: ConsulServer) -> None:
    ttl_instance(server.client(), "a", 7001)
    d = discovery(server, consistency="stale", wait=0.2)
    with watching(d) as rec:
        rec.wait_for(lambda s: len(s) == 1)
        assert d.status.last_contact == 0.0 and d.status.known_leader is True
        server.set_raft(leader=False, last_contact=1.5)
        deadline = time.monotonic() + 5
        while d.status.known_leader is not False and time.monotonic() < deadline:
            time.sleep(0.02)
        assert d.status.known_leader is False and d.status.last_contact == 1.5
        assert not d.status.stale  # a stale read answers without a leader
    server.set_raft()
    leader_reads = discovery(server, wait=0.2, backoff_initial=0.05)
    server.set_raft(leader=False)
    with watching(leader_reads):
        deadline = time.monotonic() + 5
        while not leader_reads.status.stale and time.monotonic() < deadline:
            time.sleep(0.02)
        assert leader_reads.status.error is not None and leader_reads.status.error.status == 500


def test_cached_reads_record_hits_and_age(server: ConsulServer) -> None:
    ttl_instance(server.client(), "a", 7001)
    d = discovery(server, cached=True, max_age=60.0, wait=0.1)
    with watching(d) as rec:
        rec.wait_for(lambda s: len(s) == 1)
        deadline = time.monotonic() + 5
        while d.status.cache_hit is not True and time.monotonic() < deadline:
            time.sleep(0.02)
        assert d.status.cache_hit is True and d.status.cache_age is not None
    gets = health_gets(server)
    assert all("cached" in r.query and r.headers.get("Cache-Control") == "max-age=60" for r in gets)


# --- HTTPS and tokens ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


def test_https_with_a_client_certificate_from_options_and_environment(pki: TestPKI, tmp_path: Path) -> None:
    with ConsulServer(tls=pki.server_tls(verify_incoming=True), acl_token="s3cret") as srv:
        ttl_instance(srv.client(verify=pki.ca_file, cert=(pki.client_cert, pki.client_key)), "a", 7001)
        token_file = tmp_path / "token"
        token_file.write_text("s3cret\n")
        by_options = ConsulDiscovery(
            SERVICE,
            address=srv.http_addr,
            ca_file=pki.ca_file,
            cert_file=pki.client_cert,
            key_file=pki.client_key,
            token_file=str(token_file),
            env={},
            **FAST,
        )
        env = {
            "CONSUL_HTTP_ADDR": srv.address,
            "CONSUL_HTTP_SSL": "true",
            "CONSUL_CAPATH": str(Path(pki.ca_file).parent / "cas"),
            "CONSUL_CLIENT_CERT": pki.client_cert,
            "CONSUL_CLIENT_KEY": pki.client_key,
            "CONSUL_HTTP_TOKEN_FILE": str(token_file),
            "CONSUL_TLS_SERVER_NAME": "server.dc1.consul",
        }
        (Path(pki.ca_file).parent / "cas").mkdir(exist_ok=True)
        (Path(pki.ca_file).parent / "cas" / "ca").write_text(Path(pki.ca_file).read_text())
        by_env = ConsulDiscovery(SERVICE, env=env, **FAST)
        for d in (by_options, by_env):
            with watching(d) as rec:
                rec.wait_for(lambda s: healths(s) == {7001: P})
        assert all(r.headers.get("X-Consul-Token") == "s3cret" for r in health_gets(srv))


async def test_async_https_with_a_client_certificate_and_server_name(pki: TestPKI) -> None:
    with ConsulServer(tls=pki.server_tls(verify_incoming=True)) as srv:
        client = srv.client(verify=pki.ca_file, cert=(pki.client_cert, pki.client_key))
        await asyncio.to_thread(ttl_instance, client, "a", 7001)
        d = ConsulDiscovery(
            SERVICE,
            address=f"https://127.0.0.1:{srv.port}",
            ca_file=pki.ca_file,
            cert_file=pki.client_cert,
            key_file=pki.client_key,
            tls_server_name="server.dc1.consul",
            env={},
            **FAST,
        )
        async with awatching(d) as rec:
            await rec.await_for(lambda s: healths(s) == {7001: P})
        wrong_name = ConsulDiscovery(
            SERVICE,
            address=srv.http_addr,
            ca_file=pki.ca_file,
            cert_file=pki.client_cert,
            key_file=pki.client_key,
            tls_server_name="not-the-server.example",
            env={},
            **FAST,
        )
        async with awatching(wrong_name) as rec:
            for _ in range(300):
                if wrong_name.status.error is not None:
                    break
                await asyncio.sleep(0.01)
            assert rec.sets == []
            cause = wrong_name.status.error.__cause__ if wrong_name.status.error else None
            assert cause is not None and isinstance(_ssl_cause(cause), ssl.SSLError)


def _ssl_cause(error: BaseException) -> BaseException | None:
    """The ssl.SSLError somewhere in an exception's chain of causes and contexts."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ssl.SSLError):
            return e
        stack.extend([e.__cause__, e.__context__, *[a for a in e.args if isinstance(a, BaseException)]])
        reason = getattr(e, "reason", None)
        if isinstance(reason, BaseException):
            stack.append(reason)
        os_error = getattr(e, "os_error", None)
        if isinstance(os_error, BaseException):
            stack.append(os_error)
    return None


def test_a_tls_handshake_failing_later_is_a_discovery_error_and_the_last_set_is_kept(
    pki: TestPKI, tmp_path: Path
) -> None:
    impostor = make_test_pki(tmp_path / "impostor")
    srv = ConsulServer(tls=pki.server_tls(verify_incoming=False)).start()
    try:
        ttl_instance(srv.client(verify=pki.ca_file), "a", 7001)
        d = ConsulDiscovery(SERVICE, address=srv.http_addr, ca_file=pki.ca_file, env={}, **FAST)
        with watching(d) as rec:
            rec.wait_for(lambda s: healths(s) == {7001: P})
            port = srv.port
            srv.stop()
            # the agent comes back with a certificate from a CA this client does not trust
            srv = ConsulServer(port=port, tls=impostor.server_tls(verify_incoming=False)).start()
            deadline = time.monotonic() + 5
            while _ssl_cause(d.status.error or Exception()) is None and time.monotonic() < deadline:
                time.sleep(0.02)
            error = d.status.error
            assert error is not None and _ssl_cause(error) is not None, d.status.last_error
            assert "certificate" in d.status.last_error.lower() or "SSL" in d.status.last_error
            assert all(healths(s) == {7001: P} for s in rec.sets[1:]) and len(rec.sets[-1]) == 1
    finally:
        srv.stop()


# --- the client's zone --------------------------------------------------------------------------------


def test_client_zone_from_the_agents_node_metadata() -> None:
    with ConsulServer(node_meta={"zone": "eu-west-1b"}) as srv:
        ttl_instance(srv.client(), "a", 7001, meta={"zone": "eu-west-1a"})
        d = ConsulDiscovery(SERVICE, address=srv.address, zone_from_agent=True, env={}, **FAST)
        with watching(d) as rec:
            rec.wait_for(lambda s: len(s) == 1)
            assert d.local_zone == "eu-west-1b" and rec.sets[0].endpoints[0].zone == "eu-west-1a"
        explicit = ConsulDiscovery(
            SERVICE, address=srv.address, zone_from_agent=True, env={"CONSUL_ZONE": "x"}
        )
        assert explicit.local_zone == "x"


async def test_async_client_zone_from_the_agent() -> None:
    with ConsulServer(node_meta={"az": "us-east-1c"}) as srv:
        d = ConsulDiscovery(SERVICE, address=srv.address, zone_from_agent=True, zone_key="az", env={}, **FAST)
        async with awatching(d) as rec:
            await rec.await_for(lambda s: True)
            assert d.local_zone == "us-east-1c"


# --- asyncio: decoding happens off the event loop -----------------------------------------------------


async def test_async_answers_are_decoded_off_the_event_loop_and_published_on_it(
    server: ConsulServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lbkit.discovery.consul_core import ConsulWatchCore

    loop_thread = threading.get_ident()
    decoded_in: list[int] = []
    published_in: list[int] = []
    original = ConsulWatchCore.on_response

    def recording(self: ConsulWatchCore, *args: Any) -> Any:
        decoded_in.append(threading.get_ident())
        return original(self, *args)

    monkeypatch.setattr(ConsulWatchCore, "on_response", recording)
    await asyncio.to_thread(ttl_instance, server.client(), "a", 7001)
    rec = Recorder()

    def on_update(snapshot: EndpointSet) -> None:
        published_in.append(threading.get_ident())
        rec(snapshot)

    task = asyncio.create_task(discovery(server).arun(on_update))
    try:
        await rec.await_for(lambda s: len(s) == 1)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert decoded_in and loop_thread not in decoded_in
    assert published_in and set(published_in) == {loop_thread}

"""Consul discovery without I/O: blocking-index rules, queries, staleness headers, datacenter failover,
options, the connection from options and the environment (tokens, TLS files), and secrecy."""

from __future__ import annotations

import json
import logging
import ssl
from pathlib import Path
from typing import Any

import pytest

from lbkit.discovery.consul import ConsulDiscovery
from lbkit.discovery.consul_connection import (
    ConsulConnection,
    format_duration,
    parse_consul_address,
    resolve_connection,
)
from lbkit.discovery.consul_core import ConsulOptions, ConsulWatchCore, DatacenterFailover
from lbkit.endpoint import Endpoint, EndpointHealth, EndpointSet
from lbkit.errors import ConfigError
from lbkit.testing.clock import FakeClock
from lbkit.testing.consul import TestPKI, make_test_pki
from tests.unit.test_consul_parse import entry

TOKEN = "9f3c1e2a-token-never-shown"


def make_core(
    clock: FakeClock | None = None, *, conn: ConsulConnection | None = None, **options: Any
) -> ConsulWatchCore:
    opts = ConsulOptions(**options)
    conn = conn or ConsulConnection("http", "127.0.0.1", 8500, token=TOKEN)
    return ConsulWatchCore("model", opts, conn, clock=clock or FakeClock())


def body(*entries: dict[str, Any]) -> str:
    return json.dumps(list(entries), separators=(",", ":"))


def params(core: ConsulWatchCore) -> dict[str, str]:
    return dict(core.next_query().params)


# --- blocking-index rules ---------------------------------------------------------------------------


def test_first_query_is_a_plain_read_then_blocks_on_the_returned_index() -> None:
    core = make_core(wait=30.0, request_timeout=5.0)
    q = core.next_query()
    assert q.path == "/v1/health/service/model"
    # every instance is asked for (no ?passing): their health is the watcher's to judge
    assert "index" not in dict(q.params) and "passing" not in dict(q.params)
    assert q.timeout == 5.0
    assert core.on_response(200, {"X-Consul-Index": "42"}, body(entry("a"))) is not None
    q = core.next_query()
    assert dict(q.params)["index"] == "42" and dict(q.params)["wait"] == "30s"
    # the HTTP timeout outlasts wait plus Consul's jitter (wait/16)
    assert q.timeout == pytest.approx(5.0 + 30.0 + 30.0 / 16)
    assert q.headers == {"X-Consul-Token": TOKEN}


def test_first_answer_is_published_even_when_empty_then_only_changes() -> None:
    core = make_core()
    first = core.on_response(200, {"X-Consul-Index": "5"}, "[]")
    assert first == EndpointSet([]) and first is not None and first.version == 5
    assert core.on_response(200, {"X-Consul-Index": "5"}, "[]") is None  # a return without change
    snap = core.on_response(200, {"X-Consul-Index": "9"}, body(entry("a")))
    assert snap is not None and snap.version == 9 and len(snap) == 1
    # a new index with the same endpoints (an idempotent write elsewhere) publishes nothing
    assert core.on_response(200, {"X-Consul-Index": "12"}, body(entry("a"))) is None
    assert core.index == 12
    changed = core.on_response(200, {"x-consul-index": "13"}, body(entry("a", weights={"Passing": 2})))
    assert changed is not None and changed.endpoints[0].weight == 2
    critical = core.on_response(
        200, {"X-Consul-Index": "14"}, body(entry("a", weights={"Passing": 2}, status="critical"))
    )
    assert critical is not None and critical.endpoints[0].health is EndpointHealth.CRITICAL


def test_index_going_backwards_resets_to_zero_for_a_full_read() -> None:
    core = make_core()
    core.on_response(200, {"X-Consul-Index": "100"}, body(entry("a")))
    assert core.on_response(200, {"X-Consul-Index": "40"}, body(entry("a"))) is None
    assert core.index == 0
    assert "index" not in params(core)  # a full, non-blocking read
    core.on_response(200, {"X-Consul-Index": "41"}, body(entry("a")))
    assert params(core)["index"] == "41"


def test_index_zero_from_the_server_becomes_one() -> None:
    core = make_core()
    core.on_response(200, {"X-Consul-Index": "0"}, "[]")
    assert core.index == 1 and params(core)["index"] == "1"


def test_queries_are_rate_limited_by_min_interval() -> None:
    clock = FakeClock()
    core = make_core(clock, min_interval=0.05)
    assert core.delay() == 0.0
    core.next_query()
    core.on_response(200, {"X-Consul-Index": "3"}, "[]")
    clock.now += 0.01
    assert core.delay() == pytest.approx(0.04)
    clock.now += 0.04
    assert core.delay() == 0.0


@pytest.mark.parametrize(
    ("status", "headers", "payload"),
    [
        (500, {"X-Consul-Index": "7"}, "rpc error: No cluster leader"),
        (200, {"X-Consul-Index": "7"}, "<html>proxy error</html>"),
        (200, {"X-Consul-Index": "7"}, '{"not": "a list"}'),
        (200, {}, "[]"),
        (200, {"X-Consul-Index": "seven"}, "[]"),
    ],
)
def test_errors_keep_the_last_set_and_mark_it_stale(
    status: int, headers: dict[str, str], payload: str
) -> None:
    clock = FakeClock()
    core = make_core(clock, backoff_initial=0.1, backoff_max=1.0)
    core.on_response(200, {"X-Consul-Index": "5"}, body(entry("a")))
    assert core.on_response(status, headers, payload) is None
    assert core.status.stale and core.status.consecutive_errors == 1 and core.status.errors == 1
    assert core.status.last_error and core.status.error is not None
    assert core.status.error.status == (status if status != 200 else 0)
    assert core.index == 5  # an error does not move the index
    assert core.published is not None and len(core.published) == 1
    # the answer after recovery that matches the kept set publishes nothing new
    assert core.on_response(200, {"X-Consul-Index": "6"}, body(entry("a"))) is None
    assert not core.status.stale and core.status.last_success == clock.now and core.status.error is None


def test_a_transport_failure_is_a_discovery_error_caused_by_it() -> None:
    core = make_core()
    core.on_response(200, {"X-Consul-Index": "5"}, body(entry("a")))
    cause = ssl.SSLCertVerificationError("certificate verify failed: unable to get local issuer certificate")
    core.on_error(cause)
    assert core.status.error is not None and core.status.error.__cause__ is cause
    assert "SSLCertVerificationError" in core.status.last_error
    assert core.published is not None and len(core.published) == 1


def test_backoff_grows_exponentially_with_jitter_and_is_capped() -> None:
    clock = FakeClock()
    core = make_core(clock, backoff_initial=0.1, backoff_max=0.5, min_interval=0.0)
    delays = []
    for _ in range(6):
        core.on_error(ConnectionRefusedError("refused"))
        delays.append(core.delay())
    assert 0.1 <= delays[0] <= 0.2
    assert 0.2 <= delays[1] <= 0.3
    assert 0.4 <= delays[2] <= 0.5
    assert all(d <= 0.5 for d in delays)
    assert delays[-1] == pytest.approx(0.5)
    core.on_response(200, {"X-Consul-Index": "1"}, "[]")
    assert core.delay() == 0.0


def test_outage_logs_one_warning_then_info_on_recovery(caplog: pytest.LogCaptureFixture) -> None:
    core = make_core()
    core.on_response(200, {"X-Consul-Index": "5"}, body(entry("a")))
    with caplog.at_level(logging.DEBUG, logger="lbkit.discovery"):
        for _ in range(3):
            core.on_error(ConnectionRefusedError("connection refused"))
        core.on_response(200, {"X-Consul-Index": "6"}, body(entry("a")))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(warnings) == 1 and "keeping 1 endpoints" in warnings[0].getMessage()
    assert len(infos) == 1 and "recovered after 3 failed queries" in infos[0].getMessage()


def test_acl_denied_is_logged_as_an_error_and_keeps_the_set(caplog: pytest.LogCaptureFixture) -> None:
    core = make_core()
    core.on_response(200, {"X-Consul-Index": "5"}, body(entry("a")))
    with caplog.at_level(logging.DEBUG, logger="lbkit.discovery"):
        assert core.on_response(403, {}, f"Permission denied: token {TOKEN} lacks service:read") is None
        core.on_response(403, {}, "Permission denied")
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "ACL token refused" in errors[0].getMessage()
    assert core.published is not None and len(core.published) == 1
    assert TOKEN not in caplog.text and TOKEN not in core.status.last_error


def test_an_empty_answer_from_a_reachable_consul_is_authoritative() -> None:
    core = make_core()
    core.on_response(200, {"X-Consul-Index": "5"}, body(entry("a")))
    snap = core.on_response(200, {"X-Consul-Index": "6"}, "[]")
    assert snap is not None and len(snap) == 0 and not core.status.stale


def test_every_critical_instance_is_still_published() -> None:
    core = make_core()
    snap = core.on_response(
        200,
        {"X-Consul-Index": "5"},
        body(entry("a", status="critical"), entry("b", "10.0.0.2", status="critical")),
    )
    assert snap is not None and [e.health for e in snap] == [EndpointHealth.CRITICAL] * 2


def test_query_carries_tags_datacenter_near_filter_scope_and_consistency() -> None:
    conn = ConsulConnection("http", "127.0.0.1", 8500, namespace="team-a", partition="p1")
    core = make_core(
        conn=conn,
        tags=["gpu", "v2"],
        datacenter="dc2",
        near="_agent",
        filter='Service.Meta.tier == "a"',
        consistency="stale",
    )
    q = core.next_query()
    assert ("tag", "gpu") in q.params and ("tag", "v2") in q.params
    assert ("dc", "dc2") in q.params and ("near", "_agent") in q.params
    assert ("filter", 'Service.Meta.tier == "a"') in q.params and ("stale", "") in q.params
    assert ("ns", "team-a") in q.params and ("partition", "p1") in q.params
    q = make_core(consistency="consistent").next_query()
    assert ("consistent", "") in q.params and "stale" not in dict(q.params)
    q = make_core(cached=True, max_age=30.0).next_query()
    assert ("cached", "") in q.params and q.headers["Cache-Control"] == "max-age=30"
    q = make_core(cached=True).next_query()
    assert "Cache-Control" not in q.headers
    assert dict(make_core().next_query().params) == {}


def test_staleness_and_cache_headers_are_recorded() -> None:
    core = make_core(consistency="stale", cached=True)
    headers = {
        "X-Consul-Index": "5",
        "X-Consul-LastContact": "2500",
        "X-Consul-KnownLeader": "false",
        "X-Cache": "HIT",
        "Age": "12",
    }
    core.on_response(200, headers, "[]")
    st = core.status
    assert (st.last_contact, st.known_leader, st.cache_hit, st.cache_age) == (2.5, False, True, 12.0)
    core.on_response(
        200, {"X-Consul-Index": "6", "X-Consul-LastContact": "0", "X-Consul-KnownLeader": "true"}, "[]"
    )
    assert (st.last_contact, st.known_leader, st.cache_hit, st.cache_age) == (0.0, True, None, None)


def test_service_name_is_escaped_in_the_path() -> None:
    conn = ConsulConnection("http", "127.0.0.1", 8500)
    core = ConsulWatchCore("a b?c", ConsulOptions(), conn)
    assert core.next_query().path == "/v1/health/service/a%20b%3Fc"


def test_format_duration() -> None:
    assert format_duration(60.0) == "60s"
    assert format_duration(0.25) == "250ms"
    assert format_duration(1.5) == "1500ms"


# --- datacenter failover -------------------------------------------------------------------------------


def dc_set(*health: EndpointHealth, base: int = 1, version: int = 1) -> EndpointSet:
    return EndpointSet(
        [Endpoint(f"10.0.{base}.{i + 1}:50051", health=h) for i, h in enumerate(health)], version
    )


P, C, M = EndpointHealth.PASSING, EndpointHealth.CRITICAL, EndpointHealth.MAINTENANCE


def test_failover_uses_the_local_datacenter_while_it_has_a_usable_instance() -> None:
    f = DatacenterFailover("model", ["", "dc2", "dc3"], warm=False)
    assert f.wanted == ("",)
    local = dc_set(P, C)
    assert f.on_answer("", local) is local and f.current == "" and f.wanted == ("",)


def test_failover_goes_to_the_next_usable_datacenter_in_order_and_comes_back() -> None:
    f = DatacenterFailover("model", ["", "dc2", "dc3"], warm=False)
    f.on_answer("", dc_set(P))
    assert f.on_answer("", dc_set(C, C)) is None  # nothing usable: wait for dc2 before deciding
    assert f.wanted == ("", "dc2")
    assert f.on_answer("dc2", dc_set(base=2)) is None and f.wanted == ("", "dc2", "dc3")  # dc2 is empty
    dc3 = dc_set(P, P, base=3)
    assert f.on_answer("dc3", dc3) is dc3 and f.current == "dc3"
    dc2 = dc_set(P, base=2)
    assert f.on_answer("dc2", dc2) is dc2 and f.current == "dc2" and f.wanted == ("", "dc2")
    f.forget("dc3")
    back = dc_set(P, C)
    assert f.on_answer("", back) is back and f.current == "" and f.wanted == ("",)


def test_failover_goes_past_an_unreachable_datacenter() -> None:
    f = DatacenterFailover("model", ["", "dc2", "dc3"], warm=False)
    f.on_answer("", dc_set(C))
    assert f.on_failure("dc2") is None and f.wanted == ("", "dc2", "dc3")
    dc3 = dc_set(P, base=3)
    assert f.on_answer("dc3", dc3) is dc3


def test_without_any_usable_instance_the_first_datacenter_with_instances_is_in_force() -> None:
    f = DatacenterFailover("model", ["", "dc2"], warm=False)
    f.on_answer("", dc_set(M, M))
    dc2 = dc_set(C, base=2)
    assert f.on_answer("dc2", dc2) is dc2  # its critical instances can still serve in panic mode
    f = DatacenterFailover("model", ["", "dc2"], warm=False)
    local = dc_set(C)
    f.on_answer("", local)
    assert f.on_answer("dc2", dc_set(base=2)) is local


def test_warm_failover_watches_every_datacenter_and_decides_the_same() -> None:
    f = DatacenterFailover("model", ["", "dc2"])
    assert f.wanted == ("", "dc2")
    dc2 = dc_set(P, base=2)
    assert f.on_answer("dc2", dc2) is None  # the local datacenter has not answered: wait for it
    local = dc_set(P)
    assert f.on_answer("", local) is local and f.wanted == ("", "dc2")
    assert f.on_answer("", dc_set(C)) is dc2  # dc2's set is known: the failover is immediate
    assert f.wanted == ("", "dc2")


def test_a_failing_local_datacenter_keeps_its_last_set_in_force() -> None:
    f = DatacenterFailover("model", ["", "dc2"], warm=False)
    local = dc_set(P)
    f.on_answer("", local)
    assert f.on_failure("") is None and f.current == "" and f.wanted == ("",)


# --- options ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"wait": -1.0}, "-1.0"),
        ({"wait": 601.0}, "601.0"),
        ({"wait": 0}, "0"),
        ({"min_interval": -0.1}, "-0.1"),
        ({"request_timeout": 0}, "0"),
        ({"backoff_initial": 2.0, "backoff_max": 1.0}, "1.0"),
        ({"health": "healthy"}, "healthy"),
        ({"tags": ["ok", ""]}, "''"),
        ({"tags": 5}, "5"),
        ({"address": "consul:notaport"}, "consul:notaport"),
        ({"address": "ftp://consul:8500"}, "ftp"),
        ({"address": "::1:8500"}, "::1:8500"),
        ({"address": ""}, "''"),
        ({"datacenter": ""}, "datacenter"),
        ({"namespace": ""}, "namespace"),
        ({"partition": ""}, "partition"),
        ({"failover": ["dc2", ""]}, "failover"),
        ({"failover": ["dc2", "dc2"]}, "dc2"),
        ({"datacenter": "dc1", "failover": "dc1"}, "dc1"),
        ({"consistency": "linearizable"}, "linearizable"),
        ({"cached": True, "consistency": "consistent"}, "consistent"),
        ({"max_age": 5.0}, "cached"),
        ({"cached": True, "max_age": -1.0}, "-1.0"),
        ({"cached": "yes"}, "cached"),
        ({"zone_from": ["service_meta", "rack"]}, "rack"),
        ({"zone_from": []}, "zone_from"),
        ({"zone_key": ""}, "''"),
        ({"verify": "yes"}, "yes"),
        ({"token": "a", "token_file": "/f"}, "token_file"),
        ({"no_such_option": 1}, "no_such_option"),
    ],
)
def test_bad_options_raise_config_error_naming_them(kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError) as info:
        ConsulOptions(**kwargs)
    assert named in str(info.value)


def test_datacenters_in_failover_order() -> None:
    assert ConsulOptions().datacenters == ("",)
    assert ConsulOptions(datacenter="dc1", failover=["dc2", "dc3"]).datacenters == ("dc1", "dc2", "dc3")
    assert ConsulOptions(failover="dc9").datacenters == ("", "dc9")


# --- connection: address, environment, tokens, TLS ------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:8500", ("http", "127.0.0.1", 8500)),
        ("consul.internal", ("http", "consul.internal", 8500)),
        ("https://consul.internal", ("https", "consul.internal", 8501)),
        ("https://10.0.0.9:9443/", ("https", "10.0.0.9", 9443)),
        ("[::1]:8500", ("http", "::1", 8500)),
    ],
)
def test_parse_consul_address(address: str, expected: tuple[str, str, int]) -> None:
    assert parse_consul_address(address) == expected


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


def test_environment_supplies_address_token_tls_and_scope(pki: TestPKI) -> None:
    env = {
        "CONSUL_HTTP_ADDR": "https://consul.example:8501",
        "CONSUL_HTTP_TOKEN": TOKEN,
        "CONSUL_CACERT": pki.ca_file,
        "CONSUL_CLIENT_CERT": pki.client_cert,
        "CONSUL_CLIENT_KEY": pki.client_key,
        "CONSUL_TLS_SERVER_NAME": "server.dc1.consul:8501",
        "CONSUL_NAMESPACE": "team-a",
        "CONSUL_PARTITION": "p1",
    }
    conn = resolve_connection(env=env)
    assert (conn.scheme, conn.host, conn.port, conn.token) == ("https", "consul.example", 8501, TOKEN)
    assert (conn.ca_file, conn.cert_file, conn.key_file) == (pki.ca_file, pki.client_cert, pki.client_key)
    assert conn.tls_server_name == "server.dc1.consul"  # a host:port names the host
    assert (conn.namespace, conn.partition) == ("team-a", "p1")
    assert isinstance(conn.ssl_context, ssl.SSLContext) and conn.ssl_context.verify_mode == ssl.CERT_REQUIRED
    # explicit arguments win over the environment
    conn = resolve_connection(
        address="127.0.0.1:9000", token="explicit", verify=False, namespace="mine", env=env
    )
    assert (conn.scheme, conn.port, conn.token, conn.verify, conn.namespace) == (
        "http",
        9000,
        "explicit",
        False,
        "mine",
    )
    assert conn.ssl_context is None  # plain http


def test_environment_ssl_switch_and_default_address() -> None:
    assert resolve_connection(env={}).address == "http://127.0.0.1:8500"
    conn = resolve_connection(env={"CONSUL_HTTP_ADDR": "consul:8500", "CONSUL_HTTP_SSL": "true"})
    assert conn.address == "https://consul:8500" and conn.ssl_context is not None
    conn = resolve_connection(env={"CONSUL_HTTP_ADDR": "consul", "CONSUL_HTTP_SSL": "1"})
    assert conn.address == "https://consul:8501"
    conn = resolve_connection(env={"CONSUL_HTTP_SSL": "true", "CONSUL_HTTP_SSL_VERIFY": "false"})
    assert (
        conn.verify is False
        and conn.ssl_context is not None
        and conn.ssl_context.verify_mode == ssl.CERT_NONE
    )


def test_token_file_as_consul_reads_it(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"  {TOKEN}\n")
    assert resolve_connection(token_file=str(token_file), env={}).token == TOKEN
    # as Consul's client: the token file wins over CONSUL_HTTP_TOKEN; an explicit token over both
    env = {"CONSUL_HTTP_TOKEN_FILE": str(token_file), "CONSUL_HTTP_TOKEN": "from-env"}
    assert resolve_connection(env=env).token == TOKEN
    assert resolve_connection(token="explicit", env=env).token == "explicit"
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert (
        resolve_connection(env={"CONSUL_HTTP_TOKEN_FILE": str(empty), "CONSUL_HTTP_TOKEN": "t"}).token == "t"
    )


def test_ca_path_loads_every_certificate_file(tmp_path: Path, pki: TestPKI) -> None:
    capath = tmp_path / "cas"
    capath.mkdir()
    (capath / "any-name.crt").write_text(Path(pki.ca_file).read_text())
    (capath / "other").write_text(Path(pki.other_ca_file).read_text())
    conn = resolve_connection(address="https://127.0.0.1:8501", ca_path=str(capath), env={})
    assert conn.ssl_context is not None and len(conn.ssl_context.get_ca_certs()) == 2


@pytest.mark.parametrize(
    ("kind", "named"),
    [
        ("missing-ca", "ca_file"),
        ("ca-not-pem", "ca_file"),
        ("capath-not-dir", "ca_path"),
        ("capath-junk", "junk.txt"),
        ("cert-without-key", "key_file"),
        ("key-mismatch", "cert_file"),
        ("missing-token-file", "token_file"),
        ("unreadable-token-file", "token_file"),
        ("env-missing-ca", "CONSUL_CACERT"),
        ("env-missing-token-file", "CONSUL_HTTP_TOKEN_FILE"),
        ("env-capath", "CONSUL_CAPATH"),
    ],
)
def test_bad_tls_and_token_files_are_config_errors_naming_option_and_path(
    kind: str, named: str, tmp_path: Path, pki: TestPKI
) -> None:
    junk = tmp_path / "junk.txt"
    junk.write_text("not a certificate")
    unreadable = tmp_path / "secret"
    unreadable.write_text(TOKEN)
    unreadable.chmod(0)
    missing = str(tmp_path / "missing.pem")
    https = "https://127.0.0.1:8501"
    cases: dict[str, tuple[dict[str, Any], dict[str, str], str]] = {
        "missing-ca": ({"ca_file": missing}, {}, missing),
        "ca-not-pem": ({"ca_file": str(junk)}, {}, str(junk)),
        "capath-not-dir": ({"ca_path": str(junk)}, {}, str(junk)),
        "capath-junk": ({"ca_path": str(tmp_path)}, {}, str(tmp_path)),
        "cert-without-key": ({"cert_file": pki.client_cert}, {}, pki.client_cert),
        "key-mismatch": ({"cert_file": pki.client_cert, "key_file": pki.server_key}, {}, pki.client_cert),
        "missing-token-file": ({"token_file": missing}, {}, missing),
        "unreadable-token-file": ({"token_file": str(unreadable)}, {}, str(unreadable)),
        "env-missing-ca": ({}, {"CONSUL_CACERT": missing}, missing),
        "env-missing-token-file": ({}, {"CONSUL_HTTP_TOKEN_FILE": missing}, missing),
        "env-capath": ({}, {"CONSUL_CAPATH": missing}, missing),
    }
    kwargs, env, path = cases[kind]
    if kind == "unreadable-token-file" and unreadable.read_text() == TOKEN:
        pytest.skip("running as a user who reads any file (root): nothing is unreadable")
    with pytest.raises(ConfigError) as info:
        ConsulDiscovery("model", address=https, env=env, **kwargs)
    text = str(info.value)
    assert named in text and path in text and TOKEN not in text


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"CONSUL_HTTP_ADDR": "consul:99999"}, "consul:99999"),
        ({"CONSUL_HTTP_SSL": "maybe"}, "maybe"),
        ({"CONSUL_CACERT": "/no/such/ca.pem"}, "/no/such/ca.pem"),
        ({"CONSUL_CLIENT_KEY": "/k.pem"}, "/k.pem"),
        ({"CONSUL_NAMESPACE": " a "}, "CONSUL_NAMESPACE"),
    ],
)
def test_bad_environment_raises_config_error_naming_it(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError) as info:
        ConsulDiscovery("model", env=env)
    assert named in str(info.value)


def test_bad_service_name() -> None:
    for bad in ("", " model", "a/b", None):
        with pytest.raises(ConfigError):
            ConsulDiscovery(bad, env={})  # type: ignore[arg-type]


def test_local_zone_from_the_option_then_consul_zone() -> None:
    assert ConsulDiscovery("model", zone="eu-1a", env={"CONSUL_ZONE": "us-1"}).local_zone == "eu-1a"
    assert ConsulDiscovery("model", env={"CONSUL_ZONE": "us-1"}).local_zone == "us-1"
    assert ConsulDiscovery("model", env={}).local_zone == ""  # until the agent tells it


# --- the token stays secret --------------------------------------------------------------------------------


def test_token_never_in_repr_or_errors(caplog: pytest.LogCaptureFixture) -> None:
    d = ConsulDiscovery("model", token=TOKEN, env={})
    assert TOKEN not in repr(d) and TOKEN not in repr(d.options) and TOKEN not in repr(d.connection)
    assert "token=<set>" in repr(d.options)
    env_d = ConsulDiscovery("model", env={"CONSUL_HTTP_TOKEN": TOKEN})
    assert TOKEN not in repr(env_d) and TOKEN not in repr(env_d.connection)
    with pytest.raises(ConfigError) as info:
        ConsulOptions(token=TOKEN + " x")
    assert TOKEN not in str(info.value)
    with pytest.raises(ConfigError) as info:
        ConsulDiscovery("model", env={"CONSUL_HTTP_TOKEN": TOKEN + "\n"})
    assert TOKEN not in str(info.value)
    core = make_core()
    with caplog.at_level(logging.DEBUG, logger="lbkit.discovery"):
        core.on_error(ConnectionError(f"failed with header X-Consul-Token: {TOKEN}"))
        core.on_response(500, {}, f"bad token {TOKEN}")
    assert TOKEN not in caplog.text and TOKEN not in core.status.last_error
    assert "<token>" in core.status.last_error


def test_process_environment_is_read_when_no_env_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "https://consul.service:9443")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", TOKEN)
    d = ConsulDiscovery("model")
    assert d.connection.address == "https://consul.service:9443" and d.connection.token == TOKEN
    assert ConsulDiscovery("model", address="127.0.0.1:8600", token="mine").connection.token == "mine"

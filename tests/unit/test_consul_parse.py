"""Consul discovery core: payload mapping, blocking-index rules, options and environment, secrecy."""

from __future__ import annotations

import copy
import json
import logging
from typing import Any

import pytest

from lbkit.discovery.consul import ConsulDiscovery
from lbkit.discovery.consul_core import (
    ConsulConnection,
    ConsulOptions,
    ConsulPayloadError,
    ConsulWatchCore,
    format_duration,
    parse_consul_address,
    parse_health_entries,
    resolve_connection,
)
from lbkit.endpoint import Endpoint, EndpointSet
from lbkit.errors import ConfigError
from lbkit.testing.clock import FakeClock

TOKEN = "9f3c1e2a-token-never-shown"


def entry(
    sid: str,
    address: str = "10.0.0.1",
    port: int | None = 50051,
    *,
    node_address: str = "10.1.0.1",
    node: str = "node-a",
    weights: Any = None,
    meta: dict[str, str] | None = None,
    node_meta: dict[str, str] | None = None,
    tags: list[str] | None = None,
    status: str = "passing",
) -> dict[str, Any]:
    """One /v1/health/service entry, shaped as Consul returns it."""
    service: dict[str, Any] = {
        "ID": sid,
        "Service": "model",
        "Tags": tags if tags is not None else ["v1"],
        "Address": address,
        "Meta": meta if meta is not None else {},
        "EnableTagOverride": False,
        "CreateIndex": 10,
        "ModifyIndex": 10,
    }
    if port is not None:
        service["Port"] = port
    if weights is not None:
        service["Weights"] = weights
    return {
        "Node": {
            "ID": "40e4a748-2192-161a-0510-9bf59fe950b5",
            "Node": node,
            "Address": node_address,
            "Datacenter": "dc1",
            "TaggedAddresses": {"lan": node_address, "wan": node_address},
            "Meta": node_meta if node_meta is not None else {},
        },
        "Service": service,
        "Checks": [
            {"Node": node, "CheckID": "serfHealth", "Name": "Serf Health Status", "Status": "passing"},
            {"Node": node, "CheckID": f"service:{sid}", "Name": "grpc", "Status": status, "ServiceID": sid},
        ],
    }


def parse(payload: object, **kwargs: Any) -> list[Endpoint]:
    return parse_health_entries(payload, service="model", **kwargs)


# --- mapping ---------------------------------------------------------------------------------------


def test_maps_address_port_tags_weight_meta_and_zone() -> None:
    payload = [
        entry(
            "a",
            "10.0.0.1",
            50051,
            weights={"Passing": 5, "Warning": 1},
            meta={"zone": "eu-1a", "version": "3"},
            node_meta={"rack": "r7", "version": "node-level"},
            tags=["v1", "gpu"],
        )
    ]
    (e,) = parse(payload)
    assert e.address == "10.0.0.1:50051"
    assert e.weight == 5
    assert e.zone == "eu-1a"
    assert e.tags == frozenset({"v1", "gpu"})
    # node metadata goes under the prefix; the service's own keys are kept as they are
    assert dict(e.metadata) == {
        "zone": "eu-1a",
        "version": "3",
        "node.rack": "r7",
        "node.version": "node-level",
    }


def test_service_meta_wins_over_prefixed_node_meta_on_a_clash() -> None:
    payload = [entry("a", meta={"node.rack": "svc"}, node_meta={"rack": "node"})]
    (e,) = parse(payload)
    assert e.metadata["node.rack"] == "svc"


def test_empty_service_address_falls_back_to_node_address() -> None:
    (e,) = parse([entry("a", "", 7000, node_address="192.168.5.9")])
    assert e.address == "192.168.5.9:7000"


def test_ipv6_address_is_bracketed() -> None:
    (e,) = parse([entry("a", "fd00::5", 7000)])
    assert e.address == "[fd00::5]:7000"


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        (None, 1),
        ({}, 1),
        ({"Passing": 0, "Warning": 0}, 1),
        ({"Passing": -2}, 1),
        ({"Passing": "7"}, 1),
        ({"Passing": 3}, 3),
    ],
)
def test_weight_defaults_to_one_when_missing_or_not_positive(weights: Any, expected: int) -> None:
    (e,) = parse([entry("a", weights=weights)])
    assert e.weight == expected


def test_zone_falls_back_to_node_meta_then_locality_and_key_is_configurable() -> None:
    node_zone = entry("a", node_meta={"zone": "us-2b"})
    (e,) = parse([node_zone])
    assert e.zone == "us-2b"
    loc = entry("b")
    loc["Service"]["Locality"] = {"Region": "us", "Zone": "us-3c"}
    (e,) = parse([loc])
    assert e.zone == "us-3c"
    (e,) = parse([entry("c", meta={"az": "x1", "zone": "ignored"})], zone_key="az")
    assert e.zone == "x1"


def test_malformed_entries_are_skipped_with_a_warning_naming_them(caplog: pytest.LogCaptureFixture) -> None:
    payload = [
        entry("good", "10.0.0.1", 1),
        entry("no-port", "10.0.0.2", None),
        entry("zero-port", "10.0.0.3", 0),
        entry("bad-host", "not a host!", 80),
        entry("no-address", "", 80, node_address=""),
        {"Node": {"Node": "n"}, "Service": "not-an-object"},
        entry("dup", "10.0.0.1", 1, node="node-b"),
        entry("good2", "10.0.0.4", 2),
    ]
    with caplog.at_level(logging.WARNING, logger="lbkit.discovery"):
        endpoints = parse(payload)
    assert [e.address for e in endpoints] == ["10.0.0.1:1", "10.0.0.4:2"]
    text = caplog.text
    for name in ("no-port", "zero-port", "bad-host", "no-address", "dup on node node-b"):
        assert name in text
    assert all(r.name == "lbkit.discovery" and r.levelno == logging.WARNING for r in caplog.records)
    assert len(caplog.records) == 6


@pytest.mark.parametrize("payload", [{"Node": {}}, "text", None, 42, [1, 2], [entry("a"), "x"]])
def test_payload_that_is_not_a_list_of_objects_is_rejected(payload: object) -> None:
    with pytest.raises(ConsulPayloadError):
        parse(payload)


def test_health_modes_filter_by_aggregated_status() -> None:
    payload = [
        entry("p", "10.0.0.1"),
        entry("w", "10.0.0.2", status="warning", weights={"Passing": 4, "Warning": 2}),
        entry("w0", "10.0.0.3", status="warning", weights={"Passing": 4, "Warning": 0}),
        entry("c", "10.0.0.4", status="critical"),
        entry("m", "10.0.0.5", status="maintenance"),
    ]
    assert [e.address for e in parse(payload)] == ["10.0.0.1:50051"]
    warning = parse(payload, health="warning")
    assert [(e.address, e.weight) for e in warning] == [("10.0.0.1:50051", 1), ("10.0.0.2:50051", 2)]
    assert len(parse(payload, health="any")) == 5
    assert parse(payload, health="any")[1].weight == 4


# --- blocking-index rules ---------------------------------------------------------------------------


def make_core(clock: FakeClock | None = None, **options: Any) -> ConsulWatchCore:
    opts = ConsulOptions(**options)
    conn = ConsulConnection("http", "127.0.0.1", 8500, token=TOKEN)
    return ConsulWatchCore("model", opts, conn, clock=clock or FakeClock())


def body(*entries: dict[str, Any]) -> str:
    return json.dumps(list(entries))


def params(core: ConsulWatchCore) -> dict[str, str]:
    return dict(core.next_query().params)


def test_first_query_is_a_plain_read_then_blocks_on_the_returned_index() -> None:
    core = make_core(wait=30.0, request_timeout=5.0)
    q = core.next_query()
    assert q.path == "/v1/health/service/model"
    assert "index" not in dict(q.params) and dict(q.params)["passing"] == "1"
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
    assert core.status.updates == 3


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
    assert core.index == 1
    assert params(core)["index"] == "1"


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
    assert core.status.last_error
    assert core.index == 5  # an error does not move the index
    assert core.published is not None and len(core.published) == 1
    # the answer after recovery that matches the kept set publishes nothing new
    assert core.on_response(200, {"X-Consul-Index": "6"}, body(entry("a"))) is None
    assert not core.status.stale and core.status.last_success == clock.now


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


def test_disappeared_service_empties_the_set() -> None:
    core = make_core()
    core.on_response(200, {"X-Consul-Index": "5"}, body(entry("a")))
    snap = core.on_response(200, {"X-Consul-Index": "6"}, "[]")
    assert snap is not None and len(snap) == 0 and not core.status.stale


def test_query_carries_tags_datacenter_near_filter_and_health() -> None:
    core = make_core(tags=["gpu", "v2"], datacenter="dc2", near="_agent", filter='Service.Meta.tier == "a"')
    q = core.next_query()
    assert ("tag", "gpu") in q.params and ("tag", "v2") in q.params
    assert ("dc", "dc2") in q.params and ("near", "_agent") in q.params
    assert ("filter", 'Service.Meta.tier == "a"') in q.params
    q = make_core(health="warning").next_query()
    assert "passing" not in dict(q.params)


def test_service_name_is_escaped_in_the_path() -> None:
    conn = ConsulConnection("http", "127.0.0.1", 8500)
    core = ConsulWatchCore("a b?c", ConsulOptions(), conn)
    assert core.next_query().path == "/v1/health/service/a%20b%3Fc"


def test_format_duration() -> None:
    assert format_duration(60.0) == "60s"
    assert format_duration(0.25) == "250ms"
    assert format_duration(1.5) == "1500ms"


# --- options and environment -------------------------------------------------------------------------


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
        ({"datacenter": ""}, "''"),
        ({"zone_key": ""}, "''"),
        ({"verify": "yes"}, "yes"),
        ({"no_such_option": 1}, "no_such_option"),
    ],
)
def test_bad_options_raise_config_error_naming_the_value(kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError) as info:
        ConsulOptions(**kwargs)
    assert named in str(info.value)


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


def test_environment_supplies_address_token_and_tls(tmp_path: Any) -> None:
    ca = tmp_path / "ca.pem"
    cert = tmp_path / "client.pem"
    key = tmp_path / "client.key"
    for f in (ca, cert, key):
        f.write_text("x")
    env = {
        "CONSUL_HTTP_ADDR": "https://consul.example:8501",
        "CONSUL_HTTP_TOKEN": TOKEN,
        "CONSUL_CACERT": str(ca),
        "CONSUL_CLIENT_CERT": str(cert),
        "CONSUL_CLIENT_KEY": str(key),
    }
    conn = resolve_connection(env=env)
    assert (conn.scheme, conn.host, conn.port, conn.token) == ("https", "consul.example", 8501, TOKEN)
    assert conn.http_verify == str(ca) and conn.http_cert == (str(cert), str(key))
    # explicit arguments win over the environment
    conn = resolve_connection(address="127.0.0.1:9000", token="explicit", verify=False, env=env)
    assert (conn.scheme, conn.port, conn.token, conn.http_verify) == ("http", 9000, "explicit", False)


def test_environment_ssl_switch_and_default_address() -> None:
    assert resolve_connection(env={}).address == "http://127.0.0.1:8500"
    conn = resolve_connection(env={"CONSUL_HTTP_ADDR": "consul:8500", "CONSUL_HTTP_SSL": "true"})
    assert conn.address == "https://consul:8500"
    conn = resolve_connection(env={"CONSUL_HTTP_ADDR": "consul", "CONSUL_HTTP_SSL": "1"})
    assert conn.address == "https://consul:8501"
    assert resolve_connection(env={"CONSUL_HTTP_SSL_VERIFY": "false"}).verify is False


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"CONSUL_HTTP_ADDR": "consul:99999"}, "consul:99999"),
        ({"CONSUL_HTTP_SSL": "maybe"}, "maybe"),
        ({"CONSUL_CACERT": "/no/such/ca.pem"}, "/no/such/ca.pem"),
        ({"CONSUL_CLIENT_KEY": "/k.pem"}, "/k.pem"),
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


# --- the token stays secret --------------------------------------------------------------------------


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


def test_payload_entries_are_not_mutated() -> None:
    payload = [entry("a", meta={"zone": "z"})]
    before = copy.deepcopy(payload)
    parse(payload)
    assert payload == before


def test_unchanged_instances_reuse_their_endpoint_objects() -> None:
    cache: dict[Any, Endpoint] = {}
    first = parse([entry("a", "10.0.0.1"), entry("b", "10.0.0.2")], cache=cache)
    second = parse([entry("a", "10.0.0.1"), entry("b", "10.0.0.2", meta={"zone": "z9"})], cache=cache)
    assert second[0] is first[0]
    assert second[1] is not first[1] and second[1].zone == "z9"
    assert len(cache) == 2  # only the last parse's endpoints are kept


def test_process_environment_is_read_when_no_env_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "https://consul.service:9443")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", TOKEN)
    d = ConsulDiscovery("model")
    assert d.connection.address == "https://consul.service:9443" and d.connection.token == TOKEN
    assert ConsulDiscovery("model", address="127.0.0.1:8600", token="mine").connection.token == "mine"


def test_modify_indexes_and_status_decide_reuse_when_present() -> None:
    def indexed(service_index: int, status: str = "passing", port: int = 1) -> dict[str, Any]:
        e = entry("a", "10.0.0.1", port, status=status, weights={"Passing": 4, "Warning": 2})
        e["Service"]["ModifyIndex"] = service_index
        e["Node"]["ModifyIndex"] = 3
        return e

    cache: dict[Any, Endpoint] = {}
    (first,) = parse([indexed(10)], cache=cache)
    (same,) = parse([indexed(10)], cache=cache)
    assert same is first
    (moved,) = parse([indexed(11, port=2)], cache=cache)  # a re-registration bumps ModifyIndex
    assert moved.address == "10.0.0.1:2"
    assert moved.weight == 4
    (warned,) = parse([indexed(11, "warning", port=2)], cache=cache, health="warning")
    assert warned.weight == 2  # same ModifyIndex, new status: rebuilt with the Warning weight
    assert parse([indexed(11, "critical", port=2)], cache=cache) == []

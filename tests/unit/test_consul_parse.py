"""From Consul health answers to endpoints: the mapping of one entry, health and maintenance, zones, and
the incremental decoder (reused entries, other layouts, skipped entries warned about once)."""

from __future__ import annotations

import copy
import json
import logging
from typing import Any

import pytest

from lbkit.discovery.consul_parse import (
    ConsulPayloadError,
    EntryRules,
    HealthDecoder,
    aggregated_status,
    parse_health_entries,
)
from lbkit.endpoint import Endpoint, EndpointHealth

PASSING, CRITICAL, MAINTENANCE = EndpointHealth.PASSING, EndpointHealth.CRITICAL, EndpointHealth.MAINTENANCE


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
    extra_checks: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One /v1/health/service entry, shaped (and ordered) as Consul returns it."""
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
            *(extra_checks or []),
        ],
    }


def parse(payload: object, **rules: Any) -> list[Endpoint]:
    return parse_health_entries(payload, service="model", rules=EntryRules(**rules))


def decode(decoder: HealthDecoder, *entries: Any) -> list[Endpoint]:
    """Decode entries written as Consul writes them (compact JSON)."""
    return decoder.decode(json.dumps(list(entries), separators=(",", ":")).encode())


# --- one entry ---------------------------------------------------------------------------------------


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
    assert (e.address, e.weight, e.zone, e.health) == ("10.0.0.1:50051", 5, "eu-1a", PASSING)
    assert e.tags == frozenset({"v1", "gpu"})
    # node metadata goes under the prefix; the service's own keys are kept as they are
    assert dict(e.metadata) == {
        "zone": "eu-1a",
        "version": "3",
        "node.rack": "r7",
        "node.version": "node-level",
    }


def test_service_meta_wins_over_prefixed_node_meta_on_a_clash() -> None:
    (e,) = parse([entry("a", meta={"node.rack": "svc"}, node_meta={"rack": "node"})])
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


def test_zone_sources_in_order_and_key_is_configurable() -> None:
    both = entry("a", meta={"zone": "svc-z"}, node_meta={"zone": "node-z"})
    both["Service"]["Locality"] = {"Region": "eu", "Zone": "loc-z"}
    assert parse([both])[0].zone == "svc-z"
    assert parse([both], zone_from=("node_meta", "service_meta"))[0].zone == "node-z"
    assert parse([both], zone_from=("locality",))[0].zone == "loc-z"
    (e,) = parse([entry("b", node_meta={"zone": "us-2b"})])
    assert e.zone == "us-2b"
    (e,) = parse([entry("c", node_meta={"zone": "us-2b"})], zone_from=("service_meta", "locality"))
    assert e.zone == ""
    (e,) = parse([entry("d", meta={"az": "x1", "zone": "ignored"})], zone_key="az")
    assert e.zone == "x1"
    node_loc = entry("e")
    node_loc["Node"]["Locality"] = {"Region": "us", "Zone": "node-loc"}
    assert parse([node_loc])[0].zone == "node-loc"


def test_health_follows_the_aggregated_status_and_the_accepted_states() -> None:
    payload = [
        entry("p", "10.0.0.1"),
        entry("w", "10.0.0.2", status="warning", weights={"Passing": 4, "Warning": 2}),
        entry("w0", "10.0.0.3", status="warning", weights={"Passing": 4, "Warning": 0}),
        entry("c", "10.0.0.4", status="critical"),
    ]

    def seen(**rules: Any) -> list[tuple[str, int, EndpointHealth]]:
        return [(e.address.split(":")[0], e.weight, e.health) for e in parse(payload, **rules)]

    # every instance is published; only the accepted states are passing
    assert seen() == [
        ("10.0.0.1", 1, PASSING),
        ("10.0.0.2", 4, CRITICAL),
        ("10.0.0.3", 4, CRITICAL),
        ("10.0.0.4", 1, CRITICAL),
    ]
    assert seen(health="warning") == [
        ("10.0.0.1", 1, PASSING),
        ("10.0.0.2", 2, PASSING),  # weighted by Weights.Warning, as Consul defines
        ("10.0.0.3", 4, CRITICAL),  # Warning: 0 means no traffic while warning
        ("10.0.0.4", 1, CRITICAL),
    ]
    assert all(h is PASSING for _, _, h in seen(health="any"))


@pytest.mark.parametrize(
    ("check", "health"),
    [
        ({"CheckID": "_service_maintenance:a", "Status": "critical", "Notes": "kernel upgrade"}, MAINTENANCE),
        ({"CheckID": "_node_maintenance", "Status": "critical"}, MAINTENANCE),
        ({"CheckID": "other", "Status": "critical"}, CRITICAL),
        ({"CheckID": "other", "Status": "warning"}, CRITICAL),
        ({"CheckID": "other", "Status": "something-new"}, CRITICAL),
    ],
)
def test_maintenance_is_told_by_the_check_ids_consul_uses(
    check: dict[str, Any], health: EndpointHealth
) -> None:
    (e,) = parse([entry("a", extra_checks=[check])])
    assert e.health is health
    (e,) = parse([entry("a", extra_checks=[check])], health="any")
    assert e.health is (MAINTENANCE if health is MAINTENANCE else PASSING)  # maintenance always drains


def test_aggregated_status() -> None:
    assert aggregated_status(None) == "passing" and aggregated_status([]) == "passing"
    assert aggregated_status([{"Status": "warning"}, {"Status": "passing"}]) == "warning"
    assert aggregated_status([{"Status": "warning"}, {"Status": "critical"}]) == "critical"
    assert aggregated_status(["junk", {"Status": "passing"}]) == "passing"


def test_malformed_entries_are_skipped_with_a_warning_naming_them(caplog: pytest.LogCaptureFixture) -> None:
    payload = [
        entry("good", "10.0.0.1", 1),
        entry("no-port", "10.0.0.2", None),
        entry("zero-port", "10.0.0.3", 0),
        entry("bad-host", "not a host!", 80),
        entry("no-address", "", 80, node_address=""),
        {"Node": {"Node": "n"}, "Service": "not-an-object"},
        "a string where an entry should be",
        entry("dup", "10.0.0.1", 1, node="node-b"),
        entry("good2", "10.0.0.4", 2),
    ]
    with caplog.at_level(logging.WARNING, logger="lbkit.discovery"):
        endpoints = parse(payload)
    assert [e.address for e in endpoints] == ["10.0.0.1:1", "10.0.0.4:2"]
    text = caplog.text
    for name in (
        "'no-port'",
        "'zero-port'",
        "'bad-host'",
        "'no-address'",
        "'dup' on node 'node-b'",
        "JSON str",
    ):
        assert name in text
    assert all(r.name == "lbkit.discovery" and r.levelno == logging.WARNING for r in caplog.records)
    assert len(caplog.records) == 7


@pytest.mark.parametrize("payload", [{"Node": {}}, "text", None, 42])
def test_payload_that_is_not_a_list_is_rejected(payload: object) -> None:
    with pytest.raises(ConsulPayloadError):
        parse(payload)
    with pytest.raises(ConsulPayloadError):
        HealthDecoder("model").decode(json.dumps(payload))


def test_payload_entries_are_not_mutated() -> None:
    payload = [entry("a", meta={"zone": "z"})]
    before = copy.deepcopy(payload)
    parse(payload)
    assert payload == before


# --- the decoder ---------------------------------------------------------------------------------------


def test_decoder_decodes_only_entries_that_changed() -> None:
    decoder = HealthDecoder("model")
    first = decode(decoder, entry("a", "10.0.0.1"), entry("b", "10.0.0.2"), entry("c", "10.0.0.3"))
    assert decoder.decoded == 3 and len(first) == 3
    again = decode(decoder, entry("a", "10.0.0.1"), entry("b", "10.0.0.2"), entry("c", "10.0.0.3"))
    assert decoder.decoded == 0 and all(x is y for x, y in zip(first, again, strict=True))
    changed = decode(
        decoder, entry("a", "10.0.0.1"), entry("b", "10.0.0.2", status="critical"), entry("c", "10.0.0.3")
    )
    assert decoder.decoded == 1
    assert changed[0] is first[0] and changed[2] is first[2] and changed[1].health is CRITICAL
    assert decode(decoder) == [] and decoder.decoded == 0


def test_decoder_handles_answers_not_laid_out_as_consul_writes_them() -> None:
    reordered = [
        {"Service": e["Service"], "Checks": e["Checks"], "Node": e["Node"]}
        for e in (entry("a"), entry("b", "10.0.0.2"))
    ]
    decoder = HealthDecoder("model")
    spaced = json.dumps(reordered, indent=2).encode()
    assert [e.address for e in decoder.decode(spaced)] == ["10.0.0.1:50051", "10.0.0.2:50051"]
    assert decoder.decoded == 2 and len(decoder.decode(json.dumps([entry("a")]))) == 1
    # Consul's layout, but a service's free-form Proxy.Config holds what looks like an entry boundary
    tricky = entry("c", "10.0.0.3")
    tricky["Service"]["Proxy"] = {"Config": {"x": [{"a": 1}, {"Node": {"Node": "fake"}}]}}
    body = json.dumps([entry("a"), tricky], separators=(",", ":")).encode()
    assert b'},{"Node":{' in body[body.index(b"Proxy") :]
    assert [e.address for e in HealthDecoder("model").decode(body)] == ["10.0.0.1:50051", "10.0.0.3:50051"]


def test_decoder_takes_str_and_bytes_and_rejects_what_is_not_json() -> None:
    assert len(HealthDecoder("model").decode(json.dumps([entry("a")]))) == 1
    for junk in (b"<html>proxy error</html>", b"[", b"\xff\xfe[]", b""):
        with pytest.raises(ConsulPayloadError):
            HealthDecoder("model").decode(junk)


def test_a_skipped_entry_is_warned_about_once(caplog: pytest.LogCaptureFixture) -> None:
    decoder = HealthDecoder("model")
    bad = entry("bad", "10.0.0.9", None)
    with caplog.at_level(logging.WARNING, logger="lbkit.discovery"):
        decode(decoder, entry("a"), bad)
        decode(decoder, entry("a"), bad)
        decode(decoder, entry("a", "10.0.0.2"), bad)  # another entry changed: still not a second warning
        assert len(caplog.records) == 1 and "'bad'" in caplog.text
        decode(decoder, entry("a"))
        decode(decoder, entry("a"), bad)  # gone, then back: named again
    assert len(caplog.records) == 2


def test_a_repeated_address_is_warned_naming_both_entries(caplog: pytest.LogCaptureFixture) -> None:
    decoder = HealthDecoder("model")
    first, other = entry("first", "10.0.0.1", 1), entry("other", "10.0.0.2", 2)
    decode(decoder, first, other)
    with caplog.at_level(logging.WARNING, logger="lbkit.discovery"):
        # The first entry comes from the previous answer, not decoded again: its name is read back.
        got = decode(decoder, first, other, entry("dup", "10.0.0.1", 1, node="node-b"))
    assert [e.address for e in got] == ["10.0.0.1:1", "10.0.0.2:2"]
    (record,) = caplog.records
    assert (
        "service id 'dup' on node 'node-b': address 10.0.0.1:1 repeats service id 'first' on node 'node-a'"
        in record.getMessage()
    )


def test_many_skipped_entries_are_summed_up(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="lbkit.discovery"):
        got = HealthDecoder("model").decode(json.dumps([entry("a"), *range(100)]))
    assert len(got) == 1
    assert len(caplog.records) == 21 and "80 more" in caplog.records[-1].getMessage()


def test_deeply_nested_entry_is_skipped_and_the_rest_used(caplog: pytest.LogCaptureFixture) -> None:
    deep = entry("deep", "10.0.0.7")
    deep["Service"]["Meta"] = {"x": "y"}
    text = json.dumps(deep).replace('"x": "y"', '"x": ' + "[" * 5000 + "]" * 5000)
    body = f"[{json.dumps(entry('a'))},{text}]".replace(", ", ",").replace(": ", ":")
    with caplog.at_level(logging.WARNING, logger="lbkit.discovery"):
        got = HealthDecoder("model").decode(body)
    assert [e.address for e in got] == ["10.0.0.1:50051"]
    assert "nested too deeply" in caplog.text


def test_a_change_in_a_big_answer_hashes_only_the_changed_entry() -> None:
    entries = [entry(f"s{i}", f"10.0.{i // 250}.{i % 250 + 1}", 5000 + i) for i in range(1000)]
    decoder = HealthDecoder("model")
    first = decode(decoder, *entries)
    entries[500]["Checks"][1]["Status"] = "critical"
    second = decode(decoder, *entries)
    assert decoder.hashed == 1 and decoder.decoded == 1
    assert second[500].health is CRITICAL and all(second[i] is first[i] for i in range(1000) if i != 500)
    entries.insert(700, entry("new", "10.9.9.9", 9999))
    third = decode(decoder, *entries)
    # one more may be hashed (found, not decoded): the new entry's first bytes equal its neighbour's
    assert decoder.hashed <= 2 and decoder.decoded == 1
    assert len(third) == 1001 and third[700].address == "10.9.9.9:9999"
    del entries[10]
    fourth = decode(decoder, *entries)
    assert decoder.hashed <= 1 and decoder.decoded == 0 and len(fourth) == 1000 and fourth[10] is third[11]
    decode(decoder, *entries)
    assert decoder.hashed == 0 and decoder.decoded == 0  # the same answer: nothing looked at

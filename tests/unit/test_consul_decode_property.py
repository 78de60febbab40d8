"""The watcher's decoder against random JSON (hypothesis): wrong types, missing keys, big lists, deep
nesting, odd unicode, numbers out of range. No exception escapes; each bad entry is skipped with one
warning naming its position; every good entry is used, in order."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lbkit.discovery.consul_connection import ConsulConnection
from lbkit.discovery.consul_core import ConsulOptions, ConsulWatchCore
from lbkit.discovery.consul_parse import ConsulPayloadError, HealthDecoder
from lbkit.endpoint import EndpointSet
from tests.unit.test_consul_parse import entry

leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)
odd_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=16)


@st.composite
def good_entry(draw: st.DrawFn, n: int) -> tuple[dict[str, Any], str]:
    """A valid entry (its address unique by ``n``) dressed with random noise that must not matter."""
    port = draw(st.integers(min_value=1, max_value=65535))
    address = f"10.{n // 250 % 250}.{n % 250}.{draw(st.integers(1, 254))}"
    e = entry(
        f"svc-{n}",
        address,
        port,
        meta=draw(st.dictionaries(st.text(max_size=8), odd_text, max_size=3)),
        node_meta=draw(st.dictionaries(st.text(max_size=8), odd_text, max_size=3)),
        tags=draw(st.lists(odd_text, max_size=3)),
    )
    e["Service"]["Noise"] = draw(json_values)
    e["Checks"].append(draw(json_values))
    e["Service"]["Weights"] = draw(st.none() | json_values)
    if draw(st.booleans()):
        e["Node"] = draw(json_values)  # a broken Node falls back to nothing: the service address is used
    return e, f"{address}:{port}"


@st.composite
def bad_entry(draw: st.DrawFn, n: int) -> object:
    """An entry that cannot become an endpoint."""
    e = entry(f"bad-{n}", f"10.200.{n % 250}.1", 80)
    kind = draw(st.sampled_from(["not-object", "service", "port", "no-address", "host"]))
    if kind == "not-object":
        return draw(leaves | st.lists(json_values, max_size=3))
    if kind == "service":
        e["Service"] = draw(leaves | st.lists(json_values, max_size=3))
    elif kind == "port":
        e["Service"]["Port"] = draw(
            st.none()
            | st.text(max_size=5)
            | st.floats()
            | st.booleans()
            | st.integers(min_value=65536)
            | st.integers(max_value=0)
        )
    elif kind == "no-address":
        e["Service"]["Address"] = ""
        e["Node"]["Address"] = draw(st.sampled_from(["", None, 7, [], {}]))
    else:
        e["Service"]["Address"] = draw(
            st.sampled_from(["a b", "-", "exa mple.com", "1.2.3.4:5:6", "ä" * 300])
        )
    return e


@st.composite
def answers(draw: st.DrawFn) -> tuple[list[object], list[str], list[int]]:
    """A list of entries: (entries, addresses of the good ones in order, positions of the bad ones)."""
    kinds = draw(st.lists(st.booleans(), max_size=12))
    entries: list[object] = []
    good: list[str] = []
    bad: list[int] = []
    for i, is_good in enumerate(kinds):
        if is_good:
            e, address = draw(good_entry(i))
            entries.append(e)
            good.append(address)
        else:
            entries.append(draw(bad_entry(i)))
            bad.append(i)
    return entries, good, bad


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _dumps(value: object, compact: bool) -> bytes:
    separators = (",", ":") if compact else (", ", ": ")
    return json.dumps(value, separators=separators, ensure_ascii=not compact, allow_nan=True).encode()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answers(), st.booleans())
def test_good_entries_are_used_and_each_bad_one_is_named_once(
    answer: tuple[list[object], list[str], list[int]], compact: bool
) -> None:
    entries, good, bad = answer
    log = logging.getLogger("test.consul.decode")
    records = _Records()
    log.addHandler(records)
    log.propagate = False
    try:
        decoder = HealthDecoder("model", log=log)
        body = _dumps(entries, compact)
        got = decoder.decode(body)
        assert [e.address for e in got] == good
        assert len(records.messages) == len(bad)
        for position, message in zip(bad, records.messages, strict=True):
            assert f"skipping entry {position} " in message
        # the same answer again: the same endpoints, and no warning repeated
        assert [e.address for e in decoder.decode(body)] == good
        assert len(records.messages) == len(bad)
    finally:
        log.removeHandler(records)


@settings(max_examples=120, deadline=None)
@given(json_values | st.lists(json_values, max_size=8), st.booleans())
def test_no_exception_escapes_the_watcher(value: object, compact: bool) -> None:
    conn = ConsulConnection("http", "127.0.0.1", 8500)
    core = ConsulWatchCore("model", ConsulOptions(), conn)
    body = _dumps(value, compact)
    result = core.on_response(200, {"X-Consul-Index": "7"}, body)
    assert result is None or isinstance(result, EndpointSet)
    if not isinstance(value, list):
        assert result is None and core.status.stale  # not a list: a failed query, the last set kept
    else:
        assert result is not None and not core.status.stale  # a list: used, whatever it holds
    # bytes that are not UTF-8, cut-off JSON, binary junk: failed queries too
    for junk in (body[: len(body) // 2], b"\xff" + body, body + b"]"):
        core.on_response(200, {"X-Consul-Index": "8"}, junk)


def test_a_huge_answer_of_junk_is_survived() -> None:
    junk = [[i, {"x": math.pi}] for i in range(10_000)]
    decoder = HealthDecoder("model", log=logging.getLogger("test.consul.decode.quiet"))
    assert decoder.decode(json.dumps([*junk, entry("ok")])) != []
    try:
        decoder.decode(json.dumps({"Node": junk}))
    except ConsulPayloadError:
        pass
    else:
        raise AssertionError("a JSON object is not a health answer")


@st.composite
def edit_scripts(draw: st.DrawFn) -> list[tuple[str, int]]:
    kinds = st.sampled_from(["insert", "delete", "modify", "status", "maintenance", "same", "move", "bad"])
    return draw(st.lists(st.tuples(kinds, st.integers(0, 10**6)), min_size=1, max_size=14))


def _fields(endpoints: list[Any]) -> list[tuple[Any, ...]]:
    return [(e.address, e.weight, e.zone, e.tags, dict(e.metadata), e.health, e.rank) for e in endpoints]


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 12), edit_scripts(), st.booleans())
def test_an_answer_decoded_against_the_previous_one_equals_a_fresh_decoding(
    start: int, script: list[tuple[str, int]], ranked: bool
) -> None:
    """The decoder reuses the unchanged start and end of the previous answer: whatever changed between
    two answers (entries added, removed, moved, changed, broken), it decodes what a fresh decoder does."""
    counter = iter(range(10**6))
    entries: list[object] = []

    def fresh_entry() -> dict[str, Any]:
        n = next(counter)
        return entry(f"svc-{n}", f"10.{n // 250 % 250}.{n % 250}.1", 1000 + n, meta={"zone": f"z{n % 3}"})

    for _ in range(start):
        entries.append(fresh_entry())
    quiet = logging.getLogger("test.consul.decode.quiet")
    quiet.propagate = False
    decoder = HealthDecoder("model", log=quiet, ranked=ranked)
    for kind, r in script:
        size = len(entries)
        if kind == "insert" or size == 0:
            entries.insert(r % (size + 1), fresh_entry())
        elif kind == "delete":
            del entries[r % size]
        elif kind == "modify":
            target = entries[r % size]
            if isinstance(target, dict) and "Checks" in target:
                target["Service"]["Weights"] = {"Passing": 1 + r % 7, "Warning": 1}
        elif kind == "status":
            target = entries[r % size]
            if isinstance(target, dict) and "Checks" in target:
                target["Checks"][1]["Status"] = ["passing", "warning", "critical"][r % 3]
        elif kind == "maintenance":
            target = entries[r % size]
            if isinstance(target, dict) and "Checks" in target:
                target["Checks"].append({"CheckID": "_node_maintenance", "Status": "critical"})
        elif kind == "move":
            entries.insert(r % size, entries.pop((r // 7) % size))
        elif kind == "bad":
            entries.insert(r % (size + 1), {"Node": {"Node": "x"}, "Service": {"ID": "bad", "Port": "80"}})
        body = json.dumps(entries, separators=(",", ":")).encode()
        got = decoder.decode(body)
        want = HealthDecoder("model", log=quiet, ranked=ranked).decode(body)
        assert _fields(got) == _fields(want)
        assert decoder.hashed <= len(entries)
        assert _fields(decoder.decode(body)) == _fields(want)  # the same answer again (a wait ran out)

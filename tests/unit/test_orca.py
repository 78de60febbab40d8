"""The ORCA load-report codec against protobuf's own encoding of the upstream schema, and its bad inputs."""

from __future__ import annotations

import logging
import math
import struct
from typing import Any

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from hypothesis import given
from hypothesis import strategies as st

from lbkit.errors import ConfigError
from lbkit.orca import MIRROR_TRAILER, TRAILER, LoadReport, decode, encode, read_load_report
from lbkit.stats import Stats


def _upstream_message() -> Any:
    """``xds.data.orca.v3.OrcaLoadReport`` built from its field numbers and types, in a private pool."""
    fdp = descriptor_pb2.FileDescriptorProto(name="orca_test.proto", package="orca_test", syntax="proto3")
    msg = fdp.message_type.add(name="OrcaLoadReport")
    f = descriptor_pb2.FieldDescriptorProto
    for name, number, kind in (
        ("cpu_utilization", 1, f.TYPE_DOUBLE),
        ("mem_utilization", 2, f.TYPE_DOUBLE),
        ("rps", 3, f.TYPE_UINT64),
        ("rps_fractional", 6, f.TYPE_DOUBLE),
        ("eps", 7, f.TYPE_DOUBLE),
        ("application_utilization", 9, f.TYPE_DOUBLE),
    ):
        msg.field.add(name=name, number=number, type=kind, label=f.LABEL_OPTIONAL)
    for name, number, entry in (
        ("request_cost", 4, "RequestCostEntry"),
        ("utilization", 5, "UtilizationEntry"),
        ("named_metrics", 8, "NamedMetricsEntry"),
    ):
        nested = msg.nested_type.add(name=entry)
        nested.options.map_entry = True
        nested.field.add(name="key", number=1, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
        nested.field.add(name="value", number=2, type=f.TYPE_DOUBLE, label=f.LABEL_OPTIONAL)
        msg.field.add(
            name=name,
            number=number,
            type=f.TYPE_MESSAGE,
            label=f.LABEL_REPEATED,
            type_name=f".orca_test.OrcaLoadReport.{entry}",
        )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("orca_test.OrcaLoadReport"))


Upstream = _upstream_message()

FULL = LoadReport(
    cpu_utilization=0.5,
    mem_utilization=0.25,
    application_utilization=0.75,
    qps=120.5,
    eps=1.5,
    utilization={"gpu": 0.9},
    request_cost={"tokens": 512.0, "refund": -3.0},
    named_metrics={"queue_depth": 3.0, "kv_cache_utilization": 0.4, "é": 1.0},
)


def test_our_encoding_parses_as_the_upstream_message() -> None:
    msg = Upstream.FromString(encode(FULL))
    assert (msg.cpu_utilization, msg.mem_utilization, msg.application_utilization) == (0.5, 0.25, 0.75)
    assert (msg.rps_fractional, msg.eps, msg.rps) == (120.5, 1.5, 0)
    assert dict(msg.utilization) == {"gpu": 0.9}
    assert dict(msg.request_cost) == {"tokens": 512.0, "refund": -3.0}
    assert dict(msg.named_metrics) == {"queue_depth": 3.0, "kv_cache_utilization": 0.4, "é": 1.0}


def test_upstream_encoding_decodes_to_the_same_report() -> None:
    msg = Upstream(
        cpu_utilization=0.5,
        mem_utilization=0.25,
        application_utilization=0.75,
        rps_fractional=120.5,
        eps=1.5,
        utilization={"gpu": 0.9},
        request_cost={"tokens": 512.0, "refund": -3.0},
        named_metrics={"queue_depth": 3.0, "kv_cache_utilization": 0.4, "é": 1.0},
    )
    assert decode(msg.SerializeToString()) == FULL
    assert decode(encode(FULL)) == FULL


def test_deprecated_integer_rps_is_the_qps_when_rps_fractional_is_absent() -> None:
    assert decode(Upstream(rps=300, cpu_utilization=0.5).SerializeToString()).qps == 300.0
    assert decode(Upstream(rps=300, rps_fractional=7.5).SerializeToString()).qps == 7.5


def test_unknown_fields_are_skipped() -> None:
    known = encode(LoadReport(cpu_utilization=0.5, qps=10.0))
    unknown = (
        bytes([10 << 3 | 0]) + b"\x96\x01"  # field 10, varint 150
        + bytes([11 << 3 | 5]) + b"\x00\x00\x80\x3f"  # field 11, fixed32
        + b"\xa2\x06\x03abc"  # field 100, length-delimited (a two-byte tag)
        + bytes([12 << 3 | 1]) + struct.pack("<d", 1.0)  # field 12, fixed64
    )  # fmt: skip
    assert decode(unknown + known + unknown) == LoadReport(cpu_utilization=0.5, qps=10.0)


def test_later_values_win_and_empty_is_all_zero() -> None:
    data = encode(LoadReport(cpu_utilization=0.5)) + encode(LoadReport(cpu_utilization=0.25))
    assert decode(data).cpu_utilization == 0.25
    assert decode(b"") == LoadReport()
    assert encode(LoadReport()) == b""


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x09\x00\x00", "truncated double"),
        (b"\x08\x01", "field 1 as a varint"),
        (b"\x1a\x01x", "field 3 as bytes"),
        (b"\x42\x05\x0a\x01a", "map entry longer than its bytes"),
        (b"\x42\x04\x0a\x05abcd", "map key longer than its entry"),
        (b"\x42\x03\x0a\x01\xff", "a key that is not UTF-8"),
        (b"\x42\x02\x10\x01", "map value as a varint"),
        (b"\x58", "unknown field with no value"),
        (b"\x5b", "a group (wire type 3)"),
        (b"\x07", "field number 0"),
        (b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", "an overlong varint"),
        (b"\x09" + struct.pack("<d", -0.5), "negative cpu utilization"),
        (b"\x31" + struct.pack("<d", math.nan), "NaN qps"),
        (b"\x39" + struct.pack("<d", math.inf), "infinite eps"),
        (b"\x49" + struct.pack("<d", -1.0), "negative application utilization"),
        (b"\x2a\x0b\x0a\x00\x11" + struct.pack("<d", -1.0), "negative named utilization"),
        (b"\x42\x0b\x0a\x00\x11" + struct.pack("<d", math.nan), "NaN named metric"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_malformed_reports_raise_config_error(data: bytes, why: str) -> None:
    with pytest.raises(ConfigError):
        decode(data)


def test_decode_wants_bytes() -> None:
    with pytest.raises(ConfigError, match="expected bytes"):
        decode("abc")  # type: ignore[arg-type]


@given(st.binary(max_size=64))
def test_any_bytes_decode_or_raise_config_error(data: bytes) -> None:
    try:
        report = decode(data)
    except ConfigError:
        return
    assert decode(encode(report)) == report


figure = st.floats(min_value=0.0, max_value=1e12, allow_nan=False)
metrics = st.dictionaries(st.text(max_size=8), st.floats(allow_nan=False, allow_infinity=False), max_size=3)


@given(figure, figure, figure, figure, figure, metrics)
def test_round_trip(
    cpu: float, mem: float, app: float, qps: float, eps: float, named: dict[str, float]
) -> None:
    report = LoadReport(
        cpu_utilization=cpu,
        mem_utilization=mem,
        application_utilization=app,
        qps=qps,
        eps=eps,
        named_metrics=named,
    )
    assert decode(encode(report)) == report
    assert Upstream.FromString(encode(report)).rps_fractional == qps


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cpu_utilization": -0.1},
        {"qps": math.nan},
        {"eps": math.inf},
        {"application_utilization": True},
        {"mem_utilization": "0.5"},
        {"utilization": {"gpu": -1.0}},
        {"named_metrics": {"queue_depth": math.nan}},
        {"named_metrics": {1: 2.0}},
        {"named_metrics": [("a", 1.0)]},
    ],
)
def test_bad_figures_raise_config_error_naming_them(kwargs: dict[str, Any]) -> None:
    name = next(iter(kwargs))
    with pytest.raises(ConfigError, match=name):
        LoadReport(**kwargs)


def test_report_is_immutable_and_utilization_prefers_the_application_s() -> None:
    report = LoadReport(cpu_utilization=0.5, application_utilization=0.75)
    with pytest.raises(AttributeError):
        report.qps = 3.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        report.named_metrics["x"] = 1.0  # type: ignore[index]
    assert report.load_utilization == 0.75
    assert LoadReport(cpu_utilization=0.5).load_utilization == 0.5


# ------------------------------------------------------------------------------------ read_load_report


def test_the_call_path_keeps_the_raw_trailer_and_a_reader_decodes_it_once() -> None:
    now = [100.0]
    stats = Stats(clock=lambda: now[0])
    entry = stats["10.0.0.1:50051"]
    report = LoadReport(cpu_utilization=0.5, application_utilization=0.25, qps=40.0, eps=2.0)
    data = encode(report)
    read_load_report(entry, (("lb-served-by", "x"), (MIRROR_TRAILER, data)))
    assert entry.load_raw is data and entry.load_reports == 0  # nothing decoded on the call path
    assert entry.load_report == report and entry.load_reports == 1
    assert entry.load_report == report and entry.load_reports == 1  # the same trailer: not again
    assert (entry.load_utilization, entry.load_qps, entry.load_eps) == (0.25, 40.0, 2.0)
    assert entry.load_updated == entry.load_usable_since == 100.0
    now[0] = 101.0
    read_load_report(entry, ((TRAILER, encode(LoadReport(cpu_utilization=0.5, qps=50.0))),))
    entry.take_load_report()
    assert (entry.load_utilization, entry.load_qps, entry.load_eps) == (0.5, 50.0, 0.0)
    assert (entry.load_updated, entry.load_usable_since, entry.load_reports) == (101.0, 100.0, 2)


def test_trailers_are_read_while_a_reader_wants_one() -> None:
    entry = Stats()["10.0.0.1:50051"]
    assert entry.load_wanted  # the first call brings a report
    read_load_report(entry, (("lb-served-by", "x"),))  # a call without one still answers the want
    assert not entry.load_wanted
    entry.take_load_report()  # taking what came asks for nothing more
    assert not entry.load_wanted
    entry.load_wanted = True  # a reader asks (weighted round robin, before each weight update)
    read_load_report(entry, ((MIRROR_TRAILER, encode(LoadReport(qps=1.0))),))
    assert not entry.load_wanted
    assert entry.load_report is not None and entry.load_wanted  # reading the report asks for the next


def test_only_the_latest_trailer_is_decoded() -> None:
    entry = Stats()["10.0.0.1:50051"]
    for qps in (1.0, 2.0, 3.0):
        read_load_report(entry, ((MIRROR_TRAILER, encode(LoadReport(cpu_utilization=0.5, qps=qps))),))
    assert entry.load_report is not None and entry.load_report.qps == 3.0
    assert entry.load_reports == 1


def test_a_report_without_utilization_or_qps_is_kept_but_not_used() -> None:
    now = [5.0]
    entry = Stats(clock=lambda: now[0])["10.0.0.1:50051"]
    read_load_report(entry, ((MIRROR_TRAILER, encode(LoadReport(cpu_utilization=0.5, qps=10.0))),))
    entry.take_load_report()
    now[0] = 6.0
    idle = LoadReport(cpu_utilization=0.0, qps=0.0, named_metrics={"queue_depth": 0.0})
    read_load_report(entry, ((MIRROR_TRAILER, encode(idle)),))
    assert entry.load_report == idle and entry.load_reports == 2
    assert (entry.load_qps, entry.load_updated) == (10.0, 5.0)


def test_no_trailer_changes_nothing() -> None:
    entry = Stats()["10.0.0.1:50051"]
    read_load_report(entry, None)
    read_load_report(entry, (("lb-served-by", "x"),))
    assert entry.load_raw is None and entry.load_report is None
    assert entry.load_reports == 0 and entry.load_reports_malformed == 0


def test_malformed_reports_are_counted_and_logged_once_per_endpoint(caplog: pytest.LogCaptureFixture) -> None:
    stats = Stats()
    a, b = stats["10.0.0.1:50051"], stats["10.0.0.2:50051"]
    good = encode(LoadReport(cpu_utilization=0.5, qps=10.0))
    with caplog.at_level(logging.WARNING, logger="lbkit"):
        for _ in range(3):
            read_load_report(a, ((MIRROR_TRAILER, bytes(bytearray(b"\x09\x00"))),))  # one object per call
            a.take_load_report()
        previous = a.load_report
        read_load_report(a, ((MIRROR_TRAILER, good),))
        a.take_load_report()
        read_load_report(b, ((MIRROR_TRAILER, "not bytes"),))
        b.take_load_report()
    assert previous is None and a.load_report is not None
    assert (a.load_reports_malformed, a.load_reports, b.load_reports_malformed) == (3, 1, 1)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "10.0.0.1:50051" in lines[0] and "10.0.0.2:50051" in lines[1]

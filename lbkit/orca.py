"""ORCA load reports: the ``endpoint-load-metrics-bin`` trailer a server attaches to each call (gRFC A51).

grpcio keeps that trailer from Python clients (see :data:`MIRROR_TRAILER`), so lbkit's servers repeat the
report under :data:`MIRROR_TRAILER`, which lbkit's clients read.

The trailer holds one binary ``xds.data.orca.v3.OrcaLoadReport``. This module encodes and decodes that
message itself, with the upstream field numbers and wire types, so lbkit needs no generated code:

====  =========================  ====================  ==============================
 no.   upstream field              wire type             here
====  =========================  ====================  ==============================
 1     cpu_utilization             double (fixed64)      ``cpu_utilization``
 2     mem_utilization             double                ``mem_utilization``
 3     rps (deprecated)            uint64 (varint)       ``qps`` when field 6 is absent
 4     request_cost                map<string, double>   ``request_cost``
 5     utilization                 map<string, double>   ``utilization``
 6     rps_fractional              double                ``qps``
 7     eps                         double                ``eps``
 8     named_metrics               map<string, double>   ``named_metrics``
 9     application_utilization     double                ``application_utilization``
====  =========================  ====================  ==============================

Unknown fields are skipped, as protobuf does; a truncated message, a known field with the wrong wire
type, bad UTF-8 in a key, or a negative or non-finite figure is malformed (:class:`ConfigError`).
:func:`read_load_report` is what the call path runs on an attempt's trailing metadata.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol

from lbkit.errors import ConfigError

__all__ = [
    "MIRROR_TRAILER",
    "TRAILER",
    "TRAILERS",
    "LoadReport",
    "LoadSink",
    "decode",
    "encode",
    "find_report",
    "read_load_report",
]

TRAILER = "endpoint-load-metrics-bin"
"""The trailing-metadata key of a per-call ORCA load report (gRFC A51; binary, hence ``-bin``)."""

MIRROR_TRAILER = "lbkit-endpoint-load-metrics-bin"
"""The same report under a key grpcio lets Python see. grpcio's C-core takes :data:`TRAILER` for its own
``weighted_round_robin`` policy and never hands it to the application, so lbkit's servers send both and
lbkit's clients read this one (or :data:`TRAILER`, should a transport ever hand it over)."""

TRAILERS = (MIRROR_TRAILER, TRAILER)
"""The keys a client looks for, in order."""

_EMPTY: Mapping[str, float] = MappingProxyType({})
_DOUBLE = struct.Struct("<d")
_unpack_double = _DOUBLE.unpack_from
_pack_double = _DOUBLE.pack

# Tags (field number << 3 | wire type) of the fields above.
_CPU, _MEM, _RPS, _COST, _UTIL, _QPS, _EPS, _NAMED, _APP = (
    0x09,
    0x11,
    0x18,
    0x22,
    0x2A,
    0x31,
    0x39,
    0x42,
    0x49,
)
_DOUBLE_FIELDS = {_CPU: 0, _MEM: 1, _APP: 2, _QPS: 3, _EPS: 4}
_MAP_FIELDS = {_UTIL: 0, _COST: 1, _NAMED: 2}
_KNOWN_NUMBERS = frozenset(range(1, 10))
_INF = math.inf
_SCALARS = ("cpu_utilization", "mem_utilization", "application_utilization", "qps", "eps")
_MAPS = ("utilization", "request_cost", "named_metrics")


class _Figures(NamedTuple):
    cpu_utilization: float
    mem_utilization: float
    application_utilization: float
    qps: float
    eps: float
    utilization: Mapping[str, float]
    request_cost: Mapping[str, float]
    named_metrics: Mapping[str, float]


class LoadReport(_Figures):
    """One ORCA load report, immutable. Figures default to 0.0 (proto3: zero means unset).

    ``qps`` and ``eps`` are queries and errors per second; the utilizations are fractions of the server's
    capacity (they may exceed 1.0 past a soft limit). ``named_metrics`` carries what the application knows,
    e.g. ``{"gpu_utilization": 0.7, "queue_depth": 3, "kv_cache_utilization": 0.4}``. Construction checks
    every figure: negative, NaN or infinite ones raise :class:`ConfigError` naming it (a named metric or a
    request cost may be negative, as ORCA allows, but must be finite). A named tuple underneath, so that
    decoding one per call stays cheap.
    """

    __slots__ = ()

    def __new__(
        cls,
        *,
        cpu_utilization: float = 0.0,
        mem_utilization: float = 0.0,
        application_utilization: float = 0.0,
        qps: float = 0.0,
        eps: float = 0.0,
        utilization: Mapping[str, float] | None = None,
        request_cost: Mapping[str, float] | None = None,
        named_metrics: Mapping[str, float] | None = None,
    ) -> LoadReport:
        figures = (cpu_utilization, mem_utilization, application_utilization, qps, eps)
        for name, value in zip(_SCALARS, figures, strict=True):
            _check(name, value, signed=False)
        maps = []
        for name, mapping, signed in (
            ("utilization", utilization, False),
            ("request_cost", request_cost, True),
            ("named_metrics", named_metrics, True),
        ):
            if mapping is None or (isinstance(mapping, Mapping) and not mapping):
                maps.append(_EMPTY)
                continue
            if not isinstance(mapping, Mapping):
                raise ConfigError(f"load report: {name} must be a mapping of str to number, got {mapping!r}")
            for key, value in mapping.items():
                if not isinstance(key, str):
                    raise ConfigError(f"load report: {name} keys must be str, got {key!r}")
                _check(f"{name}[{key!r}]", value, signed=signed)
            maps.append(MappingProxyType({k: float(v) for k, v in mapping.items()}))
        return _make((*(float(v) for v in figures), *maps))

    @property
    def load_utilization(self) -> float:
        """The utilization weighted round robin uses (gRFC A58): ``application_utilization`` if set, else
        ``cpu_utilization``."""
        return self.application_utilization or self.cpu_utilization

    def __repr__(self) -> str:
        parts = [f"{n}={getattr(self, n)!r}" for n in _SCALARS if getattr(self, n)]
        parts += [f"{n}={dict(getattr(self, n))!r}" for n in _MAPS if getattr(self, n)]
        return f"LoadReport({', '.join(parts)})"


def _make(values: tuple[Any, ...]) -> LoadReport:
    """A LoadReport of checked ``values`` (in field order), without checking them again."""
    return tuple.__new__(LoadReport, values)


def _check(name: str, value: object, *, signed: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"load report: {name} must be a finite number, got {value!r}")
    if value < 0 and not signed:
        raise ConfigError(f"load report: {name} must be >= 0, got {value!r}")


# ----------------------------------------------------------------------------------------------- encode


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _map_entries(tag: int, mapping: Mapping[str, float]) -> list[bytes]:
    parts = []
    for key in sorted(mapping):
        raw = key.encode()
        entry = b"\x0a" + _varint(len(raw)) + raw + b"\x11" + _pack_double(mapping[key])
        parts.append(bytes((tag,)) + _varint(len(entry)) + entry)
    return parts


def encode(report: LoadReport) -> bytes:
    """The report as a binary ``OrcaLoadReport`` (zero figures left out, map entries sorted by key)."""
    parts = []
    for tag, value in (
        (_CPU, report.cpu_utilization),
        (_MEM, report.mem_utilization),
        (_QPS, report.qps),
        (_EPS, report.eps),
        (_APP, report.application_utilization),
    ):
        if value:
            parts.append(bytes((tag,)) + _pack_double(value))
    parts += _map_entries(_COST, report.request_cost)
    parts += _map_entries(_UTIL, report.utilization)
    parts += _map_entries(_NAMED, report.named_metrics)
    return b"".join(parts)


# ----------------------------------------------------------------------------------------------- decode


def _read_varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ConfigError("load report: truncated or overlong varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _skip(data: bytes, pos: int, end: int, wire: int) -> int:
    """The position after an unknown field's value of wire type ``wire``."""
    if wire == 0:
        return _read_varint(data, pos, end)[1]
    if wire == 1:
        pos += 8
    elif wire == 2:
        length, pos = _read_varint(data, pos, end)
        pos += length
    elif wire == 5:
        pos += 4
    else:
        raise ConfigError(f"load report: unsupported wire type {wire}")
    if pos > end:
        raise ConfigError("load report: truncated field")
    return pos


def _map_entry(data: bytes, pos: int, end: int) -> tuple[str, float]:
    if end - pos >= 11 and data[pos] == 0x0A and data[pos + 1] < 0x80:  # the usual: key, value, nothing else
        key_end = pos + 2 + data[pos + 1]
        if key_end + 9 == end and data[key_end] == 0x11:
            try:
                return data[pos + 2 : key_end].decode(), _unpack_double(data, key_end + 1)[0]
            except UnicodeDecodeError:
                raise ConfigError("load report: a map key is not UTF-8") from None
    key = b""
    value = 0.0
    while pos < end:
        tag = data[pos]
        if tag == 0x0A:
            length, pos = _read_varint(data, pos + 1, end)
            if pos + length > end:
                raise ConfigError("load report: truncated map key")
            key = data[pos : pos + length]
            pos += length
        elif tag == 0x11:
            if pos + 9 > end:
                raise ConfigError("load report: truncated map value")
            value = _unpack_double(data, pos + 1)[0]
            pos += 9
        else:
            tag, pos = _read_varint(data, pos, end)
            if tag >> 3 in (1, 2):
                raise ConfigError(f"load report: map entry field {tag >> 3} has wire type {tag & 7}")
            pos = _skip(data, pos, end, tag & 7)
    try:
        return key.decode(), value
    except UnicodeDecodeError:
        raise ConfigError("load report: a map key is not UTF-8") from None


def decode(data: bytes) -> LoadReport:
    """Parse a binary ``OrcaLoadReport``; :class:`ConfigError` if it is malformed (see the module doc)."""
    if not isinstance(data, bytes):
        raise ConfigError(f"load report: expected bytes, got {type(data).__name__}")
    scalars = [0.0, 0.0, 0.0, 0.0, 0.0]
    maps: list[dict[str, float] | None] = [None, None, None]
    rps = 0
    pos = 0
    end = len(data)
    while pos < end:
        tag = data[pos]
        slot = _DOUBLE_FIELDS.get(tag)
        if slot is not None:
            if pos + 9 > end:
                raise ConfigError("load report: truncated double")
            scalars[slot] = _unpack_double(data, pos + 1)[0]
            pos += 9
            continue
        slot = _MAP_FIELDS.get(tag)
        if slot is not None:
            if pos + 1 < end and data[pos + 1] < 0x80:
                length = data[pos + 1]
                pos += 2
            else:
                length, pos = _read_varint(data, pos + 1, end)
            if pos + length > end:
                raise ConfigError("load report: truncated map entry")
            key, value = _map_entry(data, pos, pos + length)
            pos += length
            mapping = maps[slot]
            if mapping is None:
                mapping = maps[slot] = {}
            mapping[key] = value
            continue
        tag, pos = _read_varint(data, pos, end)
        number, wire = tag >> 3, tag & 7
        if tag == _RPS:
            rps, pos = _read_varint(data, pos, end)
        elif number == 0:
            raise ConfigError("load report: field number 0")
        elif number in _KNOWN_NUMBERS:
            raise ConfigError(f"load report: field {number} has wire type {wire}")
        else:
            pos = _skip(data, pos, end, wire)
    cpu, mem, app, qps, eps = scalars
    if not qps and rps:
        qps = float(rps)
    # One comparison chain rejects NaN (every comparison false), infinities and negatives.
    if not (0.0 <= cpu < _INF and 0.0 <= mem < _INF and 0.0 <= app < _INF and 0.0 <= qps < _INF):
        raise ConfigError(
            f"load report: bad figure (cpu {cpu!r}, mem {mem!r}, application {app!r}, qps {qps!r})"
        )
    if not 0.0 <= eps < _INF:
        raise ConfigError(f"load report: bad figure (eps {eps!r})")
    util, cost, named = maps
    return _make(
        (
            cpu,
            mem,
            app,
            qps,
            eps,
            _EMPTY if util is None else _checked_map("utilization", util, False),
            _EMPTY if cost is None else _checked_map("request_cost", cost, True),
            _EMPTY if named is None else _checked_map("named_metrics", named, True),
        )
    )


def _checked_map(name: str, mapping: dict[str, float], signed: bool) -> Mapping[str, float]:
    for key, value in mapping.items():
        if not (-math.inf < value < math.inf) or (value < 0.0 and not signed):
            raise ConfigError(f"load report: {name}[{key!r}] is {value!r}")
    return MappingProxyType(mapping)


# ------------------------------------------------------------------------------------------- call path


def find_report(metadata: Iterable[tuple[str, Any]] | None) -> Any:
    """The value of the load-report entry (:data:`TRAILERS`) of trailing ``metadata``, or None."""
    if metadata:
        for item in metadata:
            if item[0] in TRAILERS:
                return item[1]
    return None


class LoadSink(Protocol):
    """Where :func:`read_load_report` puts a trailer: an endpoint's stats
    (:class:`lbkit.stats.EndpointStats`), which decode it when a reader asks."""

    load_raw: object
    load_wanted: bool


def read_load_report(stats: LoadSink, metadata: Iterable[tuple[str, Any]] | None) -> None:
    """Keep the load report in an attempt's trailing ``metadata`` (if any) as the endpoint's latest.

    The call path calls this only while ``stats.load_wanted`` (asking grpc for a call's trailers costs a
    unary call more than decoding them), and this clears it. Only the raw value is kept;
    :meth:`lbkit.stats.EndpointStats.take_load_report` decodes it when a reader asks, so a malformed
    report never fails the call.
    """
    stats.load_wanted = False
    data = find_report(metadata)
    if data is not None:
        stats.load_raw = data

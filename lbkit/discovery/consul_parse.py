"""From a ``/v1/health/service`` answer to endpoints, without I/O.

:func:`entry_endpoint` maps one health entry (``{Node, Service, Checks}``) to an :class:`Endpoint`:
address, weight, zone, tags, metadata and health (Consul's aggregated check status mapped by the
accepted states; maintenance mode drains). :class:`HealthDecoder` decodes whole answers entry by entry
and remembers each entry's text: an entry unchanged since the last answer costs a hash and a lookup,
not a JSON decode, so a 10,000-instance answer where a few instances changed costs little, and the
decoding thread never holds the interpreter for long (an event loop in another thread keeps ticking).
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lbkit.endpoint import Endpoint, EndpointHealth
from lbkit.errors import ConfigError

__all__ = [
    "HEALTH_MODES",
    "ZONE_SOURCES",
    "ConsulPayloadError",
    "EntryRules",
    "HealthDecoder",
    "SkipEntry",
    "aggregated_status",
    "entry_endpoint",
    "parse_health_entries",
]

logger = logging.getLogger("lbkit.discovery")

HEALTH_MODES = ("passing", "warning", "any")
"""The instance states a watcher accepts: ``passing`` (checks all pass), ``warning`` (passing and warning,
the warning ones weighted by ``Weights.Warning``), ``any`` (critical ones too). Instances in other states
are published as :attr:`EndpointHealth.CRITICAL`."""

ZONE_SOURCES = ("service_meta", "node_meta", "locality")
"""Where an endpoint's zone may come from: ``Service.Meta[zone_key]``, ``Node.Meta[zone_key]``,
``Service.Locality.Zone`` (then the node's ``Locality.Zone``)."""

_SERVICE_MAINTENANCE = "_service_maintenance:"
_NODE_MAINTENANCE = "_node_maintenance"
_SEPARATOR = b'},{"Node":{'
"""Between two entries of Consul's answer (its encoder writes Node first, as an object; a check's Node
is a string, and the sequence cannot occur inside a JSON string, whose quotes are escaped)."""
_FIRST = b'{"Node":{'
_WARNINGS_PER_ANSWER = 20
"""Skipped entries named one warning each in one answer; more are counted in one more warning."""


class ConsulPayloadError(Exception):
    """An answer from Consul that is not a usable health payload (a failed query, not a crash)."""


class SkipEntry(Exception):
    """One entry of an answer cannot become an endpoint; the message says why."""


@dataclass(frozen=True)
class EntryRules:
    """How a health entry becomes an endpoint (from the watcher's options)."""

    health: str = "passing"
    """One of :data:`HEALTH_MODES`."""
    zone_key: str = "zone"
    zone_from: tuple[str, ...] = ZONE_SOURCES
    """Sources of the zone, in order: the first that has one wins (:data:`ZONE_SOURCES`)."""
    node_meta_prefix: str = "node."


def entry_name(entry: object) -> str:
    """``service id X on node Y`` for logs (``?`` for what the entry lacks)."""
    if type(entry) is not dict:
        return f"a JSON {type(entry).__name__}"
    service = entry.get("Service")
    node = entry.get("Node")
    sid = service.get("ID") if type(service) is dict else None
    nid = node.get("Node") if type(node) is dict else None
    sid_text = sid if type(sid) is str and sid else "?"
    nid_text = nid if type(nid) is str and nid else "?"
    return f"service id {sid_text[:100]!r} on node {nid_text[:100]!r}"


def aggregated_status(checks: object) -> str:
    """Consul's aggregated status of an entry: ``maintenance`` if its service or node is in maintenance
    mode (the check IDs Consul's agent uses), else critical beats warning beats passing; no checks is
    passing. A check of an unknown status counts as critical, as Consul's ``?passing`` treats it."""
    status = "passing"
    if type(checks) is not list:
        return status
    for check in checks:
        if type(check) is not dict:
            continue
        cid = check.get("CheckID")
        value = check.get("Status")
        if type(cid) is str and (cid == _NODE_MAINTENANCE or cid.startswith(_SERVICE_MAINTENANCE)):
            return "maintenance"
        if value == "passing":
            continue
        if value == "warning":
            if status == "passing":
                status = "warning"
        else:
            status = "critical"
    return status


def _str_items(value: object) -> list[tuple[str, str]]:
    if type(value) is not dict or not value:
        return []
    return [(k, v) for k, v in value.items() if type(k) is str and type(v) is str]


def _weight(weights: object, key: str) -> int | None:
    """The weight under ``key``; None when missing or not a usable int."""
    if type(weights) is not dict:
        return None
    value = weights.get(key)
    return value if type(value) is int else None


def _format_address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def _zone(rules: EntryRules, service: dict[str, Any], node: dict[str, Any]) -> str:
    for source in rules.zone_from:
        if source == "service_meta" or source == "node_meta":
            meta = service.get("Meta") if source == "service_meta" else node.get("Meta")
            value = meta.get(rules.zone_key) if type(meta) is dict else None
            if type(value) is str and value:
                return value
        else:
            for owner in (service, node):
                locality = owner.get("Locality")
                value = locality.get("Zone") if type(locality) is dict else None
                if type(value) is str and value:
                    return value
    return ""


def entry_endpoint(entry: object, rules: EntryRules) -> Endpoint:
    """The endpoint of one health entry; :class:`SkipEntry` saying why when it cannot be one.

    The address is ``Service.Address``, or ``Node.Address`` when that is empty, with ``Service.Port``;
    the weight ``Service.Weights.Passing`` (1 when missing or < 1), or ``Weights.Warning`` for a warning
    instance accepted by ``rules.health == "warning"``; the health is the aggregated status mapped by the
    accepted states (maintenance always drains); metadata is the node's under ``node_meta_prefix``
    overlaid by the service's; the zone comes from ``rules.zone_from``.
    """
    if type(entry) is not dict:
        raise SkipEntry(f"the entry is a JSON {type(entry).__name__}, not an object")
    service = entry.get("Service")
    if type(service) is not dict:
        raise SkipEntry("no Service object")
    node = entry.get("Node")
    if type(node) is not dict:
        node = {}
    host = service.get("Address") or node.get("Address")
    if type(host) is not str or not host:
        raise SkipEntry("no address (Service.Address and Node.Address are empty)")
    port = service.get("Port")
    if type(port) is not int or not 0 < port < 65536:
        raise SkipEntry(f"missing or bad port {port!r}")
    status = aggregated_status(entry.get("Checks"))
    weights = service.get("Weights")
    # Consul defaults weights to {"Passing": 1, "Warning": 1} and rejects Passing < 1 at registration, so
    # a missing or non-positive Passing weight means 1. An accepted warning instance takes the Warning
    # weight; Warning 0 means "no traffic while warning", so such an instance counts as unhealthy.
    weight = _weight(weights, "Passing")
    if status == "maintenance":
        health = EndpointHealth.MAINTENANCE
    elif status == "passing" or rules.health == "any":
        health = EndpointHealth.PASSING
    elif status == "warning" and rules.health == "warning":
        warning = _weight(weights, "Warning")
        health = EndpointHealth.PASSING if warning is None or warning >= 1 else EndpointHealth.CRITICAL
        if warning is not None and warning >= 1:
            weight = warning
    else:
        health = EndpointHealth.CRITICAL
    if weight is None or weight < 1:
        weight = 1
    raw_tags = service.get("Tags")
    tags = frozenset(t for t in raw_tags if type(t) is str) if type(raw_tags) is list else frozenset()
    meta = {f"{rules.node_meta_prefix}{k}": v for k, v in _str_items(node.get("Meta"))}
    meta.update(_str_items(service.get("Meta")))
    address = _format_address(host, port)
    try:
        return Endpoint(
            address, weight=weight, zone=_zone(rules, service, node), tags=tags, metadata=meta, health=health
        )
    except ConfigError as exc:
        raise SkipEntry(f"malformed address {address!r}: {exc}") from None


def _decode_json(body: str | bytes) -> Any:
    """``json.loads`` with the cyclic GC paused: decoding a large payload allocates tens of thousands of
    containers, none of them in a cycle, and collections triggered meanwhile cost about a third more."""
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        return json.loads(body)
    finally:
        if paused:
            gc.enable()


def _bounds(body: bytes) -> tuple[int, int] | None:
    """Where the entries of an answer lie, ``[`` and ``]`` excluded (whitespace around them trimmed), or
    None when the body is not a JSON array laid out as Consul writes it."""
    start = 0
    end = len(body)
    while start < end and body[start] in b" \t\r\n":
        start += 1
    while end > start and body[end - 1] in b" \t\r\n":
        end -= 1
    if end - start < 2 or body[start] != 0x5B or body[end - 1] != 0x5D:  # [ ... ]
        return None
    return start + 1, end - 1


def _split_range(body: bytes, start: int, end: int) -> list[tuple[int, int]] | None:
    """(start, end) of each entry between ``start`` and ``end``, or None when they do not begin as
    Consul's entries do."""
    if start >= end:
        return []
    if body[start : start + len(_FIRST)] != _FIRST:
        return None
    spans = []
    find = body.find
    while True:
        cut = find(_SEPARATOR, start, end)
        if cut < 0:
            spans.append((start, end))
            return spans
        spans.append((start, cut + 1))
        start = cut + 2


def _split(body: bytes) -> list[tuple[int, int]] | None:
    """(start, end) of each entry of a Consul health answer, or None when the body is not laid out as
    Consul writes it (the caller then decodes it whole)."""
    bounds = _bounds(body)
    return None if bounds is None else _split_range(body, *bounds)


_CHUNK = 1 << 16
"""Bytes compared per step when lining answers up: each step is a short C call, so a thread comparing
10 MB still hands the interpreter over often."""


def _common_prefix(a: bytes, b: bytes, limit: int) -> int:
    """Length of the longest common prefix of ``a`` and ``b``, at most ``limit``."""
    lo = 0
    while lo < limit:
        hi = min(lo + _CHUNK, limit)
        if a[lo:hi] != b[lo:hi]:
            break
        lo = hi
    else:
        return limit
    while hi - lo > 64:  # the first difference is in [lo, hi)
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    while lo < hi and a[lo] == b[lo]:
        lo += 1
    return lo


def _common_suffix(a: bytes, b: bytes, limit: int) -> int:
    """Length of the longest common suffix of ``a`` and ``b``, at most ``limit``."""
    la, lb = len(a), len(b)
    lo = 0
    while lo < limit:
        hi = min(lo + _CHUNK, limit)
        if a[la - hi : la - lo] != b[lb - hi : lb - lo]:
            break
        lo = hi
    else:
        return limit
    while hi - lo > 64:
        mid = (lo + hi) // 2
        if a[la - mid : la - lo] == b[lb - mid : lb - lo]:
            lo = mid
        else:
            hi = mid
    while lo < hi and a[la - lo - 1] == b[lb - lo - 1]:
        lo += 1
    return lo


@dataclass(frozen=True, slots=True)
class _Skipped:
    """An entry that cannot become an endpoint: why, and which entry (:func:`entry_name`)."""

    problem: str
    name: str


_Item = Endpoint | _Skipped
"""One decoded entry: its endpoint itself (no wrapper per endpoint kept for CPython's collector to walk),
or why it was skipped."""


class HealthDecoder:
    """Decodes ``/v1/health/service`` answers of one watcher into endpoints, in Consul's order.

    Each entry's text is hashed; an entry seen in the previous answer is not decoded again. An answer
    not laid out as Consul writes it is decoded whole (correct, only slower). An entry that cannot
    become an endpoint (a bad address or port, a wrong type, an address that repeats an earlier one) is
    skipped with one warning naming it, when it first appears; the rest of the answer is used. An answer
    that is not a JSON list raises :class:`ConsulPayloadError`.

    ``pause`` (seconds, or None): how often the decoding thread lets other threads run (``time.sleep(0)``),
    so that decoding a big answer in a worker thread leaves an event loop's thread the interpreter.
    ``ranked`` (the query asked Consul to sort by round-trip time, ``near``): each endpoint's ``rank`` is
    its place in that order, 0 the nearest.
    """

    def __init__(
        self,
        service: str,
        rules: EntryRules | None = None,
        *,
        log: logging.Logger = logger,
        pause: float | None = 0.001,
        ranked: bool = False,
    ) -> None:
        self.service = service
        self.rules = rules or EntryRules()
        self.ranked = ranked
        self._log = log
        self._pause = pause
        self._entries: dict[bytes, _Item] = {}
        """The previous answer's entries by the digest of their text."""
        self._raw: bytes | None = None
        """The previous answer, when it was laid out as Consul writes it; with its entries' spans,
        digests and decodings, in order."""
        self._spans: list[tuple[int, int]] = []
        self._digests: list[bytes] = []
        self._items: list[_Item] = []
        self._endpoints: list[Endpoint] = []
        self._warned: set[str] = set()
        self.decoded = 0
        """Entries decoded from JSON by the last :meth:`decode` (the rest came from the previous answer)."""
        self.hashed = 0
        """Entries of the last :meth:`decode` whose text was hashed (the rest lay in the part of the answer
        equal to the previous one, before or after what changed)."""

    def decode(self, body: str | bytes) -> list[Endpoint]:
        """The endpoints of one answer body (see the class doc)."""
        raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else bytes(body)
        self.decoded = self.hashed = 0
        prev = self._raw
        if prev is not None and len(prev) == len(raw) and _common_prefix(prev, raw, len(raw)) == len(raw):
            return list(self._endpoints)  # a blocking query's wait ran out: nothing new
        aligned = self._align(raw)
        if aligned is None:
            head, tail, delta = 0, len(self._spans), 0
            middle = _split(raw)
            if middle is None:
                return self._decode_whole(raw)
        else:
            head, tail, delta, middle = aligned
        # Entries before and after what changed are the previous answer's: not hashed, not decoded.
        spans = self._spans[:head]
        digests = self._digests[:head]
        items = self._items[:head]
        view = memoryview(raw)
        previous = self._entries
        fresh: dict[bytes, _Item] = {}
        clock = time.perf_counter
        pause = self._pause
        next_pause = clock() + pause if pause is not None else float("inf")
        for i, (start, end) in enumerate(middle):
            digest = hashlib.blake2b(view[start:end], digest_size=16).digest()
            item = previous.get(digest) or fresh.get(digest)
            if item is None:
                try:
                    item = self._decode_entry(json.loads(view[start:end].tobytes()))
                except ValueError:
                    return self._decode_whole(raw)  # not Consul's layout after all: decode it whole
                except RecursionError:
                    item = _Skipped("nested too deeply to decode", f"the entry at byte {start}")
                self.decoded += 1
            fresh[digest] = item
            spans.append((start, end))
            digests.append(digest)
            items.append(item)
            if i & 63 == 63 and clock() >= next_pause:
                time.sleep(0)  # let other threads (an event loop) run
                next_pause = clock() + pause  # type: ignore[operator]
        self.hashed = len(middle)
        if tail < len(self._spans):
            spans.extend((start + delta, end + delta) for start, end in self._spans[tail:])
            digests.extend(self._digests[tail:])
            items.extend(self._items[tail:])

        def name_of(position: int) -> str:
            start, end = spans[position]
            return entry_name(json.loads(view[start:end].tobytes()))

        endpoints = self._collect(items, name_of)
        self._raw, self._spans, self._digests, self._items = raw, spans, digests, items
        self._entries = dict(zip(digests, items, strict=True))
        self._endpoints = endpoints
        return list(endpoints)

    def _align(self, raw: bytes) -> tuple[int, int, int, list[tuple[int, int]]] | None:
        """Line ``raw`` up with the previous answer: (entries reused from its start, index of the first
        reused at its end, the shift of those, spans of the entries in between), or None."""
        prev, spans = self._raw, self._spans
        if prev is None or not spans:
            return None
        bounds = _bounds(raw)
        if bounds is None:
            return None
        la, lb = len(prev), len(raw)
        common = _common_prefix(prev, raw, min(la, lb))
        back = _common_suffix(prev, raw, min(la, lb) - common)
        n = len(spans)
        tail_sep = len(_SEPARATOR) - 1  # after an entry's closing brace: ,{"Node":{
        head = 0
        while head < n - 1 and spans[head][1] + tail_sep <= common:
            head += 1
        tail = n
        while tail - 1 >= max(head, 1) and spans[tail - 1][0] - 2 >= la - back:
            tail -= 1
        delta = lb - la
        start = spans[head - 1][1] + 1 if head > 0 else bounds[0]
        end = spans[tail][0] + delta - 1 if tail < n else bounds[1]
        if end < start:
            if start - end != 1 or head == 0:  # only a removal leaves the separator's comma between
                return None
            return head, tail, delta, []
        middle = _split_range(raw, start, end)
        return None if middle is None else (head, tail, delta, middle)

    def _decode_entry(self, entry: object) -> _Item:
        try:
            return entry_endpoint(entry, self.rules)
        except SkipEntry as exc:
            return _Skipped(str(exc), entry_name(entry))

    def _decode_whole(self, raw: bytes) -> list[Endpoint]:
        try:
            payload = _decode_json(raw)
        except ValueError as exc:  # json.JSONDecodeError, or bytes that are not UTF-8
            raise ConsulPayloadError(f"the answer is not JSON: {exc}") from None
        except RecursionError:
            raise ConsulPayloadError("the answer is nested too deeply to decode") from None
        if type(payload) is not list:
            raise ConsulPayloadError(f"expected a JSON list of health entries, got {type(payload).__name__}")
        self._entries = {}
        self._raw, self._spans, self._digests, self._items = None, [], [], []
        self.decoded = self.hashed = len(payload)
        return self._collect(
            [self._decode_entry(entry) for entry in payload], lambda i: entry_name(payload[i])
        )

    def _collect(self, items: list[_Item], name_of: Callable[[int], str]) -> list[Endpoint]:
        """The endpoints of ``items`` (an answer's entries, decoded), skipping with a warning those that
        cannot be one or repeat an earlier address; ``name_of(i)`` names entry i (decoded again: needed
        only for a repeated address). With ``ranked``, an entry's endpoint is replaced in ``items`` by
        the one with its rank."""
        endpoints: list[Endpoint] = []
        seen: dict[str, int] = {}
        """The position of the entry that gave each address."""
        warned: set[str] = set()
        new = 0
        for position, item in enumerate(items):
            if isinstance(item, _Skipped):
                message = f"{item.name}: {item.problem}"
            else:
                first = seen.get(item.address)
                if first is None:
                    seen[item.address] = position
                    if self.ranked and item.rank != len(endpoints):
                        item = items[position] = dataclasses.replace(item, rank=len(endpoints))
                    endpoints.append(item)
                    continue
                message = f"{name_of(position)}: address {item.address} repeats {name_of(first)}"
            warned.add(message)
            if message not in self._warned:
                new += 1
                if new <= _WARNINGS_PER_ANSWER:
                    self._log.warning(
                        "consul service %r: skipping entry %d (%s)", self.service, position, message[:500]
                    )
        if new > _WARNINGS_PER_ANSWER:
            self._log.warning(
                "consul service %r: skipping %d more unusable entries of this answer",
                self.service,
                new - _WARNINGS_PER_ANSWER,
            )
        self._warned = warned
        return endpoints


def parse_health_entries(
    payload: object,
    *,
    service: str,
    rules: EntryRules | None = None,
    log: logging.Logger = logger,
    ranked: bool = False,
) -> list[Endpoint]:
    """The endpoints of a decoded ``/v1/health/service`` payload (see :class:`HealthDecoder`)."""
    decoder = HealthDecoder(service, rules, log=log, ranked=ranked)
    if type(payload) is not list:
        raise ConsulPayloadError(f"expected a JSON list of health entries, got {type(payload).__name__}")
    return decoder._collect(
        [decoder._decode_entry(entry) for entry in payload], lambda i: entry_name(payload[i])
    )

"""Consul discovery without I/O: options, the agent's address, query building, payload parsing, and
the blocking-query rules of Consul's HTTP API (index kept >= 1, reset when it goes backwards, rate limit,
backoff). The loops that do the I/O live in :mod:`lbkit.discovery.consul`.
"""

from __future__ import annotations

import gc
import ipaddress
import json
import logging
import math
import os
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import tenacity

from lbkit._config import check_choice, check_float, config
from lbkit.discovery.base import DiscoveryStatus
from lbkit.endpoint import Endpoint, EndpointSet
from lbkit.errors import ConfigError

__all__ = [
    "HEALTH_MODES",
    "ConsulConnection",
    "ConsulOptions",
    "ConsulPayloadError",
    "ConsulQuery",
    "ConsulWatchCore",
    "EndpointCache",
    "format_duration",
    "parse_consul_address",
    "parse_health_entries",
    "resolve_connection",
]

logger = logging.getLogger("lbkit.discovery")

HEALTH_MODES = ("passing", "warning", "any")
"""``passing``: instances whose checks all pass (Consul's ``passing`` filter); ``warning``: passing and
warning ones (critical left out, as Consul's DNS does); ``any``: every instance, critical included."""


_DEFAULT_PORTS = {"http": 8500, "https": 8501}
_MAX_WAIT = 600.0  # Consul caps a blocking query's wait at 10 minutes
_ERROR_TEXT_LIMIT = 300


class ConsulPayloadError(Exception):
    """An answer from Consul that is not a usable health payload (a failed query, not a crash)."""


def _check_optional_str(owner: str, name: str, value: object, *, allow_empty: bool = False) -> None:
    if value is None:
        return
    if not isinstance(value, str) or (not value and not allow_empty):
        raise ConfigError(f"{owner}: {name} must be a non-empty str or None, got {value!r}")


def _check_token(owner: str, value: object) -> None:
    # The message never holds the token itself.
    if value is None:
        return
    if not isinstance(value, str):
        raise ConfigError(f"{owner}: token must be a str or None, got a {type(value).__name__}")
    if not value or any(ord(c) < 0x21 or ord(c) == 0x7F for c in value):
        raise ConfigError(f"{owner}: token must be non-empty, without spaces or control characters")


def _split_address(address: object, source: str) -> tuple[str | None, str, int | None]:
    if not isinstance(address, str) or not address or address != address.strip():
        raise ConfigError(f"bad Consul {source} {address!r}: expected 'host:port' or 'https://host:port'")
    text = address
    scheme: str | None = None
    if "://" in text:
        scheme, _, text = text.partition("://")
        scheme = scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise ConfigError(
                f"bad Consul {source} {address!r}: scheme must be http or https, got {scheme!r}"
            )
        text = text[:-1] if text.endswith("/") else text
    if not text or any(c in text for c in "/?#@ \t"):
        raise ConfigError(f"bad Consul {source} {address!r}: expected 'host:port' or 'https://host:port'")
    try:
        parts = urllib.parse.urlsplit(f"//{text}")
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        raise ConfigError(f"bad Consul {source} {address!r}: the port is not a number in 1..65535") from None
    if not host or text.endswith(":"):
        raise ConfigError(f"bad Consul {source} {address!r}: expected 'host:port' or 'https://host:port'")
    if text.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"bad Consul {source} {address!r}: {host!r} is not an IPv6 address") from None
    elif text.count(":") > 1:
        raise ConfigError(f"bad Consul {source} {address!r}: put an IPv6 host in brackets, '[v6]:port'")
    if port is not None and not 0 < port < 65536:
        raise ConfigError(f"bad Consul {source} {address!r}: port {port} is not in 1..65535")
    return scheme, host, port


def parse_consul_address(address: object, *, source: str = "address") -> tuple[str, str, int]:
    """Split a Consul HTTP address (``host:port``, ``http://host:port``, ``https://host:port``,
    ``[v6]:port``) into (scheme, host, port). Without a port, Consul's default for the scheme is used
    (8500 for http, 8501 for https). Raise ConfigError naming a bad one."""
    scheme, host, port = _split_address(address, source)
    scheme = scheme or "http"
    return scheme, host, port if port is not None else _DEFAULT_PORTS[scheme]


def format_duration(seconds: float) -> str:
    """A Go duration for Consul: whole seconds as ``"10s"``, anything else in milliseconds."""
    millis = max(1, round(seconds * 1000))
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


@dataclass(frozen=True)
class ConsulConnection:
    """Where and how to reach the Consul agent, after explicit options and the environment are merged."""

    scheme: str
    host: str
    port: int
    token: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True

    @property
    def address(self) -> str:
        """``scheme://host:port``, without any secret."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def http_verify(self) -> bool | str:
        """What py-consul's ``verify`` takes: the CA file when one is set, else a bool."""
        if self.verify and self.ca_file:
            return self.ca_file
        return self.verify

    @property
    def http_cert(self) -> str | tuple[str, str] | None:
        """What py-consul's ``cert`` takes: (cert, key), a combined file, or None."""
        if self.cert_file and self.key_file:
            return (self.cert_file, self.key_file)
        return self.cert_file

    def headers(self) -> dict[str, str]:
        """The request headers: the ACL token, when one is set."""
        return {"X-Consul-Token": self.token} if self.token else {}

    def redact(self, text: str) -> str:
        """``text`` with the token, if present, replaced."""
        return text.replace(self.token, "<token>") if self.token else text


def _env_bool(env: Mapping[str, str], name: str) -> bool | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    value = raw.strip().lower()
    if value in ("1", "true", "t", "yes"):
        return True
    if value in ("0", "false", "f", "no"):
        return False
    raise ConfigError(f"bad {name} {raw!r}: expected true or false")


def _check_file(owner: str, name: str, path: str | None) -> None:
    if path is not None and not os.path.isfile(path):
        raise ConfigError(f"{owner}: {name} {path!r} is not a readable file")


def resolve_connection(
    *,
    address: str | None = None,
    token: str | None = None,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    verify: bool | None = None,
    env: Mapping[str, str] | None = None,
    owner: str = "Consul",
) -> ConsulConnection:
    """Merge explicit options with Consul's environment variables, explicit ones winning.

    Read like Consul's own tools: ``CONSUL_HTTP_ADDR`` (``https://`` selects TLS), ``CONSUL_HTTP_SSL``,
    ``CONSUL_HTTP_TOKEN``, ``CONSUL_CACERT``, ``CONSUL_CLIENT_CERT``, ``CONSUL_CLIENT_KEY``,
    ``CONSUL_HTTP_SSL_VERIFY``. The default address is ``127.0.0.1:8500``.
    """
    env = os.environ if env is None else env
    _check_optional_str(owner, "address", address)
    _check_token(owner, token)
    for name, value in (("ca_file", ca_file), ("cert_file", cert_file), ("key_file", key_file)):
        _check_optional_str(owner, name, value)
    if verify is not None and not isinstance(verify, bool):
        raise ConfigError(f"{owner}: verify must be a bool or None, got {verify!r}")
    raw, source = (
        (address, "address") if address is not None else (env.get("CONSUL_HTTP_ADDR"), "CONSUL_HTTP_ADDR")
    )
    scheme, host, port = _split_address(raw or "127.0.0.1:8500", source)
    if scheme is None:
        scheme = "https" if _env_bool(env, "CONSUL_HTTP_SSL") else "http"
    if port is None:
        port = _DEFAULT_PORTS[scheme]
    if token is None:
        env_token = env.get("CONSUL_HTTP_TOKEN") or None
        try:
            _check_token(owner, env_token)
        except ConfigError:
            raise ConfigError(
                f"{owner}: CONSUL_HTTP_TOKEN is malformed (spaces or control characters)"
            ) from None
        token = env_token
    ca_file = ca_file if ca_file is not None else env.get("CONSUL_CACERT") or None
    cert_file = cert_file if cert_file is not None else env.get("CONSUL_CLIENT_CERT") or None
    key_file = key_file if key_file is not None else env.get("CONSUL_CLIENT_KEY") or None
    if verify is None:
        env_verify = _env_bool(env, "CONSUL_HTTP_SSL_VERIFY")
        verify = True if env_verify is None else env_verify
    if key_file and not cert_file:
        raise ConfigError(f"{owner}: a client key {key_file!r} needs a client certificate (cert_file)")
    _check_file(owner, "ca_file", ca_file)
    _check_file(owner, "cert_file", cert_file)
    _check_file(owner, "key_file", key_file)
    return ConsulConnection(scheme, host, port, token, ca_file, cert_file, key_file, verify)


@config
class ConsulOptions:
    """Options of :class:`~lbkit.discovery.consul.ConsulDiscovery`; connection options left None
    come from Consul's environment variables (see :func:`resolve_connection`)."""

    address: str | None = None
    """The agent's HTTP address: ``host:port``, ``http://host:port`` or ``https://host:port``."""
    token: str | None = None
    """ACL token, sent as the ``X-Consul-Token`` header; never logged."""
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool | None = None
    """Verify the agent's TLS certificate (default true)."""
    datacenter: str | None = None
    tags: str | Iterable[str] = ()
    """Only instances carrying every one of these tags."""
    near: str | None = None
    """Sort by estimated round-trip time from this node (``_agent`` for the agent's own); each endpoint's
    ``rank`` is then its place in that order (0 the nearest), and the nearest one's zone is the client's
    zone unless the balancer's ``zone`` option or ``CONSUL_ZONE`` names one."""
    filter: str | None = None
    """A Consul filter expression, applied by the server."""
    health: str = "passing"
    """Which instances count: one of :data:`HEALTH_MODES`."""
    wait: float = 60.0
    """Seconds a blocking query may wait for a change (Consul adds up to wait/16 of jitter); <= 600."""
    request_timeout: float = 10.0
    """Seconds allowed to connect and answer, on top of ``wait`` and its jitter for blocking queries."""
    min_interval: float = 0.05
    """Least seconds between the starts of two queries, so a flapping service cannot spin the watcher."""
    backoff_initial: float = 0.5
    """First retry delay after a failed query, in seconds; it doubles with each failure, plus jitter."""
    backoff_max: float = 15.0
    """Cap of the retry delay, in seconds."""
    zone_key: str = "zone"
    """Metadata key holding an instance's zone (service meta first, then node meta)."""
    node_meta_prefix: str = "node."
    """Prefix under which node metadata joins an endpoint's metadata (service metadata wins a clash)."""

    def __post_init__(self) -> None:
        owner = "ConsulOptions"
        if self.address is not None:
            parse_consul_address(self.address)
        _check_token(owner, self.token)
        for name in ("ca_file", "cert_file", "key_file", "datacenter", "near", "filter"):
            _check_optional_str(owner, name, getattr(self, name))
        if self.verify is not None and not isinstance(self.verify, bool):
            raise ConfigError(f"{owner}: verify must be a bool or None, got {self.verify!r}")
        object.__setattr__(self, "tags", _check_tags(owner, self.tags))
        check_choice(owner, "health", self.health, HEALTH_MODES)
        check_float(owner, "wait", self.wait, minimum=0.0, maximum=_MAX_WAIT, strict_min=True)
        check_float(owner, "request_timeout", self.request_timeout, minimum=0.0, strict_min=True)
        check_float(owner, "min_interval", self.min_interval, minimum=0.0)
        check_float(owner, "backoff_initial", self.backoff_initial, minimum=0.0, strict_min=True)
        check_float(owner, "backoff_max", self.backoff_max, minimum=self.backoff_initial)
        if not isinstance(self.zone_key, str) or not self.zone_key:
            raise ConfigError(f"{owner}: zone_key must be a non-empty str, got {self.zone_key!r}")
        if not isinstance(self.node_meta_prefix, str):
            raise ConfigError(f"{owner}: node_meta_prefix must be a str, got {self.node_meta_prefix!r}")

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.__dict__.items() if k != "token" and v is not None}
        token = ", token=<set>" if self.token else ""
        return f"ConsulOptions({', '.join(f'{k}={v!r}' for k, v in shown.items())}{token})"


def _check_tags(owner: str, tags: object) -> tuple[str, ...]:
    if isinstance(tags, str):
        tags = (tags,)
    if not isinstance(tags, Iterable):
        raise ConfigError(f"{owner}: tags must be a str or an iterable of str, got {tags!r}")
    result = tuple(cast(Iterable[object], tags))
    for tag in result:
        if not isinstance(tag, str) or not tag:
            raise ConfigError(f"{owner}: every tag must be a non-empty str, got {tag!r}")
    return cast(tuple[str, ...], result)


@dataclass(frozen=True)
class ConsulQuery:
    """One GET to make: path, query parameters, headers, and the HTTP timeout in seconds."""

    path: str
    params: list[tuple[str, str]]
    headers: dict[str, str] = field(repr=False)
    timeout: float
    index: int


# ---------------------------------------------------------------------------------------------------
# Payload parsing


class _SkipEntry(Exception):
    pass


def _entry_name(entry: dict[str, Any]) -> str:
    service = entry.get("Service")
    node = entry.get("Node")
    sid = service.get("ID") if isinstance(service, dict) else None
    nid = node.get("Node") if isinstance(node, dict) else None
    return f"service id {sid if sid else '?'!s} on node {nid if nid else '?'!s}"


def _status_of(entry: dict[str, Any]) -> str:
    """Consul's aggregated status: critical beats warning beats passing; no checks is passing."""
    checks = entry.get("Checks")
    status = "passing"
    if type(checks) is list:
        for check in checks:
            value = check.get("Status") if type(check) is dict else None
            if value == "passing":
                continue
            if value in ("critical", "maintenance"):
                return "critical"
            if value == "warning":
                status = "warning"
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


_EndpointKey = tuple[str, int, str, tuple[str, ...], tuple[tuple[str, str], ...], int | None]
_QuickKey = tuple[object, int, object, int, str, int | None]
EndpointCache = dict[_EndpointKey | _QuickKey, Endpoint]
"""Endpoints of the previous parse by their fields, so an unchanged instance is not built again."""


def _entry_endpoint(
    entry: dict[str, Any],
    *,
    health: str,
    zone_key: str,
    node_meta_prefix: str,
    cache: EndpointCache,
    fresh: EndpointCache,
    rank: int | None = None,
) -> Endpoint | None:
    service = entry.get("Service")
    if type(service) is not dict:
        raise _SkipEntry("no Service object")
    node = entry.get("Node")
    if type(node) is not dict:
        node = {}
    status = _status_of(entry)
    if status != "passing" and (health == "passing" or (health == "warning" and status == "critical")):
        return None
    # Consul bumps an instance's ModifyIndex (and its node's) on every change of its registration, so
    # an unchanged (ID, ModifyIndex, node, node ModifyIndex, status) is an unchanged endpoint.
    s_modify, n_modify = service.get("ModifyIndex"), node.get("ModifyIndex")
    quick: _QuickKey | None = None
    if type(s_modify) is int and type(n_modify) is int:
        quick = (service.get("ID"), s_modify, node.get("Node"), n_modify, status, rank)
        endpoint = cache.get(quick)
        if endpoint is not None:
            fresh[quick] = endpoint
            return endpoint
    host = service.get("Address") or node.get("Address")
    if type(host) is not str or not host:
        raise _SkipEntry("no address (Service.Address and Node.Address are empty)")
    port = service.get("Port")
    if type(port) is not int or not 0 < port < 65536:
        raise _SkipEntry(f"missing or bad port {port!r}")
    weights = service.get("Weights")
    # Consul defaults weights to {"Passing": 1, "Warning": 1} and rejects Passing < 1 at registration,
    # so a missing or non-positive Passing weight means 1. A warning instance takes the Warning weight;
    # Warning 0 means "no traffic while warning", so such an instance is left out.
    weight = _weight(weights, "Passing")
    if health == "warning" and status == "warning":
        weight = _weight(weights, "Warning")
        if weight is not None and weight < 1:
            return None
    if weight is None or weight < 1:
        weight = 1
    service_meta = _str_items(service.get("Meta"))
    node_meta = _str_items(node.get("Meta"))
    zone = ""
    for items in (service_meta, node_meta):
        for k, v in items:
            if k == zone_key and v:
                zone = v
                break
        if zone:
            break
    if not zone:
        locality = service.get("Locality")
        if type(locality) is dict and type(locality.get("Zone")) is str:
            zone = locality["Zone"]
    raw_tags = service.get("Tags")
    tags = tuple(t for t in raw_tags if type(t) is str) if type(raw_tags) is list else ()
    meta_items = tuple((f"{node_meta_prefix}{k}", v) for k, v in node_meta) + tuple(service_meta)
    address = _format_address(host, port)
    key = (address, weight, zone, tags, meta_items, rank)
    endpoint = cache.get(key)
    if endpoint is None:
        try:
            endpoint = Endpoint(
                address,
                weight=weight,
                zone=zone,
                tags=frozenset(tags),
                metadata=dict(meta_items),
                rank=rank,
            )
        except ConfigError as exc:
            raise _SkipEntry(f"malformed address {address!r}: {exc}") from None
    fresh[key] = endpoint
    if quick is not None:
        fresh[quick] = endpoint
    return endpoint


def parse_health_entries(
    payload: object,
    *,
    service: str,
    health: str = "passing",
    zone_key: str = "zone",
    node_meta_prefix: str = "node.",
    log: logging.Logger = logger,
    cache: EndpointCache | None = None,
    ranked: bool = False,
) -> list[Endpoint]:
    """Map a ``/v1/health/service`` payload (decoded JSON) to endpoints, in Consul's order.

    The address is ``Service.Address``, or ``Node.Address`` when that is empty; the weight is
    ``Service.Weights.Passing`` (1 when missing or < 1); metadata is the node's under
    ``node_meta_prefix`` overlaid by the service's; the zone is ``Meta[zone_key]`` of the service, then of
    the node, then ``Service.Locality.Zone``. Entries without a usable address or port, and repeats of
    an address, are skipped with a warning naming them. Raise :class:`ConsulPayloadError` when the
    payload is not a JSON list of objects. With ``cache`` (endpoints of the previous parse), unchanged
    instances reuse their Endpoint, and the cache is replaced by this parse's endpoints. ``ranked`` (the
    query asked Consul to sort by round-trip time, ``near``): each endpoint's ``rank`` is its place in
    that order, 0 the nearest.
    """
    if type(payload) is not list:
        raise ConsulPayloadError(f"expected a JSON list of health entries, got {type(payload).__name__}")
    previous: EndpointCache = cache if cache is not None else {}
    fresh: EndpointCache = {}
    endpoints: list[Endpoint] = []
    seen: dict[str, int] = {}
    for position, entry in enumerate(payload):
        if type(entry) is not dict:
            raise ConsulPayloadError(f"health entry {position} is a {type(entry).__name__}, not an object")
        try:
            endpoint = _entry_endpoint(
                entry,
                health=health,
                zone_key=zone_key,
                node_meta_prefix=node_meta_prefix,
                cache=previous,
                fresh=fresh,
                rank=len(endpoints) if ranked else None,
            )
        except _SkipEntry as exc:
            log.warning(
                "consul service %r: skipping entry %d (%s): %s", service, position, _entry_name(entry), exc
            )
            continue
        if endpoint is None:
            continue
        if endpoint.address in seen:
            log.warning(
                "consul service %r: skipping entry %d (%s): address %s repeats %s",
                service,
                position,
                _entry_name(entry),
                endpoint.address,
                _entry_name(payload[seen[endpoint.address]]),
            )
            continue
        seen[endpoint.address] = position
        endpoints.append(endpoint)
    if cache is not None:
        cache.clear()
        cache.update(fresh)
    return endpoints


# ---------------------------------------------------------------------------------------------------
# The watch state machine


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    for key, item in headers.items():
        if key.lower() == lowered:
            return item
    return None


def _decode(body: str | bytes) -> Any:
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


def _status_kind(status: int) -> str:
    """``acl`` (401/403) and ``request`` (other 4xx but 429) are configuration errors; the rest outages."""
    if status in (401, 403):
        return "acl"
    if 400 <= status < 500 and status != 429:
        return "request"
    return "http"


class _Attempt:
    """The one field of tenacity's retry state that its wait functions read."""

    def __init__(self, attempt_number: int) -> None:
        self.attempt_number = attempt_number


class ConsulWatchCore:
    """The blocking-query loop of one watcher, without I/O.

    A driver repeats: sleep :meth:`delay`, send :meth:`next_query`, then hand the answer to
    :meth:`on_response` (publishing what it returns) or the transport failure to :meth:`on_error`.

    Rules, after Consul's "Blocking Queries" documentation: the first query (and the one after an index
    went backwards) is a plain read with no index; a returned index lower than the one held resets it to 0
    (a full read next); an index of 0 becomes 1; an answer without a change publishes nothing; query
    starts are at least ``min_interval`` apart; a failed query is retried after an exponential backoff
    with jitter, and never empties the endpoint set.
    """

    def __init__(
        self,
        service: str,
        options: ConsulOptions,
        connection: ConsulConnection,
        *,
        status: DiscoveryStatus | None = None,
        clock: Callable[[], float] = time.monotonic,
        log: logging.Logger = logger,
    ) -> None:
        self.service = service
        self.options = options
        self.connection = connection
        self.status = status if status is not None else DiscoveryStatus()
        self.index = 0
        """The index the next query sends; 0 means a plain read that does not block."""
        self.published: EndpointSet | None = None
        """The last endpoint set handed out."""
        self._clock = clock
        self._log = log
        self._last_start = -math.inf
        self._retry_at = -math.inf
        self._outage_start: float | None = None
        self._error_kind = ""
        self._backoff = tenacity.wait_exponential_jitter(
            multiplier=options.backoff_initial, max=options.backoff_max, jitter=options.backoff_initial
        )
        self._cache: EndpointCache = {}
        self._path = f"/v1/health/service/{urllib.parse.quote(service, safe='')}"
        self._static_params = self._build_static_params()

    def _build_static_params(self) -> list[tuple[str, str]]:
        o = self.options
        params: list[tuple[str, str]] = []
        if o.health == "passing":
            params.append(("passing", "1"))
        params.extend(("tag", tag) for tag in cast(tuple[str, ...], o.tags))
        if o.datacenter:
            params.append(("dc", o.datacenter))
        if o.near:
            params.append(("near", o.near))
        if o.filter:
            params.append(("filter", o.filter))
        return params

    def delay(self) -> float:
        """Seconds to sleep before the next query: the backoff after a failure, else the rate limit."""
        now = self._clock()
        if self.status.consecutive_errors:
            return max(0.0, self._retry_at - now)
        return max(0.0, self._last_start + self.options.min_interval - now)

    def next_query(self) -> ConsulQuery:
        """The query to send now (its start is noted for the rate limit)."""
        self._last_start = self._clock()
        params: list[tuple[str, str]] = []
        timeout = self.options.request_timeout
        if self.index > 0:
            wait = self.options.wait
            params += [("index", str(self.index)), ("wait", format_duration(wait))]
            timeout += wait + wait / 16
        params += self._static_params
        return ConsulQuery(self._path, params, self.connection.headers(), timeout, self.index)

    def on_response(self, status: int, headers: Mapping[str, str], body: str | bytes) -> EndpointSet | None:
        """Take an HTTP answer; return the endpoint set to publish, or None (no change, or a failure)."""
        if status != 200:
            text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
            self._fail(_status_kind(status), f"HTTP {status}: {' '.join(text.split())}", status=status)
            return None
        raw_index = _header(headers, "X-Consul-Index")
        if raw_index is None or not raw_index.strip().isdigit():
            self._fail("payload", f"missing or bad X-Consul-Index header {raw_index!r}")
            return None
        new_index = int(raw_index.strip())
        try:
            payload = _decode(body)
            endpoints = parse_health_entries(
                payload,
                service=self.service,
                health=self.options.health,
                zone_key=self.options.zone_key,
                node_meta_prefix=self.options.node_meta_prefix,
                log=self._log,
                cache=self._cache,
                ranked=bool(self.options.near),
            )
        except (ValueError, ConsulPayloadError) as exc:  # json.JSONDecodeError is a ValueError
            self._fail("payload", f"unusable payload: {exc}")
            return None
        self._succeed()
        if new_index < self.index:
            self._log.info(
                "consul service %r: index went backwards (%d -> %d); doing a full read",
                self.service,
                self.index,
                new_index,
            )
            self.index = 0
        else:
            self.index = max(new_index, 1)
        snapshot = EndpointSet(endpoints, version=new_index)
        if self.published is not None and snapshot == self.published:
            return None
        self.published = snapshot
        self.status.updates += 1
        return snapshot

    def on_error(self, error: BaseException) -> None:
        """Take a transport failure (refused, reset, timed out)."""
        text = str(error) or type(error).__name__
        self._fail("transport", f"{type(error).__name__}: {text}", cause=error)

    def _succeed(self) -> None:
        now = self._clock()
        if self.status.consecutive_errors:
            assert self._outage_start is not None
            self._log.info(
                "consul service %r: recovered after %d failed queries (%.1fs)",
                self.service,
                self.status.consecutive_errors,
                now - self._outage_start,
            )
        self.status.succeeded(now)
        self._outage_start = None
        self._error_kind = ""

    def _fail(self, kind: str, text: str, *, status: int = 0, cause: BaseException | None = None) -> None:
        now = self._clock()
        text = self.connection.redact(text)
        if len(text) > _ERROR_TEXT_LIMIT:
            text = text[: _ERROR_TEXT_LIMIT - 3] + "..."
        self.status.failed(text, status=status, cause=cause)
        attempt = self.status.consecutive_errors
        self._retry_at = now + float(self._backoff(cast(Any, _Attempt(attempt))))
        kept = len(self.published) if self.published is not None else 0
        if kind in ("acl", "request") and kind != self._error_kind:
            what = "ACL token refused" if kind == "acl" else "query rejected"
            self._log.error(
                "consul service %r: %s by %s (a configuration error): %s; keeping %d endpoints",
                self.service,
                what,
                self.connection.address,
                text,
                kept,
            )
        elif attempt == 1:
            self._log.warning(
                "consul service %r: query to %s failed, keeping %d endpoints and retrying: %s",
                self.service,
                self.connection.address,
                kept,
                text,
            )
        else:
            self._log.debug("consul service %r: query failed again (%d): %s", self.service, attempt, text)
        if attempt == 1:
            self._outage_start = now
        self._error_kind = kind

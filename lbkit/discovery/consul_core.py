"""Consul discovery without I/O: the watcher's options, the blocking-query rules of Consul's HTTP API
(index kept >= 1, reset when it goes backwards, rate limit, backoff) for one datacenter
(:class:`ConsulWatchCore`), and the failover across datacenters (:class:`DatacenterFailover`). The loops
that do the I/O live in :mod:`lbkit.discovery.consul`; the connection (address, token, TLS) in
:mod:`lbkit.discovery.consul_connection`; answers become endpoints in :mod:`lbkit.discovery.consul_parse`.
"""

from __future__ import annotations

import logging
import math
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import tenacity

from lbkit._config import check_choice, check_float, config
from lbkit.discovery.base import DiscoveryStatus
from lbkit.discovery.consul_connection import (
    ConsulConnection,
    check_optional_str,
    check_token,
    format_duration,
    parse_consul_address,
)
from lbkit.discovery.consul_parse import (
    HEALTH_MODES,
    ZONE_SOURCES,
    ConsulPayloadError,
    EntryRules,
    HealthDecoder,
)
from lbkit.endpoint import EndpointHealth, EndpointSet
from lbkit.errors import ConfigError

__all__ = [
    "CONSISTENCY_MODES",
    "HEALTH_MODES",
    "ZONE_SOURCES",
    "ConsulOptions",
    "ConsulQuery",
    "ConsulWatchCore",
    "DatacenterFailover",
    "header",
    "logger",
]

logger = logging.getLogger("lbkit.discovery")

CONSISTENCY_MODES = ("default", "stale", "consistent")
"""Consul's read consistency modes: ``default`` (the leader answers, possibly from a lease), ``stale``
(any server answers, however far behind: see ``X-Consul-LastContact``), ``consistent`` (the leader
checks it still is one first)."""

_MAX_WAIT = 600.0  # Consul caps a blocking query's wait at 10 minutes
_ERROR_TEXT_LIMIT = 300


def _check_names(owner: str, name: str, value: object, *, allow_str: bool = True) -> tuple[str, ...]:
    if isinstance(value, str) and allow_str:
        value = (value,)
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ConfigError(f"{owner}: {name} must be an iterable of str, got {value!r}")
    result = tuple(cast(Iterable[object], value))
    for item in result:
        if not isinstance(item, str) or not item or item != item.strip():
            raise ConfigError(f"{owner}: every entry of {name} must be a non-empty str, got {item!r}")
    return cast(tuple[str, ...], result)


@config
class ConsulOptions:
    """Options of :class:`~lbkit.discovery.consul.ConsulDiscovery`; connection options left None come from
    Consul's environment variables (see :func:`~lbkit.discovery.consul_connection.resolve_connection`)."""

    address: str | None = None
    """The agent's HTTP address: ``host:port``, ``http://host:port`` or ``https://host:port``."""
    token: str | None = None
    """ACL token, sent as the ``X-Consul-Token`` header; never logged."""
    token_file: str | None = None
    """A file holding the ACL token (read at construction)."""
    ca_file: str | None = None
    """CA bundle (PEM) that signed the agent's certificate."""
    ca_path: str | None = None
    """A directory of CA certificates (every file in it, as Consul reads ``CONSUL_CAPATH``)."""
    cert_file: str | None = None
    """Client certificate (PEM), for an agent that verifies incoming connections."""
    key_file: str | None = None
    """The client certificate's key (PEM)."""
    verify: bool | None = None
    """Verify the agent's TLS certificate (default true)."""
    tls_server_name: str | None = None
    """The name the agent's certificate must carry, and the SNI sent (default: the address's host)."""
    namespace: str | None = None
    """Consul Enterprise namespace (``ns``); default ``CONSUL_NAMESPACE``, else the token's."""
    partition: str | None = None
    """Consul Enterprise admin partition; default ``CONSUL_PARTITION``, else the agent's."""
    datacenter: str | None = None
    """The datacenter to watch (``dc``); None: the agent's own."""
    failover: str | Iterable[str] = ()
    """Datacenters to fail over to, in order, while ``datacenter`` has no usable instance (a prepared
    query's failover): the first one that has one is used, until the local one has one again."""
    failover_warm: bool = True
    """Watch the failover datacenters all the time (a blocking query each), so a failover publishes at
    once; False: watch each only while the ones before it have nothing usable."""
    tags: str | Iterable[str] = ()
    """Only instances carrying every one of these tags."""
    near: str | None = None
    """Sort by estimated round-trip time from this node (``_agent`` for the agent's own); each endpoint's
    ``rank`` is then its place in that order (0 the nearest), and the nearest one's zone is the client's
    zone unless the balancer's ``zone`` option or ``CONSUL_ZONE`` names one."""
    filter: str | None = None
    """A Consul filter expression, applied by the server."""
    health: str = "passing"
    """Instance states to accept: one of :data:`HEALTH_MODES`. Others are published as unhealthy."""
    consistency: str = "default"
    """Read consistency: one of :data:`CONSISTENCY_MODES`."""
    cached: bool = False
    """Read through the agent's cache (``?cached``): cheaper for the servers, possibly older."""
    max_age: float | None = None
    """With ``cached``: the oldest cache entry (seconds) to accept; older ones are fetched again."""
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
    """Metadata key holding an instance's zone (in service or node metadata)."""
    zone_from: str | Iterable[str] = ZONE_SOURCES
    """Where an endpoint's zone comes from, in order (:data:`ZONE_SOURCES`): the first that has one."""
    node_meta_prefix: str = "node."
    """Prefix under which node metadata joins an endpoint's metadata (service metadata wins a clash)."""
    zone: str | None = None
    """This client's zone; None: ``CONSUL_ZONE``, else (with ``zone_from_agent``) the local agent's node
    metadata under ``zone_key``."""
    zone_from_agent: bool = False
    """Read this client's zone from the local agent's node metadata (``/v1/agent/self``, once, before the
    first query; it needs ``agent:read``) when neither ``zone`` nor ``CONSUL_ZONE`` gives it."""

    def __post_init__(self) -> None:
        owner = "ConsulOptions"
        if self.address is not None:
            parse_consul_address(self.address)
        check_token(owner, self.token)
        for name in (
            "token_file",
            "ca_file",
            "ca_path",
            "cert_file",
            "key_file",
            "tls_server_name",
            "namespace",
            "partition",
            "datacenter",
            "near",
            "filter",
            "zone",
        ):
            check_optional_str(owner, name, getattr(self, name))
        for name in ("verify",):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ConfigError(f"{owner}: {name} must be a bool or None, got {value!r}")
        for name in ("cached", "zone_from_agent", "failover_warm"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{owner}: {name} must be a bool, got {getattr(self, name)!r}")
        if self.token is not None and self.token_file is not None:
            raise ConfigError(f"{owner}: pass token or token_file, not both")
        object.__setattr__(self, "tags", _check_names(owner, "tags", self.tags))
        failover = _check_names(owner, "failover", self.failover)
        if len(set(failover)) != len(failover):
            raise ConfigError(f"{owner}: failover names a datacenter twice: {list(failover)}")
        if self.datacenter is not None and self.datacenter in failover:
            raise ConfigError(
                f"{owner}: failover {list(failover)} names datacenter {self.datacenter!r} itself"
            )
        object.__setattr__(self, "failover", failover)
        zone_from = _check_names(owner, "zone_from", self.zone_from)
        unknown = [z for z in zone_from if z not in ZONE_SOURCES]
        if unknown or not zone_from:
            raise ConfigError(
                f"{owner}: zone_from must name some of {list(ZONE_SOURCES)}, got {list(zone_from)}"
            )
        object.__setattr__(self, "zone_from", zone_from)
        check_choice(owner, "health", self.health, HEALTH_MODES)
        check_choice(owner, "consistency", self.consistency, CONSISTENCY_MODES)
        if self.cached and self.consistency == "consistent":
            raise ConfigError(
                f"{owner}: cached reads cannot be consistent (Consul refuses ?cached&consistent)"
            )
        if self.max_age is not None:
            if not self.cached:
                raise ConfigError(f"{owner}: max_age applies to cached reads: set cached=True")
            check_float(owner, "max_age", self.max_age, minimum=0.0)
        check_float(owner, "wait", self.wait, minimum=0.0, maximum=_MAX_WAIT, strict_min=True)
        check_float(owner, "request_timeout", self.request_timeout, minimum=0.0, strict_min=True)
        check_float(owner, "min_interval", self.min_interval, minimum=0.0)
        check_float(owner, "backoff_initial", self.backoff_initial, minimum=0.0, strict_min=True)
        check_float(owner, "backoff_max", self.backoff_max, minimum=self.backoff_initial)
        if not isinstance(self.zone_key, str) or not self.zone_key:
            raise ConfigError(f"{owner}: zone_key must be a non-empty str, got {self.zone_key!r}")
        if not isinstance(self.node_meta_prefix, str):
            raise ConfigError(f"{owner}: node_meta_prefix must be a str, got {self.node_meta_prefix!r}")

    @property
    def rules(self) -> EntryRules:
        """How a health entry becomes an endpoint under these options."""
        return EntryRules(
            health=self.health,
            zone_key=self.zone_key,
            zone_from=cast(tuple[str, ...], self.zone_from),
            node_meta_prefix=self.node_meta_prefix,
        )

    @property
    def datacenters(self) -> tuple[str, ...]:
        """The datacenters in failover order; "" is the agent's own (when ``datacenter`` is None)."""
        return (self.datacenter or "", *cast(tuple[str, ...], self.failover))

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.__dict__.items() if k != "token" and v is not None}
        token = ", token=<set>" if self.token else ""
        return f"ConsulOptions({', '.join(f'{k}={v!r}' for k, v in shown.items())}{token})"


@dataclass(frozen=True)
class ConsulQuery:
    """One GET to make: path, query parameters, headers, and the HTTP timeout in seconds."""

    path: str
    params: list[tuple[str, str]]
    headers: dict[str, str] = field(repr=False)
    timeout: float
    index: int
    datacenter: str = ""
    """The datacenter asked ("" : the agent's own)."""


def header(headers: Mapping[str, str], name: str) -> str | None:
    """A response header by name, whatever its case."""
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    for key, item in headers.items():
        if key.lower() == lowered:
            return item
    return None


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
    """The blocking-query loop of one watcher in one datacenter, without I/O.

    A driver repeats: sleep :meth:`delay`, send :meth:`next_query`, then hand the answer to
    :meth:`on_response` (publishing what it returns) or the transport failure to :meth:`on_error`.
    :meth:`on_response` decodes (the costly part): an asyncio driver runs it in a worker thread.

    Rules, after Consul's "Blocking Queries" documentation: the first query (and the one after an index
    went backwards) is a plain read with no index; a returned index lower than the one held resets it to 0
    (a full read next); an index of 0 becomes 1; an answer without a change publishes nothing; query
    starts are at least ``min_interval`` apart; a failed query is retried after an exponential backoff
    with jitter, and never empties the endpoint set. An empty answer from a reachable Consul is
    authoritative: the service has no instance (or none matching), and that set is published.
    """

    def __init__(
        self,
        service: str,
        options: ConsulOptions,
        connection: ConsulConnection,
        *,
        datacenter: str | None = None,
        status: DiscoveryStatus | None = None,
        clock: Callable[[], float] = time.monotonic,
        log: logging.Logger = logger,
        pause: float | None = 0.001,
    ) -> None:
        self.service = service
        self.options = options
        self.connection = connection
        self.datacenter = options.datacenter or "" if datacenter is None else datacenter
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
        self.decoder = HealthDecoder(service, options.rules, log=log, pause=pause, ranked=bool(options.near))
        self._path = f"/v1/health/service/{urllib.parse.quote(service, safe='')}"
        self._static_params = self._build_static_params()
        self._headers = dict(connection.headers())
        if options.cached and options.max_age is not None:
            self._headers["Cache-Control"] = f"max-age={math.floor(options.max_age)}"

    def _build_static_params(self) -> list[tuple[str, str]]:
        o = self.options
        params: list[tuple[str, str]] = []
        params.extend(("tag", tag) for tag in cast(tuple[str, ...], o.tags))
        if self.datacenter:
            params.append(("dc", self.datacenter))
        if o.near:
            params.append(("near", o.near))
        if o.filter:
            params.append(("filter", o.filter))
        if o.consistency != "default":
            params.append((o.consistency, ""))
        if o.cached:
            params.append(("cached", ""))
        params.extend(self.connection.scope_params())
        return params

    @property
    def where(self) -> str:
        """``service 'x'`` (``in dc 'y'`` when another datacenter is asked), for logs."""
        return f"consul service {self.service!r}" + (f" in {self.datacenter!r}" if self.datacenter else "")

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
        return ConsulQuery(self._path, params, self._headers, timeout, self.index, self.datacenter)

    def on_response(self, status: int, headers: Mapping[str, str], body: str | bytes) -> EndpointSet | None:
        """Take an HTTP answer; return the endpoint set to publish, or None (no change, or a failure)."""
        if status != 200:
            text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
            self._fail(_status_kind(status), f"HTTP {status}: {' '.join(text.split())}", status=status)
            return None
        raw_index = header(headers, "X-Consul-Index")
        if raw_index is None or not raw_index.strip().isdigit():
            self._fail("payload", f"missing or bad X-Consul-Index header {raw_index!r}")
            return None
        new_index = int(raw_index.strip())
        try:
            endpoints = self.decoder.decode(body)
        except ConsulPayloadError as exc:
            self._fail("payload", f"unusable payload: {exc}")
            return None
        self._succeed()
        self._note_meta(headers)
        if new_index < self.index:
            self._log.info(
                "%s: index went backwards (%d -> %d); doing a full read", self.where, self.index, new_index
            )
            self.index = 0
        else:
            self.index = max(new_index, 1)
        snapshot = EndpointSet(endpoints, version=new_index)
        if self.published is not None and snapshot == self.published:
            return None
        self.published = snapshot
        return snapshot

    def on_error(self, error: BaseException) -> None:
        """Take a transport failure (refused, reset, timed out, a TLS handshake refused)."""
        text = str(error) or type(error).__name__
        self._fail("transport", f"{type(error).__name__}: {text}", cause=error)

    def _note_meta(self, headers: Mapping[str, str]) -> None:
        """Staleness and cache facts of a good answer, for metrics."""
        st = self.status
        contact = header(headers, "X-Consul-LastContact")
        st.last_contact = int(contact) / 1000.0 if contact is not None and contact.strip().isdigit() else None
        leader = header(headers, "X-Consul-KnownLeader")
        st.known_leader = None if leader is None else leader.strip().lower() == "true"
        cache = header(headers, "X-Cache")
        st.cache_hit = None if cache is None else cache.strip().upper() == "HIT"
        age = header(headers, "Age")
        st.cache_age = float(age) if st.cache_hit and age is not None and age.strip().isdigit() else None

    def _succeed(self) -> None:
        now = self._clock()
        if self.status.consecutive_errors:
            assert self._outage_start is not None
            self._log.info(
                "%s: recovered after %d failed queries (%.1fs)",
                self.where,
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
                "%s: %s by %s (a configuration error): %s; keeping %d endpoints",
                self.where,
                what,
                self.connection.address,
                text,
                kept,
            )
        elif attempt == 1:
            self._log.warning(
                "%s: query to %s failed, keeping %d endpoints and retrying: %s",
                self.where,
                self.connection.address,
                kept,
                text,
            )
        else:
            self._log.debug("%s: query failed again (%d): %s", self.where, attempt, text)
        if attempt == 1:
            self._outage_start = now
        self._error_kind = kind


def usable(endpoints: EndpointSet) -> bool:
    """Whether a set has an endpoint to pick (one whose health is passing)."""
    return any(e.health is EndpointHealth.PASSING for e in endpoints)


class DatacenterFailover:
    """Which datacenter's endpoints are in force, after a prepared query's failover rule.

    ``datacenters`` is the order ("" is the agent's own). The first with a usable instance (one passing
    after the accepted states) is in force; a datacenter not heard from yet is waited for before going
    past it, and one whose watch has failed with nothing known is gone past. When none has a usable
    instance, the first one with any instance not in maintenance is in force (so panic mode can use its
    unhealthy ones), else the first. With ``warm`` every datacenter is watched all the time
    (:attr:`wanted`), so a failover needs no query; else only those up to the one in force: the local
    one always, the next ones while it has nothing usable.
    """

    def __init__(
        self, service: str, datacenters: Sequence[str], *, warm: bool = True, log: logging.Logger = logger
    ) -> None:
        if not datacenters:
            raise ConfigError("DatacenterFailover: at least one datacenter is needed")
        self.service = service
        self.order = tuple(datacenters)
        self.latest: dict[str, EndpointSet] = {}
        """Each watched datacenter's last set."""
        self.failing: set[str] = set()
        """Datacenters whose last query failed."""
        self.current: str | None = None
        """The datacenter in force (None before anything is known)."""
        self.warm = warm
        self.wanted: tuple[str, ...] = self.order if warm else self.order[:1]
        self._published: tuple[str, EndpointSet] | None = None
        self._log = log

    def on_answer(self, datacenter: str, snapshot: EndpointSet | None) -> EndpointSet | None:
        """A datacenter's watch answered (``snapshot`` None: no change); return the set to publish."""
        self.failing.discard(datacenter)
        if snapshot is not None:
            self.latest[datacenter] = snapshot
        return self._decide()

    def on_failure(self, datacenter: str) -> EndpointSet | None:
        """A datacenter's query failed (its last set, if any, stays known); return the set to publish."""
        self.failing.add(datacenter)
        return self._decide()

    def forget(self, datacenter: str) -> None:
        """A datacenter is no longer watched: what it said may be outdated when it is watched again."""
        self.latest.pop(datacenter, None)
        self.failing.discard(datacenter)

    def _decide(self) -> EndpointSet | None:
        decided = self._choose()
        if self.warm:
            self.wanted = self.order
        return decided

    def _choose(self) -> EndpointSet | None:
        chosen: str | None = None
        wanted = len(self.order)
        for i, dc in enumerate(self.order):
            snapshot = self.latest.get(dc)
            if snapshot is None:
                if dc in self.failing:
                    continue  # unreachable and nothing known: go past it
                self.wanted = self.order[: i + 1]
                return None  # not heard from yet: wait for it before deciding
            if usable(snapshot):
                chosen, wanted = dc, i + 1
                break
        if chosen is None:
            known = [dc for dc in self.order if dc in self.latest]
            if not known:
                self.wanted = self.order
                return None
            chosen = next(
                (
                    dc
                    for dc in known
                    if any(e.health is not EndpointHealth.MAINTENANCE for e in self.latest[dc])
                ),
                known[0],
            )
        self.wanted = self.order[:wanted]
        snapshot = self.latest[chosen]
        if chosen != self.current and self.current is not None:
            self._log.warning(
                "consul service %r: %s; endpoints of %s in force",
                self.service,
                "no usable instance before it" if chosen != self.order[0] else "usable instances again",
                _dc_name(chosen),
            )
        self.current = chosen
        if self._published is not None and self._published == (chosen, snapshot):
            return None
        self._published = (chosen, snapshot)
        return snapshot


def _dc_name(dc: str) -> str:
    return repr(dc) if dc else "the local datacenter"

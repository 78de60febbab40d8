"""Prometheus metrics of balancers, built at scrape time from what the balancers already keep.

The call path pays nothing for them: a scrape reads each endpoint's :class:`~lbkit.stats.EndpointStats`
(counters and latency histogram), the endpoint states, the retry counters and the discovery status. Only
ejections and other events are counted as they happen, by an event listener (events are rare).

Every metric is named ``lbkit_*`` and labelled by ``service`` (the balancer's) and, per endpoint, by
``endpoint`` (its address), plus bounded labels (``state``, ``outcome``, ``reason``, ``kind``, ``cause``)
whose values lbkit fixes: never a hash key, a user id, a token or an event's text (the ``reason`` and
``cause`` labels are an event's typed :class:`~lbkit.events.Cause`). See docs/metrics.md.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client import start_http_server as _prometheus_start_http_server
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from lbkit._driver import BalancerBase
from lbkit.discovery.base import DiscoveryStatus
from lbkit.errors import ConfigError
from lbkit.events import KIND_CAUSES, Event, EventKind
from lbkit.stats import LATENCY_BUCKETS

__all__ = [
    "EJECTION_REASONS",
    "ENDPOINT_STATES",
    "EVENT_CAUSES",
    "BalancerCollector",
    "instrument",
    "start_http_server",
]

log = logging.getLogger("lbkit.metrics")

# lbkit is a library: its log records go nowhere unless the application configures logging.
_package_log = logging.getLogger("lbkit")
if not any(isinstance(h, logging.NullHandler) for h in _package_log.handlers):
    _package_log.addHandler(logging.NullHandler())

ENDPOINT_STATES: tuple[str, ...] = ("ready", "connecting", "unhealthy", "ejected", "draining")
"""Values of the ``state`` label."""

EJECTION_REASONS: tuple[str, ...] = tuple(c.value for c in KIND_CAUSES[EventKind.EJECTED])
"""Values of the ``reason`` label of ejections: the causes an EJECTED event carries."""

EVENT_CAUSES: tuple[tuple[str, str], ...] = tuple(
    (kind.value, cause.value) for kind, causes in KIND_CAUSES.items() for cause in causes
)
"""The (``kind``, ``cause``) label pairs of ``lbkit_events_total``, each exported from 0."""


# ---------------------------------------------------------------------------------------------------
# The metric table


@dataclass(frozen=True)
class _Spec:
    name: str
    """Family name (a counter's without ``_total``: the exposition adds it)."""
    kind: str
    """gauge, counter or histogram."""
    help: str
    labels: tuple[str, ...]
    combine: str = "sum"
    """How two balancers with the same label values merge: sum, max or min."""


_S = ("service",)
_SE = ("service", "endpoint")

_ENDPOINTS = _Spec("lbkit_endpoints", "gauge", "Endpoints in each state.", ("service", "state"))
_ENDPOINT_STATE = _Spec(
    "lbkit_endpoint_state",
    "gauge",
    "1 for the state the endpoint is in, 0 for the others.",
    ("service", "endpoint", "state"),
    "max",
)
_IN_FLIGHT = _Spec("lbkit_endpoint_in_flight", "gauge", "Calls in flight on the endpoint.", _SE)
_PICKS = _Spec(
    "lbkit_endpoint_picks", "counter", "Calls started on the endpoint (picks that sent a call).", _SE
)
_CALLS = _Spec(
    "lbkit_endpoint_calls",
    "counter",
    "Calls finished on the endpoint, by outcome (failed: a status that counts as the endpoint's failure).",
    ("service", "endpoint", "outcome"),
)
_LATENCY = _Spec(
    "lbkit_endpoint_call_latency_seconds",
    "histogram",
    "Latency of calls finished on the endpoint (unary and client-streaming; response streams are left out).",
    _SE,
)
_EWMA = _Spec(
    "lbkit_endpoint_latency_ewma_seconds",
    "gauge",
    "Peak-_EWMA latency of the endpoint, as the peak_ewma selector sees it.",
    _SE,
    "max",
)
_LOAD_REPORTS = _Spec(
    "lbkit_endpoint_load_reports",
    "counter",
    "ORCA load reports received from the endpoint, by outcome (malformed: ignored). Read only by selectors "
    "that use them (weighted_round_robin).",
    ("service", "endpoint", "outcome"),
)
_LOAD_UTILIZATION = _Spec(
    "lbkit_endpoint_load_utilization",
    "gauge",
    "Utilization in the endpoint's latest usable load report (application utilization, else CPU); "
    "only endpoints that have sent one.",
    _SE,
    "max",
)
_LOAD_QPS = _Spec(
    "lbkit_endpoint_load_qps",
    "gauge",
    "Queries per second in the endpoint's latest usable load report; only endpoints that have sent one.",
    _SE,
    "max",
)
_EJECTIONS = _Spec(
    "lbkit_endpoint_ejections",
    "counter",
    "Outlier ejections of the endpoint, by reason (the ejection's cause).",
    ("service", "endpoint", "reason"),
)
_EVENTS = _Spec(
    "lbkit_events",
    "counter",
    "Endpoint and balancer state changes, by kind and cause.",
    ("service", "kind", "cause"),
)
_RETRIED = _Spec("lbkit_calls_retried", "counter", "Retries of calls on another endpoint.", _S)
_REFUSED = _Spec("lbkit_retry_budget_refused", "counter", "Retries the retry budget refused.", _S)
_TOKENS = _Spec("lbkit_retry_budget_tokens", "gauge", "Tokens left in the retry budget.", _S, "min")
_HEDGES = _Spec("lbkit_hedges", "counter", "Hedges sent: attempts of hedged calls after the first.", _S)
_HEDGES_WON = _Spec(
    "lbkit_hedges_won", "counter", "Hedged calls answered first by a hedge, not the first attempt.", _S
)
_HEDGES_CANCELLED = _Spec(
    "lbkit_hedge_attempts_cancelled",
    "counter",
    "Attempts of hedged calls cancelled because another attempt of the call answered first.",
    _S,
)
_ZONE_SHARE = _Spec(
    "lbkit_zone_share",
    "gauge",
    "Share of zone-routed calls the current zone plan sends to each zone (none while routing is off).",
    ("service", "zone"),
    "max",
)
_PANIC = _Spec("lbkit_panic", "gauge", "1 while the balancer is in panic mode, else 0.", _S, "max")
_PANIC_STARTS = _Spec("lbkit_panic_starts", "counter", "Times the balancer entered panic mode.", _S)
_DISCOVERY_UPDATES = _Spec("lbkit_discovery_updates", "counter", "Endpoint sets discovery published.", _S)
_DISCOVERY_ERRORS = _Spec("lbkit_discovery_errors", "counter", "Failed discovery queries.", _S)
_DISCOVERY_CONSECUTIVE = _Spec(
    "lbkit_discovery_consecutive_errors",
    "gauge",
    "Failed discovery queries since the last good answer.",
    _S,
    "max",
)
_DISCOVERY_STALENESS = _Spec(
    "lbkit_discovery_staleness_seconds",
    "gauge",
    "Seconds since the last good discovery answer while discovery is failing (or has not answered yet); "
    "0 while it answers.",
    _S,
    "max",
)
_DISCOVERY_LAST_CONTACT = _Spec(
    "lbkit_discovery_last_contact_seconds",
    "gauge",
    "Seconds since the answering Consul server last heard from its leader, at the last good answer "
    "(X-Consul-LastContact: 0 from the leader, more for stale reads).",
    _S,
    "max",
)
_DISCOVERY_KNOWN_LEADER = _Spec(
    "lbkit_discovery_known_leader",
    "gauge",
    "1 if the answering Consul server knew a leader at the last good answer (X-Consul-KnownLeader), else 0.",
    _S,
    "min",
)
_DISCOVERY_CACHE_AGE = _Spec(
    "lbkit_discovery_cache_age_seconds",
    "gauge",
    "Age of the last answer served from the Consul agent's cache (Age), for cached reads that hit.",
    _S,
    "max",
)

_SPECS: tuple[_Spec, ...] = (
    _ENDPOINTS,
    _ENDPOINT_STATE,
    _IN_FLIGHT,
    _PICKS,
    _CALLS,
    _LATENCY,
    _EWMA,
    _LOAD_REPORTS,
    _LOAD_UTILIZATION,
    _LOAD_QPS,
    _EJECTIONS,
    _EVENTS,
    _RETRIED,
    _REFUSED,
    _TOKENS,
    _HEDGES,
    _HEDGES_WON,
    _HEDGES_CANCELLED,
    _ZONE_SHARE,
    _PANIC,
    _PANIC_STARTS,
    _DISCOVERY_UPDATES,
    _DISCOVERY_ERRORS,
    _DISCOVERY_CONSECUTIVE,
    _DISCOVERY_STALENESS,
    _DISCOVERY_LAST_CONTACT,
    _DISCOVERY_KNOWN_LEADER,
    _DISCOVERY_CACHE_AGE,
)

_LE = (*(repr(float(b)) for b in LATENCY_BUCKETS), "+Inf")

Labels = tuple[str, ...]


def _family(spec: _Spec) -> Metric:
    if spec.kind == "counter":
        return CounterMetricFamily(spec.name, spec.help, labels=spec.labels)
    if spec.kind == "histogram":
        return HistogramMetricFamily(spec.name, spec.help, labels=spec.labels)
    return GaugeMetricFamily(spec.name, spec.help, labels=spec.labels)


def _describe() -> Iterator[Metric]:
    for spec in _SPECS:
        yield _family(spec)


class _Sink:
    """Samples of one scrape, merged by label values across balancers."""

    def __init__(self) -> None:
        self.values: dict[str, dict[Labels, float]] = {s.name: {} for s in _SPECS if s.kind != "histogram"}
        self.histograms: dict[Labels, tuple[list[int], float]] = {}
        self.discoveries: set[int] = set()
        """ids of discovery objects already read (one discovery may feed several balancers)."""

    def add(self, spec: _Spec, labels: Labels, value: float) -> None:
        values = self.values[spec.name]
        old = values.get(labels)
        if old is None:
            values[labels] = value
        elif spec.combine == "max":
            values[labels] = max(old, value)
        elif spec.combine == "min":
            values[labels] = min(old, value)
        else:
            values[labels] = old + value

    def add_histogram(self, labels: Labels, buckets: tuple[int, ...], total: float) -> None:
        old = self.histograms.get(labels)
        if old is None:
            self.histograms[labels] = (list(buckets), total)
        else:
            counts, old_total = old
            for i, n in enumerate(buckets):
                counts[i] += n
            self.histograms[labels] = (counts, old_total + total)

    def families(self) -> Iterator[Metric]:
        for spec in _SPECS:
            family = _family(spec)
            if isinstance(family, HistogramMetricFamily):
                for labels, (counts, total) in self.histograms.items():
                    cumulative = 0
                    buckets: list[tuple[str, float]] = []
                    for le, n in zip(_LE, counts, strict=True):
                        cumulative += n
                        buckets.append((le, cumulative))
                    family.add_metric(labels, buckets, total)
            elif isinstance(family, (CounterMetricFamily, GaugeMetricFamily)):
                for labels, value in self.values[spec.name].items():
                    family.add_metric(labels, value)
            yield family


# ---------------------------------------------------------------------------------------------------
# Collectors


def _closed(lb: BalancerBase) -> bool:
    return bool(getattr(lb, "_closed", False))


class BalancerCollector:
    """A prometheus-client collector for one balancer (``lbkit.Balancer`` or ``lbkit.aio.Balancer``).

    It holds the balancer weakly and adds an event listener to it (counting ejections, panic starts and
    other events from then on). :meth:`collect` builds every family at scrape time; a closed or
    collected balancer yields no samples. To put several balancers in one registry, use
    :func:`instrument`, which merges them under one collector (each registry takes a metric name once).
    """

    def __init__(self, lb: BalancerBase) -> None:
        if not isinstance(lb, BalancerBase):
            raise ConfigError(f"BalancerCollector: expected an lbkit Balancer, got {lb!r}")
        self._lb: weakref.ref[BalancerBase] = weakref.ref(lb)
        self.service = lb.service
        """The ``service`` label of this balancer's samples."""
        self._lock = threading.Lock()
        self._events: dict[tuple[str, str], int] = dict.fromkeys(EVENT_CAUSES, 0)
        self._ejections: dict[tuple[str, str], int] = {}
        self._created = time.monotonic()
        lb.add_listener(self._on_event)

    @property
    def balancer(self) -> BalancerBase | None:
        """The balancer, or None once it has been garbage-collected."""
        return self._lb()

    @property
    def active(self) -> bool:
        """Whether the balancer still exists and is not closed."""
        lb = self._lb()
        return lb is not None and not _closed(lb)

    def _on_event(self, event: Event) -> None:
        with self._lock:
            pair = (event.kind.value, event.cause.value)
            self._events[pair] = self._events.get(pair, 0) + 1
            if event.kind is EventKind.EJECTED:
                key = (event.address, event.cause.value)
                self._ejections[key] = self._ejections.get(key, 0) + 1

    def describe(self) -> Iterator[Metric]:
        """The families this collector yields, without samples (for the registry's name check)."""
        return _describe()

    def collect(self) -> Iterator[Metric]:
        """Every family, with this balancer's samples as of now."""
        sink = _Sink()
        self._gather(sink)
        return sink.families()

    def _gather(self, sink: _Sink) -> None:
        """Add this balancer's samples to ``sink``."""
        lb = self._lb()
        if lb is None or _closed(lb):
            return
        service = lb.service
        states = lb.endpoint_states()
        counts = dict.fromkeys(ENDPOINT_STATES, 0)
        for address, state in states.items():
            counts[state] = counts.get(state, 0) + 1
            for s in ENDPOINT_STATES:
                sink.add(_ENDPOINT_STATE, (service, address, s), 1.0 if s == state else 0.0)
        for state, n in counts.items():
            sink.add(_ENDPOINTS, (service, state), n)

        known = set(states)
        lock = lb.stats.lock
        now = lb.stats.clock()
        for entry in lb.stats:
            with lock:
                ok, failed, in_flight = entry.successes, entry.failures, entry.in_flight
                buckets, latency_sum = tuple(entry.latency_buckets), entry.latency_sum
                reports, malformed = entry.load_reports, entry.load_reports_malformed
                utilization, qps = entry.load_utilization, entry.load_qps
            address = entry.address
            known.add(address)
            labels = (service, address)
            sink.add(_IN_FLIGHT, labels, in_flight)
            sink.add(_PICKS, labels, ok + failed + in_flight)
            sink.add(_CALLS, (service, address, "ok"), ok)
            sink.add(_CALLS, (service, address, "failed"), failed)
            sink.add_histogram(labels, buckets, latency_sum)
            sink.add(_EWMA, labels, entry.latency(now))
            if reports or malformed:
                sink.add(_LOAD_REPORTS, (service, address, "ok"), reports)
                sink.add(_LOAD_REPORTS, (service, address, "malformed"), malformed)
            if qps > 0.0:
                sink.add(_LOAD_UTILIZATION, labels, utilization)
                sink.add(_LOAD_QPS, labels, qps)

        with self._lock:
            for key in [k for k in self._ejections if k[0] not in known]:
                del self._ejections[key]  # the endpoint is gone: so are its series
            ejections = dict(self._ejections)
            events = dict(self._events)
        for address in known:
            for reason in EJECTION_REASONS:
                sink.add(_EJECTIONS, (service, address, reason), ejections.get((address, reason), 0))
        panic_starts = 0
        for (kind, cause), n in events.items():
            sink.add(_EVENTS, (service, kind, cause), n)
            if kind == EventKind.PANIC_START.value:
                panic_starts += n
        sink.add(_PANIC_STARTS, (service,), panic_starts)
        for zone, share in lb.zone_plan.shares.items():
            sink.add(_ZONE_SHARE, (service, zone), share)
        sink.add(_PANIC, (service,), 1.0 if lb.panic else 0.0)
        sink.add(_RETRIED, (service,), lb.calls_retried)
        sink.add(_REFUSED, (service,), lb.budget.refused)
        sink.add(_TOKENS, (service,), lb.budget.tokens)
        sink.add(_HEDGES, (service,), lb.hedges_sent)
        sink.add(_HEDGES_WON, (service,), lb.hedges_won)
        sink.add(_HEDGES_CANCELLED, (service,), lb.hedges_cancelled)
        self._gather_discovery(lb, service, sink)

    def _gather_discovery(self, lb: BalancerBase, service: str, sink: _Sink) -> None:
        discovery = lb.discovery
        status = getattr(discovery, "status", None)
        if not isinstance(status, DiscoveryStatus) or id(discovery) in sink.discoveries:
            return
        sink.discoveries.add(id(discovery))
        labels = (service,)
        sink.add(_DISCOVERY_UPDATES, labels, status.updates)
        sink.add(_DISCOVERY_ERRORS, labels, status.errors)
        sink.add(_DISCOVERY_CONSECUTIVE, labels, status.consecutive_errors)
        staleness = 0.0
        if status.consecutive_errors > 0 or status.last_success is None:
            since = status.last_success if status.last_success is not None else self._created
            staleness = max(0.0, time.monotonic() - since)
        sink.add(_DISCOVERY_STALENESS, labels, staleness)
        # Consul's staleness facts, when the source reports them (absent samples: not told).
        if status.last_contact is not None:
            sink.add(_DISCOVERY_LAST_CONTACT, labels, status.last_contact)
        if status.known_leader is not None:
            sink.add(_DISCOVERY_KNOWN_LEADER, labels, 1.0 if status.known_leader else 0.0)
        if status.cache_age is not None:
            sink.add(_DISCOVERY_CACHE_AGE, labels, status.cache_age)


class _RegistryCollector:
    """The one lbkit collector of a registry: the balancers instrumented there, held weakly."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._members: weakref.WeakKeyDictionary[BalancerBase, BalancerCollector] = (
            weakref.WeakKeyDictionary()
        )

    def add(self, lb: BalancerBase) -> BalancerCollector:
        with self._lock:
            collector = self._members.get(lb)
            if collector is not None:
                return collector
            if any(c.service == lb.service and c.active for c in self._members.values()):
                log.info(
                    "lbkit metrics: another balancer has service %r; samples with equal labels are merged",
                    lb.service,
                )
            collector = self._members[lb] = BalancerCollector(lb)
        log.debug("lbkit metrics: instrumented balancer of service %r", lb.service)
        return collector

    def describe(self) -> Iterator[Metric]:
        return _describe()

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            for lb in [lb for lb, c in self._members.items() if not c.active]:
                del self._members[lb]  # closed balancers never reopen
            collectors = sorted(self._members.values(), key=lambda c: c.service)
        sink = _Sink()
        for c in collectors:
            c._gather(sink)
        return sink.families()


_registries: weakref.WeakKeyDictionary[CollectorRegistry, _RegistryCollector] = weakref.WeakKeyDictionary()
_registries_lock = threading.Lock()


def instrument(lb: BalancerBase, registry: CollectorRegistry | None = None) -> BalancerCollector:
    """Export ``lb``'s metrics from ``registry`` (prometheus-client's default one if None).

    Balancers instrumented in one registry share one registered collector, so several balancers (of
    different services) export the same metric names without a clash. Instrumenting a balancer twice
    in a registry returns the same collector. Raises ConfigError if another collector already exports
    ``lbkit_*`` names from ``registry``.
    """
    if not isinstance(lb, BalancerBase):
        raise ConfigError(f"instrument: expected an lbkit Balancer, got {lb!r}")
    target = REGISTRY if registry is None else registry
    with _registries_lock:
        shared = _registries.get(target)
        if shared is None:
            shared = _RegistryCollector()
            try:
                target.register(shared)
            except ValueError as exc:
                raise ConfigError(
                    f"instrument: the registry already has a collector exporting lbkit metrics ({exc}); "
                    "register balancers only through lbkit.metrics.instrument"
                ) from None
            _registries[target] = shared
    return shared.add(lb)


def start_http_server(
    port: int = 0, addr: str = "127.0.0.1", registry: CollectorRegistry | None = None
) -> tuple[WSGIServer, int]:
    """Serve ``registry`` (the default one if None) over HTTP in a daemon thread; (server, bound port).

    Port 0 picks a free port. Stop it with ``server.shutdown()`` then ``server.server_close()``.
    """
    target = REGISTRY if registry is None else registry
    server, _thread = _prometheus_start_http_server(port, addr=addr, registry=target)
    return server, int(server.server_port)

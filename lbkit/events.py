"""State changes of endpoints and balancers, as events that metrics and logs see.

Each event carries a typed :class:`Cause` (what made it happen, for code and metric labels) and a
``reason`` (the same in words, with figures, for people). Code decides from the cause, never from the
reason's text.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

__all__ = ["KIND_CAUSES", "Cause", "Event", "EventKind"]


class EventKind(str, enum.Enum):
    """What happened."""

    ADDED = "added"
    """Discovery reported a new endpoint."""
    REMOVED = "removed"
    """Discovery dropped an endpoint (or put it in maintenance); its channel drains."""
    READY = "ready"
    """The endpoint's channel became READY."""
    NOT_READY = "not_ready"
    """The endpoint's channel left READY (TRANSIENT_FAILURE, IDLE, SHUTDOWN)."""
    HEALTHY = "healthy"
    """A health source reports the endpoint healthy again."""
    UNHEALTHY = "unhealthy"
    """A health source reports the endpoint unhealthy (NOT_SERVING, SERVICE_UNKNOWN, Consul critical)."""
    EJECTED = "ejected"
    """Outlier detection ejected the endpoint."""
    RETURNED = "returned"
    """An ejected endpoint's ejection time passed."""
    PANIC_START = "panic_start"
    """Too few endpoints are healthy: balancing over all of them."""
    PANIC_END = "panic_end"
    """Enough endpoints are healthy again."""
    DISCOVERY_ERROR = "discovery_error"
    """Discovery started failing; the last good endpoint set stays in force."""
    DISCOVERY_RECOVERED = "discovery_recovered"
    """Discovery answers again after failing."""


class Cause(str, enum.Enum):
    """Why an event happened: a fixed set, used as a metric label and for decisions in code.

    :data:`KIND_CAUSES` says which causes each :class:`EventKind` carries.
    """

    DISCOVERED = "discovered"
    """Discovery lists the endpoint (ADDED)."""
    DISCOVERY_REMOVED = "discovery_removed"
    """Discovery no longer lists the endpoint (REMOVED)."""
    SUBSET_WIDENED = "subset_widened"
    """An endpoint of the balancer's subset is down: the next in the subset's order joins (ADDED)."""
    SUBSET_LEFT = "subset_left"
    """Still discovered, but no longer in the subset: it narrowed back after a recovery, or the endpoint
    set changed which endpoints it holds (REMOVED)."""
    MAINTENANCE = "maintenance"
    """The endpoint's service or node is in Consul maintenance mode: drained as if removed (REMOVED)."""
    CHANNEL_STATE = "channel_state"
    """The endpoint's channel changed connectivity state (READY, NOT_READY)."""
    HEALTH_SERVING = "health_serving"
    """``grpc.health.v1`` answered SERVING (HEALTHY)."""
    HEALTH_NOT_SERVING = "health_not_serving"
    """``grpc.health.v1`` answered NOT_SERVING (UNHEALTHY)."""
    HEALTH_SERVICE_UNKNOWN = "health_service_unknown"
    """``grpc.health.v1`` does not know the service: SERVICE_UNKNOWN, or ``Check`` NOT_FOUND (UNHEALTHY)."""
    HEALTH_UNKNOWN = "health_unknown"
    """``grpc.health.v1`` answered UNKNOWN, or a status the protocol does not name (UNHEALTHY)."""
    HEALTH_UNIMPLEMENTED = "health_unimplemented"
    """The server has no health service; ``HealthCheck.unimplemented`` says what that means (either kind)."""
    CONSUL_PASSING = "consul_passing"
    """Consul's checks of the instance pass again (HEALTHY)."""
    CONSUL_CRITICAL = "consul_critical"
    """A Consul check of the instance (or of its node) is critical (UNHEALTHY)."""
    CONSECUTIVE_FAILURES = "consecutive_failures"
    """A streak of failed calls (EJECTED)."""
    SUCCESS_RATE = "success_rate"
    """Success rate below the peers' mean by more than the allowed deviations (EJECTED)."""
    FAILURE_PERCENTAGE = "failure_percentage"
    """Failure percentage at or above the threshold (EJECTED)."""
    EJECTION_ENDED = "ejection_ended"
    """The ejection time passed (RETURNED)."""
    PANIC_THRESHOLD = "panic_threshold"
    """The share of healthy endpoints crossed the panic threshold (PANIC_START, PANIC_END)."""
    DISCOVERY_FAILED = "discovery_failed"
    """A discovery query failed (DISCOVERY_ERROR)."""
    DISCOVERY_ANSWERED = "discovery_answered"
    """A discovery query answered again (DISCOVERY_RECOVERED)."""


KIND_CAUSES: Mapping[EventKind, tuple[Cause, ...]] = MappingProxyType(
    {
        EventKind.ADDED: (Cause.DISCOVERED, Cause.SUBSET_WIDENED),
        EventKind.REMOVED: (Cause.DISCOVERY_REMOVED, Cause.MAINTENANCE, Cause.SUBSET_LEFT),
        EventKind.READY: (Cause.CHANNEL_STATE,),
        EventKind.NOT_READY: (Cause.CHANNEL_STATE,),
        EventKind.HEALTHY: (Cause.HEALTH_SERVING, Cause.HEALTH_UNIMPLEMENTED, Cause.CONSUL_PASSING),
        EventKind.UNHEALTHY: (
            Cause.HEALTH_NOT_SERVING,
            Cause.HEALTH_SERVICE_UNKNOWN,
            Cause.HEALTH_UNKNOWN,
            Cause.HEALTH_UNIMPLEMENTED,
            Cause.CONSUL_CRITICAL,
        ),
        EventKind.EJECTED: (Cause.CONSECUTIVE_FAILURES, Cause.SUCCESS_RATE, Cause.FAILURE_PERCENTAGE),
        EventKind.RETURNED: (Cause.EJECTION_ENDED,),
        EventKind.PANIC_START: (Cause.PANIC_THRESHOLD,),
        EventKind.PANIC_END: (Cause.PANIC_THRESHOLD,),
        EventKind.DISCOVERY_ERROR: (Cause.DISCOVERY_FAILED,),
        EventKind.DISCOVERY_RECOVERED: (Cause.DISCOVERY_ANSWERED,),
    }
)
"""The causes each kind of event carries (the ``cause`` label values of ``lbkit_events_total``)."""


@dataclass(frozen=True, slots=True)
class Event:
    """One state change: its kind, the endpoint address ("" for balancer-wide ones), why in words, when
    (the balancer's clock), and why as a typed :class:`Cause`."""

    kind: EventKind
    address: str
    reason: str
    """For people: the cause with its figures ("5 consecutive failures; ejected for 31.2s")."""
    time: float
    cause: Cause
    """For code and metrics: one of ``KIND_CAUSES[kind]``."""

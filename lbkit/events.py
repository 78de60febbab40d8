"""State changes of endpoints and balancers, as events that metrics and logs see."""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Event", "EventKind"]


class EventKind(str, enum.Enum):
    """What happened."""

    ADDED = "added"
    """Discovery reported a new endpoint."""
    REMOVED = "removed"
    """Discovery dropped an endpoint; its channel drains."""
    READY = "ready"
    """The endpoint's channel became READY."""
    NOT_READY = "not_ready"
    """The endpoint's channel left READY (TRANSIENT_FAILURE, IDLE, SHUTDOWN)."""
    HEALTHY = "healthy"
    """The active health check reported SERVING."""
    UNHEALTHY = "unhealthy"
    """The active health check reported NOT_SERVING or SERVICE_UNKNOWN."""
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


@dataclass(frozen=True, slots=True)
class Event:
    """One state change: its kind, the endpoint address ("" for balancer-wide ones), why, and when."""

    kind: EventKind
    address: str
    reason: str
    time: float

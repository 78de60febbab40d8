"""The Discovery interface: a source of endpoint-set snapshots."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

from lbkit.endpoint import EndpointSet
from lbkit.errors import DiscoveryError

__all__ = ["Discovery", "DiscoveryStatus", "OnUpdate"]

OnUpdate = Callable[[EndpointSet], None]


@dataclass
class DiscoveryStatus:
    """What a discovery source last did, for metrics and logs (times from ``time.monotonic``)."""

    updates: int = 0
    """Endpoint sets published."""
    errors: int = 0
    """Failed queries, in all."""
    consecutive_errors: int = 0
    """Failed queries since the last good answer; above 0 the published set is stale."""
    last_success: float | None = None
    """When the last good answer came."""
    last_error: str = ""
    """The last failure, as text (never holding a token)."""
    error: DiscoveryError | None = None
    """The failure in force: set by each failed query, None again at the next good answer."""
    stopped: str = ""
    """Why the discovery loop ended for good (empty while it runs): no endpoint set will follow."""
    last_contact: float | None = None
    """Seconds since the answering server last heard from its leader (Consul's ``X-Consul-LastContact``:
    0 from the leader, more for a stale read), at the last good answer; None if not told."""
    known_leader: bool | None = None
    """Whether the answering server knew a leader (``X-Consul-KnownLeader``); None if not told."""
    cache_hit: bool | None = None
    """Whether the last answer came from the agent's cache (``X-Cache``); None for uncached reads."""
    cache_age: float | None = None
    """Age in seconds of the cached answer (``Age``), for a cache hit."""
    datacenter: str | None = None
    """The datacenter whose endpoints are in force ("" the agent's own), for sources that fail over."""
    listeners: list[Callable[[DiscoveryStatus], None]] = field(
        default_factory=list, repr=False, compare=False
    )
    """Called when an outage starts (the first failed query) and when it ends (the next good answer)."""

    def failed(self, text: str, *, status: int = 0, cause: BaseException | None = None) -> None:
        """Record a failed query (``text`` must hold no secret; ``status``: the HTTP status, 0 if none;
        ``cause``: the transport error, chained to :attr:`error`); tell listeners if an outage starts."""
        error = DiscoveryError(text, status=status)
        error.__cause__ = cause
        self.error = error
        self.errors += 1
        self.consecutive_errors += 1
        self.last_error = text
        if self.consecutive_errors == 1:
            self._notify()

    def died(self, text: str, cause: BaseException) -> None:
        """Record that the loop ended, raising ``cause`` (``text`` must hold no secret); tell listeners.

        :attr:`error` stays set from then on: no good answer will follow."""
        error = DiscoveryError(text)
        error.__cause__ = cause
        self.error = error
        self.errors += 1
        self.consecutive_errors += 1
        self.last_error = text
        self.stopped = text
        self._notify()

    def succeeded(self, now: float) -> None:
        """Record a good answer at ``now``; tell listeners if it ends an outage."""
        was_stale = self.consecutive_errors > 0
        self.consecutive_errors = 0
        self.error = None
        self.last_success = now
        if was_stale:
            self._notify()

    def _notify(self) -> None:
        for listener in list(self.listeners):
            listener(self)

    @property
    def stale(self) -> bool:
        """Whether the last query failed, so the set in force may be out of date."""
        return self.consecutive_errors > 0


class Discovery(ABC):
    """A source of :class:`EndpointSet` snapshots for one service.

    A source never publishes an empty set because it failed: it keeps the last good one and retries.
    The sync balancer runs :meth:`run` in a thread of its own; the asyncio one awaits :meth:`arun`.
    """

    service: str
    """The service's name, used in errors, logs and metric labels."""

    local_zone: str = ""
    """This client's zone as the source knows it ("" unknown), for zone-aware routing: ConsulDiscovery
    takes it from its ``zone`` option, ``CONSUL_ZONE`` or the local agent's node metadata. Known once the
    first endpoint set is published."""

    status: DiscoveryStatus

    @abstractmethod
    def run(self, on_update: OnUpdate, stop: threading.Event) -> None:
        """Call ``on_update`` with each new endpoint set until ``stop`` is set; then return promptly."""

    @abstractmethod
    async def arun(self, on_update: OnUpdate) -> None:
        """Call ``on_update`` with each new endpoint set until cancelled."""

"""A fixed list of endpoints."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterable

from lbkit.discovery.base import Discovery, DiscoveryStatus, OnUpdate
from lbkit.endpoint import Endpoint, EndpointSet
from lbkit.errors import ConfigError

__all__ = ["StaticDiscovery"]


class StaticDiscovery(Discovery):
    """A fixed, non-empty list of endpoints (``Endpoint`` objects or ``host:port`` strings).

    :meth:`update` replaces the list while a balancer runs (an empty list is allowed there: it empties
    the balancer).
    """

    def __init__(self, endpoints: Iterable[Endpoint | str], *, service: str = "static") -> None:
        if isinstance(endpoints, (str, bytes)):
            raise ConfigError(f"StaticDiscovery: expected a list of endpoints, got the str {endpoints!r}")
        self._set = EndpointSet(endpoints, version=1)
        if not self._set:
            raise ConfigError("StaticDiscovery: the endpoint list is empty")
        if not isinstance(service, str) or not service:
            raise ConfigError(f"StaticDiscovery: service must be a non-empty str, got {service!r}")
        self.service = service
        self.status = DiscoveryStatus()
        self._listeners: list[OnUpdate] = []
        self._lock = threading.Lock()

    @property
    def endpoints(self) -> EndpointSet:
        """The current set."""
        return self._set

    def update(self, endpoints: Iterable[Endpoint | str]) -> None:
        """Replace the endpoint list and tell every running balancer."""
        with self._lock:
            self._set = EndpointSet(endpoints, version=self._set.version + 1)
            listeners = list(self._listeners)
        for listener in listeners:
            self._publish(listener)

    def _publish(self, on_update: OnUpdate) -> None:
        self.status.updates += 1
        self.status.last_success = time.monotonic()
        on_update(self._set)

    def run(self, on_update: OnUpdate, stop: threading.Event) -> None:
        """Publish the list, then any :meth:`update`, until ``stop`` is set."""
        with self._lock:
            self._listeners.append(on_update)
        try:
            self._publish(on_update)
            stop.wait()
        finally:
            with self._lock:
                self._listeners.remove(on_update)

    async def arun(self, on_update: OnUpdate) -> None:
        """Publish the list, then any :meth:`update`, until cancelled."""
        with self._lock:
            self._listeners.append(on_update)
        try:
            self._publish(on_update)
            await asyncio.Event().wait()
        finally:
            with self._lock:
                self._listeners.remove(on_update)

    def __repr__(self) -> str:
        return f"StaticDiscovery({[e.address for e in self._set]!r})"

"""The Selector and Picker interface every policy implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import ClassVar, Protocol, runtime_checkable

from lbkit.endpoint import Endpoint, EndpointSet
from lbkit.errors import NoEndpointsError
from lbkit.stats import Stats

__all__ = ["EmptyPicker", "Key", "Picker", "RefreshingPicker", "Selector", "refreshing"]

Key = str | bytes | None


@runtime_checkable
class Picker(Protocol):
    """An immutable snapshot that chooses an endpoint per call. Never blocks; safe from any thread."""

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """The endpoints this picker chooses from."""
        ...

    def pick(self, key: Key = None) -> Endpoint:
        """Choose an endpoint; ``key`` matters only to key-aware policies."""
        ...


@runtime_checkable
class RefreshingPicker(Picker, Protocol):
    """A picker with work to do over time (weighted round robin recomputing its weights): the balancer's
    timer calls :meth:`refresh` when :meth:`next_refresh` is due, never a pick."""

    def next_refresh(self) -> float:
        """When :meth:`refresh` next has work, on the stats' clock (``math.inf``: never)."""
        ...

    def refresh(self, now: float | None = None) -> None:
        """Do the work due at ``now`` (default: the stats' clock); safe from any thread, alongside picks."""
        ...


def refreshing(picker: Picker) -> RefreshingPicker | None:
    """``picker`` if it has timed work (see :class:`RefreshingPicker`), else None."""
    return picker if callable(getattr(picker, "next_refresh", None)) else None  # type: ignore[return-value]


class EmptyPicker:
    """A picker over nothing: every pick raises :class:`NoEndpointsError`."""

    __slots__ = ("_reason",)

    def __init__(self, reason: str = "no endpoints") -> None:
        self._reason = reason

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """Always empty."""
        return ()

    def pick(self, key: Key = None) -> Endpoint:
        """Raise :class:`NoEndpointsError`."""
        raise NoEndpointsError(self._reason)


class Selector(ABC):
    """A load-balancing policy: ``build(endpoints, stats) -> Picker``.

    Subclasses are frozen option classes and implement :meth:`_build` over a non-empty tuple of
    endpoints with distinct addresses.
    """

    name: ClassVar[str]
    """The policy's name, as accepted by ``Balancer(selector=...)``."""

    uses_stats: ClassVar[bool] = False
    """Whether picks read live stats (in-flight, latency); such pickers need no rebuild when stats change."""

    slow_start: ClassVar[bool] = False
    """Whether the policy honours ``EndpointStats.weight_factor`` (slow start)."""

    uses_key: ClassVar[bool] = False
    """Whether picks read the call's key; the call path extracts keys only for such policies."""

    uses_load_reports: ClassVar[bool] = False
    """Whether the policy reads servers' ORCA load reports (``EndpointStats.load_*``); the call path reads
    the ``endpoint-load-metrics-bin`` trailer only for such policies."""

    def build(self, endpoints: Iterable[Endpoint | str] | EndpointSet, stats: Stats | None = None) -> Picker:
        """Return a picker over ``endpoints``; an empty input gives a picker that raises NoEndpointsError."""
        items = (
            endpoints.endpoints if isinstance(endpoints, EndpointSet) else EndpointSet(endpoints).endpoints
        )
        if not items:
            return EmptyPicker()
        return self._build(items, stats if stats is not None else Stats())

    @abstractmethod
    def _build(self, endpoints: tuple[Endpoint, ...], stats: Stats) -> Picker:
        """Build a picker over a non-empty tuple of endpoints with distinct addresses."""

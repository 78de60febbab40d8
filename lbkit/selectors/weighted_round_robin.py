"""Weighted round robin from the servers' own load reports (gRFC A58).

Each server attaches an ORCA load report to its responses (``endpoint-load-metrics-bin``, see
:mod:`lbkit.server`); the call path keeps each endpoint's latest, and the picker decodes it when it
recomputes the weights. An endpoint's weight is its capacity as its reports tell it::

    weight = qps / (utilization + eps / qps * error_utilization_penalty)

with ``utilization`` the report's application utilization if set, else its CPU utilization. A server
that answers 100 calls/s at 50 % utilization weighs 200; if its calls start taking twice as long, the
same 100 calls/s cost it 100 %, and its weight halves.

As in gRFC A58 (and grpc's C-core):

* a weight counts only after the endpoint has sent usable reports (utilization and qps above 0) for
  ``blackout_period`` seconds, counted from its first such report since it joined the picker or since
  its reports last expired (a report counts from the first update after it came);
* a weight expires ``weight_expiration_period`` seconds after the endpoint's last usable report;
* endpoints without a weight get the mean of the others'; with fewer than two weights, every endpoint
  gets the same (round robin);
* weights are clamped to [0.01, 10] times their mean, so no endpoint starves and none takes all;
* the picker recomputes the weights every ``weight_update_period`` seconds, in :meth:`refresh`, which the
  balancer's timer calls when :meth:`~WeightedRoundRobinPicker.next_refresh` is due (the asyncio balancer
  in a worker thread once the picker is large): never on a pick, so no call pays for an O(N) update
  (picks meanwhile use the current schedule). Shortly before (the last fifth of the period), a refresh
  asks each endpoint for its next report, so a call brings one (grpcio makes reading a sync call's
  trailers cost a few percent of the call: one per endpoint per update, not one per call). A picker
  used alone, outside a balancer, is refreshed by its owner the same way.

The schedule is :class:`~lbkit.selectors.weighted.AliasPicker`'s: a golden-ratio sequence through an
alias table, one O(1) lock-free step per pick at any N (a static-stride scheduler, as in C-core, skips
turns and costs up to max/mean steps per pick). ``Endpoint.weight`` is ignored; the slow-start
``weight_factor`` scales the computed weights.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from typing import ClassVar

from lbkit._config import check_float, config
from lbkit.endpoint import Endpoint
from lbkit.selectors.base import Key, Picker, Selector
from lbkit.selectors.weighted import AliasPicker, TablePicker
from lbkit.stats import EndpointStats, Stats

__all__ = ["MAX_RATIO", "MIN_RATIO", "WeightedRoundRobin", "WeightedRoundRobinPicker", "schedule_weights"]

MAX_RATIO = 10.0
"""No weight in a schedule exceeds this many times the mean of the endpoints' weights."""
MIN_RATIO = 0.01
"""No weight in a schedule falls below this share of the mean of the endpoints' weights."""

_INF = math.inf
_WANT_AHEAD = 0.2
"""Share of the update period before an update when the picker asks each endpoint for its next report, so
that the update reads fresh reports: one report per endpoint per update, not one per call."""


def schedule_weights(weights: Sequence[float]) -> list[float] | None:
    """The weights a schedule uses for ``weights`` (0 meaning none known): unknown ones get the mean of the
    known, all are clamped to [MIN_RATIO, MAX_RATIO] times it; None (round robin) if fewer than two are
    known."""
    known = [w for w in weights if w > 0.0]
    if len(known) < 2:
        return None
    mean = math.fsum(known) / len(known)
    low, high = mean * MIN_RATIO, mean * MAX_RATIO
    return [mean if w <= 0.0 else (low if w < low else high if w > high else w) for w in weights]


class WeightedRoundRobinPicker:
    """Picks in proportion to weights from load reports, recomputed every ``weight_update_period`` by
    :meth:`refresh`.

    Its endpoints never change; its schedule is replaced (one attribute assignment) when the weights are
    recomputed. Picks never block and never recompute.
    """

    __slots__ = (
        "_clock",
        "_endpoints",
        "_lock",
        "_next",
        "_pick",
        "_policy",
        "_rows",
        "_want",
        "_weights",
    )

    def __init__(self, policy: WeightedRoundRobin, endpoints: tuple[Endpoint, ...], stats: Stats) -> None:
        self._policy = policy
        self._endpoints = endpoints
        self._rows: tuple[EndpointStats, ...] = tuple(stats[e.address] for e in endpoints)
        self._clock: Callable[[], float] = stats.clock
        self._lock = threading.Lock()
        self._weights: tuple[float, ...] = ()
        self._pick: Callable[[], Endpoint] = lambda: endpoints[0]
        self._next = -_INF
        self._want = -_INF
        self._refresh(self._clock())

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """The endpoints this picker chooses from."""
        return self._endpoints

    @property
    def weights(self) -> tuple[float, ...]:
        """Each endpoint's weight in the current schedule (its share is its weight over their sum)."""
        return self._weights

    def pick(self, key: Key = None) -> Endpoint:
        """The next endpoint of the weighted schedule; ``key`` is ignored."""
        return self._pick()

    def next_refresh(self) -> float:
        """When :meth:`refresh` next has work (clock time): asking for reports, or recomputing the weights."""
        return self._want if self._want < self._next else self._next

    def refresh(self, now: float | None = None) -> None:
        """Do what is due at ``now`` (default: the stats' clock): recompute the weights once
        ``weight_update_period`` has passed since the last time, or, in the last fifth of the period, ask
        each endpoint for its next load report. Safe from any thread, alongside picks."""
        with self._lock:
            if now is None:
                now = self._clock()
            if now >= self._next:
                self._refresh(now)
            elif now >= self._want:
                self._want = self._next  # once per update: each endpoint's next call brings a report
                for st in self._rows:
                    st.load_wanted = True

    def _report_weights(self, now: float) -> list[float]:
        """Each endpoint's weight from its reports as of ``now`` (0: none usable, in blackout or expired),
        reading each endpoint's latest report and restarting the runs of those expired."""
        policy = self._policy
        blackout = policy.blackout_period
        expiration = policy.weight_expiration_period
        penalty = policy.error_utilization_penalty
        out = []
        for st in self._rows:
            st.take_load_report()
            if now - st.load_updated >= expiration:
                if st.load_usable_since != _INF:
                    st.restart_load_reports()
                out.append(0.0)
            elif blackout > 0.0 and now - st.load_usable_since < blackout:
                out.append(0.0)
            else:
                qps = st.load_qps
                out.append(qps / (st.load_utilization + st.load_eps / qps * penalty))
        return out

    def _refresh(self, now: float) -> None:
        period = self._policy.weight_update_period
        self._next = now + period
        self._want = now + period * (1.0 - _WANT_AHEAD)
        endpoints = self._endpoints
        factors = [st.weight_factor for st in self._rows]
        weights = schedule_weights(self._report_weights(now))
        if weights is None:
            weights = [1.0] * len(endpoints)
        if any(f < 1.0 for f in factors):
            weights = [w * max(f, 1e-9) for w, f in zip(weights, factors, strict=True)]
        new = tuple(weights)
        if new == self._weights:
            return
        self._weights = new
        if len(set(new)) == 1:
            self._pick = TablePicker(endpoints, endpoints).pick
        else:
            self._pick = AliasPicker(endpoints, new).pick

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self._endpoints)} endpoints)"


@config
class WeightedRoundRobin(Selector):
    """Weighted round robin with weights from the servers' ORCA load reports (gRFC A58).

    Servers attach reports with :mod:`lbkit.server`; without reports it is round robin. Periods are in
    seconds.
    """

    name: ClassVar[str] = "weighted_round_robin"
    slow_start: ClassVar[bool] = True
    uses_load_reports: ClassVar[bool] = True

    blackout_period: float = 10.0
    """How long an endpoint must have sent usable reports before its weight counts (0: at once)."""
    weight_expiration_period: float = 180.0
    """How long after its last usable report an endpoint's weight stops counting."""
    weight_update_period: float = 1.0
    """How often the picker recomputes the weights; at least 0.1."""
    error_utilization_penalty: float = 1.0
    """How much the error rate (eps / qps) adds to the utilization; 0 ignores errors."""

    def __post_init__(self) -> None:
        o = "WeightedRoundRobin"
        check_float(o, "blackout_period", self.blackout_period, minimum=0.0)
        check_float(
            o, "weight_expiration_period", self.weight_expiration_period, minimum=0.0, strict_min=True
        )
        check_float(o, "weight_update_period", self.weight_update_period, minimum=0.1)
        check_float(o, "error_utilization_penalty", self.error_utilization_penalty, minimum=0.0)

    def _build(self, endpoints: tuple[Endpoint, ...], stats: Stats) -> Picker:
        before = stats.load_members
        for e in endpoints:
            if e.address not in before:
                stats[e.address].restart_load_reports()
        stats.load_members = frozenset(e.address for e in endpoints)
        return WeightedRoundRobinPicker(self, endpoints, stats)

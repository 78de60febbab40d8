"""Per-endpoint call statistics: in-flight count, peak-EWMA latency, outcomes, the latest load report.

The balancer owns one :class:`Stats` for its lifetime; pickers read it and the call path
writes it through :meth:`EndpointStats.start` and :meth:`EndpointStats.finish`. Entries
survive picker rebuilds.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator

from lbkit._config import check_float
from lbkit.errors import ConfigError
from lbkit.orca import LoadReport, decode

__all__ = ["DEFAULT_DECAY", "LATENCY_BUCKETS", "EndpointStats", "Stats"]

log = logging.getLogger("lbkit")

DEFAULT_DECAY = 10.0
"""Seconds of the peak-EWMA decay window, as in Finagle and Linkerd."""

LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
    30.0,
    60.0,
)
"""Upper bounds (seconds, inclusive) of the call-latency histogram's buckets; one more holds the rest."""

_SLOT = len(LATENCY_BUCKETS) + 1
"""Counts of one endpoint's latency histogram."""


class EndpointStats:
    """Counters for one endpoint. Fields are read without a lock; writes hold the group's lock."""

    __slots__ = (
        "_base",
        "_counts",
        "_group",
        "_load_report",
        "_load_taken",
        "address",
        "consecutive_failures",
        "discarded",
        "ewma",
        "ewma_stamp",
        "failures",
        "in_flight",
        "interval_failures",
        "interval_successes",
        "latency_sum",
        "load_eps",
        "load_qps",
        "load_raw",
        "load_reports",
        "load_reports_malformed",
        "load_updated",
        "load_usable_since",
        "load_utilization",
        "load_wanted",
        "successes",
        "weight_factor",
    )

    def __init__(self, address: str, group: Stats) -> None:
        """Made by ``group`` (:meth:`Stats.__getitem__`), under its lock."""
        self.address = address
        self._group = group
        self.in_flight = 0
        """Calls started and not yet finished."""
        self.discarded = False
        """The group forgot this entry (:meth:`Stats.discard`): its calls no longer count in the group's
        ``total_in_flight``, even those that finish late."""
        self.successes = 0
        """Calls finished ok, since the entry was made."""
        self.failures = 0
        """Calls finished failed, since the entry was made."""
        self.consecutive_failures = 0
        """Failures since the last success."""
        self.interval_successes = 0
        """Successes since the outlier detector last took the interval's counts."""
        self.interval_failures = 0
        """Failures since the outlier detector last took the interval's counts."""
        self.weight_factor = 1.0
        """Share of its full weight the endpoint gets now, in (0, 1]; below 1 during slow start."""
        self._counts, self._base = group._latency_slot()
        """The histogram's counts: ``_counts[_base:_base + _SLOT]``, a slot of the group's one list (a list
        per endpoint would be one more object for CPython's collector to walk); a list of its own once
        the group discarded the entry."""
        self.latency_sum = 0.0
        """Seconds of latency over the calls counted in ``latency_buckets``."""
        self.ewma = 0.0
        """Peak-EWMA latency in seconds as of ``ewma_stamp``; :meth:`latency` decays it to now."""
        self.ewma_stamp = group.clock()
        """When ``ewma`` was last updated (``clock`` time)."""
        self.load_raw: object = None
        """The ORCA load-report trailer of the endpoint's latest call, as received (set by the call path for
        selectors that use load reports, see :attr:`lbkit.Selector.uses_load_reports`); read lazily."""
        self.load_wanted = True
        """Whether a reader wants the endpoint's next load report: the call path asks grpc for a call's
        trailers only while this is set, and clears it. Readers set it: :attr:`load_report` does, and
        weighted round robin shortly before each weight update."""
        self._load_taken: object = None
        self._load_report: LoadReport | None = None
        self.load_reports = 0
        """Well-formed load reports read (each call's latest report, when a reader asks: at most one per
        weight update of weighted round robin)."""
        self.load_reports_malformed = 0
        """Malformed load reports read (ignored)."""
        self.load_qps = 0.0
        """Queries per second of the latest usable report (one with utilization and qps above 0)."""
        self.load_eps = 0.0
        """Errors per second of the latest usable report."""
        self.load_utilization = 0.0
        """Utilization of the latest usable report: its application utilization if set, else its CPU's."""
        self.load_updated = -math.inf
        """When the latest usable report came (``clock`` time); -inf before any."""
        self.load_usable_since = math.inf
        """When the current run of usable reports began (gRFC A58's ``non_empty_since``); +inf when no run
        has begun since :meth:`restart_load_reports`."""

    def start(self) -> float:
        """Count a call as in flight; return its start time for :meth:`finish`."""
        group = self._group
        with group.lock:
            self.in_flight += 1
            if not self.discarded:
                group.total_in_flight += 1
        return group.clock()

    def finish(self, started: float, ok: bool | None, *, observe_latency: bool = True) -> None:
        """End a call begun at ``started``: drop it from in-flight, record its outcome and latency.

        ``ok`` None: a neutral end (the call never left the client, or the client cancelled it), counted
        neither as a success nor as a failure.
        """
        group = self._group
        now = group.clock()
        streak = False
        with group.lock:
            self.in_flight -= 1
            if not self.discarded:
                group.total_in_flight -= 1
            if ok:
                self.successes += 1
                self.interval_successes += 1
                self.consecutive_failures = 0
            elif ok is not None:
                self.failures += 1
                self.interval_failures += 1
                self.consecutive_failures += 1
                streak = self.consecutive_failures == group.streak_threshold
            if observe_latency:
                rtt = now - started if now > started else 0.0
                # Peak EWMA (as _observe, inlined on this per-call path).
                if rtt > self.ewma:
                    self.ewma = rtt
                else:
                    w = math.exp(-max(now - self.ewma_stamp, 0.0) / group.decay)
                    self.ewma = self.ewma * w + rtt * (1.0 - w)
                self.ewma_stamp = now
                self._counts[self._base + bisect_left(LATENCY_BUCKETS, rtt)] += 1
                self.latency_sum += rtt
        if ok is False and group.on_failure is not None:
            group.on_failure(self)
        if streak and group.on_failure_streak is not None:
            group.on_failure_streak(self)

    def observe(self, rtt: float) -> None:
        """Fold one round-trip time (seconds) into the peak-EWMA latency."""
        group = self._group
        now = group.clock()
        with group.lock:
            self._observe(rtt, now)

    def _observe(self, rtt: float, now: float) -> None:
        # Finagle's peak EWMA: jump to a higher sample at once, decay towards lower ones.
        if rtt > self.ewma:
            self.ewma = rtt
        else:
            w = math.exp(-max(now - self.ewma_stamp, 0.0) / self._group.decay)
            self.ewma = self.ewma * w + rtt * (1.0 - w)
        self.ewma_stamp = now

    def latency(self, now: float | None = None) -> float:
        """Peak-EWMA latency in seconds, decayed to ``now``; 0.0 before any sample."""
        if now is None:
            now = self._group.clock()
        return self.ewma * math.exp(-max(now - self.ewma_stamp, 0.0) / self._group.decay)

    @property
    def load_report(self) -> LoadReport | None:
        """The latest well-formed load report the endpoint sent, decoded now if new; None before any.

        Reading it asks for the next one (:attr:`load_wanted`), which the endpoint's next call brings.
        """
        self.take_load_report()
        self.load_wanted = True
        return self._load_report

    def take_load_report(self) -> None:
        """Decode the latest report if it is new and bring the ``load_*`` figures up to date.

        The call path only keeps a call's raw trailer (:attr:`load_raw`), and only when a reader wants one
        (:attr:`load_wanted`); decoding waits for the reader. So a client reads and decodes about one
        report per endpoint per look (weighted round robin looks once per weight update), not one per
        call. A malformed report is counted in :attr:`load_reports_malformed` and logged once per
        endpoint; it changes nothing else.
        """
        group = self._group
        with group.lock:
            raw = self.load_raw
            if raw is self._load_taken:
                return
            self._load_taken = raw
        try:
            report = decode(raw)  # type: ignore[arg-type]  # decode checks the type
        except ConfigError as err:
            with group.lock:
                self.load_reports_malformed += 1
                first = self.load_reports_malformed == 1
            if first:
                log.warning(
                    "lbkit: %s sent a malformed load report (%s); ignoring it "
                    "(logged once per endpoint, counted in lbkit_endpoint_load_reports)",
                    self.address,
                    err,
                )
            return
        self.record_load(report)

    def record_load(self, report: LoadReport) -> None:
        """Take a well-formed load report as the endpoint's latest (gRFC A58: one with utilization and qps
        above 0 is usable, and begins a run of usable reports if none is running)."""
        group = self._group
        now = group.clock()
        utilization = report.application_utilization or report.cpu_utilization
        qps = report.qps
        with group.lock:
            self._load_report = report
            self.load_reports += 1
            if utilization > 0.0 and qps > 0.0:
                self.load_utilization = utilization
                self.load_qps = qps
                self.load_eps = report.eps
                self.load_updated = now
                if self.load_usable_since == math.inf:
                    self.load_usable_since = now

    def restart_load_reports(self) -> None:
        """Begin a new run of usable reports: the endpoint (re)joined, or its reports expired (gRFC A58)."""
        with self._group.lock:
            self.load_usable_since = math.inf

    @property
    def latency_buckets(self) -> list[int]:
        """Finished calls by latency: entry i counts those in (LATENCY_BUCKETS[i-1], LATENCY_BUCKETS[i]],
        the last those above every bound (not cumulative). A copy; read it under the group's lock, or
        use :meth:`latency_histogram`, for one consistent with ``latency_sum``."""
        base = self._base
        return self._counts[base : base + _SLOT]

    def latency_histogram(self) -> tuple[tuple[int, ...], float]:
        """A consistent copy of (``latency_buckets``, ``latency_sum``): calls finished with a latency.

        ``observe`` samples (not calls) are left out, as are calls finished with ``observe_latency=False``.
        """
        with self._group.lock:
            return tuple(self.latency_buckets), self.latency_sum

    def take_interval(self) -> tuple[int, int]:
        """Return and reset (successes, failures) since the last call, for the outlier detector."""
        with self._group.lock:
            counts = (self.interval_successes, self.interval_failures)
            self.interval_successes = 0
            self.interval_failures = 0
        return counts

    def __repr__(self) -> str:
        return (
            f"EndpointStats({self.address!r}, in_flight={self.in_flight}, "
            f"latency={self.latency() * 1e3:.2f}ms, ok={self.successes}, failed={self.failures})"
        )


class Stats:
    """The per-endpoint statistics of one balancer (or of a selector used alone).

    ``clock`` returns seconds (monotonic); ``decay`` is the peak-EWMA window in seconds.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, decay: float = DEFAULT_DECAY) -> None:
        self.clock = clock
        self.decay = check_float("Stats", "decay", decay, minimum=0.0, strict_min=True)
        self.lock = threading.Lock()
        self.total_in_flight = 0
        """Calls in flight over all endpoints."""
        self.streak_threshold = 0
        """Consecutive failures at which ``on_failure_streak`` fires (0: never)."""
        self.on_failure_streak: Callable[[EndpointStats], None] | None = None
        self.load_members: frozenset[str] = frozenset()
        """Addresses in the last picker built from load reports: one that joins begins a new run of reports
        (:meth:`EndpointStats.restart_load_reports`), as gRFC A58 asks of an endpoint that turns READY."""
        self.on_failure: Callable[[EndpointStats], None] | None = None
        """Called after each failed call (the sync balancer then looks at the endpoint's channel at once)."""
        self._entries: dict[str, EndpointStats] = {}
        self._latency_counts: list[int] = []
        """The latency histograms of every entry, one slot of ``_SLOT`` counts each."""
        self._free_slots: list[int] = []
        """Offsets of the slots of discarded entries, for the next entries."""

    def _latency_slot(self) -> tuple[list[int], int]:
        """A zeroed slot for a new entry's latency histogram: (the list, its offset); under the lock."""
        counts = self._latency_counts
        if self._free_slots:
            base = self._free_slots.pop()
            counts[base : base + _SLOT] = [0] * _SLOT
        else:
            base = len(counts)
            counts.extend([0] * _SLOT)
        return counts, base

    def __getitem__(self, address: str) -> EndpointStats:
        """The entry for ``address``, made on first use."""
        entry = self._entries.get(address)
        if entry is None:
            with self.lock:
                entry = self._entries.get(address)
                if entry is None:
                    entry = self._entries[address] = EndpointStats(address, self)
        return entry

    def get(self, address: str) -> EndpointStats | None:
        """The entry for ``address`` if there is one."""
        return self._entries.get(address)

    def discard(self, address: str) -> None:
        """Forget ``address`` (once its endpoint is gone and drained). Its calls still in flight leave
        ``total_in_flight`` now; when they finish later, they leave only the entry's own count."""
        with self.lock:
            entry = self._entries.pop(address, None)
            if entry is not None and not entry.discarded:
                entry.discarded = True
                self.total_in_flight -= entry.in_flight
                # Its histogram moves to a list of its own (calls finishing late still count there) and
                # its slot goes to the next entry.
                base = entry._base
                entry._counts, entry._base = self._latency_counts[base : base + _SLOT], 0
                self._free_slots.append(base)

    def __contains__(self, address: object) -> bool:
        return address in self._entries

    def __iter__(self) -> Iterator[EndpointStats]:
        return iter(list(self._entries.values()))

    def __len__(self) -> int:
        return len(self._entries)

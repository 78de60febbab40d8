"""The balancer's sans-I/O core: endpoint membership, readiness, health, ejection, panic, slow start.

No sockets, threads or ``await`` here. Drivers (``lbkit.Balancer``, ``lbkit.aio.Balancer``) feed it
endpoint sets, channel connectivity, health reports and the time; it answers with pool plans and
publishes a new immutable picker (one attribute assignment) after every change.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from lbkit.endpoint import Endpoint, EndpointHealth, EndpointSet
from lbkit.events import Cause, Event, EventKind
from lbkit.health.outlier import OutlierDetection, OutlierDetector
from lbkit.health.slow_start import SlowStart
from lbkit.selectors.base import EmptyPicker, Picker, RefreshingPicker, Selector, refreshing
from lbkit.stats import EndpointStats, Stats
from lbkit.subsetting import PreferenceOrder, Subsetting, widened
from lbkit.zones import ZonePlan, ZoneRouter, ZoneRouting

__all__ = ["BalancerCore", "EndpointState", "PickerBuild", "PoolPlan"]

log = logging.getLogger("lbkit")

EventListener = Callable[[Event], None]


@dataclass(frozen=True, slots=True)
class PoolPlan:
    """What the driver must do to its channel pool after an endpoint-set update."""

    open: tuple[Endpoint, ...]
    """Endpoints to open a channel to (or to keep, if one listed in ``close`` too is still draining)."""
    close: tuple[str, ...]
    """Addresses whose channel to drain and close (calls in flight finish first); done before ``open``."""

    def __bool__(self) -> bool:
        return bool(self.open or self.close)


class PickerBuild:
    """A picker build for the driver to run where it likes (off its event loop), then hand back to
    :meth:`BalancerCore.publish`. Calling it builds the picker from what the core chose when it made the
    build; it changes nothing of the core, so it may run in any thread."""

    __slots__ = ("_run", "seconds", "size")

    def __init__(self, run: Callable[[], Picker], size: int) -> None:
        self._run = run
        self.size = size
        """Endpoints the picker is built over."""
        self.seconds = 0.0
        """Seconds the build took (``perf_counter``), once called."""

    def __call__(self) -> Picker:
        started = time.perf_counter()
        try:
            return self._run()
        finally:
            self.seconds = time.perf_counter() - started


OFFLOAD_ABOVE = 0.002
"""Picker builds expected to take longer (seconds) go to :attr:`BalancerCore.offload` when a driver set it."""

OFFLOAD_UNMEASURED = 500
"""Before any build has been timed, builds over at least this many endpoints count as slow."""

PASS_MIN_MEMBERS = 100
"""A pass over fewer members never counts as slow: one that took milliseconds was preempted, not long."""


@dataclass(slots=True)
class EndpointState:
    """What the core knows of one endpoint."""

    endpoint: Endpoint
    ready: bool = False
    """The channel is READY."""
    failed: bool = False
    """The channel failed to connect (TRANSIENT_FAILURE) and has not been READY since."""
    healthy: bool = True
    """The active health check says SERVING (True when health checks are off)."""
    health_known: bool = True
    """The active health check has answered at least once (True when health checks are off)."""
    usable_since: float | None = None
    """When it last became eligible (ready, healthy, not ejected): the start of its slow start."""
    warm: bool = False
    """In the first endpoint set: no slow start until it has once dropped out (a pool that starts
    has nothing to ramp against)."""

    @property
    def state(self) -> str:
        """One word for metrics: ready, connecting, unhealthy (ejection is the core's to say)."""
        if not self.ready:
            return "connecting"
        if not (self.healthy and self.health_known) or self.endpoint.health is EndpointHealth.CRITICAL:
            return "unhealthy"
        return "ready"


class BalancerCore:
    """Membership and picker publication for one balancer. Thread-safe; every method is quick.

    ``picker`` is the current immutable picker; read it per call, never hold it.
    """

    def __init__(
        self,
        selector: Selector,
        *,
        service: str = "",
        outlier_detection: OutlierDetection | None = None,
        slow_start: SlowStart | None = None,
        panic_threshold: float = 50.0,
        health_checked: bool = False,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        stats: Stats | None = None,
        subsetting: Subsetting | None = None,
        zone: str | None = None,
        zone_routing: ZoneRouting | None = None,
    ) -> None:
        self.selector = selector
        self.subsetting = subsetting
        self.service = service
        self.clock = clock
        self.rng = rng or random.Random()
        self.stats = stats if stats is not None else Stats(clock=clock)
        self.panic_threshold = panic_threshold
        self.health_checked = health_checked
        self.slow_start = slow_start
        self.outlier: OutlierDetector | None = None
        if outlier_detection is not None:
            self.outlier = OutlierDetector(outlier_detection, self.stats, clock=clock, rng=self.rng)
            if outlier_detection.consecutive_failures:
                self.stats.streak_threshold = outlier_detection.consecutive_failures
                self.stats.on_failure_streak = self._on_failure_streak
        self.zones = ZoneRouter(zone, zone_routing, service=service, rng=self.rng.random)
        """The client's zone and the zone plan (zone-aware routing, :mod:`lbkit.zones`)."""
        self.picker: Picker = EmptyPicker(self._no_pick_reason_text([], 0))
        self.panic = False
        self.endpoint_set = EndpointSet()
        self.members: dict[str, EndpointState] = {}
        self.listeners: list[EventListener] = []
        self.on_picker: list[Callable[[], None]] = []
        """Called (outside the lock) after each new picker: drivers wake calls waiting for one."""
        self.on_deadline: list[Callable[[], None]] = []
        """Called (outside the lock) when :meth:`next_deadline` may have moved earlier."""
        self.on_pool: list[Callable[[], None]] = []
        """Called (outside the lock) when the subset widened or narrowed: :meth:`take_plan` has work."""
        self._preference = PreferenceOrder(subsetting) if subsetting is not None else None
        self._order: Sequence[Endpoint] = ()
        """The endpoint set, in the subsetting's order of preference if there is one."""
        self._plan_open: dict[str, Endpoint] = {}
        self._plan_close: dict[str, None] = {}
        self._plan_waiting = False
        self.rebuilds = 0
        self._lock = threading.RLock()
        self._pending: list[Event] = []
        self._ramping = False
        self._picker_changed = False
        self._deadline_moved = False
        self._dirty = False
        """A change is waiting for a rebuild (coalesced because rebuilds are slow)."""
        self._rebuild_cost = 0.0
        """Seconds the last picker build took, on ``clock`` (so a test's fake time decides coalescing, not
        the real cost of a build on a busy machine)."""
        self._last_rebuild = float("-inf")
        self.offload: Callable[[PickerBuild], None] | None = None
        """Set by a driver that runs slow picker builds elsewhere (the asyncio balancer, off its event
        loop): called (outside the lock) with each build expected to take over :data:`OFFLOAD_ABOVE`; the
        driver calls the build, then :meth:`publish` with the picker. One build runs at a time: changes
        meanwhile wait for it, and are built together after it."""
        self.offload_above = OFFLOAD_ABOVE
        """Seconds a build is expected to take above which it goes to ``offload``."""
        self._building: PickerBuild | None = None
        """The build handed to ``offload`` and not yet published."""
        self._to_offload: PickerBuild | None = None
        self._build_seconds = 0.0
        self._build_size = 0
        """Real seconds the last picker build took, and over how many endpoints (to judge the next)."""
        self.defer_passes = False
        """Set by a driver that runs :meth:`tick` and :meth:`set_endpoints` off its event loop when a pass
        over the members is slow (see :meth:`slow_pass`; the asyncio balancer): a change then never
        rebuilds inline, on the caller's thread, but marks the picker dirty for the next :meth:`tick`."""
        self.pass_min_members = PASS_MIN_MEMBERS
        """Passes over fewer members than this never count as slow (see :data:`PASS_MIN_MEMBERS`)."""
        self._pass_seconds = 0.0
        self._pass_size = 0
        """Real seconds the last pass over every member took (taking an endpoint set, with the rebuild it
        made inline; or a rebuild, but for a build handed to ``offload``), and over how many members."""
        self.dispatch: Callable[[list[Event]], None] | None = None
        """Set by a driver that delivers events elsewhere (the asyncio balancer, on its loop, in order):
        called outside the lock with each batch of events, which it hands to :meth:`deliver`."""

    # ----------------------------------------------------------------- inputs

    def set_endpoints(self, new: EndpointSet) -> PoolPlan:
        """Take a new endpoint set from discovery; return what to open and close."""
        with self._lock:
            started = time.perf_counter()
            self.endpoint_set = new
            self._order = (
                new.endpoints if self._preference is None else self._preference.update(new.by_address)
            )
            now = self.clock()
            if self._update_members(now, Cause.DISCOVERED, first=not self.members):
                self._changed(now)
            self._timed_pass(started)
            plan = self.take_plan()
        self._flush()
        return plan

    def set_ready(self, address: str, ready: bool, reason: str = "", *, failed: bool = False) -> None:
        """Record the connectivity of an endpoint's channel: READY or not, and ``failed`` when it is in
        TRANSIENT_FAILURE (which subsetting counts as down until the channel is READY again)."""
        with self._lock:
            m = self.members.get(address)
            if m is None:
                return
            newly_failed = failed and not ready and not m.failed
            if m.ready == ready and not newly_failed:
                return
            if ready:
                m.failed = False
            elif failed:
                m.failed = True
            now = self.clock()
            if m.ready != ready:
                m.ready = ready
                kind = EventKind.READY if ready else EventKind.NOT_READY
                text = reason or ("channel READY" if ready else "channel not READY")
                self._emit(kind, address, text, now, Cause.CHANNEL_STATE)
            elif self.subsetting is None:
                return  # a failure while not READY changes nothing but a subset
            self._changed(now)
        self._flush()

    def set_health(self, address: str, serving: bool, cause: Cause, reason: str = "") -> None:
        """Record a health answer for an endpoint: ``cause`` says which, ``reason`` in words."""
        with self._lock:
            m = self.members.get(address)
            if m is None or (m.health_known and m.healthy == serving):
                return
            first = not m.health_known
            m.health_known = True
            m.healthy = serving
            now = self.clock()
            if not (serving and first):  # a first answer of SERVING changes no state worth an event
                kind = EventKind.HEALTHY if serving else EventKind.UNHEALTHY
                self._emit(kind, address, reason or cause.value, now, cause)
            self._changed(now)
        self._flush()

    def tick(self) -> float | None:
        """Run due timers (outlier intervals, un-ejections, slow-start ramps); return the next deadline."""
        with self._lock:
            now = self.clock()
            changed = False
            if self.outlier is not None:
                deadline = self.outlier.next_deadline()
                if deadline is not None and deadline <= now:
                    events = self.outlier.tick(tuple(self.members))
                    self._pending.extend(events)
                    changed = bool(events)
            if changed:
                self._changed(now)
            if self._building is None and (
                self._ramping or (self._dirty and now >= self._last_rebuild + self._coalesce_window())
            ):
                self._rebuild(now)
            refresh = self._refresh_picker(now) if self._building is None else None
        if refresh is not None:
            refresh.refresh(now)  # outside the lock: the core's other inputs need not wait for it
        self._flush()
        return self.next_deadline()

    def next_deadline(self) -> float | None:
        """When :meth:`tick` next has work to do (``clock`` time), or None."""
        with self._lock:
            deadlines = []
            if self.outlier is not None:
                d = self.outlier.next_deadline()
                if d is not None:
                    deadlines.append(d)
            if self._building is None:  # else publishing it moves the deadline
                if self._ramping:
                    deadlines.append(self.clock() + self._ramp_step())
                if self._dirty:
                    deadlines.append(self._last_rebuild + self._coalesce_window())
                timed = refreshing(self.picker)
                if timed is not None and timed.next_refresh() < math.inf:
                    deadlines.append(timed.next_refresh())
            return min(deadlines) if deadlines else None

    def set_discovery_status(self, stale: bool, reason: str) -> None:
        """Record that discovery started failing (``stale``) or answers again."""
        with self._lock:
            if stale:
                self._emit(EventKind.DISCOVERY_ERROR, "", reason, self.clock(), Cause.DISCOVERY_FAILED)
            else:
                self._emit(EventKind.DISCOVERY_RECOVERED, "", reason, self.clock(), Cause.DISCOVERY_ANSWERED)
        self._flush()

    def take_plan(self) -> PoolPlan:
        """The pool changes asked for since the last call (the subset widened or narrowed), once."""
        with self._lock:
            plan = PoolPlan(tuple(self._plan_open.values()), tuple(self._plan_close))
            self._plan_open = {}
            self._plan_close = {}
            self._plan_waiting = False
            return plan

    def set_zone(self, zone: str) -> None:
        """Take the client's zone as discovery reports it (used when the ``zone`` option is None)."""
        with self._lock:
            if zone == self.zones.learned:
                return
            self.zones.set_learned(zone)
            self._changed(self.clock())
        self._flush()

    @property
    def zone_plan(self) -> ZonePlan:
        """Where zone-routed calls go (mode OFF when zone routing does not apply): the plan of the latest
        picker build, whose picker is published at once or, for a build handed to :attr:`offload`, when
        it is done."""
        return self.zones.plan

    def forget(self, address: str) -> None:
        """Drop the stats of an endpoint whose channel has been closed (unless it came back)."""
        with self._lock:
            if address not in self.members:
                self.stats.discard(address)

    # ----------------------------------------------------------------- queries

    def is_ejected(self, address: str) -> bool:
        """Whether outlier detection has ejected ``address``."""
        return self.outlier is not None and self.outlier.is_ejected(address)

    def endpoint_states(self) -> dict[str, str]:
        """Each endpoint's state: ready, connecting, unhealthy or ejected."""
        with self._lock:
            return {a: self._state_of(a, m) for a, m in self.members.items()}

    def _state_of(self, address: str, m: EndpointState) -> str:
        return "ejected" if m.state == "ready" and self.is_ejected(address) else m.state

    def no_pick_reason(self) -> str:
        """Why nothing can be picked now, naming the service and the states of its endpoints."""
        with self._lock:
            return self._no_pick_reason_text(list(self.endpoint_states().values()), len(self.members))

    def _no_pick_reason_text(self, states: list[str], total: int) -> str:
        name = self.service or "service"
        if total == 0:
            return f"{name}: no endpoints known"
        counts: dict[str, int] = {}
        for s in states:
            counts[s] = counts.get(s, 0) + 1
        detail = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        return f"{name}: none of {total} endpoints ready ({detail})"

    # ----------------------------------------------------------------- internals

    def _on_failure_streak(self, entry: EndpointStats) -> None:
        with self._lock:
            if self.outlier is None or entry.address not in self.members:
                return
            event = self.outlier.on_failure_streak(entry, tuple(self.members))
            if event is None:
                return
            self._pending.append(event)
            self._changed(self.clock())
            self._deadline_moved = True  # the ejection ends at a time the timer must wake for
        self._flush()

    def _eligible(self, m: EndpointState) -> bool:
        return (
            m.ready
            and m.healthy
            and m.health_known
            and m.endpoint.health is EndpointHealth.PASSING
            and not self.is_ejected(m.endpoint.address)
        )

    def _coalesce_window(self) -> float:
        """How long after a rebuild further changes wait to be rebuilt together: 10x the last build's cost,
        at most 0.1 s; 0 for builds under a millisecond (most selectors), so those rebuild at once; until
        it is published while a build runs elsewhere."""
        if self._building is not None:
            return math.inf  # a build is running elsewhere: changes wait for it (see ``publish``)
        cost = self._rebuild_cost
        return 0.0 if cost < 0.001 else min(10.0 * cost, 0.1)

    def _down(self, m: EndpointState) -> bool:
        """Known to be unusable: failed to connect, unhealthy (by its health check or by discovery) or
        ejected (not merely still connecting)."""
        return (
            m.failed
            or (m.health_known and not m.healthy)
            or m.endpoint.health is EndpointHealth.CRITICAL
            or self.is_ejected(m.endpoint.address)
        )

    def _is_down(self, address: str) -> bool:
        m = self.members.get(address)
        return m is not None and self._down(m)

    def _update_members(self, now: float, cause: Cause, first: bool = False) -> bool:
        """Make the members the wanted endpoints, queueing the channels to open and close; True if
        anything changed. ``cause``: why endpoints join."""
        # Endpoints discovery reports in maintenance are drained as if removed.
        order = [e for e in self._order if e.health is not EndpointHealth.MAINTENANCE]
        if self.subsetting is None:
            wanted: Sequence[Endpoint] = order
        else:
            wanted = widened(order, self.subsetting.size, self._is_down)
        members = self.members
        keep = {e.address for e in wanted}
        changed = False
        for address in [a for a in members if a not in keep]:
            del members[address]
            changed = True
            if self.outlier is not None:
                self.outlier.forget(address)
            if self._plan_open.pop(address, None) is None:
                self._plan_close[address] = None
            listed = self.endpoint_set.by_address.get(address)
            if listed is not None and listed.health is EndpointHealth.MAINTENANCE:
                self._emit(EventKind.REMOVED, address, "in maintenance: drained", now, Cause.MAINTENANCE)
            elif listed is not None:
                self._emit(EventKind.REMOVED, address, "left the subset", now, Cause.SUBSET_LEFT)
            else:
                self._emit(EventKind.REMOVED, address, "gone from discovery", now, Cause.DISCOVERY_REMOVED)
        for e in wanted:
            m = members.get(e.address)
            if m is not None:
                # Discovery hands unchanged instances back as the same objects: compare fields only when
                # the object is new.
                old = m.endpoint
                if old is not e:
                    if old != e:
                        if old.health is not e.health:
                            self._emit_discovery_health(e, now)
                        changed = True
                    m.endpoint = e  # equal or not: the next set's same object is then found by identity
                continue
            members[e.address] = EndpointState(
                e, healthy=True, health_known=not self.health_checked, warm=first
            )
            self.stats[e.address]
            self._plan_open[e.address] = e
            changed = True
            reason = "discovered" if cause is Cause.DISCOVERED else "subset widened: one of it is down"
            self._emit(EventKind.ADDED, e.address, reason, now, cause)
            if e.health is EndpointHealth.CRITICAL:
                self._emit_discovery_health(e, now)
        return changed

    def _emit_discovery_health(self, e: Endpoint, now: float) -> None:
        if e.health is EndpointHealth.CRITICAL:
            self._emit(
                EventKind.UNHEALTHY, e.address, "discovery reports it critical", now, Cause.CONSUL_CRITICAL
            )
        else:
            self._emit(
                EventKind.HEALTHY, e.address, "discovery reports it passing", now, Cause.CONSUL_PASSING
            )

    def slow_pass(self, size: int | None = None) -> bool:
        """Whether a pass over ``size`` members (default: the current ones) is expected to take over
        ``offload_above``: the last pass's time, scaled up by size (before any was timed:
        ``size >= OFFLOAD_UNMEASURED``)."""
        n = len(self.members) if size is None else size
        return n >= self.pass_min_members and self._expect_slow(self._pass_seconds, self._pass_size, n)

    def _expect_slow(self, seconds: float, measured: int, size: int) -> bool:
        """Whether work that took ``seconds`` over ``measured`` items (0: never timed) takes over
        ``offload_above`` over ``size``: scaled up by size; untimed, ``size >= OFFLOAD_UNMEASURED``."""
        if measured == 0:
            return size >= OFFLOAD_UNMEASURED
        return seconds * max(1.0, size / measured) >= self.offload_above

    def _timed_pass(self, started: float) -> None:
        self._pass_seconds = time.perf_counter() - started
        self._pass_size = max(1, len(self.members))

    def _changed(self, now: float) -> None:
        """Widen or narrow the subset, then publish a new picker now, or soon when rebuilds are slow and
        one was just made; with :attr:`defer_passes`, at the next :meth:`tick` once passes are slow.

        A Maglev table over many endpoints takes tens of milliseconds to build; a thousand endpoints
        turning READY one by one must not build it a thousand times.
        """
        if self.subsetting is not None and self._update_members(now, Cause.SUBSET_WIDENED):
            self._plan_waiting = True
        if self.defer_passes and self.slow_pass():
            if not self._dirty:
                self._dirty = True
                self._deadline_moved = True
            return
        if now >= self._last_rebuild + self._coalesce_window():
            self._rebuild(now)
        elif not self._dirty:
            self._dirty = True
            self._deadline_moved = True

    def _rebuild(self, now: float) -> None:
        pass_started = time.perf_counter()
        try:
            self._rebuild_picker(now)
        finally:
            self._timed_pass(pass_started)

    def _rebuild_picker(self, now: float) -> None:
        started = self.clock()
        members = self.members.values()
        connected: list[EndpointState] = []
        healthy: list[EndpointState] = []
        ejected = self.outlier.ejected if self.outlier is not None else frozenset()
        for m in members:  # one pass: this runs on every change, over every endpoint
            if m.ready and m.health_known:
                connected.append(m)
                if (
                    m.healthy
                    and m.endpoint.health is EndpointHealth.PASSING
                    and (not ejected or m.endpoint.address not in ejected)
                ):
                    healthy.append(m)
                    if m.usable_since is None:
                        m.usable_since = now
                    continue
            if m.usable_since is not None:
                m.usable_since = None
                m.warm = False
        panic = (
            bool(connected)
            and self.panic_threshold > 0
            and (len(healthy) * 100.0 < self.panic_threshold * len(connected))
        )
        if panic != self.panic:
            self.panic = panic
            if panic:
                self._emit(
                    EventKind.PANIC_START,
                    "",
                    f"{len(healthy)} of {len(connected)} connected endpoints healthy, below the panic "
                    f"threshold {self.panic_threshold:g}%: balancing over all connected endpoints",
                    now,
                    Cause.PANIC_THRESHOLD,
                )
            else:
                reason = f"{len(healthy)} of {len(connected)} healthy"
                self._emit(EventKind.PANIC_END, "", reason, now, Cause.PANIC_THRESHOLD)
        chosen = connected if panic else healthy
        self._ramping = False
        if self.slow_start is not None:
            for m in members:
                entry = self.stats[m.endpoint.address]
                factor = 1.0
                if m.usable_since is not None and not panic and not m.warm:
                    factor = self.slow_start.factor(now - m.usable_since)
                entry.weight_factor = factor
                if factor < 1.0:
                    self._ramping = True
        self._dirty = False
        self._last_rebuild = now
        if chosen:
            build = PickerBuild(
                self.zones.prepare(
                    self.selector,
                    [m.endpoint for m in chosen],
                    self.endpoint_set.endpoints,
                    self.stats,
                    panic=panic,
                ),
                len(chosen),
            )
            if self.offload is not None and self._slow(build.size):
                self._building = self._to_offload = build
                return
            picker = build()
            self._timed(build)
        else:
            states = [self._state_of(a, m) for a, m in self.members.items()]
            picker = EmptyPicker(self._no_pick_reason_text(states, len(self.members)))
        self._install(picker)
        self._rebuild_cost = self.clock() - started

    def _slow(self, size: int) -> bool:
        """Whether a build over ``size`` endpoints is expected to take over ``offload_above``: the last
        build's time, scaled up by size (before any was timed: ``size >= OFFLOAD_UNMEASURED``)."""
        return self._expect_slow(self._build_seconds, self._build_size, size)

    def _timed(self, build: PickerBuild) -> None:
        self._build_seconds = build.seconds
        self._build_size = build.size

    def _install(self, picker: Picker) -> None:
        self.picker = picker
        self._building = None  # a build still running elsewhere is older than this picker: dropped
        self.rebuilds += 1
        self._picker_changed = True
        if refreshing(picker) is not None:
            self._deadline_moved = True  # its refresh is a timer of its own

    def _refresh_picker(self, now: float) -> RefreshingPicker | None:
        """The picker, if its timed work (weighted round robin's weight update) is due and quick: the
        caller runs it; when slow, it is handed to :attr:`offload` like a slow build, then published as
        the same picker."""
        picker = self.picker
        timed = refreshing(picker)
        if timed is None or timed.next_refresh() > now:
            return None
        size = len(picker.endpoints)
        if self.offload is not None and self._slow(size):
            self._building = self._to_offload = PickerBuild(functools.partial(_refreshed, timed, now), size)
            return None
        return timed

    def publish(self, build: PickerBuild, picker: Picker) -> None:
        """Install the picker of a build handed to :attr:`offload` (unless a newer picker replaced it
        meanwhile); changes made while it ran are built next, after the coalescing window."""
        with self._lock:
            if build is not self._building:
                return
            if picker is self.picker:  # a refresh of the current picker (see ``_refresh_picker``)
                self._building = None
                self._deadline_moved = True
            else:
                self._timed(build)
                self._install(picker)
                now = self.clock()
                self._rebuild_cost = now - self._last_rebuild  # handed over then: on ``clock``, as inline
                self._last_rebuild = now
                if self._dirty or self._ramping:
                    self._deadline_moved = True
        self._flush()

    def drop_build(self, build: PickerBuild) -> None:
        """Give up a build handed to :attr:`offload` that failed: the next change rebuilds."""
        with self._lock:
            if build is self._building:
                self._building = None
                self._deadline_moved = self._dirty or self._ramping
        self._flush()

    def _ramp_step(self) -> float:
        assert self.slow_start is not None
        return max(self.slow_start.window / 20.0, 0.05)

    def _emit(self, kind: EventKind, address: str, reason: str, now: float, cause: Cause) -> None:
        self._pending.append(Event(kind, address, reason, now, cause))

    def _flush(self) -> None:
        """Deliver events and picker notifications outside the lock."""
        with self._lock:
            events, self._pending = self._pending, []
            changed = self._picker_changed
            self._picker_changed = False
            moved = self._deadline_moved
            self._deadline_moved = False
            pool = self._plan_waiting and bool(self._plan_open or self._plan_close)
            to_offload, self._to_offload = self._to_offload, None
        if events:
            if self.dispatch is None:
                self.deliver(events)
            else:
                self.dispatch(events)
        if changed:
            for hook in self.on_picker:
                hook()
        if moved:
            for hook in self.on_deadline:
                hook()
        if pool:
            for hook in self.on_pool:
                hook()
        if to_offload is not None and self.offload is not None:
            try:
                self.offload(to_offload)
            except Exception:
                log.exception("%s: handing a picker build over failed", self.service or "lbkit")
                self.drop_build(to_offload)

    def deliver(self, events: list[Event]) -> None:
        """Log ``events`` and call every listener with each, in order (see :attr:`dispatch`)."""
        for event in events:
            _log_event(self.service, event)
            for listener in self.listeners:
                try:
                    listener(event)
                except Exception:  # a listener must not break the balancer
                    log.exception("lbkit event listener failed on %s", event)

    def add_listener(self, listener: EventListener) -> None:
        """Call ``listener(event)`` for every state change from now on."""
        self.listeners.append(listener)

    def endpoints(self) -> Iterable[Endpoint]:
        """The endpoints discovery reported last."""
        return self.endpoint_set.endpoints


def _refreshed(picker: RefreshingPicker, now: float) -> Picker:
    picker.refresh(now)
    return picker


_LEVELS = {
    EventKind.UNHEALTHY: logging.WARNING,
    EventKind.EJECTED: logging.WARNING,
    EventKind.PANIC_START: logging.WARNING,
}


def _log_event(service: str, event: Event) -> None:
    level = _LEVELS.get(event.kind, logging.INFO)
    if log.isEnabledFor(level):
        where = f" {event.address}" if event.address else ""
        log.log(level, "%s%s %s: %s", service or "lbkit", where, event.kind.value, event.reason)

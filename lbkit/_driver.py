"""What the sync and asyncio balancers share: options, the core, the retry budget and the member table."""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import grpc

from lbkit._grpc_private import connectivity
from lbkit.core import BalancerCore, PoolPlan
from lbkit.discovery.base import Discovery, DiscoveryStatus
from lbkit.discovery.static import StaticDiscovery
from lbkit.endpoint import Endpoint, EndpointSet
from lbkit.errors import ConfigError, NoEndpointsError, NoReadyEndpointError
from lbkit.events import Cause, Event
from lbkit.health.active import HealthCheck
from lbkit.health.native import UNIMPLEMENTED_REASON, HealthChannel, health_options, verdict
from lbkit.health.outlier import OutlierDetection
from lbkit.health.slow_start import SlowStart
from lbkit.hedging import HedgingPolicy, LatencyWindow
from lbkit.options import POOL_ARG, BalancerOptions
from lbkit.retry import MethodPolicies, Policy, RetryBudget, RetryPolicy
from lbkit.selectors.base import Key, Selector
from lbkit.stats import EndpointStats, Stats
from lbkit.subsetting import Subsetting
from lbkit.zones import ZonePlan, ZoneRouting

__all__ = ["BalancerBase", "KeyFn", "Member", "MethodSpec", "as_discovery", "method_spec"]

log = logging.getLogger("lbkit")

KeyFn = Callable[[str, Any], "str | bytes | None"]

_POOL_IDS = itertools.count(1)


class MethodSpec:
    """What a channel needs to make a multicallable for a stub method: one object per distinct method,
    codecs and kind (see :func:`method_spec`), so that a member finds its cached multicallable by
    identity."""

    __slots__ = ("deser", "kind", "method", "registered", "ser")

    def __init__(self, kind: str, method: str, ser: Any, deser: Any, registered: bool) -> None:
        self.kind = kind
        self.method = method
        self.ser = ser
        self.deser = deser
        self.registered = registered


_METHOD_SPECS: dict[tuple[Any, ...], MethodSpec] = {}


def method_spec(kind: str, method: str, ser: Any, deser: Any, registered: bool) -> MethodSpec:
    """The one :class:`MethodSpec` for these (kept for the process: there are as many as stub methods)."""
    key = (kind, method, ser, deser, registered)
    spec = _METHOD_SPECS.get(key)
    if spec is None:
        spec = _METHOD_SPECS.setdefault(key, MethodSpec(kind, method, ser, deser, registered))
    return spec


_MEMBER_LOCK = threading.Lock()
"""Orders making a member's multicallables against closing its channel: one lock for all members (both
are rare: a method's first call on an endpoint, a drain), not one per endpoint."""


class Member:
    """One endpoint's channel in the pool, its stats, and its cached multicallables."""

    __slots__ = (
        "address",
        "callables",
        "channel",
        "closed",
        "closed_reason",
        "closing_at",
        "health",
        "health_report",
        "ready",
        "stats",
    )

    def __init__(self, address: str, channel: Any, stats: EndpointStats) -> None:
        self.address = address
        self.channel = channel
        self.stats = stats
        self.callables: dict[MethodSpec, Any] = {}
        self.health: Any = None
        self.closing_at: float | None = None
        """When draining started (the endpoint left discovery); None while it is a member."""
        self.ready = False
        """The channel's last connectivity was READY."""
        self.health_report: tuple[bool, Cause, str] | None = None
        """The last active health answer (serving, cause, reason), if any."""
        self.closed = False
        """lbkit closed the channel: no new multicallable may be made on it, and a call on it that ends
        CANCELLED was cancelled by the close (see :attr:`closed_reason`)."""
        self.closed_reason = ""
        """Why lbkit closed the channel, for the error of the calls it cut short."""

    def callable(self, spec: MethodSpec) -> Any:
        """The channel's multicallable for ``spec``."""
        mc = self.callables.get(spec)
        if mc is None:
            with _MEMBER_LOCK:
                # grpcio crashes the process making a registered multicallable on a closed channel.
                if self.closed:
                    raise ValueError(f"Cannot invoke RPC on closed channel to {self.address} (drained)")
                factory = getattr(self.channel, spec.kind)
                mc = factory(
                    spec.method,
                    request_serializer=spec.ser,
                    response_deserializer=spec.deser,
                    _registered_method=spec.registered,
                )
                self.callables[spec] = mc
        return mc

    def mark_closed(self, reason: str) -> None:
        """From now on no multicallable is made on the channel; the caller then closes it."""
        with _MEMBER_LOCK:
            if not self.closed:
                self.closed_reason = reason
            self.closed = True


def as_discovery(discovery: Discovery | Iterable[Endpoint | str]) -> Discovery:
    """A Discovery from a Discovery or a list of endpoints."""
    if isinstance(discovery, Discovery):
        return discovery
    if isinstance(discovery, (str, bytes)):
        raise ConfigError(f"discovery must be a Discovery or a list of endpoints, got the str {discovery!r}")
    if isinstance(discovery, Iterable):
        return StaticDiscovery(discovery)
    raise ConfigError(f"discovery must be a Discovery or a list of endpoints, got {discovery!r}")


class BalancerBase:
    """What the sync and asyncio balancers share: options, core, retry budget, member table."""

    def __init__(
        self,
        discovery: Discovery | Iterable[Endpoint | str],
        *,
        selector: Selector | str = "round_robin",
        retry: Policy | Mapping[str, Policy] | None = None,
        health_check: HealthCheck | None = None,
        outlier_detection: OutlierDetection | None = None,
        slow_start: SlowStart | None = None,
        panic_threshold: float = 50.0,
        key_header: str = "lb-key",
        forward_key_header: bool = False,
        wait_timeout: float = 10.0,
        drain_timeout: float = 30.0,
        channel_options: Sequence[tuple[str, Any]] = (),
        credentials: grpc.ChannelCredentials | None = None,
        service: str | None = None,
        latency_decay: float = 10.0,
        subset: Subsetting | None = None,
        zone: str | None = None,
        zone_routing: ZoneRouting | None = None,
        on_event: Callable[[Event], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not callable(clock):
            raise ConfigError(
                f"clock must be a callable returning seconds (like time.monotonic), got {clock!r}"
            )
        self.clock = clock
        """The balancer's time: ``time.monotonic``, or a test's ``lbkit.testing.FakeClock``. Ejection, slow
        start, draining, latency stats and waiting for readiness read it."""
        self.discovery = as_discovery(discovery)
        self.options = BalancerOptions(
            selector=selector,
            retry=retry,
            health_check=health_check,
            outlier_detection=outlier_detection,
            slow_start=slow_start,
            panic_threshold=panic_threshold,
            key_header=key_header,
            forward_key_header=forward_key_header,
            wait_timeout=wait_timeout,
            drain_timeout=drain_timeout,
            channel_options=channel_options,
            credentials=credentials,
            service=service,
            latency_decay=latency_decay,
            subset=subset,
            zone=zone,
            zone_routing=zone_routing,
        )
        opts = self.options
        self.channel_args: tuple[tuple[str, Any], ...] = (*opts.channel_options, (POOL_ARG, next(_POOL_IDS)))
        """The options of every endpoint channel: ``channel_options`` and this balancer's pool arg."""
        self.service = opts.service or self.discovery.service
        self.selector = opts.policy
        self.retry_policies: MethodPolicies = opts.retry_policies
        """The retry policy of each method (``retry=``)."""
        self.retry_policy: RetryPolicy = self.retry_policies.default
        """The retry policy of methods no pattern of ``retry=`` names; it sizes the retry budget."""
        self.core = BalancerCore(
            self.selector,
            service=self.service,
            outlier_detection=opts.outlier_detection,
            slow_start=opts.slow_start,
            panic_threshold=opts.panic_threshold,
            health_checked=opts.health_check is not None,
            clock=clock,
            stats=Stats(clock=clock, decay=opts.latency_decay),
            subsetting=opts.subset,
            zone=opts.zone,
            zone_routing=opts.zone_routing,
        )
        if on_event is not None:
            self.core.add_listener(on_event)
        self.discovery.status.listeners.append(self._on_discovery_status)
        self.stats = self.core.stats
        self.members: dict[str, Member] = {}
        self.draining: dict[str, Member] = {}
        """The members draining (``closing_at`` set): what the drain timer looks at, not every member."""
        self.budget = RetryBudget(self.retry_policy.budget_max_tokens, self.retry_policy.budget_token_ratio)
        self.keyed = self.selector.uses_key
        self.load_reports = self.selector.uses_load_reports
        """Whether calls read the servers' load reports (only for selectors that use them)."""
        outlier = self.core.outlier
        self.is_failure: Callable[[grpc.StatusCode | None], bool] = (
            outlier.is_failure if outlier is not None else _default_is_failure
        )
        self.calls_retried = 0
        """Retries made: each time a call that may have reached a server was tried again."""
        self.hedges_sent = 0
        """Hedges sent: attempts of hedged calls after the first."""
        self.hedges_won = 0
        """Hedged calls a hedge answered first (not the first attempt)."""
        self.hedges_cancelled = 0
        """Attempts of hedged calls cancelled because another attempt of the call answered first."""
        self.latency_windows: dict[str, LatencyWindow] = {}
        """Recent latencies of each method with an adaptive hedging delay (``hedging_delay="p95"``)."""
        self._retry_lock = threading.Lock()
        self._closed = False
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._watchers = (self._on_connectivity, self._on_health_state)
        """The poller's callbacks, made once: a bound method per watch is an object per endpoint the
        cyclic collector walks."""
        self._timer_seq = itertools.count()
        self._timer_lock = threading.Lock()

    _channels: Any = grpc
    """The grpc module whose channels the driver opens: ``grpc`` or ``grpc.aio``."""
    _wake: Any
    """The driver's event that wakes its timer loop (threading.Event or asyncio.Event)."""

    def _follow_clock(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` whenever a test's fake clock is advanced (a clock with ``on_advance``), so timers
        and waits look at the new time at once; ``time.monotonic`` needs nothing."""
        subscribe = getattr(self.clock, "on_advance", None)
        if subscribe is not None:
            subscribe(wake)

    def _apply_update(self, endpoint_set: EndpointSet) -> None:
        """Take a new endpoint set: drain what left, keep what came back while draining, open the rest."""
        self._apply_plan(self._core_update(self.discovery.local_zone, endpoint_set))

    def _core_update(self, zone: str, endpoint_set: EndpointSet) -> PoolPlan:
        """The core's part of an update (any thread): the client's zone discovery knows
        (``Discovery.local_zone``) first, for zone routing, then the set; the pool's part is the plan."""
        if zone:
            self.core.set_zone(zone)
        return self.core.set_endpoints(endpoint_set)

    def _apply_pending(self) -> None:
        """Apply the pool changes the core asked for since the last update (a subset widened or narrowed)."""
        plan = self.core.take_plan()
        if plan:
            self._apply_plan(plan)

    def _apply_plan(self, plan: PoolPlan) -> None:
        """Drain the channels of ``plan.close``, then keep what came back while draining and open the rest."""
        now = self.clock()
        for address in plan.close:
            member = self.members.get(address)
            if member is not None:
                member.closing_at = now
                self.draining[address] = member
        for endpoint in plan.open:
            member = self.members.get(endpoint.address)
            if member is not None and member.closing_at is not None:
                self.revive(member)  # came back while draining: keep its channel
                continue
            self._open_member(self._new_member(endpoint))
        if plan.close:
            self._wake.set()

    def _new_member(self, endpoint: Endpoint) -> Member:
        """A pool member with a new channel to ``endpoint``."""
        member = Member(endpoint.address, self._channel_to(endpoint.address), self.stats[endpoint.address])
        self.members[endpoint.address] = member
        return member

    def _channel_to(self, address: str) -> Any:
        """A new channel (of the driver's kind) to ``address``, with the pool's options."""
        opts = self.options
        if opts.credentials is not None:
            return self._channels.secure_channel(address, opts.credentials, options=self.channel_args)
        return self._channels.insecure_channel(address, options=self.channel_args)

    def _open_member(self, member: Member) -> None:
        """Start watching a new member's connectivity (and health); the driver's part."""
        raise NotImplementedError

    # ----------------------------------------------------------------- connectivity and health

    _poller: Any
    """The driver's :class:`~lbkit._connectivity.ChannelPoller` (sync) or ``AsyncChannelPoller``."""

    @staticmethod
    def _state_of(channel: Any) -> grpc.ChannelConnectivity | None:
        """A channel's state now (the driver's kind of read)."""
        return connectivity(channel)

    def _follow(self, member: Member) -> None:
        """Follow the member's connectivity (and, with health checks on, its health) with the poller.

        Health checks are gRPC's own (gRFC A17): a twin channel to the address whose service config turns
        them on, sharing the call channel's connection (see :mod:`lbkit.health.native`).
        """
        on_connectivity, on_health = self._watchers
        self._poller.watch(member, member.channel, on_connectivity, trusted=True)  # failed calls hint
        check = self.options.health_check
        if check is not None:
            opts = self.options
            options = health_options(self.channel_args, check)
            if opts.credentials is not None:
                channel = self._channels.secure_channel(member.address, opts.credentials, options=options)
            else:
                channel = self._channels.insecure_channel(member.address, options=options)
            health = member.health = HealthChannel(member, channel)
            self._poller.watch(health, channel, on_health)

    def _unfollow(self, member: Member) -> None:
        """Stop following the member (its channels are the driver's to close)."""
        poller = getattr(self, "_poller", None)
        if poller is not None:
            poller.unwatch(member)
            if member.health is not None:
                poller.unwatch(member.health)

    def _on_connectivity(self, member: Member, state: grpc.ChannelConnectivity) -> None:
        """The poller read a new state of ``member``'s channel (IDLE ones it has asked to connect)."""
        member.ready = state is grpc.ChannelConnectivity.READY
        if self.members.get(member.address) is not member or member.closing_at is not None:
            return
        failed = state is grpc.ChannelConnectivity.TRANSIENT_FAILURE
        self.core.set_ready(member.address, member.ready, f"channel {state.name}", failed=failed)
        if member.health is not None and member.ready:
            self._judge_health(member)

    def _on_health_state(self, health: HealthChannel, state: grpc.ChannelConnectivity) -> None:
        """The poller read a new state of a member's health-checked channel."""
        member: Member = health.member
        health.state = state
        self._judge_health(member)
        check = self.options.health_check
        if (
            state is grpc.ChannelConnectivity.READY
            and check is not None
            and check.unimplemented == "unhealthy"
        ):
            self._probe(member, check)

    def _probe(self, member: Member, check: HealthCheck) -> None:
        """Ask the member's server once whether it has the health service; the driver's part (calls
        :meth:`_on_unimplemented` if not)."""
        raise NotImplementedError

    def _judge_health(self, member: Member) -> None:
        # Not serving only while the connection is up: confirm with the call channel's state right now.
        health: HealthChannel = member.health
        call_ready = member.ready and self._state_of(member.channel) is grpc.ChannelConnectivity.READY
        report = verdict(health.state, call_ready)
        if report is not None:
            self.on_health(member.address, *report)

    def _on_unimplemented(self, member: Member) -> None:
        if self.members.get(member.address) is member and not self._closed:
            self.on_health(member.address, False, Cause.HEALTH_UNIMPLEMENTED, UNIMPLEMENTED_REASON)

    def _on_call_failed(self, entry: EndpointStats) -> None:
        """A call failed on ``entry``'s endpoint: read its channel's state now, not at the next sweep."""
        member = self.members.get(entry.address)
        if member is not None:
            self._poller.hint(member)

    def _detach(self) -> None:
        """Stop hearing from the discovery source (it may outlive this balancer)."""
        with contextlib.suppress(ValueError):
            self.discovery.status.listeners.remove(self._on_discovery_status)

    def discovery_died(self, exc: Exception) -> None:
        """The discovery loop raised ``exc`` and ended: make it loud (log, status, event, call errors)."""
        text = f"discovery stopped: {type(exc).__name__}: {exc}"
        log.error("%s: %s", self.service, text, exc_info=exc)
        self.discovery.status.died(text, exc)

    def _on_discovery_status(self, status: DiscoveryStatus) -> None:
        if status.stopped:
            reason = f"{status.stopped}; keeping the last {len(self.core.members)} endpoints"
        elif status.stale:
            reason = f"keeping the last {len(self.core.members)} endpoints: {status.last_error}"
        else:
            reason = "answering again"
        self.core.set_discovery_status(status.stale, reason)

    def call_at(self, when: float, fn: Callable[[], None]) -> None:
        """Run ``fn()`` on the driver's timer loop once ``clock`` reaches ``when`` (the call path's timers:
        ``fn`` must be quick and must not block)."""
        with self._timer_lock:
            heapq.heappush(self._timers, (when, next(self._timer_seq), fn))
        if when < self._sleep_until:
            self._timer_added()

    _sleep_until = float("inf")
    """Until when (``clock`` time) the driver's timer loop sleeps; a timer due earlier wakes it."""

    def _timer_added(self) -> None:
        """Wake the driver's timer loop: a timer is due before it would wake."""

    def _run_due(self, now: float) -> float | None:
        """Run the timers due at ``now``; return when the next one is due (None: none)."""
        timers = self._timers
        while True:
            with self._timer_lock:
                if not timers:
                    return None
                when, _, fn = timers[0]
                if when > now:
                    return when
                heapq.heappop(timers)
            try:
                fn()
            except Exception:  # a call path timer must not stop the others
                log.exception("%s: a call timer failed", self.service)

    def _drained(self, member: Member, now: float) -> str:
        """Why a removed endpoint's channel is being closed, for the calls it cuts short."""
        waited = now - member.closing_at if member.closing_at is not None else 0.0
        return (
            f"{self.service}: {member.address} left discovery and its channel was closed after "
            f"{waited:.3g} s of draining (drain_timeout {self.options.drain_timeout:g} s) with this call "
            "in flight"
        )

    def revive(self, member: Member) -> None:
        """Take back a draining member whose endpoint returned: the core hears its last known state."""
        member.closing_at = None
        if self.draining.get(member.address) is member:
            del self.draining[member.address]
        self.core.set_ready(member.address, member.ready, "channel kept while draining")
        if member.health_report is not None:
            self.core.set_health(member.address, *member.health_report)

    def on_health(self, address: str, serving: bool, cause: Cause, reason: str) -> None:
        """An active health answer for ``address`` (from a health watcher)."""
        member = self.members.get(address)
        if member is None:
            return
        member.health_report = (serving, cause, reason)
        if member.closing_at is None:
            self.core.set_health(address, serving, cause, reason)

    def pick_endpoint(self, key: Key = None) -> Endpoint:
        """Pick an endpoint now from the current picker (raises NoEndpointsError if none is ready)."""
        try:
            return self.core.picker.pick(key)
        except NoEndpointsError:
            pass
        raise self.no_endpoint_error()  # outside the except: the picker's error is no context of it

    def no_endpoint_error(self) -> NoEndpointsError:
        """The error for a call that found nothing to pick, saying which service and why.

        With no endpoint known while discovery fails, the discovery's :class:`DiscoveryError` is its
        ``__cause__`` and its text ends the message.
        """
        reason = self.core.no_pick_reason()
        stopped = self.discovery.status.stopped
        if self.core.members:
            return NoReadyEndpointError(f"{reason}; {stopped}" if stopped else reason)
        failure = self.discovery.status.error
        if failure is None:
            return NoEndpointsError(reason)
        error = NoEndpointsError(f"{reason}; discovery is failing: {failure}")
        error.__cause__ = failure
        return error

    def endpoint_states(self) -> dict[str, str]:
        """Each endpoint's state: ready, connecting, unhealthy, ejected (or draining)."""
        states = self.core.endpoint_states()
        for address, m in list(self.members.items()):
            if m.closing_at is not None and address not in states:
                states[address] = "draining"
        return states

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` (``aclose``) has been called."""
        return self._closed

    def check_started(self) -> None:
        """Raise RuntimeError, saying how to start it, if the balancer was never started."""
        raise NotImplementedError

    def note_retry(self) -> None:
        """Count one retry (a call that may have reached a server, tried again)."""
        with self._retry_lock:
            self.calls_retried += 1

    def note_hedges(self, sent: int = 0, won: int = 0, cancelled: int = 0) -> None:
        """Count hedges sent, hedged calls a hedge won, and attempts cancelled by a winner."""
        with self._retry_lock:
            self.hedges_sent += sent
            self.hedges_won += won
            self.hedges_cancelled += cancelled

    def latency_window(self, method: str, policy: HedgingPolicy) -> LatencyWindow:
        """The one window of recent latencies of ``method`` (made at its first use)."""
        window = self.latency_windows.get(method)
        if window is None:
            made = LatencyWindow(policy.percentile or 95.0, policy.window, policy.min_samples)
            window = self.latency_windows.setdefault(method, made)
        return window

    @property
    def panic(self) -> bool:
        """Whether the balancer is in panic mode (too few healthy endpoints)."""
        return self.core.panic

    @property
    def zone_plan(self) -> ZonePlan:
        """Where calls go by zone now: the client's zone, the mode, and each zone's share of calls."""
        return self.core.zone_plan

    def add_listener(self, listener: Callable[[Event], None]) -> None:
        """Call ``listener(event)`` for every endpoint or balancer state change."""
        self.core.add_listener(listener)


def _default_is_failure(code: grpc.StatusCode | None) -> bool:
    return code is not None and code is not grpc.StatusCode.OK

"""``lbkit.Balancer``: the threaded driver over the sans-I/O core, with a pool of ready grpc channels."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

import grpc

from lbkit.core import BalancerCore
from lbkit.discovery.base import Discovery, DiscoveryStatus
from lbkit.discovery.static import StaticDiscovery
from lbkit.endpoint import Endpoint, EndpointSet
from lbkit.errors import ConfigError, NoEndpointsError, NoReadyEndpointError
from lbkit.events import Event
from lbkit.health.active import HealthCheck
from lbkit.health.outlier import OutlierDetection
from lbkit.health.slow_start import SlowStart
from lbkit.options import BalancerOptions
from lbkit.retry import RetryBudget, RetryPolicy
from lbkit.selectors.base import Key, Selector
from lbkit.stats import EndpointStats, Stats

__all__ = ["Balancer"]

log = logging.getLogger("lbkit")

KeyFn = Callable[[str, Any], "str | bytes | None"]


class Member:
    """One endpoint's channel in the pool, its stats, and its cached multicallables."""

    __slots__ = (
        "address",
        "callables",
        "channel",
        "closed",
        "closing_at",
        "health",
        "health_report",
        "lock",
        "ready",
        "stats",
    )

    def __init__(self, address: str, channel: Any, stats: EndpointStats) -> None:
        self.address = address
        self.channel = channel
        self.stats = stats
        self.callables: dict[tuple[Any, ...], Any] = {}
        self.health: Any = None
        self.closing_at: float | None = None
        """When draining started (the endpoint left discovery); None while it is a member."""
        self.ready = False
        """The channel's last connectivity was READY."""
        self.health_report: tuple[bool, str] | None = None
        """The last active health answer (serving, reason), if any."""
        self.closed = False
        """The channel is closed: no new multicallable may be made on it."""
        self.lock = threading.Lock()
        """Orders making multicallables against closing the channel."""

    def callable(self, spec: tuple[Any, ...]) -> Any:
        """The channel's multicallable for ``spec`` = (kind, method, serializer, deserializer, registered)."""
        mc = self.callables.get(spec)
        if mc is None:
            with self.lock:
                # grpcio crashes the process making a registered multicallable on a closed channel.
                if self.closed:
                    raise ValueError(f"Cannot invoke RPC on closed channel to {self.address} (drained)")
                kind, method, ser, deser, registered = spec
                factory = getattr(self.channel, kind)
                mc = factory(
                    method, request_serializer=ser, response_deserializer=deser, _registered_method=registered
                )
                self.callables[spec] = mc
        return mc

    def mark_closed(self) -> None:
        """From now on no multicallable is made on the channel; the caller then closes it."""
        with self.lock:
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
        retry: RetryPolicy | None = None,
        health_check: HealthCheck | None = None,
        outlier_detection: OutlierDetection | None = None,
        slow_start: SlowStart | None = None,
        panic_threshold: float = 50.0,
        key_header: str = "lb-key",
        wait_timeout: float = 10.0,
        drain_timeout: float = 30.0,
        channel_options: Sequence[tuple[str, Any]] = (),
        credentials: grpc.ChannelCredentials | None = None,
        service: str | None = None,
        latency_decay: float = 10.0,
        on_event: Callable[[Event], None] | None = None,
    ) -> None:
        self.discovery = as_discovery(discovery)
        self.options = BalancerOptions(
            selector=selector,
            retry=retry,
            health_check=health_check,
            outlier_detection=outlier_detection,
            slow_start=slow_start,
            panic_threshold=panic_threshold,
            key_header=key_header,
            wait_timeout=wait_timeout,
            drain_timeout=drain_timeout,
            channel_options=channel_options,
            credentials=credentials,
            service=service,
            latency_decay=latency_decay,
        )
        opts = self.options
        self.service = opts.service or self.discovery.service
        self.selector = opts.policy
        self.retry_policy = opts.retry_policy
        self.core = BalancerCore(
            self.selector,
            service=self.service,
            outlier_detection=opts.outlier_detection,
            slow_start=opts.slow_start,
            panic_threshold=opts.panic_threshold,
            health_checked=opts.health_check is not None,
            stats=Stats(decay=opts.latency_decay),
        )
        if on_event is not None:
            self.core.add_listener(on_event)
        self.discovery.status.listeners.append(self._on_discovery_status)
        self.stats = self.core.stats
        self.members: dict[str, Member] = {}
        self.budget = RetryBudget(self.retry_policy.budget_max_tokens, self.retry_policy.budget_token_ratio)
        self.keyed = self.selector.uses_key
        outlier = self.core.outlier
        self.is_failure: Callable[[grpc.StatusCode | None], bool] = (
            outlier.is_failure if outlier is not None else _default_is_failure
        )
        self.calls_retried = 0
        """Retry attempts made: each time a call was tried again on another endpoint."""
        self._retry_lock = threading.Lock()
        self._closed = False

    _channels: Any = grpc
    """The grpc module whose channels the driver opens: ``grpc`` or ``grpc.aio``."""
    _wake: Any
    """The driver's event that wakes its timer loop (threading.Event or asyncio.Event)."""

    def _apply_update(self, endpoint_set: EndpointSet) -> None:
        """Take a new endpoint set: drain what left, keep what came back while draining, open the rest."""
        plan = self.core.set_endpoints(endpoint_set)
        now = time.monotonic()
        for address in plan.close:
            member = self.members.get(address)
            if member is not None:
                member.closing_at = now
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
        opts = self.options
        if opts.credentials is not None:
            channel = self._channels.secure_channel(
                endpoint.address, opts.credentials, options=opts.channel_options
            )
        else:
            channel = self._channels.insecure_channel(endpoint.address, options=opts.channel_options)
        member = Member(endpoint.address, channel, self.stats[endpoint.address])
        self.members[endpoint.address] = member
        return member

    def _open_member(self, member: Member) -> None:
        """Start watching a new member's connectivity (and health); the driver's part."""
        raise NotImplementedError

    def _detach(self) -> None:
        """Stop hearing from the discovery source (it may outlive this balancer)."""
        with contextlib.suppress(ValueError):
            self.discovery.status.listeners.remove(self._on_discovery_status)

    def _on_discovery_status(self, status: DiscoveryStatus) -> None:
        if status.stale:
            reason = f"keeping the last {len(self.core.members)} endpoints: {status.last_error}"
        else:
            reason = "answering again"
        self.core.set_discovery_status(status.stale, reason)

    def revive(self, member: Member) -> None:
        """Take back a draining member whose endpoint returned: the core hears its last known state."""
        member.closing_at = None
        self.core.set_ready(member.address, member.ready, "channel kept while draining")
        if member.health_report is not None:
            self.core.set_health(member.address, *member.health_report)

    def on_health(self, address: str, serving: bool, reason: str) -> None:
        """An active health answer for ``address`` (from a health watcher)."""
        member = self.members.get(address)
        if member is None:
            return
        member.health_report = (serving, reason)
        if member.closing_at is None:
            self.core.set_health(address, serving, reason)

    def pick_endpoint(self, key: Key = None) -> Endpoint:
        """Pick an endpoint now from the current picker (raises NoEndpointsError if none is ready)."""
        try:
            return self.core.picker.pick(key)
        except NoEndpointsError:
            raise self.no_endpoint_error() from None

    def no_endpoint_error(self) -> NoEndpointsError:
        """The error for a call that found nothing to pick, saying which service and why."""
        reason = self.core.no_pick_reason()
        if not self.core.members:
            return NoEndpointsError(reason)
        return NoReadyEndpointError(reason)

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

    def note_retry(self) -> None:
        """Count one retry attempt (a call tried again on another endpoint)."""
        with self._retry_lock:
            self.calls_retried += 1

    @property
    def panic(self) -> bool:
        """Whether the balancer is in panic mode (too few healthy endpoints)."""
        return self.core.panic

    def add_listener(self, listener: Callable[[Event], None]) -> None:
        """Call ``listener(event)`` for every endpoint or balancer state change."""
        self.core.add_listener(listener)


def _default_is_failure(code: grpc.StatusCode | None) -> bool:
    return code is not None and code is not grpc.StatusCode.OK


class Balancer(BalancerBase):
    """A client-side load balancer over grpc channels (threads); see the package docs for options.

    Use as a context manager, or call :meth:`start` and :meth:`close`. ``lb.channel()`` gives a
    channel that generated stubs accept; ``lb.pick()`` a ready ``grpc.Channel`` for one endpoint.
    """

    def start(self) -> Balancer:
        """Start discovery, the channel pool and the timers; return at once (see :meth:`wait_ready`)."""
        if self._closed:
            raise RuntimeError("this Balancer is closed")
        if getattr(self, "_threads", None):
            return self
        self._stop = threading.Event()
        self._picker_cond = threading.Condition()
        self._wake = threading.Event()
        self._lock = threading.RLock()
        self.core.on_picker.append(self._notify_picker)
        self.core.on_deadline.append(self._wake.set)
        self._threads = [
            threading.Thread(target=self._run_discovery, name=f"lbkit-discovery-{self.service}", daemon=True),
            threading.Thread(target=self._run_timers, name=f"lbkit-timers-{self.service}", daemon=True),
        ]
        for t in self._threads:
            t.start()
        return self

    def __enter__(self) -> Balancer:
        return self.start()

    def _check_started(self) -> None:
        if not getattr(self, "_threads", None):
            raise RuntimeError(
                f"{self.service}: the Balancer is not started: "
                "use `with lbkit.Balancer(...) as lb:` or lb.start()"
            )

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- public

    def channel(self, key: KeyFn | None = None) -> grpc.Channel:
        """A channel for generated stubs; each call picks an endpoint.

        ``key(method, request)`` gives a call's consistent-hash key; without it the ``key_header``
        metadata value is the key.
        """
        from lbkit.channel import BalancedChannel

        return BalancedChannel(self, key)

    def pick(self, key: Key = None, timeout: float | None = None) -> grpc.Channel:
        """A ready grpc.Channel for one endpoint, waiting up to ``timeout`` (default ``wait_timeout``)."""
        member = self.pick_member(key, self._deadline(timeout))
        return member.channel

    def wait_ready(self, timeout: float = 10.0, count: int = 1) -> None:
        """Block until at least ``count`` endpoints are pickable; raise NoReadyEndpointError on timeout."""
        self._check_started()
        deadline = time.monotonic() + timeout
        with self._picker_cond:
            while len(self.core.picker.endpoints) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self.no_endpoint_error()
                self._picker_cond.wait(min(left, 0.1))

    def close(self) -> None:
        """Stop discovery, health checks and timers, and close every channel."""
        if self._closed:
            return
        self._closed = True
        self._detach()
        if not getattr(self, "_threads", None):
            return
        self._stop.set()
        self._wake.set()
        self._notify_picker()
        for t in self._threads:
            t.join(timeout=2.0)
        with self._lock:
            members = list(self.members.values())
            self.members.clear()
        for m in members:
            self._close_member(m)

    # ----------------------------------------------------------------- call path

    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (self.options.wait_timeout if timeout is None else timeout)

    def pick_member(
        self, key: Key, deadline: float | None, exclude: AbstractSet[str] = frozenset()
    ) -> Member:
        """The member for a pick; waits for a ready endpoint until ``deadline`` (monotonic).

        A ``deadline`` of None waits ``wait_timeout`` from now.
        """
        picker = self.core.picker
        try:
            endpoint = picker.pick(key)
            member = self.members.get(endpoint.address)
            if member is not None and endpoint.address not in exclude:
                return member
        except NoEndpointsError:
            pass
        return self._pick_slow(key, deadline, exclude)

    def _pick_slow(self, key: Key, deadline: float | None, exclude: AbstractSet[str]) -> Member:
        if self._closed:
            raise NoEndpointsError(f"{self.service}: the balancer is closed")
        self._check_started()
        if deadline is None:
            deadline = self._deadline(None)
        cond = self._picker_cond
        while True:
            picker = self.core.picker
            fallback = None
            for _ in range(4 if exclude else 1):
                try:
                    endpoint = picker.pick(key)
                except NoEndpointsError:
                    break
                member = self.members.get(endpoint.address)
                if member is None:
                    continue
                if endpoint.address not in exclude:
                    return member
                fallback = member
            if fallback is not None and len(picker.endpoints) <= len(exclude):
                return fallback  # every endpoint was tried: trying one again beats failing
            left = deadline - time.monotonic()
            if left <= 0 or self._closed:
                raise self.no_endpoint_error()
            with cond:
                if self.core.picker is picker:
                    cond.wait(min(left, 0.25))

    def _notify_picker(self) -> None:
        cond = getattr(self, "_picker_cond", None)
        if cond is not None:
            with cond:
                cond.notify_all()

    # ----------------------------------------------------------------- pool

    def _on_update(self, endpoint_set: EndpointSet) -> None:
        with self._lock:
            if not self._closed:
                self._apply_update(endpoint_set)

    def _open_member(self, member: Member) -> None:
        member.channel.subscribe(functools.partial(self._on_connectivity, member), try_to_connect=True)
        if self.options.health_check is not None:
            from lbkit.health.active import HealthWatcher

            member.health = HealthWatcher(
                self.options.health_check, member.channel, member.address, self.on_health
            )
            member.health.start()

    def _on_connectivity(self, member: Member, state: grpc.ChannelConnectivity) -> None:
        member.ready = state is grpc.ChannelConnectivity.READY
        if self.members.get(member.address) is not member or member.closing_at is not None:
            return
        self.core.set_ready(member.address, member.ready, f"channel {state.name}")
        if state is grpc.ChannelConnectivity.IDLE and not self._closed:
            self._reconnect(member)

    @staticmethod
    def _reconnect(member: Member) -> None:
        """Ask an IDLE channel to connect now rather than at its next call."""
        # AttributeError: not grpc's own channel class; ValueError: closed meanwhile.
        with contextlib.suppress(AttributeError, ValueError):
            member.channel._channel.check_connectivity_state(True)

    def _close_member(self, member: Member) -> None:
        member.mark_closed()
        if member.health is not None:
            member.health.stop()
        try:
            member.channel.close()
        except Exception:  # closing an already broken channel must not stop the others
            log.debug("closing channel to %s failed", member.address, exc_info=True)

    def _drain(self) -> float | None:
        """Close members whose drain ended; return when to look again."""
        now = time.monotonic()
        done: list[Member] = []
        pending = False
        with self._lock:
            for address, m in list(self.members.items()):
                if m.closing_at is None:
                    continue
                if m.stats.in_flight <= 0 or now - m.closing_at >= self.options.drain_timeout:
                    del self.members[address]
                    done.append(m)
                else:
                    pending = True
        for m in done:
            self._close_member(m)
            self.core.forget(m.address)
        return now + 0.05 if pending else None

    # ----------------------------------------------------------------- threads

    def _run_discovery(self) -> None:
        try:
            self.discovery.run(self._on_update, self._stop)
        except Exception as exc:  # the discovery loop must not die silently
            log.exception("%s: discovery stopped: %s", self.service, exc)

    def _run_timers(self) -> None:
        core = self.core
        while not self._stop.is_set():
            next_core = core.tick()
            next_drain = self._drain()
            deadlines = [d for d in (next_core, next_drain) if d is not None]
            timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else 1.0
            self._wake.wait(min(timeout, 1.0))
            self._wake.clear()

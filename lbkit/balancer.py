"""``lbkit.Balancer``: the threaded driver over the sans-I/O core, with a pool of ready grpc channels."""

from __future__ import annotations

import functools
import logging
import threading

import grpc

from lbkit._attempts import Attempts, CallRules
from lbkit._config import check_float
from lbkit._connectivity import ChannelPoller
from lbkit._driver import KeyFn, Member
from lbkit.channel import BalancedChannel, PickedChannel, SyncDriver
from lbkit.endpoint import EndpointSet
from lbkit.health.active import HealthCheck
from lbkit.health.native import probe
from lbkit.selectors.base import Key, Picker

__all__ = ["Balancer"]

log = logging.getLogger("lbkit")


class Balancer(SyncDriver):
    """A client-side load balancer over grpc channels (threads); see the package docs for options.

    Use as a context manager, or call :meth:`start` and :meth:`close`. ``lb.channel()`` gives a
    channel that generated stubs accept; ``lb.pick()`` a ready ``grpc.Channel`` for one endpoint.
    """

    _threads: list[threading.Thread] | None = None

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
        self._follow_clock(self._on_clock_advanced)
        self.core.on_pool.append(self._wake.set)
        self._poller = ChannelPoller(name=f"lbkit-pool-{self.service}").start()
        self.stats.on_failure = self._on_call_failed
        self._threads = [
            threading.Thread(target=self._run_discovery, name=f"lbkit-discovery-{self.service}", daemon=True),
            threading.Thread(target=self._run_timers, name=f"lbkit-timers-{self.service}", daemon=True),
        ]
        for t in self._threads:
            t.start()
        return self

    def __enter__(self) -> Balancer:
        return self.start()

    def check_started(self) -> None:
        """Raise RuntimeError, saying how to start it, if the balancer was never started."""
        if not self._threads:
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
        return BalancedChannel(self, key)

    def pick(self, key: Key = None, timeout: float | None = None) -> grpc.Channel:
        """The channel of one ready endpoint, waiting up to ``timeout`` (default ``wait_timeout``).

        Its calls count in flight on that endpoint (its drain waits for them) and are not retried
        elsewhere. Keep it while the endpoint is in discovery: once the endpoint leaves, new calls on it
        fail at once with :class:`~lbkit.EndpointRemovedError`; pick again.
        """
        wait = self.options.wait_timeout if timeout is None else timeout
        machine = Attempts(self._pick_rules, key, self.clock() + wait)
        while True:
            action = machine.next()
            if isinstance(action, float):
                self.wait_change(action, machine.picker)
                continue
            return PickedChannel(self, action)

    def wait_ready(self, timeout: float = 10.0, count: int = 1) -> None:
        """Block until at least ``count`` endpoints are pickable; raise NoReadyEndpointError on timeout."""
        self.check_started()
        deadline = self.clock() + timeout
        with self._picker_cond:
            while len(self.core.picker.endpoints) < count:
                left = deadline - self.clock()
                if left <= 0 or self.discovery.status.stopped:
                    raise self.no_endpoint_error()
                self._picker_cond.wait(min(left, 0.1))

    def close(self, grace: float | None = None) -> None:
        """Stop taking calls, let calls in flight finish for up to ``grace`` seconds (None: do not wait),
        then stop discovery, health checks and timers and close every channel, cutting short what is
        still in flight (those calls fail with :class:`~lbkit.EndpointRemovedError`)."""
        if grace is not None:
            check_float("Balancer.close", "grace", grace, minimum=0.0)
        if self._closed:
            return
        self._closed = True
        self._detach()
        if not self._threads:
            return
        self._notify_picker()
        if grace:
            end = self.clock() + grace
            while self.stats.total_in_flight > 0 and self.clock() < end:
                self._stop.wait(0.005)
        self._stop.set()
        self._wake.set()
        self._notify_picker()
        for t in self._threads:
            t.join(timeout=2.0)
        self._poller.stop()
        with self._lock:
            members = list(self.members.values())
            self.members.clear()
            self.draining.clear()
        reason = f"{self.service}: the balancer closed" + (f" (grace {grace:g} s)" if grace else "")
        for m in members:
            self._close_member(m, reason)

    # ----------------------------------------------------------------- call path

    @functools.cached_property
    def _pick_rules(self) -> CallRules:
        return CallRules(self, "pick", self.retry_policy)

    def wait_change(self, until: float, picker: Picker | None) -> None:
        """Block until ``clock`` reaches ``until``, the picker is no longer ``picker``, the clock is
        advanced or the balancer closes, whichever comes first."""
        left = until - self.clock()
        if left <= 0:
            return
        cond = self._picker_cond
        with cond:
            if self.core.picker is picker and not self._closed:
                cond.wait(min(left, 0.25))

    def wake(self) -> None:
        """End every :meth:`wait_change` now."""
        self._notify_picker()

    def _timer_added(self) -> None:
        wake = getattr(self, "_wake", None)
        if wake is not None:
            wake.set()

    def _on_clock_advanced(self) -> None:
        self._wake.set()
        self._notify_picker()

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
        self._follow(member)

    def _probe(self, member: Member, check: HealthCheck) -> None:
        probe(member.channel, check, functools.partial(self._on_unimplemented, member))

    def _close_member(self, member: Member, reason: str) -> None:
        member.mark_closed(reason)
        self._unfollow(member)
        if member.health is not None:
            member.health.close()
        try:
            member.channel.close()
        except Exception:  # closing an already broken channel must not stop the others
            log.debug("closing channel to %s failed", member.address, exc_info=True)

    def _drain(self) -> float | None:
        """Close members whose drain ended; return when to look again (``clock`` time)."""
        now = self.clock()
        done: list[Member] = []
        pending = False
        with self._lock:
            for address, m in list(self.draining.items()):
                if m.closing_at is None or self.members.get(address) is not m:
                    self.draining.pop(address, None)
                    continue
                if m.stats.in_flight <= 0 or now - m.closing_at >= self.options.drain_timeout:
                    del self.members[address]
                    self.draining.pop(address, None)
                    done.append(m)
                else:
                    pending = True
        for m in done:
            self._close_member(m, self._drained(m, now))
            self.core.forget(m.address)
        return now + 0.05 if pending else None

    # ----------------------------------------------------------------- threads

    def _run_discovery(self) -> None:
        try:
            self.discovery.run(self._on_update, self._stop)
        except Exception as exc:  # the discovery loop must not die silently
            self.discovery_died(exc)
            self._notify_picker()

    def _run_timers(self) -> None:
        core = self.core
        while not self._stop.is_set():
            with self._lock:
                if not self._closed:
                    self._apply_pending()
            next_core = core.tick()
            next_drain = self._drain()
            self._sleep_until = float("inf")  # planning: a timer added now wakes the wait below
            next_timer = self._run_due(self.clock())
            deadlines = [d for d in (next_core, next_drain, next_timer) if d is not None]
            now = self.clock()
            timeout = min(max(0.0, min(deadlines) - now) if deadlines else 1.0, 1.0)
            self._sleep_until = now + timeout
            self._wake.wait(timeout)
            self._wake.clear()

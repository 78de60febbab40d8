"""``lbkit.aio.Balancer``: the asyncio driver over the sans-I/O core, with a pool of grpc.aio channels."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import threading
import time
from typing import Any

import grpc

from lbkit._attempts import Attempts, CallRules
from lbkit._config import check_float
from lbkit._connectivity import AsyncChannelPoller, aio_state
from lbkit._driver import KeyFn, Member
from lbkit._offloop import Worker, use_worker
from lbkit._wakeup import Wakeup
from lbkit.aio.channel import AsyncDriver, BalancedChannel, PickedChannel
from lbkit.core import PickerBuild
from lbkit.endpoint import Endpoint, EndpointSet
from lbkit.events import Event
from lbkit.health.active import HealthCheck
from lbkit.health.native import aprobe
from lbkit.selectors.base import Key, Picker

__all__ = ["Balancer"]

log = logging.getLogger("lbkit")

OPEN_SLICE = 0.002
"""Seconds of opening channels the pool does before it lets the event loop run other work: a discovery
update that adds thousands of endpoints opens them over many loop iterations, not in one long stall."""


class Balancer(AsyncDriver):
    """The asyncio twin of ``lbkit.Balancer``: same options, ``async with``, ``aclose()``.

    ``lb.channel()`` gives a ``grpc.aio``-style channel for generated stubs; ``await lb.pick()`` a ready
    ``grpc.aio.Channel`` for one endpoint.
    """

    _channels = grpc.aio
    _tasks: list[asyncio.Task[None]] | None = None

    async def start(self) -> Balancer:
        """Start discovery, the channel pool and the timers (see :meth:`wait_ready`)."""
        if self._closed:
            raise RuntimeError("this Balancer is closed")
        if getattr(self, "_tasks", None):
            return self
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._picker_event = asyncio.Event()
        self._wake = Wakeup()
        self._probes: set[asyncio.Task[None]] = set()
        self._to_open: collections.deque[Member] = collections.deque()
        self._opener: asyncio.Task[None] | None = None
        self._builds: set[asyncio.Task[None]] = set()
        # Its one thread for blocking work (Consul answers decoded, slow picker builds), started now so
        # that the thread count does not grow during the run; the loop's default executor is left alone.
        self._worker = Worker(f"lbkit-{self.service}")
        self.core.offload = self._offload
        # Passes over every member (an update, a rebuild) leave the loop once they are slow; events still
        # reach the listeners on the loop, in order.
        self.core.defer_passes = True
        self.core.dispatch = self._dispatch_events
        self._event_backlog: collections.deque[Event] = collections.deque()
        self._event_lock = threading.Lock()
        self._events_scheduled = False
        self._next_set: EndpointSet | None = None
        self._updater: asyncio.Task[None] | None = None
        self.core.on_picker.append(self._threadsafe(self._picker_changed))
        self.core.on_deadline.append(self._threadsafe(self._wake.set))
        self._follow_clock(self._threadsafe(self._on_clock_advanced))
        self.core.on_pool.append(self._threadsafe(self._wake.set))
        self._poller = AsyncChannelPoller(name=f"lbkit-pool-{self.service}").start()
        self.stats.on_failure = self._on_call_failed
        self._tasks = [
            asyncio.create_task(self._run_discovery(), name=f"lbkit-discovery-{self.service}"),
            asyncio.create_task(self._run_timers(), name=f"lbkit-timers-{self.service}"),
        ]
        return self

    async def __aenter__(self) -> Balancer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _threadsafe(self, fn: Any) -> Any:
        def call() -> None:
            if threading.get_ident() == self._loop_thread:
                fn()
            elif not self._loop.is_closed():
                self._loop.call_soon_threadsafe(fn)

        return call

    def _on_clock_advanced(self) -> None:
        self._wake.set()
        self._picker_changed()

    def _picker_changed(self) -> None:
        event = self._picker_event
        self._picker_event = asyncio.Event()
        event.set()

    # ----------------------------------------------------------------- public

    def channel(self, key: KeyFn | None = None) -> Any:
        """A grpc.aio-style channel for generated stubs; each call picks an endpoint."""
        return BalancedChannel(self, key)

    async def pick(self, key: Key = None, timeout: float | None = None) -> grpc.aio.Channel:
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
                await self.await_change(action, machine.picker)
                continue
            return PickedChannel(self, action)

    async def wait_ready(self, timeout: float = 10.0, count: int = 1) -> None:
        """Wait until at least ``count`` endpoints are pickable; raise NoReadyEndpointError on timeout."""
        self.check_started()
        deadline = self.clock() + timeout
        while len(self.core.picker.endpoints) < count:
            left = deadline - self.clock()
            if left <= 0 or self.discovery.status.stopped:
                raise self.no_endpoint_error()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._picker_event.wait(), min(left, 0.25))

    async def aclose(self, grace: float | None = None) -> None:
        """Stop taking calls, let calls in flight finish for up to ``grace`` seconds (None: do not wait),
        then stop discovery, health checks and timers and close every channel, cutting short what is
        still in flight (those calls fail with :class:`~lbkit.EndpointRemovedError`)."""
        if grace is not None:
            check_float("Balancer.aclose", "grace", grace, minimum=0.0)
        if self._closed:
            return
        self._closed = True
        self._detach()
        if not self._tasks:
            return
        self._picker_changed()
        if grace:
            end = self.clock() + grace
            while self.stats.total_in_flight > 0 and self.clock() < end:
                await asyncio.sleep(0.005)
        await self._poller.stop()
        tasks = [*self._tasks, *self._probes, *self._builds]
        tasks += [t for t in (self._opener, self._updater) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._picker_changed()
        self._worker.close()
        members = list(self.members.values())
        self.members.clear()
        self.draining.clear()
        reason = f"{self.service}: the balancer closed" + (f" (grace {grace:g} s)" if grace else "")
        for m in members:
            await self._close_member(m, reason)

    def check_started(self) -> None:
        """Raise RuntimeError, saying how to start it, if the balancer was never started."""
        if not self._tasks:
            raise RuntimeError(
                f"{self.service}: the Balancer is not started: "
                "use `async with lbkit.aio.Balancer(...) as lb:` or await lb.start()"
            )

    # ----------------------------------------------------------------- call path

    @functools.cached_property
    def _pick_rules(self) -> CallRules:
        return CallRules(self, "pick", self.retry_policy)

    async def await_change(self, until: float, picker: Picker | None) -> None:
        """Wait until ``clock`` reaches ``until``, the picker is no longer ``picker``, the clock is
        advanced or the balancer closes, whichever comes first."""
        left = until - self.clock()
        if left <= 0 or self._closed or self.core.picker is not picker:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._picker_event.wait(), min(left, 0.25))

    def wake(self) -> None:
        """End every :meth:`await_change` now."""
        self._picker_changed()

    def _timer_added(self) -> None:
        self._threadsafe(self._wake.set)()

    # ----------------------------------------------------------------- pool

    def _on_update(self, endpoint_set: EndpointSet) -> None:
        if threading.get_ident() != self._loop_thread:
            self._loop.call_soon_threadsafe(self._on_update, endpoint_set)
            return
        if self._closed:
            return
        if self._updater is not None and not self._updater.done():
            self._next_set = endpoint_set  # after the one in the worker; a newer set replaces it
        elif self.core.slow_pass(max(len(endpoint_set), len(self.core.members))):
            self._next_set = endpoint_set
            self._updater = asyncio.create_task(self._update_off_loop(), name=f"lbkit-update-{self.service}")
        else:
            self._apply_update(endpoint_set)

    async def _update_off_loop(self) -> None:
        """Hand the core's part of each pending update to the worker, then apply its plan on the loop."""
        while self._next_set is not None and not self._closed:
            endpoint_set, self._next_set = self._next_set, None
            zone = self.discovery.local_zone
            try:
                plan = await self._worker.run(self._core_update, zone, endpoint_set)
                if not self._closed:
                    self._apply_plan(plan)
            except Exception:  # as an update applied inline: logged, and the next one is taken
                log.exception("%s: taking a discovery update failed", self.service)

    def _dispatch_events(self, events: list[Event]) -> None:
        """The core's events to its listeners on the loop, in the order they happened (from any thread)."""
        if threading.get_ident() == self._loop_thread and not self._event_backlog:
            self.core.deliver(events)
            return
        with self._event_lock:
            self._event_backlog.extend(events)
            schedule = not self._events_scheduled
            self._events_scheduled = True
        if schedule and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._deliver_backlog)

    def _deliver_backlog(self) -> None:
        with self._event_lock:
            events = list(self._event_backlog)
            self._event_backlog.clear()
            self._events_scheduled = False
        self.core.deliver(events)

    def _new_member(self, endpoint: Endpoint) -> Member:
        """A member whose channel :meth:`_open_member` opens later, a slice at a time."""
        member = Member(endpoint.address, None, self.stats[endpoint.address])
        self.members[endpoint.address] = member
        return member

    def _open_member(self, member: Member) -> None:
        """Queue the member: its channel, connectivity watch and health check start in the opener task."""
        self._to_open.append(member)
        if self._opener is None or self._opener.done():
            self._opener = asyncio.create_task(self._open_queued(), name=f"lbkit-open-{self.service}")

    async def _open_queued(self) -> None:
        """Open queued members, yielding to the loop every OPEN_SLICE seconds."""
        queue = self._to_open
        while queue and not self._closed:
            until = time.perf_counter() + OPEN_SLICE
            while queue and time.perf_counter() < until:
                member = queue.popleft()
                if self.members.get(member.address) is not member or member.closed:
                    continue  # gone (or replaced) before its turn
                member.channel = self._channel_to(member.address)
                self._follow(member)
            await asyncio.sleep(0)

    @staticmethod
    def _state_of(channel: Any) -> grpc.ChannelConnectivity | None:
        return aio_state(channel, False)

    def _probe(self, member: Member, check: HealthCheck) -> None:
        task = asyncio.create_task(self._aprobe(member, check), name=f"lbkit-probe-{member.address}")
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    async def _aprobe(self, member: Member, check: HealthCheck) -> None:
        if await aprobe(member.channel, check):
            self._on_unimplemented(member)

    def _offload(self, build: PickerBuild) -> None:
        """The core's hook for slow picker builds: run it in a worker thread, publish it on the loop."""
        if threading.get_ident() != self._loop_thread:
            if not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._offload, build)
            return
        if self._closed:
            return
        task = asyncio.create_task(self._build_off_loop(build), name=f"lbkit-build-{self.service}")
        self._builds.add(task)
        task.add_done_callback(self._builds.discard)

    async def _build_off_loop(self, build: PickerBuild) -> None:
        try:
            picker = await self._worker.run(build)
        except Exception:
            log.exception("%s: building a picker failed", self.service)
            self.core.drop_build(build)
            return
        self.core.publish(build, picker)

    async def _close_member(self, member: Member, reason: str) -> None:
        member.mark_closed(reason)
        self._unfollow(member)
        if member.channel is None:
            return  # never opened
        channels = [member.channel] if member.health is None else [member.channel, member.health.channel]
        for channel in channels:
            try:
                await channel.close()
            except Exception:
                log.debug("closing a channel to %s failed", member.address, exc_info=True)

    async def _drain(self) -> float | None:
        """Close members whose drain ended; return when to look again (``clock`` time)."""
        now = self.clock()
        pending = False
        for address, m in list(self.draining.items()):
            if m.closing_at is None or self.members.get(address) is not m:
                self.draining.pop(address, None)
                continue
            if m.stats.in_flight <= 0 or now - m.closing_at >= self.options.drain_timeout:
                del self.members[address]
                self.draining.pop(address, None)
                await self._close_member(m, self._drained(m, now))
                self.core.forget(address)
            else:
                pending = True
        return now + 0.05 if pending else None

    # ----------------------------------------------------------------- tasks

    async def _run_discovery(self) -> None:
        use_worker(self._worker)  # the discovery's blocking work (decoding answers) runs on it too
        try:
            await self.discovery.arun(self._on_update)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the discovery loop must not die silently
            self.discovery_died(exc)
            self._picker_changed()

    async def _run_timers(self) -> None:
        core = self.core
        while not self._closed:
            self._apply_pending()
            next_core = await self._worker.run(core.tick) if core.slow_pass() else core.tick()
            next_drain = await self._drain()
            self._sleep_until = float("inf")  # planning: a timer added now wakes the wait below
            next_timer = self._run_due(self.clock())
            deadlines = [d for d in (next_core, next_drain, next_timer) if d is not None]
            now = self.clock()
            timeout = min(max(0.0, min(deadlines) - now) if deadlines else 1.0, 1.0)
            self._sleep_until = now + timeout
            await self._wake.wait(timeout)
            self._wake.clear()

"""Following the connectivity of every channel of a balancer without a thread or a task per channel.

grpcio makes a sync channel's state known only through ``subscribe()``, which costs a thread per channel,
and a ``grpc.aio`` channel's through ``wait_for_state_change()``, which costs a task (and about a dozen
Python objects the cyclic collector walks) per channel. Instead :class:`PollSchedule` (no I/O) says which
channel to read when, and two thin drivers read them: :class:`ChannelPoller` from one thread (the sync
balancer) and :class:`AsyncChannelPoller` from one task on the event loop (the asyncio balancer). A read
(:func:`lbkit._grpc_private.connectivity` for a sync channel, public ``get_state`` for a ``grpc.aio``
one) takes a few microseconds, asks an IDLE channel to connect and
calls back on every change. The schedule:

- a channel just added, just changed, or :meth:`~PollSchedule.hint`-ed is read again after
  ``first_interval``, then after twice that each time it has not changed, up to a cap;
- a *trusted* channel (a call channel: a call that fails on it hints the poller) that is READY is capped
  at ``ready_period`` (10 s): until a call fails there, nothing needs it read;
- every other channel (not READY yet, or a health-checked channel whose state no call reveals) is capped
  at the sweep period, ``max(min_period, channels / reads_per_second)``, and at 1 s while not READY: these
  reads together stay within ``reads_per_second`` once settled.

A health flip is seen within 50 ms at 100 endpoints, 0.5 s at 1,000 and 5 s at 10,000; a connection that
breaks under calls at the first failed call.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

import grpc

from lbkit._grpc_private import connectivity
from lbkit._wakeup import Wakeup

__all__ = ["AsyncChannelPoller", "ChannelPoller", "OnState", "PollSchedule", "Reader", "aio_state"]

log = logging.getLogger("lbkit")

Reader = Callable[[Any, bool], "grpc.ChannelConnectivity | None"]
"""Reads a channel's state (asking an IDLE one to connect if the flag says so); None once it is closed."""

OnState = Callable[[Any, grpc.ChannelConnectivity], None]
"""Called with a watch's key and its channel's new state: on the poller's thread or a failed call's (sync),
on the loop (asyncio)."""

TICK = 0.01
"""The poller sleeps at least this long between rounds: reads due within it are made together."""

NOT_READY_CAP = 1.0
"""The longest interval between reads of a channel that is not READY."""

LOOP_SLICE = 0.002
"""Seconds of reads made in one go: :class:`AsyncChannelPoller` then lets the event loop run other work,
:class:`ChannelPoller` lets a failed call's read in."""


def aio_state(channel: Any, try_to_connect: bool) -> grpc.ChannelConnectivity | None:
    """A ``grpc.aio`` channel's state (public: ``get_state``; on its loop only); None once it is closed."""
    state: grpc.ChannelConnectivity = channel.get_state(try_to_connect)
    return None if state is grpc.ChannelConnectivity.SHUTDOWN else state


class _Watch:
    __slots__ = ("channel", "due", "interval", "key", "on_state", "state", "taken", "trusted")

    def __init__(
        self, key: Hashable, channel: Any, on_state: OnState, due: float, interval: float, trusted: bool
    ) -> None:
        self.key = key
        self.channel = channel
        self.on_state = on_state
        self.state: grpc.ChannelConnectivity | None = None
        self.due = due
        self.taken = due
        """The ``due`` of its read last taken by :meth:`PollSchedule.take_due`."""
        self.interval = interval
        self.trusted = trusted


class PollSchedule:
    """Which channel to read when (see the module doc); no I/O, no lock: its driver serializes calls."""

    def __init__(
        self,
        *,
        name: str = "lbkit-connectivity",
        first_interval: float = 0.01,
        min_period: float = 0.05,
        reads_per_second: float = 2_000.0,
        ready_period: float = 10.0,
        read: Reader = connectivity,
    ) -> None:
        self.name = name
        self._read = read
        self.first_interval = first_interval
        self.min_period = min_period
        self.reads_per_second = reads_per_second
        self.ready_period = ready_period
        self._trusted = 0
        """Watches of trusted channels (their reads, once READY, are not on the sweep's budget)."""
        self._watches: dict[Hashable, _Watch] = {}
        self._heap: list[tuple[float, int]] = []
        """(due, sequence number) of each queued read: atoms only, so CPython's collector stops tracking
        these tuples (a tuple holding the watch would be one more object per channel for it to walk)."""
        self._queued: dict[int, _Watch] = {}
        """The watch of each heap entry, by its sequence number."""
        self._seq = itertools.count()
        self.reads = 0
        """Channel states read so far."""

    def watch(self, key: Hashable, channel: Any, on_state: OnState, now: float, *, trusted: bool) -> None:
        """Follow ``channel`` under ``key`` (replacing any watch with that key), read first at ``now``."""
        self.unwatch(key)
        entry = _Watch(key, channel, on_state, now, self.first_interval, trusted)
        self._watches[key] = entry
        self._trusted += trusted
        self._push(entry)

    def unwatch(self, key: Hashable) -> None:
        """Stop following the channel under ``key``."""
        entry = self._watches.pop(key, None)
        if entry is not None:
            self._trusted -= entry.trusted

    def unwatched(self, entry: _Watch) -> bool:
        """Whether ``entry`` is no longer the watch of its key."""
        return self._watches.get(entry.key) is not entry

    def clear(self) -> None:
        """Forget every watch."""
        self._watches.clear()
        self._heap.clear()
        self._queued.clear()
        self._trusted = 0

    def hint(self, key: Hashable, now: float) -> bool:
        """Read the channel under ``key`` again at ``now``, then after ``first_interval``; False if it was
        due that soon anyway."""
        entry = self._watches.get(key)
        if entry is None or entry.interval <= self.first_interval:
            return False
        entry.interval = self.first_interval
        entry.due = now
        self._push(entry)
        return True

    def suspect(self, key: Hashable) -> _Watch | None:
        """The watch under ``key`` if its channel was READY when last read: after a call failed on it,
        worth a read at once (its driver's :meth:`read`, after :meth:`hint`), as the calls after it would
        go there too. None otherwise (it is out of the pickers already, or not watched)."""
        entry = self._watches.get(key)
        return entry if entry is not None and entry.state is grpc.ChannelConnectivity.READY else None

    def next_due(self) -> float | None:
        """When the next read is due; None with nothing watched."""
        heap, queued = self._heap, self._queued
        while heap:
            at, seq = heap[0]
            if self._current(queued[seq], at):
                return at
            heapq.heappop(heap)  # stale: removed, or queued again since
            del queued[seq]
        return None

    def _current(self, entry: _Watch, at: float) -> bool:
        """Whether a heap entry of ``entry`` due ``at`` is its current one (not removed, not queued again)."""
        return self._watches.get(entry.key) is entry and entry.due == at

    def __len__(self) -> int:
        return len(self._watches)

    @property
    def period(self) -> float:
        """Seconds within which every channel on the sweep's budget is read, once settled."""
        return max(self.min_period, (len(self._watches) - self._trusted) / self.reads_per_second)

    def _cap(self, entry: _Watch, period: float) -> float:
        if entry.state is not grpc.ChannelConnectivity.READY:
            return max(self.first_interval, min(period, NOT_READY_CAP))
        return self.ready_period if entry.trusted else period

    def _push(self, entry: _Watch) -> None:
        seq = next(self._seq)
        self._queued[seq] = entry
        heapq.heappush(self._heap, (entry.due, seq))

    def take_due(self, now: float) -> list[_Watch]:
        """Pop the watches due by ``now`` (current ones only: a re-scheduled or removed watch leaves a stale
        heap entry behind, skipped here); each keeps the time it was due in ``taken``."""
        heap, queued, current = self._heap, self._queued, self._current
        due: list[_Watch] = []
        while heap and heap[0][0] <= now:
            at, seq = heapq.heappop(heap)
            entry = queued.pop(seq)
            if current(entry, at):
                entry.taken = at
                due.append(entry)
        return due

    def reschedule(self, taken: list[_Watch], now: float) -> None:
        """Queue the next read of each watch read from :meth:`take_due`'s list."""
        period = self.period
        for entry in taken:
            # Unless removed, or hinted meanwhile (then it is already queued again).
            if self._current(entry, entry.taken):
                entry.due = now + entry.interval
                entry.interval = min(entry.interval * 2.0, self._cap(entry, period))
                self._push(entry)

    def read(self, entry: _Watch) -> None:
        """Read the channel's state (asking an IDLE one to connect); call back if it changed."""
        state = self._read(entry.channel, True)
        self.reads += 1
        if state is None or state is entry.state:  # None: closed under us, its owner unwatches it
            return
        entry.state = state
        entry.interval = self.first_interval
        try:
            entry.on_state(entry.key, state)
        except Exception:  # one channel's callback must not stop the others being watched
            log.exception("%s: connectivity callback failed for %r", self.name, entry.key)


class _Poller:
    """What both drivers share: the schedule, on ``clock``, and how they are sized."""

    _read: Reader = connectivity

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, **schedule: Any) -> None:
        """``schedule``: :class:`PollSchedule`'s options (``name``, ``first_interval``, ...), its defaults."""
        self.schedule = PollSchedule(read=type(self)._read, **schedule)
        self.name = self.schedule.name
        self._clock = clock
        self._stopped = False

    @property
    def reads(self) -> int:
        """Channel states read so far."""
        return self.schedule.reads

    def __len__(self) -> int:
        return len(self.schedule)

    @property
    def period(self) -> float:
        """Seconds within which every channel on the sweep's budget is read, once settled."""
        return self.schedule.period


class ChannelPoller(_Poller):
    """Follows many sync ``grpc.Channel`` s' connectivity from one daemon thread (see the module doc)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._cond = threading.Condition(threading.Lock())
        """Guards the schedule's queue."""
        self._reading = threading.RLock()
        """Held while channels are read and their callbacks run (the poller's thread, or a failed call's)."""
        self._thread: threading.Thread | None = None
        follow = getattr(self._clock, "on_advance", None)
        if follow is not None:  # a test's fake clock: look at the new time at once
            follow(self._wake)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def start(self) -> ChannelPoller:
        """Start the thread (once)."""
        with self._cond:
            if self._thread is None and not self._stopped:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
        return self

    def stop(self, timeout: float | None = 2.0) -> None:
        """Stop the thread; no callback runs after this returns (unless called from one)."""
        with self._cond:
            self._stopped = True
            self.schedule.clear()
            self._cond.notify()
        with self._reading:  # a read under way on a failed call's thread ends first
            pass
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def watch(self, key: Hashable, channel: Any, on_state: OnState, *, trusted: bool = False) -> None:
        """Follow ``channel``'s state under ``key`` (replacing any watch with that key): it is read at once,
        with a request to connect, and ``on_state(key, state)`` hears the first state and each change.

        ``trusted``: the owner hints when the channel may have left READY (a call on it failed), so while
        READY it is read only every ``ready_period``.
        """
        with self._cond:
            if self._stopped:
                return
            self.schedule.watch(key, channel, on_state, self._clock(), trusted=trusted)
            self._cond.notify()

    def unwatch(self, key: Hashable) -> None:
        """Stop following the channel under ``key``."""
        with self._cond:
            self.schedule.unwatch(key)

    def hint(self, key: Hashable) -> None:
        """A call on the channel under ``key`` failed: read it now, on the caller's thread, if it was READY
        (the calls after it would go there too: a connection lost under calls is seen at the first failed
        call, before enough fail there to eject the endpoint, which would outlast its return); and again
        soon, on the poller's thread."""
        with self._cond:
            queued = self.schedule.hint(key, self._clock())
            entry = self.schedule.suspect(key)
        if entry is not None:
            with self._reading:
                if not self._stopped and not self.schedule.unwatched(entry):
                    self.schedule.read(entry)
        if queued:  # (after the read here: the poller's follow-up need not race it)
            with self._cond:
                self._cond.notify()

    def next_due(self) -> float | None:
        """When the next read is due (``clock`` time); None with nothing watched."""
        with self._cond:
            return self.schedule.next_due()

    def _run(self) -> None:
        cond, schedule = self._cond, self.schedule
        while True:
            with cond:
                if self._stopped:
                    return
                now = self._clock()
                due = schedule.take_due(now + TICK)
                if not due:
                    at = schedule.next_due()
                    cond.wait(None if at is None else max(at - now, TICK))
                    continue
            self._read_all(due)
            with cond:
                schedule.reschedule(due, self._clock())
            time.sleep(TICK)

    def _read_all(self, due: list[_Watch]) -> None:
        """Read ``due``, holding the read lock :data:`LOOP_SLICE` seconds at a time (a failed call's read
        waits no longer than that)."""
        schedule, perf, reading = self.schedule, time.perf_counter, self._reading
        i, n = 0, len(due)
        while i < n:
            with reading:
                until = perf() + LOOP_SLICE
                while i < n:
                    entry = due[i]
                    i += 1
                    if self._stopped:
                        return
                    if not schedule.unwatched(entry):
                        schedule.read(entry)
                        if perf() > until:
                            break


class AsyncChannelPoller(_Poller):
    """Follows many ``grpc.aio`` channels' connectivity from one task on the running event loop.

    The same schedule as :class:`ChannelPoller`; every method is called on the loop (a ``grpc.aio``
    channel may be read only there: closing it frees its core channel without a lock). Reads are made
    :data:`LOOP_SLICE` seconds at a time, so ten thousand channels due together do not stall the loop.
    """

    _read = staticmethod(aio_state)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._wake = Wakeup()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> AsyncChannelPoller:
        """Start the task (once), on the running loop."""
        if self._task is None and not self._stopped:
            loop = asyncio.get_running_loop()
            self._task = loop.create_task(self._run(), name=self.name)
            follow = getattr(self._clock, "on_advance", None)
            if follow is not None:  # a test's fake clock: look at the new time at once

                def wake() -> None:
                    if not loop.is_closed():
                        loop.call_soon_threadsafe(self._wake.set)

                follow(wake)
        return self

    async def stop(self) -> None:
        """Stop the task; no callback runs after this returns."""
        self._stopped = True
        self.schedule.clear()
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def watch(self, key: Hashable, channel: Any, on_state: OnState, *, trusted: bool = False) -> None:
        """As :meth:`ChannelPoller.watch`; ``on_state`` is called on the loop."""
        if not self._stopped:
            self.schedule.watch(key, channel, on_state, self._clock(), trusted=trusted)
            self._wake.set()

    def unwatch(self, key: Hashable) -> None:
        """Stop following the channel under ``key``."""
        self.schedule.unwatch(key)

    def hint(self, key: Hashable) -> None:
        """As :meth:`ChannelPoller.hint`, the read on the caller's turn of the loop."""
        schedule = self.schedule
        if schedule.hint(key, self._clock()):
            self._wake.set()
        entry = schedule.suspect(key)
        if entry is not None:
            schedule.read(entry)

    def next_due(self) -> float | None:
        """When the next read is due (``clock`` time); None with nothing watched."""
        return self.schedule.next_due()

    async def _run(self) -> None:
        schedule, perf = self.schedule, time.perf_counter
        while not self._stopped:
            now = self._clock()
            due = schedule.take_due(now + TICK)
            if not due:
                at = schedule.next_due()
                self._wake.clear()
                await self._wake.wait(None if at is None else max(at - now, TICK))
                continue
            until = perf() + LOOP_SLICE
            for entry in due:
                if schedule.unwatched(entry):
                    continue  # removed while the loop ran other work
                schedule.read(entry)
                if perf() > until:
                    await asyncio.sleep(0)
                    until = perf() + LOOP_SLICE
            schedule.reschedule(due, self._clock())
            await asyncio.sleep(TICK)

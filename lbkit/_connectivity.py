"""One thread that follows the connectivity of every sync channel of a balancer.

grpcio's sync channels make their state known only through ``subscribe()``, which costs a thread per
channel. :class:`ChannelPoller` instead reads each channel's state (a few microseconds, see
:func:`lbkit._grpc_private.connectivity`) on a schedule, asking IDLE channels to connect as it goes, and
calls back on every change:

- a channel just added, just changed, or :meth:`~ChannelPoller.hint`-ed is read again after
  ``first_interval``, then after twice that each time it has not changed, up to a cap;
- a *trusted* channel (a call channel: a call that fails on it hints the poller) that is READY is capped
  at ``ready_period`` (10 s): until a call fails there, nothing needs it read;
- every other channel (not READY yet, or a health-checked channel whose state no call reveals) is capped
  at the sweep period, ``max(min_period, channels / reads_per_second)``, and at 1 s while not READY: these
  reads together stay within ``reads_per_second`` once settled.

A health flip is seen within 50 ms at 100 endpoints, 0.5 s at 1,000 and 5 s at 10,000, for well under 1%
of one core; a connection that breaks under calls at the first failed call.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

import grpc

from lbkit._grpc_private import connectivity

__all__ = ["ChannelPoller", "OnState"]

log = logging.getLogger("lbkit")

OnState = Callable[[Any, grpc.ChannelConnectivity], None]
"""Called (on the poller's thread) with a watch's key and its channel's new state."""

TICK = 0.01
"""The poller sleeps at least this long between rounds: reads due within it are made together."""

NOT_READY_CAP = 1.0
"""The longest interval between reads of a channel that is not READY."""


class _Watch:
    __slots__ = ("channel", "due", "interval", "key", "on_state", "state", "trusted")

    def __init__(
        self, key: Hashable, channel: Any, on_state: OnState, due: float, interval: float, trusted: bool
    ) -> None:
        self.key = key
        self.channel = channel
        self.on_state = on_state
        self.state: grpc.ChannelConnectivity | None = None
        self.due = due
        self.interval = interval
        self.trusted = trusted


class ChannelPoller:
    """Follows many sync ``grpc.Channel`` s' connectivity from one daemon thread (see the module doc)."""

    def __init__(
        self,
        *,
        name: str = "lbkit-connectivity",
        first_interval: float = 0.01,
        min_period: float = 0.05,
        reads_per_second: float = 2_000.0,
        ready_period: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.first_interval = first_interval
        self.min_period = min_period
        self.reads_per_second = reads_per_second
        self.ready_period = ready_period
        self._trusted = 0
        """Watches of trusted channels (their reads, once READY, are not on the sweep's budget)."""
        self._clock = clock
        self._watches: dict[Hashable, _Watch] = {}
        self._heap: list[tuple[float, int, _Watch]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition(threading.Lock())
        self._stopped = False
        self._thread: threading.Thread | None = None
        self.reads = 0
        """Channel states read so far."""
        follow = getattr(clock, "on_advance", None)
        if follow is not None:  # a test's fake clock: look at the new time at once
            follow(self._wake)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # ----------------------------------------------------------------- control

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
            self._watches.clear()
            self._trusted = 0
            self._heap.clear()
            self._cond.notify()
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
            self._forget(key)
            entry = _Watch(key, channel, on_state, self._clock(), self.first_interval, trusted)
            self._watches[key] = entry
            self._trusted += trusted
            self._push(entry)
            self._cond.notify()

    def unwatch(self, key: Hashable) -> None:
        """Stop following the channel under ``key``."""
        with self._cond:
            self._forget(key)

    def _forget(self, key: Hashable) -> None:
        entry = self._watches.pop(key, None)
        if entry is not None:
            self._trusted -= entry.trusted

    def hint(self, key: Hashable) -> None:
        """Read the channel under ``key`` again soon (something suggests its state changed)."""
        with self._cond:
            entry = self._watches.get(key)
            if entry is None or entry.interval <= self.first_interval:
                return
            entry.interval = self.first_interval
            entry.due = self._clock()
            self._push(entry)
            self._cond.notify()

    def next_due(self) -> float | None:
        """When the next read is due (``clock`` time); None with nothing watched."""
        with self._cond:
            return min((w.due for w in self._watches.values()), default=None)

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

    # ----------------------------------------------------------------- thread

    def _push(self, entry: _Watch) -> None:
        heapq.heappush(self._heap, (entry.due, next(self._seq), entry))

    def _take_due(self, now: float) -> list[_Watch]:
        """Pop the watches due by ``now`` (current ones only: a re-scheduled or removed watch leaves a stale
        heap entry behind, skipped here)."""
        heap, watches = self._heap, self._watches
        due: list[_Watch] = []
        while heap and heap[0][0] <= now:
            at, _, entry = heapq.heappop(heap)
            if watches.get(entry.key) is entry and entry.due == at:
                due.append(entry)
        return due

    def _run(self) -> None:
        cond = self._cond
        while True:
            with cond:
                if self._stopped:
                    return
                now = self._clock()
                due = self._take_due(now + TICK)
                if not due:
                    wait = self._heap[0][0] - now if self._heap else None
                    cond.wait(None if wait is None else max(wait, TICK))
                    continue
            taken = [(entry, entry.due) for entry in due]
            for entry in due:
                self._read(entry)
            with cond:
                period = self.period
                now = self._clock()
                for entry, was_due in taken:
                    # Unless removed, or hinted meanwhile (then it is already queued again).
                    if self._watches.get(entry.key) is entry and entry.due == was_due:
                        entry.due = now + entry.interval
                        entry.interval = min(entry.interval * 2.0, self._cap(entry, period))
                        self._push(entry)
            time.sleep(TICK)

    def _read(self, entry: _Watch) -> None:
        state = connectivity(entry.channel, try_to_connect=True)
        self.reads += 1
        if state is None:  # closed under us: its owner unwatches it
            return
        if state is entry.state:
            return
        entry.state = state
        entry.interval = self.first_interval
        try:
            entry.on_state(entry.key, state)
        except Exception:  # one channel's callback must not stop the others being watched
            log.exception("%s: connectivity callback failed for %r", self.name, entry.key)

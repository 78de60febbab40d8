"""A wakeup for one task on an event loop that sleeps until set or until a timeout, without a task of
its own: ``asyncio.wait_for(event.wait(), timeout)`` wraps the wait in a new task each time (Python
3.10 and 3.11), which a loop's own timer and poller tasks would make every few milliseconds."""

from __future__ import annotations

import asyncio

__all__ = ["Wakeup"]


def _release(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Wakeup:
    """Set from the loop (or through ``loop.call_soon_threadsafe``); waited on by one task at a time."""

    __slots__ = ("_flag", "_waiter")

    def __init__(self) -> None:
        self._flag = False
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        """Wake the waiting task, or the next wait if none is waiting."""
        self._flag = True
        waiter = self._waiter
        if waiter is not None:
            _release(waiter)

    def clear(self) -> None:
        """Forget a wake not yet waited for."""
        self._flag = False

    def is_set(self) -> bool:
        """Whether a wake is pending."""
        return self._flag

    async def wait(self, timeout: float | None) -> bool:
        """Sleep until set (True) or ``timeout`` seconds pass (False; None: no timeout); a pending wake
        returns at once. The wake stays set until :meth:`clear`."""
        if self._flag:
            return True
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, _release, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
        return self._flag

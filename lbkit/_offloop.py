"""Where the asyncio side runs its blocking work (Consul answers decoded, slow picker builds).

``asyncio.to_thread`` uses the loop's default executor, which is the application's and grows a thread
whenever work is handed over before the previous worker has gone back to idle, even one item at a time:
over a long run its thread count creeps up to its maximum. The asyncio balancer instead owns one
:class:`Worker` thread, started with it, and points :func:`off_loop` at it for its own tasks (the
discovery loop among them), so its thread count is flat from the start and the default executor is left
to the application. Outside a balancer (a discovery run on its own), :func:`off_loop` is
``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["Worker", "off_loop", "use_worker"]

T = TypeVar("T")

_WORKER: contextvars.ContextVar[Worker | None] = contextvars.ContextVar("lbkit_worker", default=None)


class Worker:
    """One worker thread, started at construction (not at the first job), for one driver's blocking work."""

    def __init__(self, name: str) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)
        self._pool.submit(int).result()  # the thread exists from now on

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the worker thread, awaited on the running loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args))

    def close(self) -> None:
        """Stop taking work; the thread ends once the job it is running (if any) returns."""
        self._pool.shutdown(wait=False)


def use_worker(worker: Worker) -> None:
    """Make :func:`off_loop` run on ``worker`` in the current task (and the tasks it creates)."""
    _WORKER.set(worker)


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` off the event loop: on the worker of the balancer running this task, else in the
    loop's default executor (``asyncio.to_thread``)."""
    worker = _WORKER.get()
    if worker is None:
        return await asyncio.to_thread(fn, *args)
    return await worker.run(fn, *args)

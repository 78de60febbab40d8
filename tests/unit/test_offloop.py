"""lbkit._offloop: blocking work runs on the balancer's worker in the tasks that use it, else in the
loop's default executor."""

from __future__ import annotations

import asyncio
import threading

from lbkit._offloop import Worker, off_loop, use_worker


def thread_name() -> str:
    return threading.current_thread().name


async def test_off_loop_runs_on_the_worker_of_the_task_and_its_children_only() -> None:
    worker = Worker("lbkit-test")
    try:
        assert "lbkit-test_0" in {t.name for t in threading.enumerate()}  # started before any job

        async def with_worker() -> tuple[str, str]:
            use_worker(worker)
            child = asyncio.create_task(off_loop(thread_name))  # a task made here inherits it
            return await off_loop(thread_name), await child

        assert await asyncio.create_task(with_worker()) == ("lbkit-test_0", "lbkit-test_0")
        outside = await off_loop(thread_name)  # this task never chose the worker
        assert outside != "lbkit-test_0" and outside != threading.current_thread().name
    finally:
        worker.close()

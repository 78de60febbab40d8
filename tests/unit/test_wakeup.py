"""lbkit._wakeup.Wakeup: the loop tasks' sleep, woken by a set or a timeout, with no task of its own."""

from __future__ import annotations

import asyncio

from lbkit._wakeup import Wakeup


async def test_a_wait_sleeps_until_set_without_a_task_of_its_own() -> None:
    wake = Wakeup()
    tasks_before = len(asyncio.all_tasks())
    counted: list[int] = []

    async def sleeper() -> bool:
        return await wake.wait(60.0)

    task = asyncio.get_running_loop().create_task(sleeper())
    await asyncio.sleep(0)  # the sleeper is now waiting
    counted.append(len(asyncio.all_tasks()))
    wake.set()
    assert await asyncio.wait_for(task, 5.0) is True
    assert counted == [tasks_before + 1]  # the sleeper's own task only (wait_for's wait adds one more)


async def test_a_wait_ends_at_its_timeout_and_a_pending_wake_returns_at_once() -> None:
    wake = Wakeup()
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await wake.wait(0.02) is False
    assert loop.time() - start >= 0.015
    wake.set()
    assert await wake.wait(60.0) is True  # set before the wait: no sleep
    assert await wake.wait(60.0) is True  # stays set until cleared
    wake.clear()
    assert not wake.is_set() and await wake.wait(0.0) is False


async def test_a_wake_from_another_thread_through_the_loop_reaches_the_sleeper() -> None:
    wake = Wakeup()
    loop = asyncio.get_running_loop()
    waiting = loop.create_task(wake.wait(None))
    await asyncio.sleep(0)
    await asyncio.to_thread(loop.call_soon_threadsafe, wake.set)
    assert await asyncio.wait_for(waiting, 5.0) is True

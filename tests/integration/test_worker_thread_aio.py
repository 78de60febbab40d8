"""lbkit.aio.Balancer's blocking work runs on its one worker thread, started with it: over many Consul
answers and slow picker builds its threads stay the same, and the loop's default executor (the
application's) is given nothing."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable
from typing import Any

import lbkit
import lbkit.aio
from lbkit.core import PickerBuild
from lbkit.testing import ModelServer
from lbkit.testing.consul import ConsulServer

CHANGES = 40


class CountingExecutor(concurrent.futures.ThreadPoolExecutor):
    """A default executor that counts the jobs it is given."""

    def __init__(self) -> None:
        super().__init__(2, thread_name_prefix="app-default")
        self.jobs = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        self.jobs += 1
        return super().submit(fn, *args, **kwargs)


def lbkit_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("lbkit-"))


async def until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not met within {timeout} s"
        await asyncio.sleep(0.005)


async def test_threads_stay_flat_over_consul_answers_and_slow_builds() -> None:
    default = CountingExecutor()
    asyncio.get_running_loop().set_default_executor(default)
    service = "worker-threads"
    with ConsulServer() as consul, ModelServer() as steady, ModelServer() as flapping:
        client = consul.client()
        client.agent.service.register(service, service_id="steady", address="127.0.0.1", port=steady.port)
        lb = lbkit.aio.Balancer(
            lbkit.ConsulDiscovery(service, address=consul.address, env={}, wait=5.0), drain_timeout=0.0
        )
        async with lb:
            await lb.wait_ready(timeout=10.0)
            offloaded: list[PickerBuild] = []
            offload = lb.core.offload
            assert offload is not None

            def counting(build: PickerBuild) -> None:
                offloaded.append(build)
                offload(build)

            lb.core.offload = counting
            lb.core.offload_above = 0.0  # every picker build from now on counts as slow
            before = lbkit_threads()
            jobs = default.jobs
            updates = lb.discovery.status.updates
            for _ in range(CHANGES):
                client.agent.service.register(
                    service, service_id="flapping", address="127.0.0.1", port=flapping.port
                )
                await until(lambda: len(lb.core.picker.endpoints) == 2, "the second endpoint in the picker")
                client.agent.service.deregister("flapping")
                await until(lambda: len(lb.core.picker.endpoints) == 1, "the second endpoint gone")
            assert lb.discovery.status.updates - updates >= 2 * CHANGES
            assert len(offloaded) >= 2 * CHANGES
            # One worker, there from the start (not from the first slow build), and the same one at the end;
            # the default executor got no job: the answers were decoded on the worker too.
            worker = [f"lbkit-{service}_0"]
            assert (before, lbkit_threads(), default.jobs - jobs) == (worker, worker, 0)
        assert default.jobs == 0
    default.shutdown(wait=False)

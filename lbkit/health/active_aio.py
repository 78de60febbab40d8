"""The asyncio twin of :class:`lbkit.health.active.HealthWatcher`: the same protocol, run in one task."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2_grpc

from lbkit.health.active import HealthCheck, HealthTracker, OnStatus

__all__ = ["AsyncHealthWatcher"]


class AsyncHealthWatcher:
    """Checks one endpoint's health over its ``grpc.aio.Channel`` from an asyncio task."""

    def __init__(
        self,
        config: HealthCheck,
        channel: grpc.aio.Channel,
        address: str,
        on_status: OnStatus,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.address = address
        self._tracker = HealthTracker(config, address, on_status, rng=rng)
        self._stub = health_pb2_grpc.HealthStub(channel)
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    def start(self) -> None:
        """Start checking (once), in a task of the running loop."""
        if self._task is None and not self._stopped:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"lbkit-health-{self.address}"
            )

    async def stop(self) -> None:
        """Stop checking: cancel the task (and with it the call in flight) and wait for it to end.

        Nothing is reported after this returns.
        """
        self._stopped = True
        self._tracker.enabled = False
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task})

    @property
    def running(self) -> bool:
        """Whether the checking task is alive."""
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        tracker = self._tracker
        while True:
            try:
                delay = await (self._check() if tracker.polling else self._watch())
            except grpc.aio.UsageError:  # the channel was closed under us
                return
            if delay > 0.0:
                await asyncio.sleep(delay)

    async def _watch(self) -> float:
        call: Any = self._stub.Watch(self._tracker.request(), wait_for_ready=True)
        code: grpc.StatusCode | None = None
        try:
            async for response in call:
                self._tracker.on_message(response.status)
        except grpc.RpcError as error:
            code = error.code()
        finally:
            call.cancel()
        return self._tracker.on_watch_end(code)

    async def _check(self) -> float:
        call: Any = self._stub.Check(
            self._tracker.request(), timeout=self._tracker.config.timeout, wait_for_ready=True
        )
        status: int | None = None
        code: grpc.StatusCode | None = None
        try:
            status = int((await call).status)
        except grpc.RpcError as error:
            code = error.code()
        finally:
            call.cancel()
        return self._tracker.on_check(status, code)

"""Fixtures: real ModelService servers on 127.0.0.1, started and stopped by each test."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import pytest

from lbkit.testing import Behavior, ModelServer
from lbkit.testing.model_server import pb2, pb2_grpc

__all__ = ["SCHEDULING_MARGIN", "async_wait_for", "pb2", "pb2_grpc", "served_counts", "wait_for"]

SCHEDULING_MARGIN = 0.25
"""Seconds a timing bound may exceed the behaviour's own figure (a deadline, a wait_timeout): how late a
thread or task waiting for it may be woken, and the failed call unwound, on a 2-core machine shared with
other work. Bounds are the figure plus this, never a multiple of it: a call that waits twice as long as
it should fails them."""


@pytest.fixture
def make_servers() -> Iterator[Callable[..., list[ModelServer]]]:
    """Start ``n`` model servers (optionally with behaviours); all are stopped after the test."""
    started: list[ModelServer] = []

    def make(n: int = 3, **behavior: object) -> list[ModelServer]:
        servers = [ModelServer(behavior=Behavior(**behavior)).start() for _ in range(n)]  # type: ignore[arg-type]
        started.extend(servers)
        return servers

    yield make
    for s in started:
        s.stop(0)


def served_counts(servers: list[ModelServer], method: str = "Predict") -> list[int]:
    """Calls of ``method`` each server received."""
    return [s.calls[method] for s in servers]


def wait_for(cond: Callable[[], object], timeout: float = 5.0) -> None:
    """Poll ``cond`` every 10 ms until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


async def async_wait_for(cond: Callable[[], object], timeout: float = 5.0) -> None:
    """The asyncio twin of :func:`wait_for`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")

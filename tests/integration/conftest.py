"""Fixtures: real ModelService servers on 127.0.0.1, started and stopped by each test."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from lbkit.testing import Behavior, ModelServer
from lbkit.testing.model_server import pb2, pb2_grpc

__all__ = ["pb2", "pb2_grpc"]


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

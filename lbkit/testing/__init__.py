"""Helpers for tests: real model servers, a Consul-compatible HTTP server and a fake clock (loaded lazily)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lbkit._lazy import lazy_exports

__all__ = [
    "Behavior",
    "ConsulServer",
    "ConsulTimings",
    "FakeClock",
    "ModelServer",
    "RecordedRequest",
    "ServerProcess",
]

_LAZY: dict[str, str] = {
    "Behavior": "lbkit.testing.model_server",
    "FakeClock": "lbkit.testing.clock",
    "ModelServer": "lbkit.testing.model_server",
    "ConsulServer": "lbkit.testing.consul",
    "ConsulTimings": "lbkit.testing.consul",
    "RecordedRequest": "lbkit.testing.consul",
    "ServerProcess": "lbkit.testing.server_process",
}

if TYPE_CHECKING:
    from lbkit.testing.clock import FakeClock
    from lbkit.testing.consul import ConsulServer, ConsulTimings, RecordedRequest
    from lbkit.testing.model_server import Behavior, ModelServer
    from lbkit.testing.server_process import ServerProcess


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())

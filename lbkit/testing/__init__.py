"""Helpers for tests: real model servers and a Consul-compatible HTTP server (loaded lazily)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["Behavior", "ConsulServer", "ConsulTimings", "ModelServer", "RecordedRequest", "ServerProcess"]

_LAZY = {
    "Behavior": "lbkit.testing.model_server",
    "ModelServer": "lbkit.testing.model_server",
    "ConsulServer": "lbkit.testing.consul",
    "ConsulTimings": "lbkit.testing.consul",
    "RecordedRequest": "lbkit.testing.consul",
    "ServerProcess": "lbkit.testing.server_process",
}

if TYPE_CHECKING:
    from lbkit.testing.consul import ConsulServer, ConsulTimings, RecordedRequest
    from lbkit.testing.model_server import Behavior, ModelServer
    from lbkit.testing.server_process import ServerProcess


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lbkit.testing' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

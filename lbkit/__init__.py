"""lbkit: client-side load balancing for gRPC in Python.

Selectors (round robin, least connections, weighted, consistent hash, peak EWMA), discovery (static,
Consul), health (active checks, outlier ejection) and balanced channels that generated stubs accept.
Public names load lazily, so ``import lbkit`` costs little more than ``import grpc``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY: dict[str, str] = {
    "ConfigError": "lbkit.errors",
    "DiscoveryError": "lbkit.errors",
    "LbkitError": "lbkit.errors",
    "NoEndpointsError": "lbkit.errors",
    "NoReadyEndpointError": "lbkit.errors",
    "Endpoint": "lbkit.endpoint",
    "EndpointDiff": "lbkit.endpoint",
    "EndpointSet": "lbkit.endpoint",
    "Event": "lbkit.events",
    "EventKind": "lbkit.events",
    "EndpointStats": "lbkit.stats",
    "Stats": "lbkit.stats",
    "Picker": "lbkit.selectors.base",
    "Selector": "lbkit.selectors.base",
    "Discovery": "lbkit.discovery.base",
    "StaticDiscovery": "lbkit.discovery.static",
}

__all__ = sorted([*_LAZY, "__version__"])

if TYPE_CHECKING:
    from lbkit.discovery.base import Discovery
    from lbkit.discovery.static import StaticDiscovery
    from lbkit.endpoint import Endpoint, EndpointDiff, EndpointSet
    from lbkit.errors import ConfigError, DiscoveryError, LbkitError, NoEndpointsError, NoReadyEndpointError
    from lbkit.events import Event, EventKind
    from lbkit.selectors.base import Picker, Selector
    from lbkit.stats import EndpointStats, Stats


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lbkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])

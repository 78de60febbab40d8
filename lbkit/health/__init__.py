"""Endpoint health: passive outlier ejection, slow start, and active grpc.health.v1 checks.

Names load lazily, so the outlier and slow-start core does not import the health-check protos.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY: dict[str, str] = {
    "FailurePercentageEjection": "lbkit.health.outlier",
    "OutlierDetection": "lbkit.health.outlier",
    "OutlierDetector": "lbkit.health.outlier",
    "SuccessRateEjection": "lbkit.health.outlier",
    "SlowStart": "lbkit.health.slow_start",
    "HealthCheck": "lbkit.health.active",
    "HealthTracker": "lbkit.health.active",
    "HealthWatcher": "lbkit.health.active",
    "OnStatus": "lbkit.health.active",
    "AsyncHealthWatcher": "lbkit.health.active_aio",
}

__all__ = [
    "AsyncHealthWatcher",
    "FailurePercentageEjection",
    "HealthCheck",
    "HealthTracker",
    "HealthWatcher",
    "OnStatus",
    "OutlierDetection",
    "OutlierDetector",
    "SlowStart",
    "SuccessRateEjection",
]

if TYPE_CHECKING:
    from lbkit.health.active import HealthCheck, HealthTracker, HealthWatcher, OnStatus
    from lbkit.health.active_aio import AsyncHealthWatcher
    from lbkit.health.outlier import (
        FailurePercentageEjection,
        OutlierDetection,
        OutlierDetector,
        SuccessRateEjection,
    )
    from lbkit.health.slow_start import SlowStart


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lbkit.health' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])

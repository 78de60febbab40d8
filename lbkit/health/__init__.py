"""Endpoint health: passive outlier ejection, slow start, and active grpc.health.v1 checks.

Names load lazily, so the outlier and slow-start core does not import the health-check protos.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lbkit._lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())

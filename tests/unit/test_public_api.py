"""The public surface: ``lbkit.__all__`` pinned, every public name documented, sync/asyncio parity."""

from __future__ import annotations

import inspect
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import lbkit
import lbkit.aio

LBKIT_ALL = [
    "BalancedChannel",
    "Balancer",
    "Cause",
    "ConfigError",
    "ConsistentHash",
    "ConsulDiscovery",
    "Discovery",
    "DiscoveryError",
    "Endpoint",
    "EndpointDiff",
    "EndpointHealth",
    "EndpointRemovedError",
    "EndpointSet",
    "EndpointStats",
    "Event",
    "EventKind",
    "FailurePercentageEjection",
    "HealthCheck",
    "HedgingPolicy",
    "LbkitError",
    "LeastConnections",
    "NoEndpointsError",
    "NoReadyEndpointError",
    "OutlierDetection",
    "PeakEwma",
    "Picker",
    "RegistrationError",
    "RetryPolicy",
    "RoundRobin",
    "Selector",
    "SlowStart",
    "StaticDiscovery",
    "Stats",
    "Subsetting",
    "SuccessRateEjection",
    "Weighted",
    "WeightedRoundRobin",
    "ZoneMode",
    "ZonePlan",
    "ZoneRouting",
    "__version__",
]

AIO_ALL = ["Balancer"]

SYNC_ASYNC_PAIRS = {"close": "aclose"}
"""Methods whose asyncio twin has another name (documented in docs/getting-started.md)."""

CALL_PATH_HELPERS = {"wait_change", "await_change"}
"""Public-named helpers the balanced channels call; not part of the documented surface."""


def _public_names(module: ModuleType) -> list[str]:
    return [n for n in module.__all__ if not n.startswith("_")]


def _own_members(cls: type) -> dict[str, Any]:
    """Public attributes defined by ``cls`` or its lbkit bases (not by object, Exception, grpc, ...)."""
    members: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if not klass.__module__.startswith("lbkit"):
            continue
        for name, value in vars(klass).items():
            if not name.startswith("_"):
                members[name] = value
    return members


def _is_routine(value: Any) -> bool:
    return isinstance(value, (staticmethod, classmethod, property)) or inspect.isfunction(value)


def _doc(value: Any) -> str | None:
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    if isinstance(value, property):
        value = value.fget
    return inspect.getdoc(value)


def test_lbkit_all_is_pinned() -> None:
    assert sorted(lbkit.__all__) == LBKIT_ALL


def test_lbkit_aio_all_is_pinned() -> None:
    assert sorted(lbkit.aio.__all__) == AIO_ALL


@pytest.mark.parametrize("module", [lbkit, lbkit.aio], ids=["lbkit", "lbkit.aio"])
def test_every_public_name_resolves_and_is_documented(module: ModuleType) -> None:
    undocumented = []
    for name in _public_names(module):
        value = getattr(module, name)  # raises if a lazy name points nowhere
        if not inspect.getdoc(value):
            undocumented.append(name)
    assert undocumented == []


@pytest.mark.parametrize("module", [lbkit, lbkit.aio], ids=["lbkit", "lbkit.aio"])
def test_every_public_method_is_documented(module: ModuleType) -> None:
    undocumented = []
    for name in _public_names(module):
        value = getattr(module, name)
        if not inspect.isclass(value):
            continue
        for attr, member in _own_members(value).items():
            if _is_routine(member) and not _doc(member):
                undocumented.append(f"{name}.{attr}")
    assert undocumented == []


def test_lazy_names_match_all() -> None:
    table = vars(lbkit)["_LAZY"]
    submodules = {name for name, module in table.items() if module == f"lbkit.{name}"}
    assert submodules == {"aio", "metrics", "registration", "testing"}
    assert set(table) - submodules == set(lbkit.__all__) - {"__version__"}
    for name in submodules:
        assert getattr(lbkit, name).__name__ == f"lbkit.{name}"


def test_version_matches_the_package_metadata() -> None:
    tomllib = pytest.importorskip("tomllib")
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    if not pyproject.exists():  # pragma: no cover - installed without the source tree
        pytest.skip("no pyproject.toml")
    assert lbkit.__version__ == tomllib.loads(pyproject.read_text())["project"]["version"]


def _init_params(cls: type) -> list[tuple[str, Any, Any]]:
    sig = inspect.signature(getattr(cls, "__init__"))  # noqa: B009 - mypy rejects cls.__init__
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


def test_sync_and_asyncio_balancers_take_the_same_parameters() -> None:
    assert _init_params(lbkit.Balancer) == _init_params(lbkit.aio.Balancer)


def _public_methods(cls: type) -> set[str]:
    return {name for name, member in _own_members(cls).items() if _is_routine(member)}


def test_sync_and_asyncio_balancers_have_the_same_public_methods() -> None:
    sync = {SYNC_ASYNC_PAIRS.get(n, n) for n in _public_methods(lbkit.Balancer) - CALL_PATH_HELPERS}
    asyncio_ = _public_methods(lbkit.aio.Balancer) - CALL_PATH_HELPERS
    assert sorted(sync ^ asyncio_) == []


def test_asyncio_twins_are_coroutines_where_the_sync_ones_block() -> None:
    for name in ("start", "pick", "wait_ready", "aclose"):
        assert inspect.iscoroutinefunction(getattr(lbkit.aio.Balancer, name)), name
    for name in ("start", "pick", "wait_ready", "close", "channel"):
        assert not inspect.iscoroutinefunction(getattr(lbkit.Balancer, name)), name


def test_import_lbkit_leaves_grpc_unimported() -> None:
    # docs/faq.md: public names load lazily, so `import lbkit` does not pay for importing grpc.
    import subprocess
    import sys

    code = "import sys, lbkit; print(sorted(m for m in sys.modules if m == 'grpc' or m.startswith('grpc.')))"
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60, check=True
    )
    assert proc.stdout.strip() == "[]"

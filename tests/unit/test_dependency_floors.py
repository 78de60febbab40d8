"""ci/lowest_constraints.py pins every runtime dependency of pyproject.toml to its floor (CI runs part of
the suite on those pins), and refuses a dependency that names no floor."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lowest_constraints", ROOT / "ci" / "lowest_constraints.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_runtime_dependency_is_pinned_to_its_floor() -> None:
    script = _script()
    dependencies = script._dependencies(ROOT / "pyproject.toml")
    pins = script.constraints(dependencies)
    assert len(pins) == len(dependencies)
    names = [p.split("==")[0] for p in pins]
    assert {"grpcio", "py-consul", "tenacity", "prometheus-client", "protobuf"} <= set(names)
    assert "py-consul==1.8.0" in pins  # the extra is dropped, the floor kept
    assert "typing_extensions==4.12.0; python_version < '3.11'" in pins  # the marker kept


@pytest.mark.parametrize("dependency", ["mmh3", "mmh3<6", "mmh3>=4,>=5", "mmh3==5.0"])
def test_a_dependency_without_one_floor_is_refused(dependency: str) -> None:
    with pytest.raises(SystemExit, match="floor"):
        _script().constraints([dependency])


def test_floor_with_a_ceiling() -> None:
    assert _script().constraints(["mmh3>=5.0.0,<6"]) == ["mmh3==5.0.0"]

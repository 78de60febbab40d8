"""The code stays ruff- and mypy --strict-clean (run as part of the test suite, so CI checks it).

Both run as ``python -m ...`` with the interpreter running the tests, and with a PATH that holds no
virtualenv: they run in a venv that is not activated, as they do in an activated one.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("lbkit", "tests", "benchmarks", "examples")


def run_module(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m module args`` from the checkout's root, skipping the test if ``module`` is not
    installed for this interpreter (the ``test`` extra installs it)."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed for {sys.executable} (pip install -e '.[test]')")
    env = {**os.environ, "PATH": os.defpath}  # nothing found through an activated venv's bin/
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_ruff_check() -> None:
    result = run_module("ruff", "check", *SOURCES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format() -> None:
    result = run_module("ruff", "format", "--check", *SOURCES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict() -> None:
    result = run_module("mypy", "--strict", "lbkit")
    assert result.returncode == 0, result.stdout + result.stderr

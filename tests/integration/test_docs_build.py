"""The docs site builds with ``mkdocs build --strict`` (warnings are errors), as CI builds it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mkdocs")
pytest.importorskip("material")
pytest.importorskip("mkdocstrings_handlers.python")

ROOT = Path(__file__).resolve().parents[2]


def test_docs_build_strict(tmp_path: Path) -> None:
    if not (ROOT / "mkdocs.yml").exists():  # pragma: no cover - installed without the source tree
        pytest.skip("no mkdocs.yml")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (site / "index.html").exists()
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("lbkit.Balancer", "lbkit.ConsistentHash", "lbkit.RetryPolicy"):
        assert f'id="{name}"' in api, f"{name} missing from the API reference"

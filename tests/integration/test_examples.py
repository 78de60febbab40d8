"""Every example runs by itself, ends in time, exits 0 and prints the line that says what it shows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

CASES = [
    ("wrap_existing_stub.py", "the unchanged stub now spreads its calls over 3 servers"),
    ("ab_routing.py", "every user stayed on one model version"),
    ("gpu_pool.py", "WeightedRoundRobin took them from the servers' load reports"),
    ("pipeline.py", "each request fused on one server"),
    ("model_service/run.py", "the unhealthy server got no new streams"),
]

TIMEOUT = 45.0


@pytest.mark.timeout(TIMEOUT + 15)
@pytest.mark.parametrize(("script", "key_line"), CASES, ids=[c[0] for c in CASES])
def test_example_runs(script: str, key_line: str) -> None:
    path = EXAMPLES / script
    if not path.exists():  # pragma: no cover - installed without the source tree
        pytest.skip(f"no {script}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert key_line in result.stdout, output


def test_every_example_is_tested() -> None:
    scripts = {p.relative_to(EXAMPLES).as_posix() for p in EXAMPLES.rglob("*.py")}
    helpers = {"model_service/server.py", "model_service/client.py"}
    assert scripts - helpers == {script for script, _ in CASES}

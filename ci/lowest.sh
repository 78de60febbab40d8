#!/usr/bin/env bash
# A fast part of the suite against the oldest versions pyproject.toml allows, so a floor that is not true
# fails CI: a fresh venv (on the oldest Python lbkit supports, when it is installed), every runtime
# dependency pinned to its floor by ci/lowest_constraints.py, then the unit tests and the integration tests
# that exercise each dependency (grpc, health checking, py-consul, tenacity, prometheus-client).
set -euo pipefail
cd "$(dirname "$0")/.."

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

py=python
for candidate in "$(pyenv root 2>/dev/null || echo /nonexistent)"/versions/3.10*/bin/python python3.10; do
    if "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 10))' 2>/dev/null; then
        py="$candidate"
        break
    fi
done

python ci/lowest_constraints.py >"$work/lowest.txt"
echo "lowest versions ($("$py" --version)):" $(grep -v '^#' "$work/lowest.txt" | cut -d';' -f1)
"$py" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --upgrade pip
# The test tools the selected tests import (pip finds no version set for the whole test extra together
# with the floors); the constraints pin only the runtime dependencies.
"$work/venv/bin/python" -m pip install -q -c "$work/lowest.txt" -e . \
    pytest pytest-asyncio pytest-timeout hypothesis cryptography
# The venv must hold exactly the floors (pytest brings in packaging, which reads the markers).
"$work/venv/bin/python" - "$work/lowest.txt" <<'PY'
import sys
from importlib.metadata import version

from packaging.requirements import Requirement

for line in open(sys.argv[1]):
    if line.strip() and not line.startswith("#"):
        req = Requirement(line.strip())
        if req.marker is None or req.marker.evaluate():
            floor = str(req.specifier).removeprefix("==")
            assert version(req.name) == floor, f"{req.name} {version(req.name)} is installed, its floor {floor}"
PY
"$work/venv/bin/python" -m pytest -q -p no:cacheprovider tests/unit \
    tests/integration/test_discovery_failure.py \
    tests/integration/test_active_health.py \
    tests/integration/test_metrics.py \
    tests/integration/test_consul_balancer.py \
    tests/integration/test_consul_balancer_aio.py \
    -k "not test_consul_balancer or registration_reaches or killed_and_restarted or not_serving"

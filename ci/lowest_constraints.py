"""Print pip constraints pinning every runtime dependency of pyproject.toml to its floor.

``python ci/lowest_constraints.py > lowest.txt`` turns ``grpcio>=1.85.1`` into ``grpcio==1.85.1`` (extras
dropped, environment markers kept). Every runtime dependency must have a ``>=`` floor: one without is an
error, since nothing would then say which oldest version lbkit claims to work with.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None  # type: ignore[assignment]

__all__ = ["constraints", "main"]

ROOT = Path(__file__).resolve().parents[1]
_REQUIREMENT = re.compile(
    r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(?P<spec>[^;]*?)\s*(?:;\s*(?P<marker>.+))?$"
)


def _dependencies(pyproject: Path) -> list[str]:
    text = pyproject.read_text()
    if tomllib is not None:
        return list(tomllib.loads(text)["project"]["dependencies"])
    block = re.search(r"^dependencies\s*=\s*\[(.*?)^\]", text, re.S | re.M)
    if block is None:
        raise SystemExit(f"{pyproject}: no [project] dependencies")
    return re.findall(r'"([^"]+)"', block.group(1))


def constraints(dependencies: list[str]) -> list[str]:
    """One ``name==floor`` line (with its marker) per dependency; SystemExit naming one without a floor."""
    lines = []
    for dep in dependencies:
        match = _REQUIREMENT.match(dep)
        if match is None:
            raise SystemExit(f"cannot read the dependency {dep!r}")
        floors = [s.strip()[2:].strip() for s in match["spec"].split(",") if s.strip().startswith(">=")]
        if len(floors) != 1:
            raise SystemExit(f"dependency {dep!r} needs exactly one '>=' floor")
        line = f"{match['name']}=={floors[0]}"
        if match["marker"]:
            line += f"; {match['marker'].strip()}"
        lines.append(line)
    return lines


def main() -> int:
    """Print the constraints for this repository's pyproject.toml."""
    print("\n".join(constraints(_dependencies(ROOT / "pyproject.toml"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())

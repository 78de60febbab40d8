"""docs/architecture.md stays true: every module and name its table of rules points to exists."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def _named(text: str) -> tuple[set[str], set[str]]:
    """Dotted lbkit paths in code spans, and the bare names (classes, functions) the table's rows give."""
    table = text[text.index("## Where each rule lives") :]
    spans = re.findall(r"`([^`]+)`", table)
    dotted = {s for s in spans if s.startswith("lbkit.") or s == "lbkit"}
    bare = {s for s in spans if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", s)}
    return dotted, bare


def _resolve(path: str) -> object:
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(path)


def test_every_module_the_architecture_page_names_exists() -> None:
    dotted, _ = _named(DOC.read_text(encoding="utf-8"))
    assert len(dotted) > 20
    missing = []
    for path in sorted(dotted):
        try:
            _resolve(path)
        except (ModuleNotFoundError, AttributeError):
            missing.append(path)
    assert missing == [], (
        f"docs/architecture.md names {missing}, which no longer exist: move those rows to where they live"
    )


def test_every_name_in_a_row_is_defined_in_that_rows_modules() -> None:
    text = DOC.read_text(encoding="utf-8")
    table = text[text.index("## Where each rule lives") :]
    missing = []
    for row in table.splitlines():
        if not row.startswith("| ") or row.startswith("| Rule") or row.startswith("|---"):
            continue
        cells = row.split("|")
        modules = [m for m in re.findall(r"`([^`]+)`", cells[2]) if m.startswith("lbkit")]
        names = re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", cells[3])
        for name in names:
            if not any(hasattr(_resolve(m), name) for m in modules):
                missing.append(f"{name} (in {', '.join(modules)})")
    assert missing == [], f"docs/architecture.md: {missing} not found where the row says"

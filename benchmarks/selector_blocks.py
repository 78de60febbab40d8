"""The "Measured" blocks of the selector pages (docs/selectors/), written from a full run's results.

Each page holds ``<!-- benchmarks:selector:NAME:begin -->`` and ``...:end -->`` lines; ``python -m
benchmarks --update-docs`` fills them from the ``selectors`` module (ns per pick at each N against its
baseline, rebuild time over 1,000 endpoints) and, for the selectors the ``faults`` module compares on a
slow server, that comparison.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from benchmarks._common import markdown_table

__all__ = ["SELECTOR_BLOCKS"]

_PAGES: dict[str, tuple[list[str], str]] = {
    # block name: (the pick_ns labels of its rows, the baseline label)
    "round_robin": (["round_robin"], "baseline itertools.cycle"),
    "least_connections": (["least_connections"], "baseline random.choice"),
    "weighted": (["weighted"], "baseline static stride, weights 1..10"),
    "peak_ewma": (["peak_ewma"], "baseline random.choice"),
    "consistent_hash": (["consistent_hash maglev", "consistent_hash ring"], "baseline random.choice"),
    "weighted_round_robin": (["weighted_round_robin"], "baseline static stride, weights 1..10"),
}


def _pick_table(picks: Mapping[str, Any], labels: list[str], baseline: str) -> str | None:
    rows: list[list[Any]] = []
    sizes: list[int] = []
    for label in [*labels, baseline]:
        points = {int(n): float(ns) for n, ns in picks.get(label, [])}
        if not points:
            return None
        sizes = sorted(points)
        rows.append([f"{label}, ns per pick", *(f"{points[n]:,.0f}" for n in sizes)])
    columns = ["", *(f"N={n:,}" for n in sizes)]
    return markdown_table({"caption": "", "columns": columns, "rows": rows})


def _rebuilds(rebuild: Mapping[str, float], labels: list[str]) -> str | None:
    parts = []
    for label in labels:
        for key in (label, f"{label}, weights 1..10"):
            if key in rebuild:
                parts.append(f"{rebuild[key]:.1f} ms ({key})")
    if not parts:
        return None
    return "Rebuilding the picker over 1,000 endpoints took " + ", ".join(parts) + "."


def _slow_server(results: Mapping[str, Any], selector: str) -> str | None:
    slow = results.get("faults", {}).get("data", {}).get("slow", {})
    mine, native = slow.get(f"lbkit {selector}"), slow.get("native round_robin")
    if not mine or not native:
        return None
    return (
        "With one server of four at 200 ms per call (the others at 2 ms, 300 calls/s), "
        f"{selector} sent it {mine['slow']['share']:.1%} of the calls, with a p99 of "
        f"{mine['slow']['p99_ms']:.1f} ms against {mine['healthy']['p99_ms']:.1f} ms with all four healthy; "
        f"native round_robin sent it {native['slow']['share']:.1%}, p99 {native['slow']['p99_ms']:.1f} ms "
        "(the Faults section of the benchmarks)."
    )


def render(name: str, results: Mapping[str, Any]) -> str | None:
    """The block of selector page ``name``, or None when the results lack its figures."""
    labels, baseline = _PAGES[name]
    data = results.get("selectors", {}).get("data", {})
    if data.get("quick", True):
        return None  # a page quotes full runs only
    table = _pick_table(data.get("pick_ns", {}), labels, baseline)
    if table is None:
        return None
    lines = [table, ""]
    for sentence in (_rebuilds(data.get("rebuild_ms_1000", {}), labels), _slow_server(results, name)):
        if sentence:
            lines.append(sentence)
    lines.append(
        "From the last full run of `python -m benchmarks --update-docs` (machine in the "
        "[Benchmarks](../benchmarks.md) page's header); a pick's cost is the best of several repeats."
    )
    return "\n".join(lines)


SELECTOR_BLOCKS: dict[str, Callable[[Mapping[str, Any]], str | None]] = {
    f"selector:{name}": partial(render, name) for name in _PAGES
}
"""Block name -> renderer, for ``benchmarks.__main__.BLOCKS``."""

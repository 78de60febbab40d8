"""The benchmark suite: ``python -m benchmarks [--quick] [--only NAME ...] [--out DIR] [--update-docs]``.

Runs each benchmark module present (see ``MODULES``) and writes, under ``--out`` (``bench-results/`` by
default), one Markdown report headed by the machine and versions (``benchmarks.md``), a JSON of every
result (``results.json``) and PNG plots if matplotlib is installed (``img/``). Running the benchmarks never
touches the checkout's docs; ``--update-docs`` (a full run of every module) publishes the report as
``docs/benchmarks.md``, its plots in ``docs/img/``, and refreshes every generated block in the docs pages
(see :data:`BLOCKS`). Exits 1 if a module raised (the report still lists the others).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks._common import Result, machine_info, markdown_table, median, render_result, run_info
from benchmarks.selector_blocks import SELECTOR_BLOCKS

__all__ = [
    "BLOCKS",
    "DOCS",
    "MODULES",
    "main",
    "make_plots",
    "refresh_blocks",
    "render_report",
    "run_suite",
    "summary_vs_round_robin",
]

MODULES = (
    "selectors",
    "hash_quality",
    "subsetting",
    "zones",
    "e2e",
    "faults",
    "load_reports",
    "tail",
    "consul_propagation",
    "consul_picker",
    "scale",
    "soak",
)
"""Benchmark modules, in the order they run and appear in the report."""

Series = dict[str, list[tuple[float, float]]]

DOCS = Path(__file__).resolve().parent.parent / "docs"
"""The checkout's docs, which only ``--update-docs`` writes."""
SUMMARY_TITLE = "In short: lbkit against grpcio's round_robin"
PLACEHOLDER = (
    "_No figures yet: `python -m benchmarks --update-docs` writes them here from a full run (see"
    " [Benchmarks](benchmarks.md))._"
)
"""What a generated block holds before the first published run."""


def _ratio_range(values: Sequence[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:.2f}x" if f"{low:.2f}" == f"{high:.2f}" else f"{low:.2f}-{high:.2f}x"


def _round_ratios(cell: Mapping[str, Any], name: str, baseline: str, key: str) -> float | None:
    """The median over rounds of ``name``'s per-round ratio of ``key`` to ``baseline``'s (as e2e judges)."""
    xs, bs = cell.get(name), cell.get(baseline)
    if not xs or not bs or len(xs) != len(bs):
        return None
    ratios = [x[key] / b[key] for x, b in zip(xs, bs, strict=True) if b[key]]
    return median(ratios) if ratios else None


def summary_vs_round_robin(results: Mapping[str, Any]) -> str | None:
    """The Markdown summary of lbkit against native round_robin (e2e and selectors figures of this run),
    or None if those modules did not run. ``docs/faq.md`` quotes it as generated."""
    e2e = results.get("e2e", {}).get("data", {}).get("cells")
    if not e2e:
        return None
    from benchmarks.e2e import CYCLE, NATIVE, SELECTORS, lbkit_variant

    rows: list[list[str]] = []
    native_cpu: list[float] = []
    for kind in ("unary", "stream"):
        cells = {name: cell for name, cell in e2e.items() if name.startswith(f"{kind} ")}
        groups = [
            (f"4 plain channels in turn (one per server, no lbkit), {kind}", [(CYCLE.name, NATIVE.name)]),
            (f"lbkit round_robin, {kind}", [(lbkit_variant("round_robin").name, NATIVE.name)]),
            (
                f"lbkit, any of its {len(SELECTORS)} selectors, {kind}",
                [(lbkit_variant(s).name, lbkit_variant(s).baseline) for s in SELECTORS],
            ),
        ]
        for label, pairs in groups:
            cpu: list[float] = []
            qps: list[float] = []
            for cell in cells.values():
                for name, baseline in pairs:
                    c = _round_ratios(cell, name, baseline, "cpu_us_per_call")
                    q = _round_ratios(cell, name, baseline, "qps")
                    if c is not None and q is not None:
                        cpu.append(c)
                        qps.append(q)
            if cpu:
                rows.append([label, _ratio_range(cpu), _ratio_range(qps), str(len(cells))])
        if kind == "unary":
            native_cpu += [
                median([w["cpu_us_per_call"] for w in cell[NATIVE.name]])
                for cell in cells.values()
                if cell.get(NATIVE.name)
            ]
    if not rows:
        return None
    table = markdown_table(
        {
            "caption": "",
            "columns": ["client", "client CPU per call vs native", "QPS vs native", "client modes"],
            "rows": rows,
        }
    )
    lines = [table, ""]
    if native_cpu:
        lines.append(
            f"- A loopback unary call through native round_robin cost {min(native_cpu):.0f}-"
            f"{max(native_cpu):.0f} us of client CPU across the client modes (sync and asyncio, concurrency"
            " 1 to 64)."
        )
    picks = results.get("selectors", {}).get("data", {}).get("pick_ns", {})
    at_100: dict[str, float] = {}
    for label, points in picks.items():
        ns = {int(n): float(v) for n, v in points}.get(100)
        if ns is not None and not label.startswith("baseline"):
            at_100[label] = ns
    if at_100:
        ranked = sorted(at_100.items(), key=lambda item: item[1])
        (cheapest, low), (dearest, high) = ranked[0], ranked[-1]
        lines.append(
            f"- A pick itself cost {low:,.0f} ns ({cheapest}) to {high:,.0f} ns ({dearest}) over 100"
            " endpoints (the Selector costs section of the benchmarks)."
        )
    lines.append(
        "- Ranges run over the client modes of the End-to-end section; each ratio is a median of per-round"
        " ratios against native round_robin measured in the same run (consistent hash against native"
        " round_robin sending the same lb-key header)."
    )
    return "\n".join(lines)


BLOCKS: dict[str, Callable[[Mapping[str, Any]], str | None]] = {
    "vs-round-robin": summary_vs_round_robin,
    **SELECTOR_BLOCKS,
}
"""Generated blocks of the docs pages, by name: a page holds ``<!-- benchmarks:NAME:begin -->`` and
``<!-- benchmarks:NAME:end -->`` lines, and ``--update-docs`` replaces what is between them."""


def block_pattern(name: str) -> re.Pattern[str]:
    """The begin marker, the block's text and the end marker of block ``name``."""
    return re.compile(
        rf"(<!-- benchmarks:{re.escape(name)}:begin -->\n)(.*?)(\n<!-- benchmarks:{re.escape(name)}:end -->)",
        re.DOTALL,
    )


def _filled(body: str) -> Callable[[re.Match[str]], str]:
    def fill(match: re.Match[str]) -> str:
        return match.group(1) + body + match.group(3)

    return fill


def refresh_blocks(results: Mapping[str, Any], docs: Path) -> list[Path]:
    """Rewrite every generated block in the Markdown pages under ``docs``; return the pages changed."""
    changed: list[Path] = []
    for page in sorted(docs.rglob("*.md")):
        text = page.read_text()
        new = text
        for name, render in BLOCKS.items():
            body = render(results)
            if body is not None:
                new = block_pattern(name).sub(_filled(body), new)
        if new != text:
            page.write_text(new)
            changed.append(page)
    return changed


def run_suite(names: Sequence[str], *, quick: bool) -> dict[str, Any]:
    """Run the named modules; return ``{name: result}`` with ``skipped`` or ``error`` entries for the rest."""
    results: dict[str, Any] = {}
    for position, name in enumerate(names, 1):
        label = f"[{position}/{len(names)}] {name}"
        if importlib.util.find_spec(f"benchmarks.{name}") is None:
            results[name] = {"skipped": f"benchmarks/{name}.py is not present"}
            print(f"{label}: skipped (not present)", file=sys.stderr, flush=True)
            continue
        print(f"{label}: running{' (quick)' if quick else ''}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            module = importlib.import_module(f"benchmarks.{name}")
            result: Result = module.run(quick=quick)
        except Exception:
            results[name] = {
                "error": traceback.format_exc(),
                "seconds": round(time.perf_counter() - start, 1),
            }
            print(f"{label}: FAILED\n{results[name]['error']}", file=sys.stderr, flush=True)
            continue
        result["seconds"] = round(time.perf_counter() - start, 1)
        results[name] = result
        print(f"{label}: done in {result['seconds']:.1f} s", file=sys.stderr, flush=True)
    return results


def render_report(
    results: Mapping[str, Any],
    machine: Mapping[str, str],
    *,
    quick: bool,
    plots: Mapping[str, str],
    published: bool = False,
) -> str:
    """The Markdown report: machine and versions, the summary, then each module's tables, notes and plots."""
    command = "python -m benchmarks" + (" --quick" if quick else "") + (" --update-docs" if published else "")
    parts = [
        "# lbkit benchmarks",
        f"Generated by `{command}`"
        + (" (quick run: short windows, figures are rough)." if quick else ".")
        + (" Do not edit: the next run rewrites this page." if published else ""),
        markdown_table(
            {"caption": "", "columns": ["machine", ""], "rows": [[k, v] for k, v in machine.items()]}
        ),
    ]
    summary = summary_vs_round_robin(results)
    if summary is not None:
        parts.append(f"## {SUMMARY_TITLE}\n\n{summary}")
    for name, result in results.items():
        if "skipped" in result:
            parts.append(f"## {name}\n\nSkipped: {result['skipped']}.")
            continue
        if "error" in result:
            parts.append(
                f"## {name}\n\nFailed after {result['seconds']} s:\n\n```\n{result['error'].rstrip()}\n```"
            )
            continue
        section = render_result(result).rstrip()
        section += f"\n\n_{name}: {result.get('seconds', 0)} s._"
        for title, path in plots.items():
            if title.startswith(f"{name}:"):
                section += f"\n\n![{title.split(':', 1)[1].strip()}]({path})"
        parts.append(section)
    return "\n\n".join(parts) + "\n"


def _as_series(value: object) -> Series | None:
    """``{name: [[x, y], ...]}``, ``{name: {x: y}}`` or ``{name: {"x": [...], "y": [...]}}`` as series."""
    if not isinstance(value, Mapping) or not value:
        return None
    out: Series = {}
    for name, points in value.items():
        pairs: list[tuple[float, float]] = []
        try:
            if isinstance(points, Mapping) and "x" in points and "y" in points:
                pairs = [(float(x), float(y)) for x, y in zip(points["x"], points["y"], strict=False)]
            elif isinstance(points, Mapping):
                pairs = [(float(x), float(y)) for x, y in points.items()]
            elif isinstance(points, (list, tuple)):
                pairs = [(float(p[0]), float(p[1])) for p in points]
            else:
                return None
        except (TypeError, ValueError, IndexError, KeyError):
            return None
        if pairs:
            out[str(name)] = sorted(pairs)
    return out or None


def _find_series(data: object, words: tuple[str, ...], depth: int = 0) -> tuple[str, Series] | None:
    """The first key naming all of ``words`` whose value reads as series, and the series (searching nested
    data)."""
    if not isinstance(data, Mapping) or depth > 3:
        return None
    for key, value in data.items():
        if all(w in str(key).lower() for w in words):
            series = _as_series(value)
            if series:
                return str(key), series
    for value in data.values():
        found = _find_series(value, words, depth + 1)
        if found:
            return found
    return None


def make_plots(results: Mapping[str, Any], directory: str) -> tuple[dict[str, str], list[str]]:
    """Write the PNG plots the results allow; return ``({"module: title": path}, notes)``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}, ["No plots: matplotlib is not installed."]
    os.makedirs(directory, exist_ok=True)
    made: dict[str, str] = {}
    notes: list[str] = []

    def save(fig: Any, module: str, title: str, filename: str) -> None:
        path = os.path.join(directory, filename)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made[f"{module}: {title}"] = path

    faults = results.get("faults", {}).get("data", {}).get("slow")
    if faults:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for name, d in faults.items():
            lat = d["slow"]["latencies_ms"]
            if lat:
                ax.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))], label=f"{name}, one slow")
        healthy = faults.get("native round_robin", {}).get("healthy", {}).get("latencies_ms", [])
        if healthy:
            ys = [(i + 1) / len(healthy) for i in range(len(healthy))]
            ax.plot(healthy, ys, "k--", label="native round_robin, all healthy")
        ax.set_xscale("log")
        ax.set_xlabel("call latency, ms (log)")
        ax.set_ylabel("share of calls")
        ax.set_title("Latency CDF with one server of four at 200 ms")
        ax.legend(fontsize=7)
        save(fig, "faults", "latency CDF per selector with a slow server", "latency_cdf_slow_server.png")

    subsetting = results.get("subsetting", {}).get("data")
    if subsetting:
        from benchmarks.subsetting import plot as plot_subsetting

        title = "connections per server and churn per algorithm"
        save(plot_subsetting(subsetting, plt), "subsetting", title, "subsetting.png")

    zones = results.get("zones", {}).get("data")
    if zones:
        from benchmarks.zones import plot as plot_zones

        title = "calls kept local as local capacity drops, and pick cost"
        save(plot_zones(zones, plt), "zones", title, "zones.png")

    for module, words, title, xlabel, ylabel, filename in (
        (
            "hash_quality",
            ("moved",),
            "keys moved vs endpoints removed",
            "endpoints removed",
            "share of keys moved",
            "hash_keys_moved.png",
        ),
        ("selectors", ("pick",), "pick cost vs N", "endpoints (N)", "pick cost", "selectors_pick_cost.png"),
    ):
        result = results.get(module)
        if not result or "data" not in result:
            continue
        found = _find_series(result["data"], words)
        if not found:
            notes.append(
                f"No {module} plot: its data has no series under a key with {' and '.join(words)!r}."
            )
            continue
        key, series = found
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for name, pairs in series.items():
            ax.plot([p[0] for p in pairs], [p[1] for p in pairs], marker="o", label=name)
        if module == "selectors":
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{ylabel} ({key})")
        ax.set_title(title)
        ax.legend(fontsize=7)
        save(fig, module, title, filename)
    return made, notes


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite and write the report, the JSON and the plots (and, with --update-docs, the docs)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs: a smoke test (under 2 minutes)")
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=MODULES, help="run only these modules")
    parser.add_argument(
        "--out",
        default="bench-results",
        metavar="DIR",
        help="directory for benchmarks.md, results.json and img/ (default %(default)s)",
    )
    parser.add_argument("--no-plots", action="store_true", help="write no plots")
    parser.add_argument(
        "--update-docs",
        action="store_true",
        help=f"also publish the report, its plots and the docs' generated blocks in {DOCS} (a full run only)",
    )
    args = parser.parse_args(argv)
    if args.update_docs and (args.quick or args.only):
        parser.error("--update-docs publishes a full run of every module: drop --quick and --only")

    names = [n for n in MODULES if not args.only or n in args.only]
    machine = machine_info()
    start = time.perf_counter()
    results = run_suite(names, quick=args.quick)
    machine.update(run_info(start))
    failed = [n for n, r in results.items() if "error" in r]
    out = Path(args.out)
    written = [_write(results, machine, quick=args.quick, directory=out, plots=not args.no_plots)]
    with open(out / "results.json", "w") as f:
        json.dump({"machine": machine, "quick": args.quick, "modules": results}, f, indent=1, default=str)
    if args.update_docs and failed:
        print(f"benchmarks: not publishing to {DOCS}: {', '.join(failed)} failed", file=sys.stderr)
    elif args.update_docs:
        written.append(
            _write(results, machine, quick=False, directory=DOCS, plots=not args.no_plots, published=True)
        )
        written += [str(p) for p in refresh_blocks(results, DOCS)]
    print(
        f"benchmarks: {len(names)} modules in {time.perf_counter() - start:.1f} s; wrote {', '.join(written)}"
        f" and {out / 'results.json'}" + (f"; FAILED: {', '.join(failed)}" if failed else ""),
        file=sys.stderr,
    )
    return 1 if failed else 0


def _write(
    results: Mapping[str, Any],
    machine: Mapping[str, str],
    *,
    quick: bool,
    directory: Path,
    plots: bool,
    published: bool = False,
) -> str:
    """Write ``benchmarks.md`` (and its plots in ``img/``) into ``directory``; return the report's path."""
    directory.mkdir(parents=True, exist_ok=True)
    made: dict[str, str] = {}
    plot_notes: list[str] = []
    if plots:
        made, plot_notes = make_plots(results, str(directory / "img"))
    relative = {title: os.path.relpath(path, directory) for title, path in made.items()}
    report = render_report(results, machine, quick=quick, plots=relative, published=published)
    if plot_notes:
        report += "\n" + "\n".join(f"- {n}" for n in plot_notes) + "\n"
    path = directory / "benchmarks.md"
    path.write_text(report)
    return str(path)


if __name__ == "__main__":
    sys.exit(main())

"""Helpers the benchmark modules share: load loops, measurement windows, Markdown tables, progress lines.

Each benchmark module has ``run(quick: bool = False) -> dict`` returning ``{"title": str, "tables":
[{"caption": str, "columns": [...], "rows": [[...], ...]}], "notes": [str, ...], "data": {...}}`` and a
``main()`` for ``python -m benchmarks.NAME [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import itertools
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Load",
    "Progress",
    "Result",
    "Table",
    "fmt",
    "machine_info",
    "markdown_table",
    "median",
    "module_main",
    "percentile",
    "render_result",
    "run_async_load",
    "run_sync_load",
]

Result = dict[str, Any]
"""What a benchmark module's ``run()`` returns (see the module doc)."""
Table = dict[str, Any]
"""``{"caption": str, "columns": [...], "rows": [[...], ...]}``."""


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values`` by nearest rank; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = min(max(round(q / 100.0 * len(ordered) + 0.5) - 1, 0), len(ordered) - 1)
    return ordered[rank]


def median(values: Sequence[float]) -> float:
    """The median, 0.0 for no values."""
    return statistics.median(values) if values else 0.0


def fmt(value: float, digits: int = 2) -> str:
    """A number with ``digits`` decimals, thousands separated above 1000."""
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


@dataclass
class Load:
    """One measured load window: calls made, failed, wall and client CPU seconds, and each call's latency."""

    calls: int = 0
    errors: int = 0
    wall: float = 0.0
    cpu: float = 0.0
    latencies: list[float] = field(default_factory=list)

    @property
    def qps(self) -> float:
        """Calls finished per wall second."""
        return self.calls / self.wall if self.wall > 0 else 0.0

    @property
    def cpu_us(self) -> float:
        """Client process CPU microseconds per call."""
        return self.cpu / self.calls * 1e6 if self.calls else 0.0

    def p(self, q: float) -> float:
        """The ``q``-th latency percentile, in milliseconds."""
        return percentile(self.latencies, q) * 1e3

    def summary(self) -> dict[str, float]:
        """The figures, for JSON."""
        return {
            "calls": self.calls,
            "errors": self.errors,
            "wall_s": round(self.wall, 4),
            "cpu_s": round(self.cpu, 4),
            "qps": round(self.qps, 1),
            "cpu_us_per_call": round(self.cpu_us, 2),
            "p50_ms": round(self.p(50), 3),
            "p99_ms": round(self.p(99), 3),
        }


def run_sync_load(
    call: Callable[[int], object],
    *,
    concurrency: int,
    duration: float,
    max_calls: int = 1_000_000,
) -> Load:
    """Call ``call(i)`` from ``concurrency`` threads until ``duration`` seconds or ``max_calls`` calls.

    Exceptions count as errors. CPU is the whole process's (``time.process_time``) over the window.
    """
    counter = itertools.count()
    barrier = threading.Barrier(concurrency + 1)
    lat: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    deadline = [0.0]

    def worker(slot: int) -> None:
        mine = lat[slot]
        clock = time.perf_counter
        barrier.wait()
        end = deadline[0]
        failed = 0
        while True:
            i = next(counter)
            t0 = clock()
            if i >= max_calls or t0 >= end:
                break
            try:
                call(i)
            except Exception:
                failed += 1
            mine.append(clock() - t0)
        errors[slot] = failed

    threads = [threading.Thread(target=worker, args=(s,), daemon=True) for s in range(concurrency)]
    for t in threads:
        t.start()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    deadline[0] = wall0 + duration
    barrier.wait()
    for t in threads:
        t.join(duration + 60.0)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    latencies = [x for part in lat for x in part]
    return Load(len(latencies), sum(errors), wall, cpu, latencies)


async def run_async_load(
    call: Callable[[int], Awaitable[object]],
    *,
    concurrency: int,
    duration: float,
    max_calls: int = 1_000_000,
) -> Load:
    """Keep ``concurrency`` calls of ``call(i)`` in flight for ``duration`` seconds or ``max_calls`` calls."""
    counter = itertools.count()
    latencies: list[float] = []
    errors = [0]
    clock = time.perf_counter
    end = 0.0

    async def worker() -> None:
        while True:
            i = next(counter)
            t0 = clock()
            if i >= max_calls or t0 >= end:
                return
            try:
                await call(i)
            except Exception:
                errors[0] += 1
            latencies.append(clock() - t0)

    cpu0, wall0 = time.process_time(), clock()
    end = wall0 + duration
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), duration + 60.0)
    wall, cpu = clock() - wall0, time.process_time() - cpu0
    return Load(len(latencies), errors[0], wall, cpu, latencies)


class Progress:
    """A one-line progress bar on stderr: ``label [#####.....] 5/10 detail``, redrawn in place on a tty."""

    def __init__(self, label: str, total: int, *, stream: Any = None) -> None:
        self.label = label
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._start = time.perf_counter()

    def step(self, detail: str = "") -> None:
        """Count one step done and redraw."""
        self.done = min(self.done + 1, self.total)
        self.show(detail)

    def show(self, detail: str = "") -> None:
        """Redraw with ``detail`` (on a tty; elsewhere one line per call)."""
        width = 20
        filled = width * self.done // self.total
        bar = "#" * filled + "." * (width - filled)
        elapsed = time.perf_counter() - self._start
        line = f"{self.label} [{bar}] {self.done}/{self.total} {elapsed:5.1f}s {detail}"
        if self._tty:
            self.stream.write("\r\x1b[K" + line[:150])
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self, detail: str = "done") -> None:
        """Finish the line."""
        self.done = self.total
        self.show(detail)
        if self._tty:
            self.stream.write("\n")
            self.stream.flush()


def _cell(value: object) -> str:
    if isinstance(value, float):
        return fmt(value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(table: Table) -> str:
    """One table as Markdown, its caption in bold above it."""
    columns = [str(c) for c in table["columns"]]
    lines = []
    if table.get("caption"):
        lines += [f"**{table['caption']}**", ""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in table["rows"]:
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines)


def render_result(result: Result, *, level: int = 2) -> str:
    """A module's result as Markdown: its title as a heading, its tables, then its notes as a list."""
    parts = [f"{'#' * level} {result.get('title', 'untitled')}"]
    parts += [markdown_table(t) for t in result.get("tables", [])]
    notes = result.get("notes", [])
    if notes:
        parts.append("\n".join(f"- {n}" for n in notes))
    return "\n\n".join(parts) + "\n"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, str]:
    """CPU model and cores, OS, Python, grpcio and lbkit versions, and the date (UTC)."""
    import grpc

    import lbkit

    return {
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count() or 0),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "grpcio": str(getattr(grpc, "__version__", "?")),
        "lbkit": lbkit.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def run_info(started: float) -> dict[str, str]:
    """How long the run took (since ``started``, a ``time.perf_counter()``) and how busy the machine was:
    the 15-minute load average at its end, beside the core count (other work shares the cores)."""
    info = {"run took": f"{(time.perf_counter() - started) / 60:.1f} min"}
    with contextlib.suppress(OSError, AttributeError):
        info["load average (15 min) at the end"] = f"{os.getloadavg()[2]:.1f}"
    return info


def module_main(name: str, run: Callable[[bool], Result], argv: Sequence[str] | None = None) -> None:
    """``python -m benchmarks.NAME [--quick] [--json PATH]``: run one module and print its Markdown."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}")
    parser.add_argument("--quick", action="store_true", help="short run (a smoke test)")
    parser.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    args = parser.parse_args(argv)
    result = run(args.quick)
    print(render_result(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)

"""What the demo shows: the progress line, a table per selector, the closing summary and the PNG plot."""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from lbkit._demo.load import Record, percentile

__all__ = [
    "Fault",
    "Progress",
    "SelectorRun",
    "ServerRow",
    "format_table",
    "render_run",
    "render_summary",
    "write_plot",
]


@dataclass(slots=True)
class Fault:
    """A fault injected into one server during a run, and when the balancer acted on it."""

    address: str
    role: str
    what: str
    """What was done, e.g. "deregistered from Consul"."""
    at: float
    """Seconds after the run began."""
    label: str = ""
    """A word or two for the plot (``what`` when empty)."""
    detected_after: float | None = None
    """Seconds from the fault to the balancer acting on it (None: it did not within the run)."""
    detected_by: str = ""
    """The event that showed it (``ejected``, ``removed``, ``ready``...), or ``picker``."""


@dataclass(slots=True)
class ServerRow:
    """One server's figures in one run."""

    address: str
    role: str
    weight: int
    calls: int
    """Calls the server received (attempts, retries included), counted by the server."""
    latencies_ms: list[float]
    """Client-side latency of the calls it answered successfully."""
    failed: int
    """Attempts that failed on it, as the balancer counted them."""
    ejections: int


@dataclass(slots=True)
class SelectorRun:
    """Everything measured while one selector ran."""

    selector: str
    duration: float
    rate: float
    records: list[Record]
    servers: list[ServerRow]
    faults: list[Fault]
    after_fault_calls: int = 0
    """Calls the failing server received after it started failing."""
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> int:
        """Calls the client saw fail (after any retries)."""
        return sum(1 for r in self.records if not r.ok)

    @property
    def latencies(self) -> list[float]:
        """Latency of every call that succeeded, ms."""
        return [r.latency_ms for r in self.records if r.ok]

    def server(self, role: str) -> ServerRow:
        """The row of the server playing ``role``."""
        for row in self.servers:
            if row.role == role:
                return row
        raise KeyError(role)

    def ratio(self, role: str, other: str) -> float:
        """Calls of the server playing ``role`` per call of the one playing ``other``."""
        theirs = self.server(other).calls
        return self.server(role).calls / theirs if theirs else 0.0

    def share(self, role: str) -> float:
        """Percent of all server-received calls that went to the server playing ``role``."""
        total = sum(row.calls for row in self.servers)
        return 100.0 * self.server(role).calls / total if total else 0.0


# --------------------------------------------------------------------------------------------- progress


class Progress:
    """A live progress line: redrawn in place on a terminal, printed every ``every`` seconds otherwise."""

    def __init__(self, stream: TextIO, *, tty: bool | None = None, every: float = 2.0) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.every = every
        self._last = 0.0
        self._drawn = False

    def begin(self) -> None:
        """Start a new stretch: the next periodic line comes ``every`` seconds from now."""
        self._last = time.monotonic()

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[2K")
            self._drawn = False

    def update(self, text: str, *, fraction: float, force: bool = False) -> None:
        """Show ``text`` after a bar ``fraction`` (0..1) full."""
        if self.tty:
            width = max(shutil.get_terminal_size((100, 20)).columns - 1, 40)
            bar_width = 16
            full = round(min(max(fraction, 0.0), 1.0) * bar_width)
            line = f"[{'#' * full}{'.' * (bar_width - full)}] {text}"
            self.stream.write("\r\x1b[2K" + line[:width])
            self.stream.flush()
            self._drawn = True
            return
        now = time.monotonic()
        if force or now - self._last >= self.every:
            self._last = now
            self.stream.write(f"  ... {text}\n")
            self.stream.flush()

    def note(self, text: str) -> None:
        """Print one line of its own (above the progress line on a terminal)."""
        self._clear()
        self.stream.write(text + "\n")
        self.stream.flush()

    def done(self) -> None:
        """Remove the progress line."""
        self._clear()
        self.stream.flush()


# --------------------------------------------------------------------------------------------- tables


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, indent: str = "  ") -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return (indent + "  ".join(parts)).rstrip()

    rule = indent + "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def _ms(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _secs(value: float) -> str:
    return f"{value * 1e3:.0f} ms" if value < 1.0 else f"{value:.2f} s"


def render_run(run: SelectorRun) -> str:
    """The table of one run, its faults and what the selector did with the slow and failing servers."""
    headers = ["server", "role", "weight", "calls", "share", "p50 ms", "p99 ms", "failed", "ejections"]
    total = sum(row.calls for row in run.servers)
    rows = []
    for row in run.servers:
        share = f"{100.0 * row.calls / total:.0f} %" if total else "-"
        p50 = _ms(percentile(row.latencies_ms, 50)) if row.latencies_ms else "-"
        p99 = _ms(percentile(row.latencies_ms, 99)) if row.latencies_ms else "-"
        rows.append(
            [
                row.address,
                row.role,
                str(row.weight),
                str(row.calls),
                share,
                p50,
                p99,
                str(row.failed),
                str(row.ejections),
            ]
        )
    lat = run.latencies
    rows.append(
        [
            "all (client)",
            "",
            "",
            str(len(run.records)),
            "",
            _ms(percentile(lat, 50)),
            _ms(percentile(lat, 99)),
            str(run.failed),
            str(sum(row.ejections for row in run.servers)),
        ]
    )
    out = [
        f"{run.selector}: {len(run.records)} calls in {run.duration:g} s at {run.rate:g}/s "
        f"(calls and failed per server count attempts, retries included; 'all' counts what the client saw)",
        format_table(headers, rows),
    ]
    for fault in run.faults:
        if fault.detected_after is None:
            seen = "not acted on before the run ended"
        else:
            seen = f"{fault.detected_by} after {_secs(fault.detected_after)}"
        out.append(f"  at {fault.at:5.2f} s  {fault.address} ({fault.role}) {fault.what}: {seen}")
    out.extend(f"  {note}" for note in run.notes)
    return "\n".join(out)


def render_summary(runs: Sequence[SelectorRun]) -> str:
    """One line per selector: latency, failures, the slow server's share, the failing server's fate."""
    headers = [
        "selector",
        "calls",
        "p50 ms",
        "p99 ms",
        "client failed",
        "slow share",
        "slow/steady",
        "failing: calls after fault",
        "failing: out after",
    ]
    rows = []
    for run in runs:
        lat = run.latencies
        failing = [f for f in run.faults if f.role == "failing"]
        out_after = "-"
        if failing:
            f = failing[0]
            out_after = (
                f"{_secs(f.detected_after)} ({f.detected_by})" if f.detected_after is not None else "never"
            )
        rows.append(
            [
                run.selector,
                str(len(run.records)),
                _ms(percentile(lat, 50)),
                _ms(percentile(lat, 99)),
                str(run.failed),
                f"{run.share('slow'):.0f} %",
                f"{run.ratio('slow', 'steady'):.2f}x",
                str(run.after_fault_calls),
                out_after,
            ]
        )
    return "\n".join(
        [
            "Summary: an even share is 25 %, more while the leaving server is out and the failing one is\n"
            "ejected; slow/steady is the slow server's calls per call of the steady one (1.00x: even)",
            format_table(headers, rows),
        ]
    )


# --------------------------------------------------------------------------------------------- plot


def write_plot(runs: Sequence[SelectorRun], path: str) -> str | None:
    """Write latency over time per selector (faults marked) to ``path``; return why not, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib)"
    n = len(runs)
    height = 2.4 * n + 1.0
    fig, axes_any = plt.subplots(n, 1, figsize=(9, height), sharex=True, squeeze=False)
    axes: list[Any] = [row[0] for row in axes_any]
    colors = ["tab:orange", "tab:red", "tab:purple", "tab:green"]
    for ax, run in zip(axes, runs, strict=True):
        color_of = {row.address: colors[i % len(colors)] for i, row in enumerate(run.servers)}
        for row in run.servers:
            points = [(r.at, r.latency_ms) for r in run.records if r.ok and r.server == row.address]
            if points:
                ax.scatter(
                    [p[0] for p in points],
                    [p[1] for p in points],
                    s=3,
                    alpha=0.35,
                    color=color_of[row.address],
                    label=f"{row.role} ({row.address})",
                )
        failed = [(r.at, r.latency_ms) for r in run.records if not r.ok]
        if failed:
            ax.scatter(
                [p[0] for p in failed],
                [p[1] for p in failed],
                s=14,
                marker="x",
                color="black",
                label="failed",
            )
        bins = _p99_bins(run.records, 0.25)
        if bins:
            ax.plot(
                [b[0] for b in bins], [b[1] for b in bins], color="black", linewidth=1.0, label="p99 (0.25 s)"
            )
        for fault in run.faults:
            ax.axvline(fault.at, color=color_of.get(fault.address, "gray"), linestyle="--", linewidth=1.0)
            ax.annotate(
                fault.label or fault.what,
                (fault.at, 1.0),
                xycoords=("data", "axes fraction"),
                fontsize=7,
                rotation=90,
                va="top",
                ha="right",
            )
        lat = run.latencies
        ax.set_title(
            f"{run.selector}: p50 {_ms(percentile(lat, 50))} ms, p99 {_ms(percentile(lat, 99))} ms, "
            f"{run.failed} failed of {len(run.records)}",
            fontsize=9,
        )
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel("latency, ms")
        ax.grid(True, which="both", alpha=0.2)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, markerscale=3, frameon=False)
    axes[-1].set_xlabel("seconds into the run")
    fig.tight_layout(rect=(0.0, 0.55 / height, 1.0, 1.0))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def _p99_bins(records: Sequence[Record], width: float) -> list[tuple[float, float]]:
    buckets: dict[int, list[float]] = {}
    for r in records:
        if r.ok:
            buckets.setdefault(int(r.at / width), []).append(r.latency_ms)
    return [((k + 0.5) * width, percentile(v, 99)) for k, v in sorted(buckets.items())]

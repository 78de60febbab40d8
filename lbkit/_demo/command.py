"""``lbkit demo``: lbkit against four local model servers and a Consul-compatible server, no outside service.

Four ModelService servers (one twice as slow, one that starts failing every call half way, one that is
deregistered and registered again, one steady) are registered with gRPC health checks and weights in
the embedded Consul-compatible server (or a real agent with ``--consul``). A client, ``lbkit.Balancer``
over ``lbkit.ConsulDiscovery``, sends a fixed rate of calls through each selector in turn; after each it
prints calls per server, p50/p99, failures, ejections and how long the balancer took to act on each
fault, and at the end a summary and a PNG of latency over time. Everything it starts is stopped when it
ends, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from lbkit._config import check_float, check_int, config
from lbkit._demo.cluster import Cluster, Instance
from lbkit._demo.load import PacedLoad, percentile
from lbkit._demo.report import (
    Fault,
    Progress,
    SelectorRun,
    ServerRow,
    render_run,
    render_summary,
    write_plot,
)
from lbkit.errors import ConfigError
from lbkit.events import Event, EventKind
from lbkit.stats import EndpointStats, Stats

__all__ = ["DEFAULT_SELECTORS", "SCENARIOS", "DemoOptions", "main", "run_demo"]

SCENARIOS = ("selectors", "tail")
"""What ``--scenario`` may name; the first is the default."""
DEFAULT_SELECTORS = ("round_robin", "least_connections", "weighted", "consistent_hash", "peak_ewma")
PLOT_NAME = "lbkit-demo.png"

LEAVE_AT = 0.15
"""When the leaving server is deregistered, as a share of the run."""
REJOIN_AT = 0.40
"""When it is registered again."""
FAIL_AT = 0.50
"""When the failing server starts failing every call."""
CALL_TIMEOUT = 1.0
EWMA_DECAY = 1.0
"""Seconds of the peak-EWMA latency decay. lbkit's default, 10 s, outlasts a run of a few seconds: one
latency spike (a busy machine) would then steer peak_ewma for the whole run."""
KEYS = 500
"""Distinct ``lb-key`` values the client sends (consistent hashing maps them to servers)."""

_GONE = frozenset({EventKind.EJECTED, EventKind.UNHEALTHY, EventKind.REMOVED, EventKind.NOT_READY})
_SHOWN = frozenset(
    {
        EventKind.EJECTED,
        EventKind.RETURNED,
        EventKind.REMOVED,
        EventKind.ADDED,
        EventKind.UNHEALTHY,
        EventKind.HEALTHY,
        EventKind.PANIC_START,
        EventKind.PANIC_END,
        EventKind.DISCOVERY_ERROR,
    }
)


@config
class DemoOptions:
    """Options of ``lbkit demo`` (times in seconds)."""

    duration: float = 7.0
    """How long each selector runs."""
    selectors: tuple[str, ...] = DEFAULT_SELECTORS
    plot: bool = True
    out: str = "."
    """Directory of the PNG."""
    consul: str | None = None
    """A real Consul agent's HTTP address; None starts the embedded Consul-compatible server."""
    service: str | None = None
    """The service name; None: inference-service (embedded) or lbkit-demo (a real agent)."""
    rate: float = 300.0
    """Calls per second the client sends."""
    concurrency: int = 16
    """Most calls in flight at once."""
    delay_ms: float = 10.0
    """Milliseconds each call takes on a normal server (the slow one takes twice that)."""
    scenario: str = "selectors"
    """``selectors`` (each selector against faults) or ``tail`` (hedged calls against a noisy neighbour,
    and weights from load reports)."""

    def __post_init__(self) -> None:
        owner = "lbkit demo"
        if self.scenario not in SCENARIOS:
            raise ConfigError(
                f"{owner}: scenario must be one of {', '.join(SCENARIOS)}, got {self.scenario!r}"
            )
        check_float(owner, "duration", self.duration, minimum=1.0, maximum=600.0)
        check_float(owner, "rate", self.rate, minimum=1.0, maximum=5000.0)
        check_int(owner, "concurrency", self.concurrency, minimum=1)
        check_float(owner, "delay_ms", self.delay_ms, minimum=0.0, maximum=1000.0)
        if isinstance(self.selectors, str) or not self.selectors:
            raise ConfigError(
                f"{owner}: selectors must be a non-empty sequence of names, got {self.selectors!r}"
            )
        object.__setattr__(self, "selectors", tuple(self.selectors))
        from lbkit.options import resolve_selector

        for name in self.selectors:
            try:
                resolve_selector(name)
            except (ConfigError, ImportError) as exc:
                raise ConfigError(f"{owner}: unknown selector {name!r} ({exc})") from None
        if self.consul is not None:
            from lbkit.discovery.consul_connection import parse_consul_address

            parse_consul_address(self.consul, source="--consul address")
        if self.service is not None and (not self.service or "/" in self.service):
            raise ConfigError(f"{owner}: service must be a non-empty name without '/', got {self.service!r}")

    @property
    def service_name(self) -> str:
        """The service the demo registers and discovers."""
        if self.service:
            return self.service
        return "inference-service" if self.consul is None else "lbkit-demo"


# --------------------------------------------------------------------------------------------- one run


class _FailureTally:
    """Failed attempts per address from the balancer's stats, kept across an entry's removal."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[EndpointStats, int]] = {}

    def sample(self, stats: Stats) -> None:
        """Note every entry's failures now (an entry is dropped once its endpoint has drained)."""
        for entry in stats:
            self._seen[id(entry)] = (entry, entry.failures)

    def by_address(self) -> dict[str, int]:
        """Failed attempts per address, summed over every entry the address has had."""
        out: dict[str, int] = {}
        for entry, failures in self._seen.values():
            out[entry.address] = out.get(entry.address, 0) + failures
        return out


@dataclass(slots=True)
class _Step:
    at: float
    """Share of the run."""
    instance: Instance
    what: str
    label: str
    action: Callable[[], None]
    kinds: frozenset[EventKind]
    """Events that show the balancer acted; empty: the endpoint coming back (READY)."""


def _detect(
    fault: Fault,
    start: float,
    kinds: frozenset[EventKind],
    events: Sequence[Event],
    pickers: Sequence[tuple[float, frozenset[str]]],
) -> None:
    """Fill in when (and how) the balancer acted on ``fault``: the first matching event or picker change."""
    t_fault = start + fault.at
    leaving = bool(kinds)
    event = next(
        (
            e
            for e in events
            if e.address == fault.address
            and e.time >= t_fault
            and (e.kind in kinds if leaving else e.kind is EventKind.READY)
        ),
        None,
    )
    picker = next(
        (t for t, members in pickers if t >= t_fault and ((fault.address in members) != leaving)),
        None,
    )
    if event is not None and (picker is None or event.time <= picker + 1e-3):
        fault.detected_after, fault.detected_by = max(event.time - t_fault, 0.0), event.kind.value
    elif picker is not None:
        fault.detected_after = max(picker - t_fault, 0.0)
        fault.detected_by = "picker " + ("exclusion" if leaving else "inclusion")


class _Closer:
    """Closes balancers in the background (their discovery takes up to half a second to stop)."""

    def __init__(self) -> None:
        self._threads: list[threading.Thread] = []

    def close(self, closeable: Any) -> None:
        thread = threading.Thread(target=closeable.close, name="lbkit-demo-close", daemon=True)
        thread.start()
        self._threads.append(thread)

    def join(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = [t for t in self._threads if t.is_alive()]


def run_selector(
    cluster: Cluster, selector: str, opts: DemoOptions, progress: Progress, closer: _Closer | None = None
) -> SelectorRun:
    """Run the client through ``selector`` for ``opts.duration`` seconds, injecting the faults.

    The balancer is closed on return, by ``closer`` in the background if given.
    """
    import grpc

    from lbkit.balancer import Balancer
    from lbkit.health.outlier import OutlierDetection
    from lbkit.testing.proto import model_service_pb2 as pb2
    from lbkit.testing.proto import model_service_pb2_grpc as pb2_grpc

    events: list[Event] = []
    pickers: list[tuple[float, frozenset[str]]] = []
    tally = _FailureTally()
    lb = Balancer(
        cluster.discovery(),
        selector=selector,
        outlier_detection=OutlierDetection(
            consecutive_failures=5, interval=1.0, base_ejection_time=2.0, max_ejection_time=10.0
        ),
        wait_timeout=2.0,
        drain_timeout=2.0,
        latency_decay=EWMA_DECAY,
    )
    lb.add_listener(events.append)

    def on_picker() -> None:
        pickers.append((time.monotonic(), frozenset(e.address for e in lb.core.picker.endpoints)))
        tally.sample(lb.stats)

    lb.core.on_picker.append(on_picker)
    failing, leaving = cluster.by_role("failing"), cluster.by_role("leaving")
    before_fault = [0]

    def start_failing() -> None:
        before_fault[0] = cluster.calls()[failing.index]
        cluster.set_failing(failing, 1.0)

    steps = [
        _Step(
            LEAVE_AT,
            leaving,
            "deregistered from Consul",
            "leaving: deregistered",
            lambda: cluster.leave(leaving),
            frozenset({EventKind.REMOVED}),
        ),
        _Step(
            REJOIN_AT,
            leaving,
            "registered again (listed once its check passes)",
            "leaving: back",
            lambda: cluster.rejoin(leaving),
            frozenset(),
        ),
        _Step(FAIL_AT, failing, "starts failing every call", "failing: fails", start_failing, _GONE),
    ]
    faults: list[tuple[Fault, frozenset[EventKind]]] = []
    request = pb2.PredictRequest(features=[1.0, 2.0, 3.0], model_version="v1")
    load: PacedLoad | None = None
    try:
        lb.start()
        lb.wait_ready(timeout=20.0, count=len(cluster.instances))
        cluster.reset_calls()
        stub: Any = pb2_grpc.ModelServiceStub(lb.channel())  # type: ignore[no-untyped-call]
        keys = [(("lb-key", f"user-{i}"),) for i in range(KEYS)]

        def call(n: int) -> tuple[bool, str, str]:
            try:
                reply = stub.Predict(request, timeout=CALL_TIMEOUT, metadata=keys[(n * 7919) % KEYS])
            except grpc.RpcError as exc:
                code = exc.code() if callable(getattr(exc, "code", None)) else None
                return False, "", code.name if code is not None else type(exc).__name__
            return True, str(reply.served_by), "OK"

        progress.begin()
        load = PacedLoad(call, rate=opts.rate, workers=opts.concurrency, duration=opts.duration).start()
        start = load.started_at
        shown = 0
        pending = list(steps)
        while not load.done():
            elapsed = load.elapsed
            while pending and elapsed >= pending[0].at * opts.duration:
                step = pending.pop(0)
                at = time.monotonic() - start
                step.action()
                faults.append(
                    (
                        Fault(step.instance.address, step.instance.role.name, step.what, at, step.label),
                        step.kinds,
                    )
                )
                progress.note(
                    f"  at {at:5.2f} s  {step.instance.address} ({step.instance.role.name}) {step.what}"
                )
            while shown < len(events):
                event = events[shown]
                shown += 1
                if event.time >= start and event.kind in _SHOWN:
                    where = f"{event.address} " if event.address else ""
                    progress.note(
                        f"  at {event.time - start:5.2f} s  {where}{event.kind.value}: {event.reason}"
                    )
            tally.sample(lb.stats)
            records = load.records
            recent = [r.latency_ms for r in records[-int(opts.rate) :] if r.ok]
            shown_time = f"{min(elapsed, opts.duration):4.1f}/{opts.duration:g} s"
            latency = (
                f"p50 {percentile(recent, 50):4.1f} p99 {percentile(recent, 99):5.1f} ms" if recent else ""
            )
            progress.update(
                f"{selector:<17} {shown_time} {len(records):5d} calls {load.failed:3d} failed  {latency}",
                fraction=elapsed / opts.duration,
            )
            next_step = pending[0].at * opts.duration - elapsed if pending else 1.0
            time.sleep(min(0.1, max(next_step, 0.005)))
        load.stop(timeout=CALL_TIMEOUT * 2)
        progress.done()
        tally.sample(lb.stats)
        calls = cluster.calls()
    finally:
        if load is not None:
            load.stop(timeout=CALL_TIMEOUT * 2)
        if closer is not None:
            closer.close(lb)
        else:
            lb.close()
    for fault, kinds in faults:
        _detect(fault, start, kinds, events, pickers)
    failed = tally.by_address()
    ejections: dict[str, int] = {}
    for event in events:
        if event.kind is EventKind.EJECTED:
            ejections[event.address] = ejections.get(event.address, 0) + 1
    rows = [
        ServerRow(
            address=instance.address,
            role=instance.role.name,
            weight=instance.role.weight,
            calls=calls[instance.index],
            latencies_ms=[r.latency_ms for r in load.records if r.ok and r.server == instance.address],
            failed=failed.get(instance.address, 0),
            ejections=ejections.get(instance.address, 0),
        )
        for instance in cluster.instances
    ]
    run = SelectorRun(
        selector=selector,
        duration=opts.duration,
        rate=opts.rate,
        records=list(load.records),
        servers=rows,
        faults=[f for f, _ in faults],
        after_fault_calls=calls[failing.index] - before_fault[0]
        if any(f.role == "failing" for f, _ in faults)
        else 0,
    )
    run.notes.extend(_verdict(run))
    return run


def _verdict(run: SelectorRun) -> list[str]:
    """What the selector did with the slow and the failing server, in words."""
    out = []
    slow = run.server("slow")
    fast = [row for row in run.servers if row.role in ("steady", "failing") and row.latencies_ms]
    fast_p50 = percentile([x for row in fast for x in row.latencies_ms], 50) if fast else 0.0
    slow_p50 = percentile(slow.latencies_ms, 50) if slow.latencies_ms else 0.0
    out.append(
        f"slow server: {run.share('slow'):.0f} % of calls, {run.ratio('slow', 'steady'):.2f}x the steady "
        f"server's (p50 {slow_p50:.1f} ms against {fast_p50:.1f} ms on the others)"
    )
    failing = run.server("failing")
    fault = next((f for f in run.faults if f.role == "failing"), None)
    if fault is not None:
        out.append(
            f"failing server: {run.after_fault_calls} calls after its fault, {failing.failed} failed there, "
            f"ejected {failing.ejections} time(s); the client saw {run.failed} failed call(s) "
            f"(retries on other servers absorb the rest)"
        )
    return out


# --------------------------------------------------------------------------------------------- the demo


class _LogToProgress(logging.Handler):
    """lbkit's warnings (discovery, registration, health) as notes; event logs are shown as notes already."""

    def __init__(self, progress: Progress) -> None:
        super().__init__(logging.WARNING)
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "lbkit":
            return
        self.progress.note(f"    {record.levelname.lower()}: {record.getMessage()}")


def _plot_path(out: str) -> str:
    os.makedirs(out, exist_ok=True)
    path = os.path.abspath(os.path.join(out, PLOT_NAME))
    if os.access(os.path.dirname(path), os.W_OK):
        return path
    return os.path.join(tempfile.gettempdir(), PLOT_NAME)


def _banner(cluster: Cluster, opts: DemoOptions) -> str:
    where = (
        f"the embedded Consul-compatible server at {cluster.consul_address}"
        if cluster.embedded
        else f"the Consul agent at {cluster.consul_address}"
    )
    lines = [
        f"lbkit demo: service {cluster.service!r} in {where}",
        f"  {len(cluster.instances)} model servers on 127.0.0.1 (ModelService, {opts.delay_ms:g} ms a call, "
        f"process {cluster.server_pid}),",
        f"  each registered with its weight and a gRPC health check every {cluster.check.interval:g} s:",
    ]
    lines += [f"    {i.address:<22} {i.role.name:<8} {i.role.describe}" for i in cluster.instances]
    d = opts.duration
    lines += [
        f"  client: lbkit.Balancer over lbkit.ConsulDiscovery; {opts.rate:g} calls/s, at most "
        f"{opts.concurrency} in flight, {CALL_TIMEOUT:g} s deadline;",
        "    failed calls retried on another server; outlier ejection after 5 failures in a row (2 s, "
        "longer each time);",
        f"    latency EWMA decay {EWMA_DECAY:g} s (default 10 s, shortened to suit runs of a few seconds)",
        f"  each selector runs {d:g} s: at {LEAVE_AT * d:.1f} s the leaving server is deregistered, at "
        f"{REJOIN_AT * d:.1f} s registered again;",
        f"    at {FAIL_AT * d:.1f} s the failing server starts failing every call (its health check passes)",
        f"  selectors: {', '.join(opts.selectors)}",
        "",
    ]
    return "\n".join(lines)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_demo(opts: DemoOptions, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the demo; return the exit status (0 done, 1 failed, 130 interrupted by Ctrl-C or SIGTERM)."""
    if threading.current_thread() is not threading.main_thread():
        return _run_demo(opts, out, err)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _run_demo(opts, out, err)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_tail(opts: DemoOptions, out: TextIO, err: TextIO) -> int:
    from lbkit._demo.tail import PLOT_NAME as TAIL_PLOT
    from lbkit._demo.tail import run_tail

    progress = Progress(err)
    try:
        path = os.path.join(os.path.dirname(_plot_path(opts.out)), TAIL_PLOT) if opts.plot else None
        run_tail(opts, out, progress, path)
    except KeyboardInterrupt:
        progress.done()
        err.write("\ninterrupted: stopping everything...\n")
        return 130
    except Exception as exc:
        progress.done()
        err.write(f"lbkit demo failed: {type(exc).__name__}: {exc}\n")
        return 1
    progress.done()
    out.flush()
    return 0


def _run_demo(opts: DemoOptions, out: TextIO | None, err: TextIO | None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    if opts.scenario == "tail":
        return _run_tail(opts, out, err)
    progress = Progress(err)
    handler = _LogToProgress(progress)
    lbkit_log = logging.getLogger("lbkit")
    lbkit_log.addHandler(handler)
    level = lbkit_log.level
    if level == logging.NOTSET:
        lbkit_log.setLevel(logging.WARNING)
    cluster = Cluster(service=opts.service_name, consul=opts.consul, delay_ms=opts.delay_ms)
    runs: list[SelectorRun] = []
    closer = _Closer()
    status = 0
    started = ""
    try:
        if cluster.embedded:
            progress.note("starting the embedded Consul-compatible server and 4 model servers...")
        else:
            progress.note(f"starting 4 model servers and registering them with Consul at {opts.consul}...")
        cluster.start()
        started = f"{len(cluster.instances)} model servers (process {cluster.server_pid})"
        started += " and the embedded Consul server" if cluster.embedded else " and their registrations"
        out.write(_banner(cluster, opts) + "\n")
        out.flush()
        for position, selector in enumerate(opts.selectors, 1):
            progress.note(f"[{position}/{len(opts.selectors)}] {selector}")
            run = run_selector(cluster, selector, opts, progress, closer)
            runs.append(run)
            out.write(render_run(run) + "\n\n")
            out.flush()
            cluster.restore()
        if len(runs) > 1:
            out.write(render_summary(runs) + "\n\n")
        if opts.plot:
            path = _plot_path(opts.out)
            why_not = write_plot(runs, path)
            out.write((why_not or f"plot: {path} (latency over time per selector, faults marked)") + "\n")
        else:
            out.write("plot: skipped (--no-plot)\n")
    except KeyboardInterrupt:
        progress.done()
        err.write("\ninterrupted: stopping everything...\n")
        status = 130
    except Exception as exc:
        progress.done()
        what = str(exc) if isinstance(exc, RuntimeError) else f"{type(exc).__name__}: {exc}"
        err.write(f"lbkit demo failed: {what}\n")
        status = 1
    finally:
        try:
            closer.join()
            cluster.close()
        except KeyboardInterrupt:
            cluster.close()
        lbkit_log.removeHandler(handler)
        lbkit_log.setLevel(level)
        if started:
            progress.note(f"stopped: {started}")
    out.flush()
    return status


# --------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's command-line options."""
    parser.add_argument("--duration", type=float, default=7.0, help="seconds per selector (default 7)")
    parser.add_argument(
        "--selectors",
        default=",".join(DEFAULT_SELECTORS),
        help="comma-separated selectors to run, in order (default: all five)",
    )
    parser.add_argument("--no-plot", action="store_true", help="write no PNG")
    parser.add_argument("--out", default=".", help=f"directory for {PLOT_NAME} (default: the current one)")
    parser.add_argument(
        "--consul",
        metavar="ADDR",
        help="a real Consul agent's HTTP address (host:port or http(s)://host:port) instead of the embedded "
        "server; the model servers on 127.0.0.1 must be reachable from it",
    )
    parser.add_argument(
        "--service", help="service name (default inference-service, or lbkit-demo with --consul)"
    )
    parser.add_argument("--rate", type=float, default=300.0, help="client calls per second (default 300)")
    parser.add_argument("--concurrency", type=int, default=16, help="most calls in flight (default 16)")
    parser.add_argument(
        "--scenario",
        choices=SCENARIOS,
        default=SCENARIOS[0],
        help="selectors: each selector against faults (default); tail: hedged calls against a noisy "
        "neighbour, and weights from the servers' load reports",
    )


def options_from_args(args: argparse.Namespace) -> DemoOptions:
    """DemoOptions from parsed arguments (ConfigError names a bad one)."""
    selectors = tuple(s.strip() for s in str(args.selectors).split(",") if s.strip())
    return DemoOptions(
        duration=args.duration,
        selectors=selectors,
        plot=not args.no_plot,
        out=args.out,
        consul=args.consul,
        service=args.service,
        rate=args.rate,
        concurrency=args.concurrency,
        scenario=args.scenario,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``lbkit demo [options]``."""
    parser = argparse.ArgumentParser(prog="lbkit demo", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        opts = options_from_args(args)
    except ConfigError as exc:
        parser.error(str(exc))
    return run_demo(opts)

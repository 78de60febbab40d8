"""``lbkit demo --scenario tail``: hedged calls against a noisy neighbour, and weights from load reports.

Part 1: four model servers in a child process (:class:`~lbkit.testing.server_process.ServerProcess`), each
call a few ms, and 2 % of calls on every server stalled 200 ms at random. The same paced load runs
without hedging, with a fixed hedging delay (the p95 the unhedged run just measured) and with
``hedging_delay="p95"``; each prints the demo's per-server table, and a summary gives p50, p99, p99.9,
the extra calls the servers received and the hedges. Part 2: two fast and two slow servers that report
their load (:mod:`lbkit.server`), through round robin and then weighted round robin (gRFC A58), which
learns each server's capacity from the reports. The plot shows latency over time per hedging variant.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, TextIO

from lbkit._demo.load import PacedLoad, percentile
from lbkit._demo.report import Progress, SelectorRun, ServerRow, format_table, render_run, write_plot

__all__ = ["PLOT_NAME", "run_tail"]

PLOT_NAME = "lbkit-demo-tail.png"
STALL_RATE = 0.02
STALL_MS = 200.0
SERVICE_MS = 3.0
CALL_TIMEOUT = 2.0
METHOD = "/lbkit.inference.v1.ModelService/Predict"
FAST_MS = 5.0
SLOW_MS = 25.0


def _load(lb: Any, rate: float, workers: int, duration: float) -> PacedLoad:
    """Paced Predict calls through ``lb`` (blocking calls from ``workers`` threads), run to the end."""
    from lbkit.testing.proto import model_service_pb2 as pb2
    from lbkit.testing.proto import model_service_pb2_grpc as pb2_grpc

    stub = pb2_grpc.ModelServiceStub(lb.channel())  # type: ignore[no-untyped-call]
    request = pb2.PredictRequest(features=[1.0])

    def call(n: int) -> tuple[bool, str, str]:
        import grpc

        try:
            reply = stub.Predict(request, timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            return False, "", exc.code().name
        return True, str(reply.served_by), "OK"

    load = PacedLoad(call, rate=rate, workers=workers, duration=duration).start()
    load.join(duration + CALL_TIMEOUT + 5.0)
    load.stop()
    return load


def _hedging_run(
    servers: Any, name: str, retry: Any, opts: Any, progress: Progress
) -> tuple[SelectorRun, dict[str, Any]]:
    import lbkit

    with lbkit.Balancer(servers.addresses, retry=retry) as lb:
        lb.wait_ready(timeout=10.0, count=len(servers.addresses))
        progress.note(f"  {name}: warming up 1 s, then {opts.duration:g} s measured")
        _load(lb, opts.rate, opts.concurrency, 1.0)
        servers.command("reset")
        sent0, won0 = lb.hedges_sent, lb.hedges_won
        load = _load(lb, opts.rate, opts.concurrency, opts.duration)
        received = servers.calls()
        hedges, won = lb.hedges_sent - sent0, lb.hedges_won - won0
        failed = {e.address: e.failures for e in lb.stats}
    by_server: dict[str, list[float]] = {a: [] for a in servers.addresses}
    for r in load.records:
        if r.ok and r.server in by_server:
            by_server[r.server].append(r.latency_ms)
    rows = [
        ServerRow(
            address, f"stalls {STALL_RATE:.0%}", 1, calls, by_server[address], failed.get(address, 0), 0
        )
        for address, calls in zip(servers.addresses, received, strict=True)
    ]
    made = len(load.records)
    extra = sum(received) / made - 1.0 if made else 0.0
    run = SelectorRun(
        name,
        opts.duration,
        opts.rate,
        load.records,
        rows,
        [],
        notes=[f"hedges sent {hedges}, won {won}; the servers received {extra:+.1%} calls over those made"],
    )
    return run, {"extra": extra, "hedges": hedges, "won": won}


def _summary(runs: list[SelectorRun], figures: list[dict[str, Any]]) -> str:
    rows = []
    for run, f in zip(runs, figures, strict=True):
        lat = run.latencies
        rows.append(
            [
                run.selector,
                f"{percentile(lat, 50):.1f}",
                f"{percentile(lat, 99):.1f}",
                f"{percentile(lat, 99.9):.1f}",
                f"{f['extra']:+.1%}",
                str(f["hedges"]),
                str(f["won"]),
                str(run.failed),
            ]
        )
    headers = ["client", "p50 ms", "p99 ms", "p99.9 ms", "extra calls", "hedges", "won", "failed"]
    return "hedging, in short:\n" + format_table(headers, rows)


def _reported_weights(opts: Any, progress: Progress) -> str:
    """Part 2: round robin against weighted round robin over servers reporting their load."""
    import lbkit
    from lbkit.server import LoadReportInterceptor, ServerLoad
    from lbkit.testing import Behavior, ModelServer

    servers = [
        ModelServer(
            behavior=Behavior(delay=ms / 1e3),
            interceptors=[LoadReportInterceptor(ServerLoad(capacity=4, window=0.25))],
        ).start()
        for ms in (FAST_MS, FAST_MS, SLOW_MS, SLOW_MS)
    ]
    kind = {s.address: "fast" if s.behavior.delay == FAST_MS / 1e3 else "slow" for s in servers}
    lines = [
        f"load reports: 2 fast ({FAST_MS:g} ms) and 2 slow ({SLOW_MS:g} ms) servers, each reporting its"
        " calls/s and its 4 slots' use (lbkit.server.LoadReportInterceptor)"
    ]
    rows = []
    try:
        selectors: list[tuple[str, Any]] = [
            ("round_robin", "round_robin"),
            (
                "weighted_round_robin",
                lbkit.WeightedRoundRobin(blackout_period=0.5, weight_update_period=0.2),
            ),
        ]
        duration = max(opts.duration / 2, 1.0)
        for name, selector in selectors:
            progress.note(f"  load reports: {name}, {duration:g} s after 1 s of warm-up")
            with lbkit.Balancer([s.address for s in servers], selector=selector) as lb:
                lb.wait_ready(timeout=10.0, count=len(servers))
                _load(lb, min(opts.rate, 150.0), opts.concurrency, 1.0)
                load = _load(lb, min(opts.rate, 150.0), opts.concurrency, duration)
                weights = dict(
                    zip(
                        (e.address for e in lb.core.picker.endpoints),
                        getattr(lb.core.picker, "weights", None) or (),
                        strict=False,
                    )
                )
            served = Counter(r.server for r in load.records if r.ok)
            total = sum(served.values()) or 1
            fast = sum(n for a, n in served.items() if kind.get(a) == "fast") / total
            lat = [r.latency_ms for r in load.records if r.ok]
            learned = ", ".join(
                f"{kind[a]} {w:.0f}" for a, w in sorted(weights.items(), key=lambda x: kind[x[0]])
            )
            rows.append(
                [
                    name,
                    f"{fast:.0%}",
                    f"{percentile(lat, 50):.1f}",
                    f"{percentile(lat, 99):.1f}",
                    learned or "-",
                ]
            )
    finally:
        for s in servers:
            s.stop(0)
    lines.append(format_table(["selector", "share to fast", "p50 ms", "p99 ms", "learned weights"], rows))
    return "\n".join(lines)


def run_tail(opts: Any, out: TextIO, progress: Progress, plot_path: str | None) -> None:
    """Run the tail scenario, writing its tables to ``out`` and its plot to ``plot_path``."""
    import lbkit
    from lbkit.testing.server_process import ServerProcess

    progress.note(
        f"starting 4 model servers ({SERVICE_MS:g} ms a call, {STALL_RATE:.0%} stall {STALL_MS:g} ms)..."
    )
    with ServerProcess(4, delay_ms=SERVICE_MS) as servers:
        for i in range(4):
            servers.command(f"stall {i} {STALL_RATE} {STALL_MS}")
        out.write(
            f"lbkit demo --scenario tail: 4 model servers on 127.0.0.1 (process {servers.pid}), "
            f"{SERVICE_MS:g} ms a call; {STALL_RATE:.0%} of calls on every server stall {STALL_MS:g} ms "
            f"(a noisy neighbour)\n  client: lbkit.Balancer, {opts.rate:g} calls/s from {opts.concurrency} "
            f"threads, {CALL_TIMEOUT:g} s deadline; {opts.duration:g} s per variant\n\n"
        )
        out.flush()
        runs: list[SelectorRun] = []
        figures: list[dict[str, Any]] = []
        run, f = _hedging_run(servers, "no hedging", None, opts, progress)
        runs.append(run)
        figures.append(f)
        out.write(render_run(run) + "\n\n")
        fixed = max(percentile(run.latencies, 95) / 1e3, 0.001)
        for name, delay in ((f"fixed delay {fixed * 1e3:.1f} ms (the p95 above)", fixed), ('"p95"', "p95")):
            retry = {METHOD: lbkit.HedgingPolicy(hedging_delay=delay)}
            run, f = _hedging_run(servers, f"hedging_delay={name}", retry, opts, progress)
            runs.append(run)
            figures.append(f)
            out.write(render_run(run) + "\n\n")
            out.flush()
    out.write(_summary(runs, figures) + "\n\n")
    out.flush()
    out.write(_reported_weights(opts, progress) + "\n\n")
    if plot_path is None:
        out.write("plot: skipped (--no-plot)\n")
    else:
        why_not = write_plot(runs, plot_path)
        out.write((why_not or f"plot: {plot_path} (latency over time, without and with hedging)") + "\n")

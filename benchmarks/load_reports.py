"""Load reports: weighted round robin from servers' reports, against static weights and peak EWMA, when one
server loses half its capacity, and what reading the reports costs a client per call.

``python -m benchmarks.load_reports [--quick]``. Four model servers run in a child process (so the
client's CPU is its own). Each has 4 slots and serves a call in 40 ms, so it can do 100 calls/s, and
reports load with :class:`lbkit.server.LoadReportInterceptor`: calls per second and its slots' utilization,
measured (:class:`lbkit.server.ServerLoad`), and its queue depth as a named metric. An asyncio client
sends 200 calls/s with Poisson arrivals (half the pool's capacity) through one variant at a time. Mid-run
server 3's service time doubles: its capacity halves, and so does its weight as its reports tell it.

Per variant: latency before and after the change, server 3's share of the calls (its fair share drops
from 1/4 to 1/7: 50 of the pool's 350 calls/s), the time until its share is within 10 % of 1/7 (judged
on sliding windows of arrivals), and for lbkit's weighted_round_robin the time until its weight halved.
Then, closed-loop sync calls against servers that answer at once, with and without reading the reports,
interleaved: the client CPU per call that reading costs. ``--quick`` runs static weights and lbkit's
weighted round robin only, over short phases (a smoke run: figures are rough).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc

from benchmarks._common import Progress, Result, median, module_main, percentile

__all__ = ["PLANS", "main", "run"]

SERVERS = 4
SLOTS = 4
"""Calls a server works on at once; more wait for a slot."""
SERVICE_MS = 40.0
RATE = 200.0
"""Calls per second offered: half the pool's capacity before the change."""
SLOW = 3
"""The server whose service time doubles."""
TIMEOUT = 2.0
SHARE_TOLERANCE = 0.10
CPU_GOAL = 0.03
"""Reading load reports may cost at most this share of a call's client CPU."""


@dataclass(frozen=True)
class Plan:
    """Durations (seconds) and periods of one run."""

    warmup: float
    steady: float
    after: float
    blackout: float
    update: float
    window: float
    """The servers' measuring window."""
    poll: float
    share_window: float
    cpu_rounds: int
    cpu_calls: int


PLANS = {
    # gRFC A58's defaults: 10 s blackout, 1 s weight updates; servers measure over 1 s.
    False: Plan(
        warmup=12.0,
        steady=8.0,
        after=20.0,
        blackout=10.0,
        update=1.0,
        window=1.0,
        poll=0.25,
        share_window=1.0,
        cpu_rounds=6,
        cpu_calls=2000,
    ),
    True: Plan(
        warmup=1.0,
        steady=0.6,
        after=1.6,
        blackout=1.0,
        update=0.2,
        window=0.25,
        poll=0.125,
        share_window=0.5,
        cpu_rounds=2,
        cpu_calls=150,
    ),
}


# ------------------------------------------------------------------------------------- the server child


def serve(count: int, slots: int, service_ms: float, window: float) -> None:
    """The child: ``count`` servers on 127.0.0.1, ``READY addr,...``, then commands from stdin:
    ``service I MS``, ``calls`` (arrivals per server), ``quit``."""
    from lbkit.server import LoadReportInterceptor, ServerLoad, report_load
    from lbkit.testing.proto import model_service_pb2 as pb2
    from lbkit.testing.proto import model_service_pb2_grpc as pb2_grpc

    class Slotted(pb2_grpc.ModelServiceServicer):  # type: ignore[misc]
        def __init__(self, name: str) -> None:
            self.name = name
            self.service = service_ms / 1e3
            self.slots = threading.Semaphore(slots)
            self.arrived = 0
            self.waiting = 0
            self.lock = threading.Lock()

        def Predict(self, request: Any, context: grpc.ServicerContext) -> Any:
            with self.lock:
                self.arrived += 1
                self.waiting += 1
                depth = self.waiting
            report_load(context, named_metrics={"queue_depth": depth})
            with self.slots:
                with self.lock:
                    self.waiting -= 1
                if self.service and context.is_active():  # a call its client gave up on is not served
                    time.sleep(self.service)
            return pb2.PredictResponse(predictions=[1.0], served_by=self.name)

    servers, servicers = [], []
    for _ in range(count):
        load = ServerLoad(capacity=slots, window=window)
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=64), interceptors=[LoadReportInterceptor(load)]
        )
        port = server.add_insecure_port("127.0.0.1:0")
        servicer = Slotted(f"127.0.0.1:{port}")
        pb2_grpc.add_ModelServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
        server.start()
        servers.append(server)
        servicers.append(servicer)
    print("READY " + ",".join(s.name for s in servicers), flush=True)
    try:
        for line in sys.stdin:
            words = line.split()
            if words == ["quit"]:
                break
            if words == ["calls"]:
                print("OK " + ",".join(str(s.arrived) for s in servicers), flush=True)
            elif len(words) == 3 and words[0] == "service":
                servicers[int(words[1])].service = float(words[2]) / 1e3
                print("OK", flush=True)
            else:
                print(f"ERR {line.strip()!r}", flush=True)
    finally:
        for server in servers:
            server.stop(0)


class Child:
    """The server child process, steered line by line."""

    def __init__(self, window: float) -> None:
        argv = [sys.executable, "-m", "benchmarks.load_reports", "--serve", str(window)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lock = threading.Lock()
        line = self._line()
        if not line.startswith("READY "):
            self.close()
            raise RuntimeError(f"server child said {line!r}")
        self.addresses = line[len("READY ") :].split(",")

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"server child exited (code {self.proc.poll()})")
        return line.strip()

    def command(self, text: str) -> str:
        """Send one command; the text after ``OK``."""
        assert self.proc.stdin is not None
        with self.lock:
            self.proc.stdin.write(text + "\n")
            self.proc.stdin.flush()
            line = self._line()
        if not line.startswith("OK"):
            raise RuntimeError(f"{text!r}: {line}")
        return line[2:].strip()

    def arrivals(self) -> list[int]:
        """Calls each server has received."""
        return [int(n) for n in self.command("calls").split(",")]

    def close(self) -> None:
        """Stop the child."""
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5.0)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# ----------------------------------------------------------------------------------------- the scenario


@dataclass
class Trace:
    """What one variant's run recorded."""

    sent: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)
    arrivals: list[tuple[float, list[int]]] = field(default_factory=list)
    weights: list[tuple[float, float]] = field(default_factory=list)
    """(time, server 3's weight over the others' mean) for lbkit's weighted_round_robin."""
    ejections: list[tuple[float, str]] = field(default_factory=list)
    """(time, address) of each outlier ejection (lbkit clients)."""


@dataclass(frozen=True)
class Variant:
    """A client under test."""

    name: str
    kind: str
    """``lbkit`` or ``native``."""
    selector: Any = None


def variants(plan: Plan, quick: bool = False) -> list[Variant]:
    """Static weights, peak EWMA, lbkit's weighted round robin and grpcio's own, in the order they run
    (the quick run: static weights and lbkit's weighted round robin)."""
    import lbkit

    wrr = lbkit.WeightedRoundRobin(blackout_period=plan.blackout, weight_update_period=plan.update)
    static = Variant("weighted (static, equal weights)", "lbkit", "weighted")
    reported = Variant("weighted_round_robin", "lbkit", wrr)
    if quick:
        return [static, reported]
    return [
        static,
        Variant("peak_ewma", "lbkit", "peak_ewma"),
        reported,
        Variant("native weighted_round_robin (grpcio)", "native"),
    ]


@contextlib.asynccontextmanager
async def open_client(variant: Variant, addresses: list[str], plan: Plan) -> AsyncIterator[tuple[Any, Any]]:
    """(stub, balancer or None) for ``variant``, ready, closed on exit."""
    import lbkit.aio
    from lbkit.testing.proto import model_service_pb2_grpc as pb2_grpc

    if variant.kind == "lbkit":
        async with lbkit.aio.Balancer(addresses, selector=variant.selector) as lb:
            await lb.wait_ready(timeout=10.0, count=len(addresses))
            yield pb2_grpc.ModelServiceStub(lb.channel()), lb  # type: ignore[no-untyped-call]
        return
    config = {
        "loadBalancingConfig": [
            {
                "weighted_round_robin": {
                    "blackoutPeriod": f"{plan.blackout}s",
                    "weightUpdatePeriod": f"{plan.update}s",
                }
            }
        ]
    }
    options = [("grpc.service_config", json.dumps(config))]
    async with grpc.aio.insecure_channel("ipv4:" + ",".join(addresses), options=options) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10.0)
        yield pb2_grpc.ModelServiceStub(channel), None  # type: ignore[no-untyped-call]


def _weight_ratio(lb: Any, slow: str) -> float | None:
    picker = lb.core.picker
    weights = getattr(picker, "weights", None)
    if not weights:
        return None
    by_address = dict(zip((e.address for e in picker.endpoints), weights, strict=True))
    others = [w for a, w in by_address.items() if a != slow]
    return by_address[slow] / (sum(others) / len(others)) if slow in by_address and others else None


async def run_variant(variant: Variant, child: Child, plan: Plan, seed: int) -> tuple[Trace, float]:
    """Offer RATE calls/s for the whole run; double server SLOW's service time after warmup + steady.

    Returns the trace and the change's time (``time.monotonic``)."""
    from lbkit.testing.proto import model_service_pb2 as pb2

    child.command(f"service {SLOW} {SERVICE_MS}")
    trace = Trace()
    request = pb2.PredictRequest(features=[1.0])
    rng = random.Random(seed)
    slow_address = child.addresses[SLOW]
    async with open_client(variant, child.addresses, plan) as (stub, lb):
        if lb is not None:
            from lbkit.events import EventKind

            def on_event(event: Any) -> None:
                if event.kind is EventKind.EJECTED:
                    trace.ejections.append((time.monotonic(), event.address))

            lb.add_listener(on_event)
        loop = asyncio.get_running_loop()
        start = time.monotonic()
        change = start + plan.warmup + plan.steady
        end = change + plan.after
        pending: set[asyncio.Task[None]] = set()

        async def one(sent: float) -> None:
            try:
                await stub.Predict(request, timeout=TIMEOUT)
            except grpc.RpcError:
                trace.errors.append(sent)
                return
            trace.sent.append(sent)
            trace.latency.append(time.monotonic() - sent)

        async def watch() -> None:
            changed = False
            while (now := time.monotonic()) < end + 0.5:
                if not changed and now >= change:
                    await loop.run_in_executor(None, child.command, f"service {SLOW} {2 * SERVICE_MS}")
                    changed = True
                counts = await loop.run_in_executor(None, child.arrivals)
                trace.arrivals.append((time.monotonic(), counts))
                if lb is not None:
                    ratio = _weight_ratio(lb, slow_address)
                    if ratio is not None:
                        trace.weights.append((time.monotonic(), ratio))
                await asyncio.sleep(plan.poll)

        watcher = asyncio.create_task(watch())
        next_send = start
        while next_send < end:
            delay = next_send - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(time.monotonic()))
            pending.add(task)
            task.add_done_callback(pending.discard)
            next_send += rng.expovariate(RATE)
        await asyncio.gather(*pending)
        await watcher
    return trace, change


def _shares(trace: Trace, window: float) -> list[tuple[float, float]]:
    """(t, server SLOW's share of the arrivals since the last poll at least ``window`` seconds before t)."""
    out = []
    points = trace.arrivals
    j = -1
    for t, counts in points:
        while j + 1 < len(points) and points[j + 1][0] <= t - window:
            j += 1
        if j < 0:
            continue
        base = points[j][1]
        delta = [c - b for c, b in zip(counts, base, strict=True)]
        total = sum(delta)
        if total:
            out.append((t, delta[SLOW] / total))
    return out


def _share_between(trace: Trace, start: float, end: float) -> float:
    inside = [(t, c) for t, c in trace.arrivals if start <= t <= end]
    if len(inside) < 2:
        return float("nan")
    delta = [b - a for a, b in zip(inside[0][1], inside[-1][1], strict=True)]
    return delta[SLOW] / sum(delta) if sum(delta) else float("nan")


def summarize(trace: Trace, change: float, plan: Plan) -> dict[str, Any]:
    """Latency and shares before and after the change, and how long the shift took."""
    start = change - plan.steady
    before = [lat for s, lat in zip(trace.sent, trace.latency, strict=True) if start <= s < change]
    after = [lat for s, lat in zip(trace.sent, trace.latency, strict=True) if s >= change]
    target = (1.0 / 7.0) * (1.0 + SHARE_TOLERANCE)
    reached = next(
        (t - change for t, share in _shares(trace, plan.share_window) if t > change and share <= target), None
    )
    halved = next(
        (t - change for t, ratio in trace.weights if t > change and ratio <= 0.5 * (1 + SHARE_TOLERANCE)),
        None,
    )
    return {
        "p50_before_ms": percentile(before, 50) * 1e3,
        "p99_before_ms": percentile(before, 99) * 1e3,
        "p50_after_ms": percentile(after, 50) * 1e3,
        "p99_after_ms": percentile(after, 99) * 1e3,
        "errors": len(trace.errors),
        "calls": len(trace.sent) + len(trace.errors),
        "share_before": _share_between(trace, start, change),
        "share_end": _share_between(trace, change + plan.after / 2, change + plan.after),
        "time_to_share_s": reached,
        "time_to_weight_halved_s": halved,
        "share_series": [(round(t - change, 3), round(s, 4)) for t, s in _shares(trace, plan.share_window)],
        "ejections": [(round(t - change, 3), address) for t, address in trace.ejections],
    }


# ---------------------------------------------------------------------------------------- the CPU cost


def measure_read_cost(child: Child, plan: Plan) -> dict[str, Any]:
    """Client CPU per call without reading reports, reading them as weighted_round_robin does, and reading
    every call's; and reading one report alone.

    One sync balancer (weighted_round_robin) against servers that answer at once, one thread, so the work
    reading adds runs in the measured thread. Each way takes turns with 'unread' call by call
    (``thread_time`` and ``process_time`` summed per way), so the machine's drift falls on both alike.
    """
    import lbkit
    from lbkit.orca import read_load_report
    from lbkit.stats import Stats
    from lbkit.testing.proto import model_service_pb2 as pb2
    from lbkit.testing.proto import model_service_pb2_grpc as pb2_grpc

    for i in range(SERVERS):
        child.command(f"service {i} 0")
    request = pb2.PredictRequest(features=[1.0])
    ways = ("unread", "as deployed", "every call")
    thread = dict.fromkeys(ways, 0.0)
    process = dict.fromkeys(ways, 0.0)
    ratios: dict[str, list[float]] = {w: [] for w in ways[1:]}
    calls = dict.fromkeys(ways, 0)
    with lbkit.Balancer(child.addresses, selector=lbkit.WeightedRoundRobin(blackout_period=0.0)) as lb:
        lb.wait_ready(timeout=10.0, count=SERVERS)
        predict = pb2_grpc.ModelServiceStub(lb.channel()).Predict  # type: ignore[no-untyped-call]
        entries = [lb.stats[a] for a in child.addresses]
        for _ in range(200):
            predict(request, timeout=5.0)
        before = sum(e.load_reports for e in entries)
        tt, pt = time.thread_time, time.process_time
        # Two passes, each against 'unread': the 'every call' way wants every endpoint's next report,
        # which would leak into the 'as deployed' calls were they in one pass.
        for way in ways[1:]:
            for r in range(plan.cpu_rounds):
                part_t = {"unread": 0.0, way: 0.0}
                for i in range(plan.cpu_calls):
                    for current in ("unread", way) if (i + r) % 2 == 0 else (way, "unread"):
                        lb.load_reports = current != "unread"
                        if current == "every call":
                            for e in entries:
                                e.load_wanted = True
                        t0, p0 = tt(), pt()
                        predict(request, timeout=5.0)
                        elapsed = tt() - t0
                        part_t[current] += elapsed
                        thread[current] += elapsed
                        process[current] += pt() - p0
                        calls[current] += 1
                        if current == "every call":
                            for e in entries:
                                e.load_wanted = False
                ratios[way].append(part_t[way] / part_t["unread"])
            if way == "as deployed":
                deployed_reports = sum(e.load_reports for e in entries) - before
        lb.load_reports = True
        entries[0].load_wanted = True
        _, done = predict.with_call(request, timeout=5.0)
        trailers = done.trailing_metadata()
    entry = Stats()["127.0.0.1:1"]
    # Each call brings its own bytes objects: copies, so that every report is new and decoded.
    copies = [
        tuple((k, bytes(bytearray(v)) if k.endswith("-bin") else v) for k, v in trailers) for _ in range(5000)
    ]
    best = float("inf")
    for _ in range(5):
        t0 = time.thread_time()
        for metadata in copies:
            entry.load_wanted = True
            read_load_report(entry, metadata)
            entry.take_load_report()
        best = min(best, (time.thread_time() - t0) / len(copies))
    assert entry.load_reports >= len(copies)
    return {
        "calls_per_way": plan.cpu_rounds * plan.cpu_calls,
        "thread_us": {w: thread[w] / calls[w] * 1e6 for w in ways},
        "process_us": {w: process[w] / calls[w] * 1e6 for w in ways},
        "share": {w: median(ratios[w]) - 1.0 for w in ways[1:]},
        "share_range": {w: (min(ratios[w]) - 1.0, max(ratios[w]) - 1.0) for w in ways[1:]},
        "read_and_decode_us": best * 1e6,
        "reports_decoded": deployed_reports,
        "trailer_bytes": sum(len(v) for k, v in trailers if k.endswith("-bin")),
    }


# ------------------------------------------------------------------------------------------------- run


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f} s"


def run(quick: bool = False) -> Result:
    """Run every variant through the capacity loss, then measure the cost of reading reports."""
    plan = PLANS[quick]
    chosen = variants(plan, quick)
    progress = Progress("load_reports", len(chosen) + 1)
    results: dict[str, dict[str, Any]] = {}
    child = Child(plan.window)

    async def scenario() -> None:  # one event loop for every variant (grpc.aio binds to the first)
        for i, variant in enumerate(chosen):
            trace, change = await run_variant(variant, child, plan, seed=i)
            results[variant.name] = summarize(trace, change, plan)
            progress.step(variant.name)

    try:
        asyncio.run(scenario())
        cost = measure_read_cost(child, plan)
        progress.step("read cost")
    finally:
        child.close()
    progress.close()
    return report(plan, chosen, results, cost)


def report(
    plan: Plan, chosen: list[Variant], results: dict[str, dict[str, Any]], cost: dict[str, Any]
) -> Result:
    """The result dict: the scenario's table, the read-cost table, notes and data."""
    goal_s = 2 * plan.blackout
    half = SLOTS * 1e3 / SERVICE_MS / 2  # the slowed server's capacity, calls/s
    pool = half * (2 * SERVERS - 1)
    rows = []
    for variant in chosen:
        r = results[variant.name]
        halved = r["time_to_weight_halved_s"] if variant.name == "weighted_round_robin" else "-"
        rows.append(
            [
                variant.name,
                f"{r['p50_before_ms']:.1f}",
                f"{r['p99_before_ms']:.1f}",
                f"{r['p50_after_ms']:.1f}",
                f"{r['p99_after_ms']:.1f}",
                r["errors"],
                len(r["ejections"]) if variant.kind == "lbkit" else "-",
                f"{r['share_before']:.1%}",
                f"{r['share_end']:.1%}",
                _seconds(r["time_to_share_s"]),
                halved if halved == "-" else _seconds(halved),
            ]
        )
    wrr = results["weighted_round_robin"]
    shift_ok = wrr["time_to_share_s"] is not None and wrr["time_to_share_s"] <= goal_s
    share, spread = cost["share"], cost["share_range"]
    cost_ok = share["as deployed"] <= CPU_GOAL
    cost_rows = []
    for way, thread_us in cost["thread_us"].items():
        row = [way, f"{thread_us:.0f}", f"{cost['process_us'][way]:.0f}"]
        if way == "unread":
            row += ["-", ""]
        else:
            row.append(f"{share[way]:+.1%} ({spread[way][0]:+.1%} .. {spread[way][1]:+.1%})")
            row.append(f"<= {CPU_GOAL:.0%}: {'pass' if cost_ok else 'FAIL'}" if way == "as deployed" else "")
        cost_rows.append(row)
    caption = (
        f"{SERVERS} servers x {SLOTS} slots x {SERVICE_MS:g} ms, {RATE:g} calls/s (Poisson); server {SLOW}'s"
        f" service time doubles at t=0; latency in ms; server {SLOW}'s fair share after: 1/7"
    )
    return {
        "title": "Load reports: weights from the servers' own reports",
        "tables": [
            {
                "caption": caption,
                "columns": [
                    "client",
                    "p50 before",
                    "p99 before",
                    "p50 after",
                    "p99 after",
                    "errors",
                    "ejections",
                    f"server {SLOW} share before",
                    "share, 2nd half after",
                    f"time to share <= 1/7 + {SHARE_TOLERANCE:.0%}",
                    "time to weight / 2",
                ],
                "rows": rows,
            },
            {
                "caption": "What reading load reports costs the client: CPU per call (sync, one thread)",
                "columns": ["reports", "thread CPU us", "process CPU us", "cost (median; range)", "goal"],
                "rows": cost_rows,
            },
        ],
        "notes": [
            f"weighted_round_robin: blackout {plan.blackout:g} s, weight updates every {plan.update:g} s;"
            f" servers measure over {plan.window:g} s windows. Goal: server {SLOW}'s share settles within 2"
            f" blackout periods ({goal_s:g} s) of the change: {_seconds(wrr['time_to_share_s'])},"
            f" {'pass' if shift_ok else 'FAIL'}.",
            f"With the other servers unchanged, half the capacity is {half:g} of the pool's {pool:g} calls/s,"
            " a share of 1/7 (14.3 %) rather than half of 1/4; the time is to the end of the first sliding"
            f" window of arrivals ({plan.share_window:g} s) whose share is within 10 % of it. 'Time to weight"
            " / 2': until the weight lbkit's picker gives the server is half the others' mean (within 10 %).",
            f"Static weights keep giving the server a quarter of the calls, {RATE / SERVERS:g} calls/s"
            f" against its new capacity of {half:g}: it runs full, its queue growing with each burst.",
            "The native row is grpcio's own weighted_round_robin (C-core) with the same blackout and update"
            " period over the same reports (servers send the standard endpoint-load-metrics-bin trailer).",
            "Read cost: one sync weighted_round_robin balancer against servers that answer at once, one"
            " thread. 'as deployed' reads a report when the selector wants one (each endpoint's first call"
            f" in the last fifth of each weight-update period: {cost['reports_decoded']} reports in"
            f" {cost['calls_per_way']:,} calls); 'every call' reads every call's trailers (the cost of one"
            " read, where a call reads)."
            f" Each takes turns with 'unread' call by call, {plan.cpu_rounds} rounds of {plan.cpu_calls:,}"
            " calls each; the cost is the thread CPU (time.thread_time) over 'unread'. Finding, keeping and"
            f" decoding one report, alone in a loop: {cost['read_and_decode_us']:.1f} us"
            f" ({cost['trailer_bytes']} bytes of trailers: the report under both keys).",
        ],
        "data": {
            "plan": plan.__dict__,
            "variants": results,
            "read_cost": cost,
            "goals": {"shift_s": goal_s, "read_cost": CPU_GOAL},
        },
    }


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m benchmarks.load_reports [--quick] [--json PATH]`` (``--serve W``: the server child)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--serve"]:
        parser = argparse.ArgumentParser(prog="python -m benchmarks.load_reports --serve")
        parser.add_argument("--serve", type=float, metavar="WINDOW", required=True)
        serve(SERVERS, SLOTS, SERVICE_MS, parser.parse_args(args).serve)
        return
    module_main("load_reports", run, args)


if __name__ == "__main__":
    main()

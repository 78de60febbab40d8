"""Tail latency with hedged calls: a noisy neighbour, without hedging, with a fixed delay and with "p95".

``python -m benchmarks.tail [--quick]``. Four model servers run in a child process (the client's CPU and
GIL are its own); each call takes a few ms, and 2 % of calls, at random on every server, first stall
200 ms (a noisy neighbour: no server is slow, any call may be). A client offers 300 calls/s with Poisson
arrivals through one variant at a time, sync (``future()`` calls from one sending thread) and asyncio
(a task per call):

- **no hedging**: ``RetryPolicy()`` (what a plain client gets);
- **fixed delay**: ``HedgingPolicy(hedging_delay=D)`` with D the p95 of this API's unhedged run just
  measured, in this run: the best fixed delay one could tune by hand from the same data;
- **"p95"**: ``HedgingPolicy(hedging_delay="p95")``: the delay is learnt by the client as it goes.

Variants take turns in rounds, each round a fresh balancer that first runs a warm-up (so the adaptive
delay has its samples) and then the measured phase. Reported: p50, p99, p99.9 of the call latency, the
extra calls the servers received (server-side count over calls made), hedges sent and won, and the
client CPU per call. Goals, judged with "p95" against no hedging in the same run: p99.9 <= 1/5 of the
unhedged, extra calls <= 6 %, p50 within 5 %. ``--quick`` runs one short asyncio round (figures are
rough).
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from benchmarks._common import Progress, Result, module_main, percentile

__all__ = ["GOALS", "PLANS", "Plan", "main", "run"]

SERVERS = 4
SERVICE_MS = 3.0
"""Milliseconds each call takes on its server."""
STALL_RATE = 0.02
STALL_MS = 200.0
RATE = 300.0
"""Calls per second offered."""
TIMEOUT = 2.0
METHOD = "/lbkit.inference.v1.ModelService/Predict"
GOALS = {"p99.9 vs unhedged": 1 / 5, "extra calls": 0.06, "p50 change": 0.05}
"""With "p95", against no hedging in the same run: p99.9 at most this share, extra calls at most this
share of the calls, p50 within this share."""


@dataclass(frozen=True)
class Plan:
    """Durations (seconds) of one run."""

    rounds: int
    warmup: float
    measure: float
    apis: tuple[str, ...]


PLANS = {
    False: Plan(rounds=4, warmup=1.0, measure=12.0, apis=("aio", "sync")),
    True: Plan(rounds=1, warmup=0.3, measure=1.0, apis=("aio",)),
}
"""The full run: 4 rounds x 12 s of each variant per API (about 14,000 measured calls a variant); the
quick run: one short asyncio round (a smoke run)."""


# ------------------------------------------------------------------------------------- the servers


class Child:
    """The servers, in a child process (:class:`lbkit.testing.server_process.ServerProcess`)."""

    def __init__(self) -> None:
        from lbkit.testing.server_process import ServerProcess

        self._process = ServerProcess(SERVERS, delay_ms=SERVICE_MS).start()
        try:
            for i in range(SERVERS):
                self._process.command(f"stall {i} {STALL_RATE} {STALL_MS}")
        except BaseException:
            self._process.close()
            raise
        self.addresses = self._process.addresses

    def calls(self) -> int:
        """Calls the servers have received."""
        return sum(self._process.calls())

    def close(self) -> None:
        """Stop the child."""
        self._process.close()


# ----------------------------------------------------------------------------------------- the phases


@dataclass
class Phase:
    """What one measured phase of one variant recorded."""

    latencies: list[float]
    errors: int
    calls: int
    server_calls: int
    hedges_sent: int
    hedges_won: int
    cpu: float


VARIANTS = ("no hedging", "fixed delay", '"p95"')


def policy(variant: str, fixed: float) -> Any:
    """The ``retry=`` of ``variant``."""
    import lbkit

    if variant == "no hedging":
        return None
    delay: float | str = fixed if variant == "fixed delay" else "p95"
    return {METHOD: lbkit.HedgingPolicy(hedging_delay=delay)}


def _schedule(seconds: float, rng: random.Random) -> list[float]:
    """Poisson send offsets within ``seconds``."""
    offsets, t = [], rng.expovariate(RATE)
    while t < seconds:
        offsets.append(t)
        t += rng.expovariate(RATE)
    return offsets


async def _aio_load(
    stub: Any, request: Any, seconds: float, rng: random.Random
) -> tuple[list[float], int, int]:
    """Open-loop calls for ``seconds``: (latencies of the calls that succeeded, calls sent, calls that
    failed or had not ended TIMEOUT + 5 s after the last was sent)."""
    latencies: list[float] = []
    errors = 0
    pending: set[asyncio.Task[None]] = set()

    async def one(sent: float) -> None:
        nonlocal errors
        try:
            await stub.Predict(request, timeout=TIMEOUT)
        except grpc.RpcError:
            errors += 1
            return
        latencies.append(time.monotonic() - sent)

    start = time.monotonic()
    offsets = _schedule(seconds, rng)
    for offset in offsets:
        delay = start + offset - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(time.monotonic()))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.wait(pending, timeout=TIMEOUT + 5.0)
    return list(latencies), len(offsets), len(offsets) - len(latencies)


def _sync_load(stub: Any, request: Any, seconds: float, rng: random.Random) -> tuple[list[float], int, int]:
    """The sync twin of :func:`_aio_load` (``future()`` calls from this thread)."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    outstanding = [0]
    idle = threading.Event()

    def ended(sent: float, future: Any) -> None:
        took = time.monotonic() - sent
        with lock:
            if future.exception() is None:
                latencies.append(took)
            else:
                errors[0] += 1
            outstanding[0] -= 1
            if outstanding[0] == 0:
                idle.set()

    start = time.monotonic()
    offsets = _schedule(seconds, rng)
    for offset in offsets:
        delay = start + offset - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sent = time.monotonic()
        with lock:
            outstanding[0] += 1
            idle.clear()
        stub.Predict.future(request, timeout=TIMEOUT).add_done_callback(lambda f, sent=sent: ended(sent, f))
    idle.wait(TIMEOUT + 5.0)
    with lock:
        return list(latencies), len(offsets), len(offsets) - len(latencies)


async def _aio_phase(child: Child, retry: Any, plan: Plan, rng: random.Random) -> Phase:
    import lbkit.aio
    from lbkit.testing.proto import model_service_pb2 as pb2
    from lbkit.testing.proto import model_service_pb2_grpc as pb2_grpc

    request = pb2.PredictRequest(features=[1.0])
    async with lbkit.aio.Balancer(child.addresses, retry=retry) as lb:
        await lb.wait_ready(timeout=10.0, count=len(child.addresses))
        stub = pb2_grpc.ModelServiceStub(lb.channel())  # type: ignore[no-untyped-call]
        await _aio_load(stub, request, plan.warmup, rng)
        loop = asyncio.get_running_loop()
        before = await loop.run_in_executor(None, child.calls)
        sent0, won0, cpu0 = lb.hedges_sent, lb.hedges_won, time.process_time()
        latencies, sent, errors = await _aio_load(stub, request, plan.measure, rng)
        cpu = time.process_time() - cpu0
        after = await loop.run_in_executor(None, child.calls)
        return Phase(
            latencies, errors, sent, after - before, lb.hedges_sent - sent0,
            lb.hedges_won - won0, cpu,
        )  # fmt: skip


def _sync_phase(child: Child, retry: Any, plan: Plan, rng: random.Random) -> Phase:
    import lbkit
    from lbkit.testing.proto import model_service_pb2 as pb2
    from lbkit.testing.proto import model_service_pb2_grpc as pb2_grpc

    request = pb2.PredictRequest(features=[1.0])
    with lbkit.Balancer(child.addresses, retry=retry) as lb:
        lb.wait_ready(timeout=10.0, count=len(child.addresses))
        stub = pb2_grpc.ModelServiceStub(lb.channel())  # type: ignore[no-untyped-call]
        _sync_load(stub, request, plan.warmup, rng)
        before = child.calls()
        sent0, won0, cpu0 = lb.hedges_sent, lb.hedges_won, time.process_time()
        latencies, sent, errors = _sync_load(stub, request, plan.measure, rng)
        cpu = time.process_time() - cpu0
        after = child.calls()
        return Phase(
            latencies, errors, sent, after - before, lb.hedges_sent - sent0,
            lb.hedges_won - won0, cpu,
        )  # fmt: skip


def summarize(phases: list[Phase]) -> dict[str, Any]:
    """A variant's figures over its rounds."""
    latencies = [x for p in phases for x in p.latencies]
    calls = sum(p.calls for p in phases)
    server = sum(p.server_calls for p in phases)
    return {
        "calls": calls,
        "errors": sum(p.errors for p in phases),
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
        "p999_ms": percentile(latencies, 99.9) * 1e3,
        "extra": (server - calls) / calls if calls else 0.0,
        "hedges_sent": sum(p.hedges_sent for p in phases),
        "hedges_won": sum(p.hedges_won for p in phases),
        "cpu_us_per_call": sum(p.cpu for p in phases) / calls * 1e6 if calls else 0.0,
    }


def judge(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The goals of "p95" against no hedging."""
    base, hedged = results["no hedging"], results['"p95"']
    tail = hedged["p999_ms"] / base["p999_ms"] if base["p999_ms"] else 0.0
    p50 = hedged["p50_ms"] / base["p50_ms"] - 1.0 if base["p50_ms"] else 0.0
    return {
        "p99.9 vs unhedged": {"value": tail, "pass": tail <= GOALS["p99.9 vs unhedged"]},
        "extra calls": {"value": hedged["extra"], "pass": hedged["extra"] <= GOALS["extra calls"]},
        "p50 change": {"value": p50, "pass": abs(p50) <= GOALS["p50 change"]},
    }


def run(quick: bool = False) -> Result:
    """Each API: a round of no hedging first (its p95 sets the fixed delay), then the variants in turn."""
    plan = PLANS[quick]
    progress = Progress("tail", plan.rounds * len(VARIANTS) * len(plan.apis))
    child = Child()
    data: dict[str, Any] = {}
    try:
        for api in plan.apis:
            rng = random.Random(7)
            phases: dict[str, list[Phase]] = {v: [] for v in VARIANTS}
            fixed = 0.0

            def phase(variant: str, api: str = api, rng: random.Random = rng, fixed_: float = 0.0) -> Phase:
                retry = policy(variant, fixed_)
                if api == "aio":
                    return asyncio.run(_aio_phase(child, retry, plan, rng))
                return _sync_phase(child, retry, plan, rng)

            for r in range(plan.rounds):
                for variant in VARIANTS:
                    if variant == "fixed delay" and not fixed:
                        unhedged = [x for p in phases["no hedging"] for x in p.latencies]
                        fixed = percentile(unhedged, 95)
                    phases[variant].append(phase(variant, fixed_=fixed))
                    progress.step(f"{api} round {r + 1} {variant}")
            results = {v: summarize(p) for v, p in phases.items()}
            data[api] = {"variants": results, "fixed_delay_ms": fixed * 1e3, "goals": judge(results)}
    finally:
        child.close()
    progress.close()
    return report(plan, data)


def _verdict(goal: dict[str, Any], text: str) -> str:
    return f"{text}: {'pass' if goal['pass'] else 'FAIL'}"


def report(plan: Plan, data: dict[str, Any]) -> Result:
    """The result dict: a table per API, notes, data."""
    tables = []
    for api, d in data.items():
        results, goals = d["variants"], d["goals"]
        rows = []
        for variant in VARIANTS:
            r = results[variant]
            name = f"fixed delay {d['fixed_delay_ms']:.1f} ms" if variant == "fixed delay" else variant
            goal = ""
            if variant == '"p95"':
                goal = "; ".join(
                    [
                        _verdict(
                            goals["p99.9 vs unhedged"], f"p99.9 {goals['p99.9 vs unhedged']['value']:.2f}x"
                        ),
                        _verdict(goals["extra calls"], f"extra {goals['extra calls']['value']:.1%}"),
                        _verdict(goals["p50 change"], f"p50 {goals['p50 change']['value']:+.1%}"),
                    ]
                )
            rows.append(
                [
                    name,
                    f"{r['calls']:,}",
                    r["errors"],
                    f"{r['p50_ms']:.2f}",
                    f"{r['p99_ms']:.1f}",
                    f"{r['p999_ms']:.1f}",
                    f"{r['extra']:+.1%}",
                    f"{r['hedges_sent']:,}",
                    f"{r['hedges_won']:,}",
                    f"{r['cpu_us_per_call']:.0f}",
                    goal or "baseline" if variant == "no hedging" else goal,
                ]
            )
        tables.append(
            {
                "caption": f"{api}: {SERVERS} servers x {SERVICE_MS:g} ms, {STALL_RATE:.0%} of calls stall"
                f" {STALL_MS:g} ms, {RATE:g} calls/s (Poisson); latency in ms",
                "columns": [
                    "client",
                    "calls",
                    "errors",
                    "p50",
                    "p99",
                    "p99.9",
                    "extra calls",
                    "hedges",
                    "hedges won",
                    "client CPU us/call",
                    "goal (p99.9 <= 1/5, extra <= 6 %, p50 within 5 %)",
                ],
                "rows": rows,
            }
        )
    return {
        "title": "Tail latency: hedged calls against a noisy neighbour",
        "tables": tables,
        "notes": [
            f"{plan.rounds} round(s) per API; in each, every variant gets a fresh balancer, {plan.warmup:g} s"
            f" of warm-up (the adaptive delay learns from it) and {plan.measure:g} s measured, in turn.",
            "Extra calls: calls the servers received over calls made, less one (a cancelled hedge that"
            " reached a server counts). 'hedges won': calls a hedge answered before the first attempt.",
            "The fixed delay is the p95 of the unhedged calls of the same API measured just before in this"
            ' run: the best single delay one could set by hand. "p95" learns it per method from recent'
            " call latencies (lbkit.HedgingPolicy's default); at most 2 attempts a call, throttled by the"
            " retry budget.",
            "Servers run in a child process, so the client's CPU figure is its own. Goals are judged in the"
            ' run, "p95" against no hedging. Errors: calls that failed or had not ended 7 s after the last'
            " was sent (a 2 s deadline each).",
            f"Load average over the last minute at the end of the run: {os.getloadavg()[0]:.1f} (2 cores"
            " here: far above 2, the client is starved and every figure with it).",
        ],
        "data": {"plan": plan.__dict__, "apis": data, "goals": GOALS},
    }


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m benchmarks.tail [--quick] [--json PATH]``."""
    module_main("tail", run, argv)


if __name__ == "__main__":
    main()

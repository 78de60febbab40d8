"""End-to-end calls through ``lb.channel()`` against grpcio's native ``round_robin`` and a plain channel.

Four local model servers run in a child process (:mod:`lbkit.testing.server_process`), so the client
process's CPU time is the client's alone. Each cell is a client mode (sync threads or ``grpc.aio``) at a
concurrency, a call kind (unary ``Predict`` or an 8-token ``StreamPredict``) and a variant (plain channel,
native round robin, or lbkit with one selector). All variants of a cell are open at once and measured in
short windows, interleaved in rotating order; the ratios against native round robin are medians of
per-round ratios, so the machine's drift and bursts of other load cancel out.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from benchmarks._common import (
    Load,
    Progress,
    Result,
    median,
    module_main,
    percentile,
    run_async_load,
    run_sync_load,
)
from lbkit.discovery.static import StaticDiscovery
from lbkit.testing.proto import model_service_pb2 as pb2
from lbkit.testing.proto import model_service_pb2_grpc as pb2_grpc
from lbkit.testing.server_process import ServerProcess

__all__ = ["SELECTORS", "cpu_goal", "main", "run"]

SELECTORS = ("round_robin", "least_connections", "weighted", "consistent_hash", "peak_ewma")
"""The lbkit selectors measured, by name."""

CPU_GOAL = 1.10
"""lbkit's client CPU per call may be at most this many times native round robin's."""
QPS_GOAL = 0.95
"""lbkit's QPS must be at least this share of native round robin's."""
REFERENCE_GOAL = 1.05
"""Where grpcio's own "4 plain channels in turn" already costs more than ``CPU_GOAL`` times native round
robin (one sync channel per endpoint runs an event thread each for streams), lbkit's CPU may be at most
this many times the reference's: its own cost over the structure it shares."""

_RR_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
_REQUEST = pb2.PredictRequest(features=[0.5, 1.5, 2.5, 3.5], model_version="v1")
_STREAM_REQUEST = pb2.PredictRequest(features=[0.5], max_tokens=8)
_KEYS = tuple(((("lb-key", f"user-{i}"),)) for i in range(1024))
_TIMEOUT = 10.0
_COLUMNS = ("client", "QPS", "p50 ms", "p99 ms", "CPU us/call", "errors", "CPU vs native", "QPS vs native")


@dataclass(frozen=True)
class Mode:
    """A client mode: sync threads or asyncio, at a concurrency."""

    name: str
    aio: bool
    concurrency: int


MODES = (
    Mode("sync c=1", False, 1),
    Mode("sync c=16", False, 16),
    Mode("aio c=1", True, 1),
    Mode("aio c=64", True, 64),
)


@dataclass(frozen=True)
class Variant:
    """What a cell's client calls through."""

    name: str
    kind: str
    """``plain``, ``native``, ``cycle`` or ``lbkit``."""
    selector: str = ""
    keyed: bool = False
    """Whether calls carry ``lb-key`` metadata (consistent hash, and its native baseline)."""

    @property
    def baseline(self) -> str:
        """The native variant this one is compared with."""
        return "native round_robin + lb-key" if self.keyed else "native round_robin"


PLAIN = Variant("plain channel (1 server)", "plain")
NATIVE = Variant("native round_robin", "native")
NATIVE_KEYED = Variant("native round_robin + lb-key", "native", keyed=True)
CYCLE = Variant("4 plain channels in turn", "cycle")
"""One grpc channel per server, taken in turn by ``itertools.cycle``: lbkit's structure with no lbkit in it,
so its ratio to native round robin is what one channel per endpoint costs in grpcio by itself."""


class _Cycle:
    """A stub-like object whose every call goes to the next of several stubs, in turn."""

    def __init__(self, stubs: list[Any]) -> None:
        self._next = itertools.cycle(stubs).__next__

    def Predict(self, *args: Any, **kwargs: Any) -> Any:
        return self._next().Predict(*args, **kwargs)

    def StreamPredict(self, *args: Any, **kwargs: Any) -> Any:
        return self._next().StreamPredict(*args, **kwargs)


def lbkit_variant(selector: str) -> Variant:
    """The lbkit variant for ``selector``; consistent hash calls carry an ``lb-key``."""
    return Variant(f"lbkit {selector}", "lbkit", selector, keyed=selector == "consistent_hash")


def balancer_class(aio: bool) -> Any:
    """``lbkit.Balancer`` or ``lbkit.aio.Balancer``; raises ImportError or AttributeError if missing."""
    return importlib.import_module("lbkit.aio" if aio else "lbkit").Balancer


def lbkit_available() -> str:
    """Empty if ``lbkit.Balancer`` and ``lbkit.aio.Balancer`` can be used; else why not."""
    try:
        balancer_class(False)
        balancer_class(True)
    except (ImportError, AttributeError) as exc:
        return f"lbkit.Balancer is not available ({exc})"
    return ""


def _native_target(addresses: list[str]) -> str:
    return "ipv4:" + ",".join(addresses)


@contextlib.contextmanager
def open_sync(variant: Variant, addresses: list[str]) -> Iterator[Any]:
    """A ModelService stub for ``variant``, ready, closed on exit."""
    if variant.kind == "lbkit":
        with balancer_class(False)(StaticDiscovery(addresses), selector=variant.selector) as lb:
            lb.wait_ready(timeout=10.0, count=len(addresses))
            yield pb2_grpc.ModelServiceStub(lb.channel())  # type: ignore[no-untyped-call]
        return
    if variant.kind == "cycle":
        with contextlib.ExitStack() as stack:
            channels = [stack.enter_context(grpc.insecure_channel(a)) for a in addresses]
            for ch in channels:
                grpc.channel_ready_future(ch).result(timeout=10.0)
            yield _Cycle([pb2_grpc.ModelServiceStub(ch) for ch in channels])  # type: ignore[no-untyped-call]
        return
    if variant.kind == "native":
        channel = grpc.insecure_channel(
            _native_target(addresses), options=[("grpc.service_config", _RR_CONFIG)]
        )
    else:
        channel = grpc.insecure_channel(addresses[0])
    with channel:
        grpc.channel_ready_future(channel).result(timeout=10.0)
        yield pb2_grpc.ModelServiceStub(channel)  # type: ignore[no-untyped-call]


@contextlib.asynccontextmanager
async def open_aio(variant: Variant, addresses: list[str]) -> AsyncIterator[Any]:
    """An asyncio ModelService stub for ``variant``, ready, closed on exit."""
    if variant.kind == "lbkit":
        async with balancer_class(True)(StaticDiscovery(addresses), selector=variant.selector) as lb:
            await lb.wait_ready(timeout=10.0, count=len(addresses))
            yield pb2_grpc.ModelServiceStub(lb.channel())  # type: ignore[no-untyped-call]
        return
    if variant.kind == "cycle":
        async with contextlib.AsyncExitStack() as stack:
            channels = [await stack.enter_async_context(grpc.aio.insecure_channel(a)) for a in addresses]
            for ch in channels:
                await asyncio.wait_for(ch.channel_ready(), 10.0)
            yield _Cycle([pb2_grpc.ModelServiceStub(ch) for ch in channels])  # type: ignore[no-untyped-call]
        return
    if variant.kind == "native":
        target = _native_target(addresses)
        channel = grpc.aio.insecure_channel(target, options=[("grpc.service_config", _RR_CONFIG)])
    else:
        channel = grpc.aio.insecure_channel(addresses[0])
    async with channel:
        await asyncio.wait_for(channel.channel_ready(), 10.0)
        yield pb2_grpc.ModelServiceStub(channel)  # type: ignore[no-untyped-call]


def _sync_call(stub: Any, kind: str, keyed: bool) -> Callable[[int], object]:
    predict, stream = stub.Predict, stub.StreamPredict
    if kind == "unary":
        if keyed:
            return lambda i: predict(_REQUEST, timeout=_TIMEOUT, metadata=_KEYS[i & 1023])
        return lambda i: predict(_REQUEST, timeout=_TIMEOUT)

    def call(i: int) -> object:
        metadata = _KEYS[i & 1023] if keyed else None
        n = 0
        for _ in stream(_STREAM_REQUEST, timeout=_TIMEOUT, metadata=metadata):
            n += 1
        return n

    return call


def _aio_call(stub: Any, kind: str, keyed: bool) -> Callable[[int], Awaitable[object]]:
    predict, stream = stub.Predict, stub.StreamPredict
    if kind == "unary":
        if keyed:
            return lambda i: predict(_REQUEST, timeout=_TIMEOUT, metadata=_KEYS[i & 1023])
        return lambda i: predict(_REQUEST, timeout=_TIMEOUT)

    async def call(i: int) -> object:
        metadata = _KEYS[i & 1023] if keyed else None
        n = 0
        async for _ in stream(_STREAM_REQUEST, timeout=_TIMEOUT, metadata=metadata):
            n += 1
        return n

    return call


def _broken(variant: Variant, exc: Exception) -> str:
    if variant.kind != "lbkit":
        raise exc
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


def _order(variants: list[Variant], round_: int) -> list[Variant]:
    shift = round_ % len(variants)
    return variants[shift:] + variants[:shift]


def measure_cell(
    variants: list[Variant],
    mode: Mode,
    kind: str,
    addresses: list[str],
    *,
    rounds: int,
    window: float,
    warmup: float,
) -> tuple[dict[str, list[Load]], dict[str, str]]:
    """Open and warm up every variant, then measure ``rounds`` windows of each, interleaved in rotating order.

    Returns the windows by variant name and, for lbkit variants that could not be opened, why.
    """
    loads: dict[str, list[Load]] = {v.name: [] for v in variants}
    broken: dict[str, str] = {}
    c = mode.concurrency
    if not mode.aio:
        with contextlib.ExitStack() as stack:
            calls: dict[str, Callable[[int], object]] = {}
            for v in variants:
                try:
                    calls[v.name] = _sync_call(stack.enter_context(open_sync(v, addresses)), kind, v.keyed)
                except Exception as exc:
                    broken[v.name] = _broken(v, exc)
                    continue
                run_sync_load(calls[v.name], concurrency=c, duration=warmup, max_calls=5000)
            live = [v for v in variants if v.name in calls]
            for r in range(rounds):
                for v in _order(live, r):
                    loads[v.name].append(run_sync_load(calls[v.name], concurrency=c, duration=window))
        return loads, broken

    async def go() -> None:
        async with contextlib.AsyncExitStack() as stack:
            calls: dict[str, Callable[[int], Awaitable[object]]] = {}
            for v in variants:
                try:
                    stub = await stack.enter_async_context(open_aio(v, addresses))
                except Exception as exc:
                    broken[v.name] = _broken(v, exc)
                    continue
                calls[v.name] = _aio_call(stub, kind, v.keyed)
                await run_async_load(calls[v.name], concurrency=c, duration=warmup, max_calls=5000)
            live = [v for v in variants if v.name in calls]
            for r in range(rounds):
                for v in _order(live, r):
                    loads[v.name].append(await run_async_load(calls[v.name], concurrency=c, duration=window))

    asyncio.run(go())
    return loads, broken


def plan(quick: bool, with_lbkit: bool) -> list[tuple[Mode, str, list[Variant]]]:
    """The cells: for each mode and call kind, the variants measured side by side."""
    selectors = SELECTORS if with_lbkit else ()
    cells: list[tuple[Mode, str, list[Variant]]] = []
    for kind in ("unary", "stream"):
        for mode in MODES:
            if kind == "unary":
                variants = [PLAIN, NATIVE, CYCLE, *(lbkit_variant(s) for s in selectors)]
            else:
                chosen = ("round_robin", "least_connections") if quick else selectors
                variants = [NATIVE, CYCLE, *(lbkit_variant(s) for s in selectors if s in chosen)]
                if quick and mode.concurrency == 1:
                    continue  # the quick run streams at the high concurrency only
            if any(v.keyed for v in variants):
                variants.insert(variants.index(NATIVE) + 1, NATIVE_KEYED)
            cells.append((mode, kind, variants))
    return cells


def cpu_goal(reference: float | None) -> float:
    """lbkit's CPU limit in a cell, as a ratio to native round robin, given the reference's ratio there."""
    if reference is None or not reference > CPU_GOAL:
        return CPU_GOAL
    return REFERENCE_GOAL * reference


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def run(quick: bool = False) -> Result:
    """Measure every cell; return tables of QPS, p50, p99 and client CPU per call, with ratios to native."""
    rounds, window, warmup = (3, 0.1, 0.05) if quick else (20, 0.25, 0.5)
    missing = lbkit_available()
    cells = plan(quick, not missing)
    progress = Progress("e2e", len(cells))
    raw: dict[str, dict[str, list[dict[str, float]]]] = {}
    tables: list[dict[str, Any]] = []
    verdicts: list[bool] = []
    failures: list[str] = []
    with ServerProcess(count=4) as servers:
        for mode, kind, variants in cells:
            cell = f"{kind} {mode.name}"
            loads, broken = measure_cell(
                variants, mode, kind, servers.addresses, rounds=rounds, window=window, warmup=warmup
            )
            progress.step(cell)
            failures += [f"{cell}, {name} failed: {why}" for name, why in broken.items()]
            raw[cell] = {name: [x.summary() for x in xs] for name, xs in loads.items()}
            rows: list[list[Any]] = []
            reference: float | None = None
            for variant in variants:
                xs = loads[variant.name]
                if variant.name in broken:
                    verdicts.append(False)
                    rows.append([variant.name, "error", "", "", "", "", "", "", "FAIL (see notes)"])
                    continue
                qps, cpu = median([x.qps for x in xs]), median([x.cpu_us for x in xs])
                pooled = [t for x in xs for t in x.latencies]
                p50, p99 = percentile(pooled, 50) * 1e3, percentile(pooled, 99) * 1e3
                errors = sum(x.errors for x in xs)
                row: list[Any] = [
                    variant.name,
                    f"{qps:,.0f}",
                    f"{p50:.3f}",
                    f"{p99:.3f}",
                    f"{cpu:.0f}",
                    errors,
                ]
                if variant.kind == "cycle":
                    base = loads[variant.baseline]
                    cpu_r = median([_ratio(x.cpu_us, b.cpu_us) for x, b in zip(xs, base, strict=True)])
                    qps_r = median([_ratio(x.qps, b.qps) for x, b in zip(xs, base, strict=True)])
                    reference = cpu_r
                    row += [f"{cpu_r:.2f}x", f"{qps_r:.2f}x", "reference"]
                elif variant.kind == "lbkit" and len(loads.get(variant.baseline, ())) != len(xs):
                    verdicts.append(False)
                    row += ["no baseline", "", "FAIL"]
                elif variant.kind == "lbkit":
                    base = loads[variant.baseline]
                    cpu_r = median([_ratio(x.cpu_us, b.cpu_us) for x, b in zip(xs, base, strict=True)])
                    qps_r = median([_ratio(x.qps, b.qps) for x, b in zip(xs, base, strict=True)])
                    limit = cpu_goal(reference)
                    ok = cpu_r <= limit and qps_r >= QPS_GOAL and errors == 0
                    verdicts.append(ok)
                    verdict = "pass" if ok else "FAIL"
                    if limit != CPU_GOAL:
                        verdict += f" (CPU <= {limit:.2f}x: {REFERENCE_GOAL}x the reference)"
                    row += [f"{cpu_r:.2f}x", f"{qps_r:.2f}x", verdict]
                else:
                    row += ["baseline" if variant.kind == "native" else "", "", ""]
                rows.append(row)
            tables.append(
                {
                    "caption": f"{kind.capitalize()} calls, {mode.name}",
                    "columns": [*_COLUMNS, f"goal (CPU <= {CPU_GOAL}x, QPS >= {QPS_GOAL}x)"],
                    "rows": rows,
                }
            )
    progress.close()
    notes = [
        "4 model servers on 127.0.0.1 in one child process; the client's CPU (time.process_time over the"
        " measured window) is the client process's alone.",
        f"Each variant of a cell is opened and warmed up ({warmup:g} s), then measured in {rounds} windows of"
        f" {window:g} s, interleaved with the other variants' in rotating order. QPS and CPU are medians over"
        " windows, p50/p99 over all calls, ratios medians of per-round ratios against the native baseline.",
        "Consistent-hash calls carry an lb-key header; their baseline is native round robin sending the same"
        " header.",
        "Stream calls are StreamPredict with 8 tokens; latency is the whole stream's.",
        "Every server shares one process (one GIL), so at high concurrency QPS is bounded by the servers;"
        " client CPU per call is the figure that isolates the client.",
        f"Goal: CPU per call at most {CPU_GOAL}x native round robin's, or, in cells where the reference"
        f" ('4 plain channels in turn') already costs more than that, at most {REFERENCE_GOAL}x the"
        f" reference's; QPS at least {QPS_GOAL}x; no errors.",
        "'4 plain channels in turn' is lbkit's structure without lbkit: one grpc channel per server, taken in"
        " turn. Its ratio to native round robin is what one channel per endpoint costs in grpcio itself: each"
        " sync channel runs its own event thread for streams, where native round robin has one for all"
        " servers. lbkit's own cost is its ratio less this one.",
    ]
    notes[:0] = failures
    if missing:
        notes.insert(0, f"lbkit rows skipped: {missing}.")
    elif verdicts:
        notes.insert(0, f"{sum(verdicts)} of {len(verdicts)} lbkit cells meet the goal.")
    return {
        "title": "End-to-end: lbkit against grpcio's native round_robin",
        "tables": tables,
        "notes": notes,
        "data": {
            "rounds": rounds,
            "window_s": window,
            "cells": raw,
            "goals": {"cpu": CPU_GOAL, "qps": QPS_GOAL, "over_reference": REFERENCE_GOAL},
        },
    }


def main() -> None:
    """``python -m benchmarks.e2e [--quick]``."""
    module_main("e2e", run)


if __name__ == "__main__":
    main()

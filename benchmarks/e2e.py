"""End-to-end calls through ``lb.channel()`` against grpcio's native ``round_robin`` and a plain channel.

Four local model servers run in a child process (:mod:`lbkit.testing.server_process`), so the client
process's CPU time is the client's alone. Each cell is a client mode (sync threads or ``grpc.aio``) at a
concurrency, a call kind (unary ``Predict`` or an 8-token ``StreamPredict``) and a variant (plain channel,
native round robin, or lbkit with one selector). Variants of a cell run interleaved, rotating their order
each repetition, and each figure is the median over repetitions; the ratios against native round robin
are medians of per-repetition ratios, so slow drift of the machine cancels out.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from benchmarks._common import Load, Progress, Result, median, module_main, run_async_load, run_sync_load
from lbkit.discovery.static import StaticDiscovery
from lbkit.testing.proto import model_service_pb2 as pb2
from lbkit.testing.proto import model_service_pb2_grpc as pb2_grpc
from lbkit.testing.server_process import ServerProcess

__all__ = ["SELECTORS", "main", "run"]

SELECTORS = ("round_robin", "least_connections", "weighted", "consistent_hash", "peak_ewma")
"""The lbkit selectors measured, by name."""

CPU_GOAL = 1.10
"""lbkit's client CPU per call may be at most this many times native round robin's."""
QPS_GOAL = 0.95
"""lbkit's QPS must be at least this share of native round robin's."""

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
    """``plain``, ``native`` or ``lbkit``."""
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
            lb.wait_ready(timeout=10.0)
            yield pb2_grpc.ModelServiceStub(lb.channel())  # type: ignore[no-untyped-call]
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
            await lb.wait_ready(timeout=10.0)
            yield pb2_grpc.ModelServiceStub(lb.channel())  # type: ignore[no-untyped-call]
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


def measure(
    variant: Variant, mode: Mode, kind: str, addresses: list[str], *, duration: float, warmup: float
) -> Load:
    """Open ``variant``, warm it up, and measure one window of ``duration`` seconds."""
    if not mode.aio:
        with open_sync(variant, addresses) as stub:
            call = _sync_call(stub, kind, variant.keyed)
            run_sync_load(call, concurrency=mode.concurrency, duration=warmup, max_calls=5000)
            return run_sync_load(call, concurrency=mode.concurrency, duration=duration)

    async def go() -> Load:
        async with open_aio(variant, addresses) as stub:
            call = _aio_call(stub, kind, variant.keyed)
            await run_async_load(call, concurrency=mode.concurrency, duration=warmup, max_calls=5000)
            return await run_async_load(call, concurrency=mode.concurrency, duration=duration)

    return asyncio.run(go())


def _plan(quick: bool, with_lbkit: bool) -> list[tuple[Mode, str, list[Variant]]]:
    """The cells: for each mode and call kind, the variants measured side by side."""
    selectors = SELECTORS if with_lbkit else ()
    cells: list[tuple[Mode, str, list[Variant]]] = []
    for kind in ("unary", "stream"):
        for mode in MODES:
            if kind == "unary":
                variants = [PLAIN, NATIVE, *(lbkit_variant(s) for s in selectors)]
                if "consistent_hash" in selectors:
                    variants.insert(2, NATIVE_KEYED)
            else:
                chosen = ("round_robin", "least_connections") if quick else selectors
                variants = [NATIVE, *(lbkit_variant(s) for s in selectors if s in chosen)]
                if quick and mode.concurrency == 1:
                    continue  # the quick run streams at the high concurrency only
            cells.append((mode, kind, variants))
    return cells


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def run(quick: bool = False) -> Result:
    """Measure every cell; return tables of QPS, p50, p99 and client CPU per call, with ratios to native."""
    reps, duration, warmup = (2, 0.4, 0.15) if quick else (5, 1.0, 0.5)
    missing = lbkit_available()
    cells = _plan(quick, not missing)
    progress = Progress("e2e", sum(len(v) for _, _, v in cells) * reps)
    raw: dict[str, dict[str, list[dict[str, float]]]] = {}
    tables: list[dict[str, Any]] = []
    verdicts: list[bool] = []
    broken: dict[str, str] = {}
    with ServerProcess(count=4) as servers:
        addresses = servers.addresses
        for mode, kind, variants in cells:
            cell = f"{kind} {mode.name}"
            loads: dict[str, list[Load]] = {v.name: [] for v in variants}
            for rep in range(reps):
                shift = rep % len(variants)
                for variant in variants[shift:] + variants[:shift]:
                    progress.step(f"{cell} {variant.name}")
                    if variant.name in broken:
                        continue
                    try:
                        load = measure(variant, mode, kind, addresses, duration=duration, warmup=warmup)
                    except Exception as exc:
                        if variant.kind != "lbkit":
                            raise
                        broken[variant.name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                        continue
                    loads[variant.name].append(load)
            raw[cell] = {name: [x.summary() for x in xs] for name, xs in loads.items()}
            rows: list[list[Any]] = []
            for variant in variants:
                xs = loads[variant.name]
                if variant.name in broken:
                    verdicts.append(False)
                    rows.append([variant.name, "error", "", "", "", "", "", "", "FAIL (see notes)"])
                    continue
                qps, cpu = median([x.qps for x in xs]), median([x.cpu_us for x in xs])
                p50, p99 = median([x.p(50) for x in xs]), median([x.p(99) for x in xs])
                errors = sum(x.errors for x in xs)
                row: list[Any] = [
                    variant.name,
                    f"{qps:,.0f}",
                    f"{p50:.3f}",
                    f"{p99:.3f}",
                    f"{cpu:.0f}",
                    errors,
                ]
                if variant.kind == "lbkit":
                    base = loads[variant.baseline]
                    cpu_r = median([_ratio(x.cpu_us, b.cpu_us) for x, b in zip(xs, base, strict=True)])
                    qps_r = median([_ratio(x.qps, b.qps) for x, b in zip(xs, base, strict=True)])
                    ok = cpu_r <= CPU_GOAL and qps_r >= QPS_GOAL and errors == 0
                    verdicts.append(ok)
                    row += [f"{cpu_r:.2f}x", f"{qps_r:.2f}x", "pass" if ok else "FAIL"]
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
        f"{reps} repetitions of {duration:g} s per cell after {warmup:g} s of warm-up, variants interleaved"
        " in rotating order; figures are medians over repetitions, ratios medians of per-repetition ratios.",
        "Consistent-hash calls carry an lb-key header; their baseline is native round robin sending the same"
        " header.",
        "Stream calls are StreamPredict with 8 tokens; latency is the whole stream's.",
        "Every server shares one process (one GIL), so at high concurrency QPS is bounded by the servers;"
        " client CPU per call is the figure that isolates the client.",
    ]
    notes[:0] = [f"{name} failed: {why}" for name, why in broken.items()]
    if missing:
        notes.insert(0, f"lbkit rows skipped: {missing}.")
    elif verdicts:
        notes.insert(0, f"{sum(verdicts)} of {len(verdicts)} lbkit cells meet the goal.")
    return {
        "title": "End-to-end: lbkit against grpcio's native round_robin",
        "tables": tables,
        "notes": notes,
        "data": {
            "reps": reps,
            "duration_s": duration,
            "cells": raw,
            "goals": {"cpu": CPU_GOAL, "qps": QPS_GOAL},
        },
    }


def main() -> None:
    """``python -m benchmarks.e2e [--quick]``."""
    module_main("e2e", run)


if __name__ == "__main__":
    main()

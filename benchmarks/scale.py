"""Scale: one client over N endpoints against grpc's native ``round_robin`` over the same addresses.

N endpoints are N loopback ports of a few server processes (:mod:`lbkit.testing.port_farm`, one
``grpc.aio`` server each, so ten thousand idle connections and health streams cost them no threads).
Each cell runs in a fresh client process, alone, so its threads, memory and CPU are its own: lbkit's
``Balancer`` (sync) or ``aio.Balancer`` over ``StaticDiscovery`` with round robin, or one native channel
(``ipv4:`` target over all N addresses, ``round_robin`` by service config, ``grpc.default_authority``
set), with health checks off or on (native: ``healthCheckConfig``). A cell measures the time until it
is ready (lbkit: all N endpoints pickable; native: the channel READY, grpc says no more), its OS
threads, its RSS growth per endpoint, its idle CPU, then a window of unary calls (sync: one thread;
asyncio: a few in flight): client CPU per call, p99 latency and failed calls. Native and lbkit cells
alternate, over rounds; the figures are medians over rounds.

The stall scenario: an ``aio.Balancer`` watches a Consul service (lbkit's test Consul server, in this
process) that grows from ``START`` to ``TARGET`` instances, registered through py-consul as fast as the
server takes them, while a light call loop runs; a 1 ms ticker on the balancer's loop records its
longest gap. A bare 1 ms ticker in its own process over the same window is the control: the machine's
own stalls. Then, alone, the floor: a loop holding bare ``grpc.aio`` channels to the same addresses,
grown the same way over the same time, with the same ticker: what the channels alone cost the loop
(CPython's collector walks their objects too).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks._common import Progress, Result, fmt, module_main, percentile, run_async_load, run_sync_load

__all__ = ["main", "run"]

THREADS_BASE, THREADS_PER_CORE = 16, 2
"""Goal: a client's OS threads at the largest N are at most BASE + PER_CORE x cores, health on or off."""
RSS_GOAL = 1.5
"""Goal: lbkit's RSS growth per endpoint at most this many times native's (same API, same health)."""
CPU_GOAL = 1.15
"""Goal: lbkit's client CPU per call at most this many times native's at the largest N."""
GROWTH_GOAL = 1.10
"""Goal: lbkit's CPU per call growth from the smallest to the largest N within this factor of native's."""
STALL_GOAL_MS = 5.0
"""Goal: the longest gap of a 1 ms ticker on the balancer's loop while Consul grows the service..."""
STALL_CONTROL_FACTOR = 1.5
"""...or, on a machine that itself stalls more, at most this many times the control ticker's."""

FULL = {"ns": (10, 100, 1_000, 10_000), "health": (False, True), "rounds": 2, "window": 4.0, "idle": 2.0}
QUICK = {"ns": (20,), "health": (False,), "rounds": 1, "window": 0.3, "idle": 0.2}
WARMUP = 2_000
"""Calls before the measured window (at most twice N)."""
STALL_FULL = (1_000, 10_000)
STALL_QUICK = (20, 60)
CONCURRENCY = {"sync": 1, "aio": 4}
READY_TIMEOUT = 300.0
SERVICE = "scale-model"
_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


@dataclass(frozen=True)
class Cell:
    """One client process: who (lbkit or native), which API, over how many endpoints, health or not."""

    client: str
    api: str
    n: int
    health: bool
    addresses: str
    """A file with one address a line."""
    window: float
    idle: float
    warmup: int

    @property
    def label(self) -> str:
        return f"{self.client} {self.api}{' +health' if self.health else ''} N={self.n:,}"


# ----------------------------------------------------------------------------- the client process


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _rss_kib() -> int:
    return _status("VmRSS")


def _threads() -> int:
    return _status("Threads")


def _native_options(health: bool) -> list[tuple[str, Any]]:
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    if health:
        config["healthCheckConfig"] = {"serviceName": ""}
    # Without channelz, as lbkit's channels: each side in its best configuration.
    return [
        ("grpc.service_config", json.dumps(config)),
        ("grpc.default_authority", "localhost"),
        ("grpc.enable_channelz", 0),
    ]


def _measure_idle(seconds: float) -> float:
    """Process CPU over ``seconds`` of doing nothing, as a percentage of one core."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    time.sleep(seconds)
    return 100.0 * (time.process_time() - cpu0) / (time.perf_counter() - wall0)


def _after_ready(cell: Cell, rss0: int, ready_s: float) -> dict[str, Any]:
    time.sleep(min(1.0, cell.idle))  # connections still settling after the first READY
    idle = _measure_idle(cell.idle)
    gc.collect()
    return {
        "ready_s": ready_s,
        "threads": _threads(),
        "rss_kib_per_endpoint": (_rss_kib() - rss0) / cell.n,
        "idle_cpu_pct": idle,
    }


def _sync_cell(cell: Cell, addresses: list[str]) -> dict[str, Any]:
    import grpc

    import lbkit
    import lbkit.balancer  # what the cell uses, loaded before the baseline: RSS per endpoint, not per import
    import lbkit.health.native
    import lbkit.selectors.round_robin
    from lbkit.testing.proto import model_service_pb2 as pb2
    from lbkit.testing.proto import model_service_pb2_grpc as pb2_grpc

    request = pb2.PredictRequest(features=[1.0])
    gc.collect()
    rss0 = _rss_kib()
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if cell.client == "native":
            channel = grpc.insecure_channel(
                "ipv4:" + ",".join(addresses), options=_native_options(cell.health)
            )
            stack.callback(channel.close)
            grpc.channel_ready_future(channel).result(timeout=READY_TIMEOUT)
        else:
            check = lbkit.HealthCheck() if cell.health else None
            lb = stack.enter_context(lbkit.Balancer(addresses, selector="round_robin", health_check=check))
            lb.wait_ready(count=cell.n, timeout=READY_TIMEOUT)
            channel = lb.channel()
        figures = _after_ready(cell, rss0, time.perf_counter() - started)
        predict = pb2_grpc.ModelServiceStub(channel).Predict  # type: ignore[no-untyped-call]
        for _ in range(cell.warmup):
            predict(request, timeout=10)
        load = run_sync_load(
            lambda i: predict(request, timeout=10), concurrency=CONCURRENCY["sync"], duration=cell.window
        )
    return {**figures, **load.summary()}


async def _aio_cell(cell: Cell, addresses: list[str]) -> dict[str, Any]:
    import grpc

    import lbkit
    import lbkit.aio
    import lbkit.aio.balancer  # loaded before the baseline, as in the sync cell
    import lbkit.health.native
    import lbkit.selectors.round_robin
    from lbkit.testing.proto import model_service_pb2 as pb2
    from lbkit.testing.proto import model_service_pb2_grpc as pb2_grpc

    request = pb2.PredictRequest(features=[1.0])
    gc.collect()
    rss0 = _rss_kib()
    started = time.perf_counter()
    async with contextlib.AsyncExitStack() as stack:
        if cell.client == "native":
            channel: Any = grpc.aio.insecure_channel(
                "ipv4:" + ",".join(addresses), options=_native_options(cell.health)
            )
            stack.push_async_callback(channel.close)
            await asyncio.wait_for(channel.channel_ready(), READY_TIMEOUT)
        else:
            check = lbkit.HealthCheck() if cell.health else None
            lb = lbkit.aio.Balancer(addresses, selector="round_robin", health_check=check)
            await stack.enter_async_context(lb)
            await lb.wait_ready(count=cell.n, timeout=READY_TIMEOUT)
            channel = lb.channel()
        ready_s = time.perf_counter() - started
        await asyncio.sleep(min(1.0, cell.idle))
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.sleep(cell.idle)
        idle = 100.0 * (time.process_time() - cpu0) / (time.perf_counter() - wall0)
        gc.collect()
        figures = {
            "ready_s": ready_s,
            "threads": _threads(),
            "rss_kib_per_endpoint": (_rss_kib() - rss0) / cell.n,
            "idle_cpu_pct": idle,
        }
        predict = pb2_grpc.ModelServiceStub(channel).Predict  # type: ignore[no-untyped-call]
        for _ in range(cell.warmup):
            await predict(request, timeout=10)
        load = await run_async_load(
            lambda i: predict(request, timeout=10), concurrency=CONCURRENCY["aio"], duration=cell.window
        )
    return {**figures, **load.summary()}


def _cell_main(spec: str) -> None:
    from lbkit.testing.port_farm import raise_file_limit

    raise_file_limit()
    cell = Cell(**json.loads(spec))
    with open(cell.addresses) as f:
        addresses = f.read().split()[: cell.n]
    result = _sync_cell(cell, addresses) if cell.api == "sync" else asyncio.run(_aio_cell(cell, addresses))
    print(json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- the stall scenario


async def _ticker(gaps: list[float], stop: asyncio.Event, ends: list[float] | None = None) -> None:
    clock = time.perf_counter
    last = clock()
    while not stop.is_set():
        await asyncio.sleep(0.001)
        now = clock()
        gaps.append(now - last)
        if ends is not None:
            ends.append(now)
        last = now


def _max_gap_without_gc(gaps: list[float], ends: list[float], pauses: list[tuple[float, float]]) -> float:
    """The longest gap that no collector pause overlaps (seconds): what the loop's own work cost it."""
    longest = 0.0
    i = 0
    for gap, end in sorted(zip(gaps, ends, strict=True), key=lambda ge: ge[1]):
        start = end - gap
        while i < len(pauses) and pauses[i][1] < start:
            i += 1
        if i < len(pauses) and pauses[i][0] <= end:
            continue  # a pause lies within this gap
        longest = max(longest, gap)
    return longest


def _stdin_lines(loop: asyncio.AbstractEventLoop) -> asyncio.Queue[str]:
    lines: asyncio.Queue[str] = asyncio.Queue()

    def read() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line.strip())
        loop.call_soon_threadsafe(lines.put_nowait, "")

    threading.Thread(target=read, daemon=True).start()
    return lines


def _gap_figures(gaps: list[float]) -> dict[str, float]:
    return {
        "ticks": len(gaps),
        "max_gap_ms": max(gaps, default=0.0) * 1e3,
        "p99_gap_ms": percentile(gaps, 99) * 1e3,
        "p999_gap_ms": percentile(gaps, 99.9) * 1e3,
    }


class _GcPauses:
    """The longest pause of CPython's collector, and how many full (generation 2) collections ran."""

    def __init__(self) -> None:
        self.longest = 0.0
        self.full = 0
        self.pauses: list[tuple[float, float]] = []
        """(start, end) of each pause over 1 ms, ``perf_counter`` time."""
        self._began = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
            return
        now = time.perf_counter()
        self.longest = max(self.longest, now - self._began)
        self.full += info.get("generation") == 2
        if now - self._began > 0.001:
            self.pauses.append((self._began, now))

    def install(self) -> _GcPauses:
        gc.callbacks.append(self)
        return self

    def uninstall(self) -> None:
        gc.callbacks.remove(self)


class _LoopWatch:
    """A growth window on this loop: from GO, a 1 ms ticker and the collector's pauses; at the end, their
    figures and the tracked objects added per endpoint added."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self._gaps: list[float] = []
        self._ends: list[float] = []
        self._pauses = _GcPauses()
        self._objects0 = 0
        self._ticker: asyncio.Task[None] | None = None

    async def start(self, lines: asyncio.Queue[str]) -> float:
        """Say READY, wait for GO, start watching; the start time (``perf_counter``)."""
        gc.collect()
        self._objects0 = len(gc.get_objects())
        print("READY", flush=True)
        await lines.get()  # GO
        self._ticker = asyncio.create_task(_ticker(self._gaps, self.stop, self._ends))
        self._pauses.install()
        return time.perf_counter()

    async def end(self, grew: int) -> dict[str, Any]:
        """Stop watching (after the tasks that also wait for :attr:`stop`); the window's figures."""
        self.stop.set()
        assert self._ticker is not None
        await self._ticker
        self._pauses.uninstall()
        gc.collect()
        pauses = self._pauses
        return {
            **_gap_figures(self._gaps),
            "gc_max_ms": pauses.longest * 1e3,
            "max_gap_no_gc_ms": _max_gap_without_gc(self._gaps, self._ends, pauses.pauses) * 1e3,
            "gc_full": pauses.full,
            "objects_per_endpoint": (len(gc.get_objects()) - self._objects0) / grew if grew > 0 else 0.0,
        }


async def _control_main() -> None:
    """A bare 1 ms ticker until stdin closes; prints its gaps."""
    lines = _stdin_lines(asyncio.get_running_loop())
    gaps: list[float] = []
    stop = asyncio.Event()
    task = asyncio.create_task(_ticker(gaps, stop))
    print("READY", flush=True)
    await lines.get()
    stop.set()
    await task
    print(json.dumps(_gap_figures(gaps)), flush=True)


async def _stall_main(spec: str) -> None:
    """An aio.Balancer over a Consul service: READY at ``start`` endpoints; on GO, ticks until ``target``."""
    import lbkit
    import lbkit.aio
    from lbkit.testing.port_farm import raise_file_limit
    from lbkit.testing.proto import model_service_pb2 as pb2
    from lbkit.testing.proto import model_service_pb2_grpc as pb2_grpc

    raise_file_limit()
    opts = json.loads(spec)
    lines = _stdin_lines(asyncio.get_running_loop())
    discovery = lbkit.ConsulDiscovery(SERVICE, address=opts["consul"])
    async with lbkit.aio.Balancer(discovery, selector="round_robin") as lb:
        await lb.wait_ready(count=opts["start"], timeout=READY_TIMEOUT)
        predict = pb2_grpc.ModelServiceStub(lb.channel()).Predict  # type: ignore[no-untyped-call]
        request = pb2.PredictRequest(features=[1.0])
        watch = _LoopWatch()
        stop = watch.stop
        started = await watch.start(lines)
        calls = [0, 0]

        async def call_loop() -> None:
            while not stop.is_set():
                try:
                    await predict(request, timeout=10)
                    calls[0] += 1
                except Exception:
                    calls[1] += 1
                await asyncio.sleep(0.002)

        caller = asyncio.create_task(call_loop())
        deadline = started + READY_TIMEOUT
        while len(lb.core.picker.endpoints) < opts["target"] and time.perf_counter() < deadline:
            await asyncio.sleep(0.02)
        grown_s = time.perf_counter() - started
        stop.set()
        await caller
        result = {
            **await watch.end(len(lb.core.picker.endpoints) - opts["start"]),
            "grown_s": grown_s,
            "endpoints": len(lb.core.picker.endpoints),
            "calls": calls[0],
            "failed": calls[1],
        }
    print(json.dumps(result), flush=True)


SLICE = 100
"""The floor's loop makes this many channel reads or channels in one go, then lets other work run."""


async def _floor_main(spec: str) -> None:
    """grpc.aio channels alone (no balancer): ``start`` connected; on GO, grown to ``target`` over
    ``seconds`` while a 1 ms ticker runs, until all are READY. What holding the channels costs the loop."""
    import grpc

    from lbkit.testing.port_farm import raise_file_limit

    raise_file_limit()
    opts = json.loads(spec)
    with open(opts["addresses"]) as f:
        addresses = f.read().split()[: opts["target"]]
    lines = _stdin_lines(asyncio.get_running_loop())
    channels = [grpc.aio.insecure_channel(a) for a in addresses[: opts["start"]]]

    async def all_ready(deadline: float) -> bool:
        pending = list(channels)
        while pending and time.perf_counter() < deadline:
            left = []
            for i, channel in enumerate(pending, 1):
                if channel.get_state(True) is not grpc.ChannelConnectivity.READY:
                    left.append(channel)
                if i % SLICE == 0:
                    await asyncio.sleep(0)  # the loop's best: reads in slices, as lbkit's poller
            pending = left
            if pending:
                await asyncio.sleep(0.05)
        return not pending

    await all_ready(time.perf_counter() + READY_TIMEOUT)
    watch = _LoopWatch()
    started = await watch.start(lines)
    rest = addresses[opts["start"] :]
    steps = max(1, int(opts["seconds"] / 0.05))
    per_step = max(1, -(-len(rest) // steps))
    for i in range(0, len(rest), per_step):
        for j, address in enumerate(rest[i : i + per_step], 1):
            channel = grpc.aio.insecure_channel(address)
            channel.get_state(True)
            channels.append(channel)
            if j % SLICE == 0:
                await asyncio.sleep(0)
        await asyncio.sleep(0.05)
    ready = await all_ready(started + READY_TIMEOUT)
    grown_s = time.perf_counter() - started
    result = {
        **await watch.end(len(rest)),
        "grown_s": grown_s,
        "endpoints": len(channels) if ready else -1,
    }
    for channel in channels:
        await channel.close()
    print(json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- the parent


def _child(args: Sequence[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.scale", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=_ENV,
    )


def _line(proc: subprocess.Popen[str], timeout: float) -> str:
    out = proc.stdout
    assert out is not None
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(out.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not box or not box[0]:
        proc.kill()
        raise RuntimeError(f"benchmark child {proc.args!r} gave no answer (exit {proc.poll()})")
    return box[0].strip()


def _run_cell(cell: Cell) -> dict[str, Any]:
    proc = _child(["cell", json.dumps(asdict(cell))])
    try:
        return dict(json.loads(_line(proc, READY_TIMEOUT + cell.window + 120.0)))
    finally:
        proc.kill()
        proc.wait()


def _medians(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    keys = rounds[0].keys()
    return {k: statistics.median(r[k] for r in rounds) for k in keys if k != "errors"} | {
        "errors": sum(r["errors"] for r in rounds)
    }


def _cells(plan: dict[str, Any], progress: Progress, addresses_file: str, n: int) -> dict[tuple, Any]:
    """Every (client, api, health) cell at ``n`` endpoints, rounds interleaved; medians over rounds."""
    results: dict[tuple[str, str, bool], list[dict[str, Any]]] = {}
    combos = [(api, health) for api in ("sync", "aio") for health in plan["health"]]
    for r in range(plan["rounds"]):
        order = ("native", "lbkit") if r % 2 == 0 else ("lbkit", "native")
        for api, health in combos:
            for client in order:
                warmup = min(WARMUP, 2 * n)
                cell = Cell(client, api, n, health, addresses_file, plan["window"], plan["idle"], warmup)
                results.setdefault((client, api, health), []).append(_run_cell(cell))
                progress.step(cell.label)
    return {k: _medians(v) for k, v in results.items()}


@contextlib.contextmanager
def _addresses_file(addresses: list[str]) -> Iterator[str]:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(addresses))
    try:
        yield f.name
    finally:
        os.unlink(f.name)


def _stall(start: int, target: int, progress: Progress) -> dict[str, Any]:
    import consul

    from lbkit.testing.consul import ConsulServer
    from lbkit.testing.port_farm import PortFarm

    with PortFarm(target) as farm, ConsulServer() as server:
        host, port = server.address.rsplit(":", 1)
        client = consul.Consul(host=host, port=int(port))

        def register(addresses: list[str]) -> None:
            for address in addresses:
                h, p = address.rsplit(":", 1)
                client.agent.service.register(SERVICE, service_id=f"{SERVICE}-{p}", address=h, port=int(p))

        register(farm.addresses[:start])
        stall = _child(["stall", json.dumps({"consul": server.address, "start": start, "target": target})])
        control = _child(["control"])
        try:
            if _line(stall, READY_TIMEOUT) != "READY" or _line(control, 60.0) != "READY":
                raise RuntimeError("stall children did not start")
            progress.step(f"stall: {start:,} ready")
            assert stall.stdin is not None and control.stdin is not None
            stall.stdin.write("GO\n")
            stall.stdin.flush()
            began = time.perf_counter()
            register(farm.addresses[start:])
            registered_s = time.perf_counter() - began
            lbkit = json.loads(_line(stall, READY_TIMEOUT))
            control.stdin.close()
            bare = json.loads(_line(control, 60.0))
        finally:
            for proc in (stall, control):
                proc.kill()
                proc.wait()
        progress.step(f"stall: grew to {target:,}")
        # After, alone: the same growth of bare grpc.aio channels, over the time lbkit's took.
        with _addresses_file(farm.addresses) as path:
            spec = {"addresses": path, "start": start, "target": target, "seconds": lbkit["grown_s"]}
            floor = _child(["floor", json.dumps(spec)])
            try:
                if _line(floor, READY_TIMEOUT) != "READY":
                    raise RuntimeError("the floor child did not start")
                assert floor.stdin is not None
                floor.stdin.write("GO\n")
                floor.stdin.flush()
                channels_only = json.loads(_line(floor, READY_TIMEOUT))
            finally:
                floor.kill()
                floor.wait()
    progress.step("stall: grpc.aio channels alone")
    return {
        "lbkit": lbkit,
        "control": bare,
        "floor": channels_only,
        "registered_s": registered_s,
        "start": start,
        "target": target,
    }


def _picker_memory(n: int) -> dict[str, dict[str, float]]:
    """Bytes per endpoint and build time of each selector's picker over ``n`` endpoints (tracemalloc)."""
    import tracemalloc

    from lbkit.endpoint import Endpoint
    from lbkit.selectors import SELECTORS
    from lbkit.stats import Stats

    endpoints = [Endpoint(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}:50051") for i in range(n)]
    out: dict[str, dict[str, float]] = {}
    for name, selector in SELECTORS.items():
        stats = Stats()
        selector.build(endpoints, stats)  # stats entries exist before, as in a balancer
        gc.collect()
        started = time.perf_counter()
        selector.build(endpoints, stats)
        seconds = time.perf_counter() - started
        tracemalloc.start()
        picker = selector.build(endpoints, stats)
        size, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out[name] = {"bytes_per_endpoint": size / n, "build_ms": seconds * 1e3}
        del picker
    return out


def _judge(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def run(quick: bool = False) -> Result:
    """Run every cell and the stall scenario; see the module doc."""
    from lbkit.testing.port_farm import PortFarm, raise_file_limit

    raise_file_limit()
    plan = QUICK if quick else FULL
    ns: tuple[int, ...] = plan["ns"]
    stall_start, stall_target = STALL_QUICK if quick else STALL_FULL
    progress = Progress("scale", len(ns) * 4 * len(plan["health"]) * plan["rounds"] + 3)
    by_n: dict[int, dict[tuple, Any]] = {}
    for n in ns:
        with PortFarm(n) as farm, _addresses_file(farm.addresses) as path:
            by_n[n] = _cells(plan, progress, path, n)
    stall = _stall(stall_start, stall_target, progress)
    pickers = _picker_memory(max(ns) if not quick else 1_000)
    progress.close()
    return _report(by_n, plan["health"], stall, pickers, quick)


def _report(
    by_n: dict[int, dict[tuple, Any]],
    healths: Sequence[bool],
    stall: dict[str, Any],
    pickers: dict[str, dict[str, float]],
    quick: bool,
) -> Result:
    cores = os.cpu_count() or 1
    small, large = min(by_n), max(by_n)
    columns = [
        "client",
        "ready s",
        "OS threads",
        "RSS KiB/endpoint",
        "idle CPU %",
        "CPU us/call",
        "CPU vs native",
        "p99 ms",
        "failed calls",
    ]
    tables: list[dict[str, Any]] = []
    data: dict[str, Any] = {"cells": {}, "stall": stall, "pickers": pickers}
    for n, cells in by_n.items():
        rows = []
        for api in ("sync", "aio"):
            for health in healths:
                native = cells[("native", api, health)]
                for client in ("native", "lbkit"):
                    c = cells[(client, api, health)]
                    name = f"{client} {api}{' +health' if health else ''}"
                    ratio = (
                        c["cpu_us_per_call"] / native["cpu_us_per_call"] if native["cpu_us_per_call"] else 0.0
                    )
                    rows.append(
                        [
                            name,
                            fmt(c["ready_s"]),
                            int(c["threads"]),
                            fmt(c["rss_kib_per_endpoint"], 1),
                            fmt(c["idle_cpu_pct"], 1),
                            fmt(c["cpu_us_per_call"], 0),
                            fmt(ratio),
                            fmt(c["p99_ms"]),
                            int(c["errors"]),
                        ]
                    )
                    data["cells"][f"{n}/{name}"] = c
        tables.append(
            {
                "caption": f"N = {n:,} endpoints (medians of rounds; native's ready s is its first READY)",
                "columns": columns,
                "rows": rows,
            }
        )
    goals: dict[str, dict[str, Any]] = {}

    def goal(name: str, value: float, limit: str, ok: bool) -> None:
        goals[name] = {"value": value, "limit": limit, "pass": bool(ok)}

    thread_limit = THREADS_BASE + THREADS_PER_CORE * cores
    for api in ("sync", "aio"):
        for health in healths:
            label = f"{api}{' +health' if health else ''}"
            lb, nat = by_n[large][("lbkit", api, health)], by_n[large][("native", api, health)]
            lb0, nat0 = by_n[small][("lbkit", api, health)], by_n[small][("native", api, health)]
            goal(f"OS threads, {label}", lb["threads"], f"<= {thread_limit}", lb["threads"] <= thread_limit)
            rss = lb["rss_kib_per_endpoint"] / nat["rss_kib_per_endpoint"]
            goal(f"RSS per endpoint vs native, {label}", rss, f"<= {RSS_GOAL}", rss <= RSS_GOAL)
            cpu = lb["cpu_us_per_call"] / nat["cpu_us_per_call"]
            goal(f"CPU per call vs native, {label}", cpu, f"<= {CPU_GOAL}", cpu <= CPU_GOAL)
            growth = (lb["cpu_us_per_call"] / lb0["cpu_us_per_call"]) / (
                nat["cpu_us_per_call"] / nat0["cpu_us_per_call"]
            )
            if small != large:  # (a quick run measures one N: no growth to judge)
                name = f"CPU growth N={small:,}->{large:,} vs native's, {label}"
                goal(name, growth, f"<= {GROWTH_GOAL}", growth <= GROWTH_GOAL)
            goal(f"failed calls, {label}", lb["errors"], "0", lb["errors"] == 0)
    gap, control_gap = stall["lbkit"]["max_gap_ms"], stall["control"]["max_gap_ms"]
    goal(
        f"loop stall, Consul {stall['start']:,}->{stall['target']:,} instances (ms)",
        gap,
        f"<= {STALL_GOAL_MS:g} or <= {STALL_CONTROL_FACTOR}x control ({fmt(control_gap)})",
        gap <= STALL_GOAL_MS or gap <= STALL_CONTROL_FACTOR * control_gap,
    )
    goal("failed calls while Consul grows", stall["lbkit"]["failed"], "0", stall["lbkit"]["failed"] == 0)
    data["goals"] = goals
    rows = [
        [
            name,
            fmt(g["value"]) if isinstance(g["value"], float) else g["value"],
            g["limit"],
            _judge(g["pass"]),
        ]
        for name, g in goals.items()
    ]
    tables.insert(
        0,
        {
            "caption": f"Goals at N = {large:,}" + (" (quick run: the largest N here)" if quick else ""),
            "columns": ["goal", "measured", "limit", "result"],
            "rows": rows,
        },
    )
    s, f = stall["lbkit"], stall["floor"]

    def window_row(name: str, w: dict[str, Any], calls: Any = "-", failed: Any = "-") -> list[Any]:
        return [
            name,
            fmt(w["max_gap_ms"]),
            fmt(w["p999_gap_ms"]),
            fmt(w["p99_gap_ms"]),
            w["ticks"],
            fmt(w["grown_s"]),
            calls,
            failed,
            fmt(w["gc_max_ms"]),
            w["gc_full"],
            fmt(w["objects_per_endpoint"], 1),
            fmt(w["max_gap_no_gc_ms"]),
        ]

    tables.append(
        {
            "caption": f"asyncio loop while Consul grows a service from {stall['start']:,} to "
            f"{stall['target']:,} instances (1 ms ticker gaps, ms)",
            "columns": [
                "ticker",
                "max gap",
                "p99.9 gap",
                "p99 gap",
                "ticks",
                "grown in s",
                "calls",
                "failed",
                "longest GC pause",
                "full GCs",
                "tracked objects per endpoint",
                "max gap without a GC pause",
            ],
            "rows": [
                window_row("lbkit aio.Balancer's loop", s, s["calls"], s["failed"]),
                window_row("grpc.aio channels alone, grown the same (after, own process)", f),
                [
                    "control: bare loop, own process",
                    fmt(stall["control"]["max_gap_ms"]),
                    fmt(stall["control"]["p999_gap_ms"]),
                    fmt(stall["control"]["p99_gap_ms"]),
                    stall["control"]["ticks"],
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                ],
            ],
        }
    )
    picker_n = max(by_n) if not quick else 1_000
    tables.append(
        {
            "caption": f"A picker over {picker_n:,} endpoints: memory it holds (tracemalloc) and build time",
            "columns": ["selector", "bytes per endpoint", "build ms"],
            "rows": [[n, fmt(p["bytes_per_endpoint"], 0), fmt(p["build_ms"])] for n, p in pickers.items()],
        }
    )
    notes = [
        f"Sync clients call from {CONCURRENCY['sync']} thread, asyncio clients keep "
        f"{CONCURRENCY['aio']} calls in flight; CPU is the client process's (all threads) over the window.",
        "RSS per endpoint: the client's RSS growth from before the first channel to after readiness, over N.",
        "Idle CPU: the client doing nothing but keeping its pool (lbkit's sync pool reads channel "
        "states on a schedule, see docs/faq.md).",
        "The stall scenario's Consul server runs in the benchmark's own process; the discovery answer "
        "is decoded wherever lbkit.discovery decodes it.",
        "Longest GC pause: CPython's cyclic collector, which stops every thread; a full collection walks "
        "every tracked object of the process; 'tracked objects per endpoint' is the growth of that count "
        "over the endpoints added, most of them grpc.aio's channel objects. The last column is the longest "
        "ticker gap with no collector pause in it: the balancer's own work on the loop.",
        "The row of grpc.aio channels alone is the floor under any balancer: a loop that only holds the "
        "same channels, grown the same way, pays the collector's walk over them too.",
    ]
    return {
        "title": "Scale: 10 to 10,000 endpoints in one client",
        "tables": tables,
        "notes": notes,
        "data": data,
    }


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m benchmarks.scale [--quick]``; the children take ``cell``, ``stall``, ``control`` and
    ``floor``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "cell":
        _cell_main(args[1])
    elif args and args[0] == "stall":
        asyncio.run(_stall_main(args[1]))
    elif args and args[0] == "control":
        asyncio.run(_control_main())
    elif args and args[0] == "floor":
        asyncio.run(_floor_main(args[1]))
    else:
        module_main("scale", run, args)


if __name__ == "__main__":
    main()

"""Consul propagation: how fast a change in Consul reaches the watcher and the picker, what an update
costs, how calls fail over between datacenters, and whether a big service stalls an asyncio event loop.

Against lbkit's test Consul server on 127.0.0.1:

- **Propagation**: a sync ``ConsulDiscovery`` watcher in a thread; latency from just before the change is
  sent to the agent (a deregistration, or a TTL check failed) to the watcher's publish of a set without
  that endpoint (or with it critical). "Isolated" changes come at least ``min_interval`` plus a random
  0-30 ms after the previous publish; "back-to-back" ones right after it, so the rate limit shows.
- **Maintenance on to picker**: a sync ``Balancer`` over real model servers; from just before
  ``PUT /v1/agent/service/maintenance/<id>?enable=true`` to the balancer's REMOVED event (cause
  maintenance), emitted once the picker without the endpoint is published.
- **Datacenter failover**: two test servers joined over the WAN (dc1, dc2), a model server in each, a
  ``Balancer`` with ``failover=["dc2"]`` under a steady call load; from just before dc1's last instance
  turns critical to the first call answered by dc2's server, then back; every call's outcome is counted.
- **CPU per update** of a service with 1,000 instances: the watcher core alone, and a live watcher thread.
- **Event-loop stall**: the asyncio watcher (``arun``) while the service grows from 1,000 to 10,000
  instances (a test server and a registering client in processes of their own); the longest gap of a
  1 ms ticker on the loop, against a bare 1 ms ticker in its own process in the same window (the
  control: what the machine itself stalls) and against decoding on the loop (the whole answer with
  ``json.loads`` per answer, as before).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from benchmarks._common import Progress, Result, fmt, median, module_main, percentile
from lbkit.balancer import Balancer
from lbkit.discovery.consul import ConsulDiscovery
from lbkit.discovery.consul_connection import ConsulConnection, resolve_connection
from lbkit.discovery.consul_core import ConsulOptions, ConsulWatchCore
from lbkit.discovery.consul_parse import (
    EntryRules,
    HealthDecoder,
    SkipEntry,
    aggregated_status,
    entry_endpoint,
)
from lbkit.endpoint import Endpoint, EndpointHealth, EndpointSet
from lbkit.events import Cause, Event, EventKind

__all__ = ["main", "run"]

MEDIAN_GOAL_MS = 50.0
P99_GOAL_MS = 200.0
BACK_TO_BACK_MEDIAN_GOAL_MS = 100.0
"""Back-to-back changes meet the rate limit: up to ``min_interval`` (50 ms) more."""
CPU_GOAL_MS = 20.0
MAINTENANCE_GOAL_MS = 50.0
FAILOVER_GOAL_S = 1.0
STALL_GOAL_MS = 5.0
STALL_CONTROL_RATIO = 1.5
SERVICE = "bench-model"
BIG = 1000
_SETTLE = 10.0


class Recorder:
    """Collects published sets with the wall time and the watcher thread's CPU time of each."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.updates: list[tuple[float, float, EndpointSet]] = []

    def __call__(self, snapshot: EndpointSet) -> None:
        now, cpu = time.perf_counter(), time.thread_time()
        with self.cond:
            self.updates.append((now, cpu, snapshot))
            self.cond.notify_all()

    def mark(self) -> int:
        """A position in the list of publishes, for :meth:`wait_for`."""
        with self.cond:
            return len(self.updates)

    def wait_for(
        self, predicate: Callable[[EndpointSet], bool], since: int = 0, timeout: float = _SETTLE
    ) -> float:
        """Wait for a publish at or after position ``since`` matching ``predicate``; return its wall time."""
        deadline = time.perf_counter() + timeout
        with self.cond:
            start = since
            while True:
                for when, _, snap in self.updates[start:]:
                    if predicate(snap):
                        return when
                left = deadline - time.perf_counter()
                if left <= 0:
                    raise TimeoutError("the watcher did not publish the expected set in time")
                self.cond.wait(left)


def _ttl_check(sid: str) -> dict[str, str]:
    return {"CheckID": f"service:{sid}", "Name": "ttl", "TTL": "600s", "Status": "passing"}


def _register(client: Any, sid: str, port: int, *, ttl: bool, service: str = SERVICE) -> None:
    check = _ttl_check(sid) if ttl else None
    client.agent.service.register(service, service_id=sid, address="127.0.0.1", port=port, check=check)


def _watch(server: Any, min_interval: float) -> tuple[Recorder, threading.Event, threading.Thread]:
    discovery = ConsulDiscovery(SERVICE, address=server.address, wait=30.0, min_interval=min_interval, env={})
    recorder = Recorder()
    stop = threading.Event()
    thread = threading.Thread(target=discovery.run, args=(recorder, stop), daemon=True)
    thread.start()
    return recorder, stop, thread


def _gone_or_critical(address: str) -> Callable[[EndpointSet], bool]:
    def check(s: EndpointSet) -> bool:
        e = s.by_address.get(address)
        return e is None or e.health is EndpointHealth.CRITICAL

    return check


def _back(address: str) -> Callable[[EndpointSet], bool]:
    def check(s: EndpointSet) -> bool:
        e = s.by_address.get(address)
        return e is not None and e.health is EndpointHealth.PASSING

    return check


def _propagation(server: Any, changes: int, *, kind: str, isolated: bool, progress: Progress) -> list[float]:
    """Milliseconds from each change to the publish that reflects it."""
    client = server.client()
    sids = [f"{kind}-{i}" for i in range(8)]
    for i, sid in enumerate(sids):
        _register(client, sid, 20000 + i, ttl=kind == "ttl")
    min_interval = ConsulOptions().min_interval
    recorder, stop, thread = _watch(server, min_interval)
    rng = random.Random(7)
    latencies: list[float] = []
    try:
        recorder.wait_for(lambda s: len(s) == len(sids))
        for n in range(changes):
            i = n % len(sids)
            address = f"127.0.0.1:{20000 + i}"
            if isolated:
                time.sleep(min_interval + rng.uniform(0.0, 0.03))
            mark = recorder.mark()
            start = time.perf_counter()
            if kind == "ttl":
                client.agent.check.ttl_fail(f"service:{sids[i]}")
            else:
                client.agent.service.deregister(sids[i])
            seen = recorder.wait_for(_gone_or_critical(address), mark)
            latencies.append((seen - start) * 1000.0)
            mark = recorder.mark()
            if kind == "ttl":
                client.agent.check.ttl_pass(f"service:{sids[i]}")
            else:
                _register(client, sids[i], 20000 + i, ttl=False)
            recorder.wait_for(_back(address), mark)
            progress.step(f"{kind} {'isolated' if isolated else 'back-to-back'}")
    finally:
        stop.set()
        thread.join(5.0)
        for sid in sids:
            client.agent.service.deregister(sid)
    return latencies


def _round_trip(server: Any, n: int) -> list[float]:
    """Milliseconds of one plain (non-blocking) GET of the service's health, with py-consul."""
    client = server.client()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        client.health.service(SERVICE)
        times.append((time.perf_counter() - start) * 1000.0)
    return times


# --- maintenance on to picker ---------------------------------------------------------------------------


class _Drained:
    """A balancer listener: when each endpoint was REMOVED for maintenance, and whether the picker then
    excluded it."""

    def __init__(self, lb: Balancer) -> None:
        self.lb = lb
        self.cond = threading.Condition()
        self.when: dict[str, tuple[float, bool]] = {}

    def __call__(self, event: Event) -> None:
        if event.kind is not EventKind.REMOVED or event.cause is not Cause.MAINTENANCE:
            return
        now = time.perf_counter()
        picked = any(e.address == event.address for e in self.lb.core.picker.endpoints)
        with self.cond:
            self.when[event.address] = (now, picked)
            self.cond.notify_all()

    def wait(self, address: str) -> tuple[float, bool]:
        with self.cond:
            if not self.cond.wait_for(lambda: address in self.when, _SETTLE):
                raise TimeoutError(f"{address} was not drained for maintenance in time")
            return self.when.pop(address)


def _wait(condition: Callable[[], bool], what: str, timeout: float = _SETTLE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout}s")
        time.sleep(0.002)


def _maintenance(server: Any, changes: int, progress: Progress) -> dict[str, Any]:
    """Milliseconds from enabling maintenance on an instance to a published picker without it."""
    from lbkit.testing.model_server import ModelServer

    servers = [ModelServer().start() for _ in range(3)]
    client = server.client()
    sids = [f"maint-{i}" for i in range(len(servers))]
    for sid, s in zip(sids, servers, strict=True):
        client.agent.service.register("bench-maint", service_id=sid, address=s.host, port=s.port)
    lb = Balancer(ConsulDiscovery("bench-maint", address=server.address, env={}))
    drained = _Drained(lb)
    lb.add_listener(drained)
    latencies: list[float] = []
    confirmed = 0
    rng = random.Random(11)
    try:
        lb.start()
        lb.wait_ready(timeout=_SETTLE, count=len(servers))
        for n in range(changes):
            i = n % len(servers)
            address = servers[i].address
            time.sleep(ConsulOptions().min_interval + rng.uniform(0.0, 0.03))
            start = time.perf_counter()
            client.agent.service.maintenance(sids[i], True, "benchmark")
            when, picked = drained.wait(address)
            latencies.append((when - start) * 1000.0)
            confirmed += not picked
            client.agent.service.maintenance(sids[i], False)
            _wait(
                lambda a=address: any(e.address == a for e in lb.core.picker.endpoints), "back in the picker"
            )  # type: ignore[misc]
            progress.step("maintenance")
    finally:
        lb.close()
        for sid in sids:
            client.agent.service.deregister(sid)
        for s in servers:
            s.stop(0)
    return {"latency_ms": latencies, "confirmed": confirmed}


# --- datacenter failover ------------------------------------------------------------------------------------


class _Calls:
    """Predict calls from two threads through a balancer, each answer with its time and server."""

    def __init__(self, lb: Balancer) -> None:
        from lbkit.testing.model_server import pb2, pb2_grpc

        self.stub = pb2_grpc.ModelServiceStub(lb.channel())  # type: ignore[no-untyped-call]
        self.request = pb2.PredictRequest(features=[1.0])
        self.lock = threading.Lock()
        self.answers: list[tuple[float, str]] = []
        self.failed: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(2)]

    def _run(self) -> None:
        end = time.monotonic() + 60.0
        while not self.stop.is_set() and time.monotonic() < end:
            try:
                reply = self.stub.Predict(self.request, timeout=5)
            except Exception as exc:
                with self.lock:
                    self.failed.append(f"{type(exc).__name__}: {exc}")
            else:
                now = time.perf_counter()
                with self.lock:
                    self.answers.append((now, reply.served_by))
            self.stop.wait(0.002)

    def first_after(self, start: float, server: str) -> float:
        """When the first call after ``start`` answered by ``server`` finished."""
        deadline = time.monotonic() + _SETTLE
        while time.monotonic() < deadline:
            with self.lock:
                for when, by in self.answers:
                    if when >= start and by == server:
                        return when
            time.sleep(0.005)
        raise TimeoutError(f"no call answered by {server} within {_SETTLE}s")

    def __enter__(self) -> _Calls:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10.0)


def _failover(trials: int, progress: Progress) -> dict[str, Any]:
    """Seconds from dc1's last instance turning critical to calls answered by dc2, and back."""
    from lbkit.testing.consul import ConsulServer
    from lbkit.testing.model_server import ModelServer

    near, far = ModelServer().start(), ModelServer().start()
    out: dict[str, Any] = {"failover_s": [], "return_s": [], "calls": 0, "failed": []}
    try:
        with ConsulServer(datacenter="dc1") as dc1, ConsulServer(datacenter="dc2", node_name="node-2") as dc2:
            dc1.join_wan(dc2)
            local, remote = dc1.client(), dc2.client()
            local.agent.service.register(
                "bench-dc", service_id="near", address=near.host, port=near.port, check=_ttl_check("near")
            )
            remote.agent.service.register(
                "bench-dc", service_id="far", address=far.host, port=far.port, check=_ttl_check("far")
            )
            lb = Balancer(ConsulDiscovery("bench-dc", address=dc1.address, failover=["dc2"], env={}))
            try:
                lb.start()
                lb.wait_ready(timeout=_SETTLE, count=1)
                with _Calls(lb) as calls:
                    calls.first_after(0.0, near.address)
                    for _ in range(trials):
                        start = time.perf_counter()
                        local.agent.check.ttl_fail("service:near")
                        out["failover_s"].append(calls.first_after(start, far.address) - start)
                        time.sleep(0.2)
                        start = time.perf_counter()
                        local.agent.check.ttl_pass("service:near")
                        out["return_s"].append(calls.first_after(start, near.address) - start)
                        time.sleep(0.2)
                        progress.step("datacenter failover")
                out["calls"] = len(calls.answers) + len(calls.failed)
                out["failed"] = calls.failed
            finally:
                lb.close()
    finally:
        near.stop(0)
        far.stop(0)
    return out


# --- CPU per update ---------------------------------------------------------------------------------------


def _cost(server: Any, updates: int, progress: Progress, big: int = BIG) -> dict[str, float]:
    """CPU per update with ``big`` instances: the core alone (decode, compare, publish) and a live watcher."""
    client = server.client()
    for i in range(big):
        client.agent.service.register(
            SERVICE,
            service_id=f"big-{i}",
            address=f"10.{i // 250}.{i % 250}.1",
            port=50051,
            tags=["v1", "gpu"],
            meta={"zone": f"z{i % 3}", "version": "7"},
            weights={"Passing": 1 + i % 4, "Warning": 1},
        )
    raw_index, payload = client.health.service(SERVICE)
    body_a = json.dumps(payload, separators=(",", ":"))
    first = payload[0]["Service"]
    changed = dict(first, Port=50052, ModifyIndex=first["ModifyIndex"] + 1)  # as a re-registration does
    payload_b = [dict(e, Service=changed) if j == 0 else e for j, e in enumerate(payload)]
    body_b = json.dumps(payload_b, separators=(",", ":"))
    conn = ConsulConnection("http", "127.0.0.1", server.port)
    core = ConsulWatchCore(SERVICE, ConsulOptions(), conn)
    published: list[EndpointSet] = []
    core_ms: list[float] = []
    index = int(raw_index)
    for n in range(updates):
        body = body_a if n % 2 == 0 else body_b
        index += 1
        t0 = time.thread_time()
        snap = core.on_response(200, {"X-Consul-Index": str(index)}, body)
        if snap is not None:
            published.append(snap)
        core_ms.append((time.thread_time() - t0) * 1000.0)
    assert len(published) == updates and len(published[-1]) == big
    # A live watcher: its thread's CPU between consecutive publishes (HTTP, JSON, mapping, compare).
    recorder, stop, thread = _watch(server, 0.05)
    live_ms: list[float] = []
    try:
        recorder.wait_for(lambda s: len(s) == big)
        for n in range(updates):
            before = recorder.updates[-1][1]
            mark = recorder.mark()
            port = 50052 if n % 2 == 0 else 50051
            client.agent.service.register(SERVICE, service_id="big-0", address="10.0.0.1", port=port)
            recorder.wait_for(lambda s, p=port: f"10.0.0.1:{p}" in s.by_address, mark)  # type: ignore[misc]
            live_ms.append((recorder.updates[-1][1] - before) * 1000.0)
            progress.step("1,000 instances")
    finally:
        stop.set()
        thread.join(5.0)
        for i in range(big):
            client.agent.service.deregister(f"big-{i}")
    return {
        "core_median_ms": median(core_ms),
        "core_p99_ms": percentile(core_ms, 99),
        "live_median_ms": median(live_ms),
        "live_p99_ms": percentile(live_ms, 99),
    }


# --- the event loop while a service grows ---------------------------------------------------------------

_REGISTRAR = r"""
import http.client, json, sys, time
host, port, service, prefix = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[6]
first, last = int(sys.argv[4]), int(sys.argv[5])
conn = http.client.HTTPConnection(host, port, timeout=30)
for i in range(first, last):
    address = f"10.{i // 62500 % 250}.{i // 250 % 250}.{i % 250 + 1}"
    check = {"CheckID": f"service:{prefix}{i}", "TTL": "3600s", "Status": "passing"}
    meta = {"zone": f"z{i % 3}", "version": "7"}
    body = json.dumps({"Name": service, "ID": f"{prefix}{i}", "Address": address, "Port": 50051,
                       "Tags": ["v1", "gpu"], "Meta": meta, "Check": check})
    conn.request("PUT", "/v1/agent/service/register", body, {"Content-Type": "application/json"})
    conn.getresponse().read()
print("done", flush=True)
"""

_CONTROL = r"""
import asyncio, sys, time
async def main(seconds):
    gaps, end = [], time.perf_counter() + seconds
    last = time.perf_counter()
    while time.perf_counter() < end:
        await asyncio.sleep(0.001)
        now = time.perf_counter(); gaps.append(now - last); last = now
    gaps.sort()
    print(gaps[-1] * 1000.0, gaps[int(len(gaps) * 0.99)] * 1000.0, flush=True)
asyncio.run(main(float(sys.argv[1])))
"""


@contextlib.contextmanager
def _consul_process() -> Iterator[str]:
    """A test Consul server in a process of its own (its rendering must not take this process's GIL)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lbkit.testing.consul", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.startswith("CONSUL_HTTP_ADDR="):
            raise RuntimeError(f"the test Consul server did not start: {line!r}")
        yield line.split("=", 1)[1]
    finally:
        proc.terminate()
        proc.wait(10)


def _register_range(address: str, service: str, first: int, last: int, prefix: str) -> subprocess.Popen[str]:
    host, port = address.rsplit(":", 1)
    return subprocess.Popen(
        [sys.executable, "-c", _REGISTRAR, host, port, service, str(first), str(last), prefix],
        stdout=subprocess.PIPE,
        text=True,
    )


class _LoopDecoder(HealthDecoder):
    """Decoding as before: the whole answer with ``json.loads``, then each entry, reusing the endpoint of an
    instance whose (ID, ModifyIndex, node ModifyIndex, status) did not change."""

    def __init__(self, service: str) -> None:
        super().__init__(service, pause=None)
        self._by_key: dict[tuple[Any, ...], Endpoint] = {}

    def decode(self, body: str | bytes) -> list[Endpoint]:
        payload = json.loads(body)
        fresh: dict[tuple[Any, ...], Endpoint] = {}
        out = []
        for entry in payload:
            service, node = entry["Service"], entry["Node"]
            key = (
                service["ID"],
                service["ModifyIndex"],
                node["ModifyIndex"],
                aggregated_status(entry["Checks"]),
            )
            endpoint = self._by_key.get(key)
            if endpoint is None:
                try:
                    endpoint = entry_endpoint(entry, EntryRules())
                except SkipEntry:
                    continue
            fresh[key] = endpoint
            out.append(endpoint)
        self._by_key = fresh
        return out


async def _on_loop_watch(address: str, service: str, on_update: Callable[[EndpointSet], None]) -> None:
    """The asyncio watch loop with decoding on the event loop (the baseline)."""
    import urllib.parse

    import aiohttp

    conn = resolve_connection(address=address, env={})
    core = ConsulWatchCore(service, ConsulOptions(wait=30.0), conn)
    core.decoder = _LoopDecoder(service)
    async with aiohttp.ClientSession() as session:
        while True:
            delay = core.delay()
            if delay > 0:
                await asyncio.sleep(delay)
            q = core.next_query()
            url = f"{conn.address}{q.path}?{urllib.parse.urlencode(q.params)}"
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=q.timeout)) as resp:
                    status, headers, body = resp.status, resp.headers, await resp.read()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                core.on_error(exc)
                continue
            snapshot = core.on_response(status, headers, body)  # on the loop
            if snapshot is not None:
                on_update(snapshot)


async def _ticker_while(done: asyncio.Event) -> list[float]:
    gaps = []
    last = time.perf_counter()
    while not done.is_set():
        await asyncio.sleep(0.001)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    return gaps


async def _grow(
    address: str, service: str, start: int, end: int, *, on_loop: bool, min_window: float = 5.0
) -> dict[str, Any]:
    """Grow ``service`` from ``start`` to ``end`` instances while an asyncio watcher runs; a ticker's gaps."""
    setup = _register_range(address, service, 0, start, f"{service}-")
    await asyncio.to_thread(setup.wait, 300)
    seen: list[int] = []
    full = asyncio.Event()

    def on_update(snapshot: EndpointSet) -> None:
        seen.append(len(snapshot))
        if len(snapshot) >= end:
            full.set()

    if on_loop:
        watch = asyncio.create_task(_on_loop_watch(address, service, on_update))
    else:
        discovery = ConsulDiscovery(service, address=address, wait=30.0, env={})
        watch = asyncio.create_task(discovery.arun(on_update))
    try:
        while not seen or seen[-1] < start:
            await asyncio.sleep(0.01)
        # Processes are started off the loop, before the ticker: a fork is no stall of the watcher's.
        window = max(min_window, (end - start) / 1000.0 * 2.0)
        control = await asyncio.to_thread(
            subprocess.Popen, [sys.executable, "-c", _CONTROL, str(window)], stdout=subprocess.PIPE, text=True
        )
        registrar = await asyncio.to_thread(_register_range, address, service, start, end, f"{service}-")
        done = asyncio.Event()
        ticker = asyncio.create_task(_ticker_while(done))
        t0 = time.perf_counter()
        await asyncio.to_thread(registrar.wait, 600)
        await asyncio.wait_for(full.wait(), 120.0)
        grow_s = time.perf_counter() - t0
        done.set()
        gaps = await ticker
        out, _ = await asyncio.to_thread(control.communicate)
    finally:
        watch.cancel()
        with contextlib.suppress(BaseException):
            await watch
    return {
        "max_gap_ms": max(gaps) * 1000.0,
        "p99_gap_ms": percentile(gaps, 99) * 1000.0,
        "control_gap_ms": float((out.split() or ["nan"])[0]),
        "control_p99_ms": float((out.split() or ["nan", "nan"])[-1]),
        "grow_s": grow_s,
        "publishes": len(seen),
    }


def _stall(start: int, end: int, progress: Progress, min_window: float = 5.0) -> dict[str, Any]:
    with _consul_process() as address:
        lbkit = asyncio.run(_grow(address, "grow-lbkit", start, end, on_loop=False, min_window=min_window))
        progress.step("event loop, lbkit")
        baseline = asyncio.run(
            _grow(address, "grow-baseline", start, end, on_loop=True, min_window=min_window)
        )
        progress.step("event loop, decoding on the loop")
    return {"lbkit": lbkit, "on_loop": baseline, "start": start, "end": end}


# --- the report ---------------------------------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "yes" if ok else "no"


def run(quick: bool = False) -> Result:
    """Propagation, maintenance, failover, CPU and event-loop stall; see the module doc."""
    from lbkit.testing.consul import ConsulServer

    changes = 12 if quick else 100
    maint = 6 if quick else 40
    trials = 1 if quick else 5
    updates = 6 if quick else 40
    big = 200 if quick else BIG
    grow = (100, 400) if quick else (1000, 10_000)
    progress = Progress("consul_propagation", 3 * changes + maint + trials + updates + 2)
    scenarios = [("deregister", True), ("ttl", True), ("deregister", False)]
    latency: dict[str, list[float]] = {}
    with ConsulServer() as server:
        for kind, isolated in scenarios:
            name = f"{kind}, {'isolated' if isolated else 'back-to-back'}"
            latency[name] = _propagation(server, changes, kind=kind, isolated=isolated, progress=progress)
        round_trip = _round_trip(server, changes)
        maintenance = _maintenance(server, maint, progress)
        cost = _cost(server, updates, progress, big)
    failover = _failover(trials, progress)
    stall = _stall(*grow, progress, min_window=1.5 if quick else 5.0)
    progress.close()

    rows = []
    for name, values in latency.items():
        med, p99 = median(values), percentile(values, 99)
        goal_median = MEDIAN_GOAL_MS if "isolated" in name else BACK_TO_BACK_MEDIAN_GOAL_MS
        goal = f"median <= {goal_median:.0f}, p99 <= {P99_GOAL_MS:.0f}"
        ok = med <= goal_median and p99 <= P99_GOAL_MS
        rows.append([name, len(values), fmt(med), fmt(p99), fmt(max(values)), goal, _verdict(ok)])
    m = maintenance["latency_ms"]
    rows.append(
        [
            "maintenance on, to the picker",
            len(m),
            fmt(median(m)),
            fmt(percentile(m, 99)),
            fmt(max(m)),
            f"median <= {MAINTENANCE_GOAL_MS:.0f}",
            _verdict(median(m) <= MAINTENANCE_GOAL_MS and maintenance["confirmed"] == len(m)),
        ]
    )
    f_s, r_s = failover["failover_s"], failover["return_s"]
    no_failed = not failover["failed"]
    failover_rows = [
        [
            "dc1's last instance critical, to a call answered in dc2",
            len(f_s),
            fmt(median(f_s) * 1000),
            fmt(max(f_s) * 1000),
            len(failover["failed"]),
            f"max <= {FAILOVER_GOAL_S * 1000:.0f} ms, 0 failed",
            _verdict(max(f_s) <= FAILOVER_GOAL_S and no_failed),
        ],
        [
            "dc1 passing again, to a call answered in dc1",
            len(r_s),
            fmt(median(r_s) * 1000),
            fmt(max(r_s) * 1000),
            len(failover["failed"]),
            f"max <= {FAILOVER_GOAL_S * 1000:.0f} ms, 0 failed",
            _verdict(max(r_s) <= FAILOVER_GOAL_S and no_failed),
        ],
    ]
    cost_rows = [
        [
            "core: decode + compare + publish",
            fmt(cost["core_median_ms"]),
            fmt(cost["core_p99_ms"]),
            f"median <= {CPU_GOAL_MS:.0f}",
            _verdict(cost["core_median_ms"] <= CPU_GOAL_MS),
        ],
        [
            "live watcher thread (HTTP + decode + core)",
            fmt(cost["live_median_ms"]),
            fmt(cost["live_p99_ms"]),
            f"median <= {CPU_GOAL_MS:.0f}",
            _verdict(cost["live_median_ms"] <= CPU_GOAL_MS),
        ],
    ]
    lb, base = stall["lbkit"], stall["on_loop"]
    allowed = max(STALL_GOAL_MS, STALL_CONTROL_RATIO * lb["control_gap_ms"])
    stall_rows = [
        [
            f"{stall['start']:,} -> {stall['end']:,} instances",
            fmt(lb["max_gap_ms"]),
            fmt(lb["p99_gap_ms"]),
            f"{fmt(lb['control_gap_ms'])} (p99 {fmt(lb['control_p99_ms'])})",
            f"{fmt(base['max_gap_ms'])} (p99 {fmt(base['p99_gap_ms'])})",
            f"<= {STALL_GOAL_MS:.0f} ms, or <= {STALL_CONTROL_RATIO}x the control's",
            _verdict(lb["max_gap_ms"] <= allowed),
        ]
    ]
    return {
        "title": "Consul propagation to the watcher and the picker",
        "tables": [
            {
                "caption": "Change in Consul to watcher publish (maintenance: to the balancer's picker), ms",
                "columns": ["change", "n", "median", "p99", "max", "goal", "met"],
                "rows": rows,
            },
            {
                "caption": "Plain GET of the service's health from the test server, ms (the floor: a "
                f"watcher cannot publish before its answer arrives), n = {len(round_trip)}",
                "columns": ["median", "p99", "max"],
                "rows": [[fmt(median(round_trip)), fmt(percentile(round_trip, 99)), fmt(max(round_trip))]],
            },
            {
                "caption": "Datacenter failover under load (2 threads calling), ms; "
                f"{failover['calls']:,} calls",
                "columns": ["change", "n", "median", "max", "failed calls", "goal", "met"],
                "rows": failover_rows,
            },
            {
                "caption": f"Watcher CPU per update, {big:,} instances in one service, ms",
                "columns": ["what", "median", "p99", "goal", "met"],
                "rows": cost_rows,
            },
            {
                "caption": "Asyncio event loop while a service grows: longest gap of a 1 ms ticker, ms",
                "columns": [
                    "growth",
                    "lbkit arun",
                    "lbkit p99",
                    "control (bare ticker process)",
                    "decoding on the loop (before)",
                    "goal",
                    "met",
                ],
                "rows": stall_rows,
            },
        ],
        "notes": [
            "Test Consul server (lbkit.testing.consul) on 127.0.0.1; sync watcher, wait=30s, "
            f"min_interval={ConsulOptions().min_interval * 1000:.0f} ms (the default).",
            "Latency starts just before the HTTP call that makes the change, so it includes that call. "
            "A failed TTL check is published as the instance turning critical (it stays in the set).",
            "Isolated: each change comes at least min_interval (+0-30 ms) after the previous publish. "
            "Back-to-back: right after it, so the next query may wait up to min_interval (the rate limit); "
            "its goal allows that.",
            f"Maintenance: sync Balancer over 3 real model servers; the REMOVED event (cause maintenance) "
            "came with the picker already without the endpoint in "
            f"{maintenance['confirmed']} of {len(m)} changes.",
            "Failover: dc1 and dc2 are two test servers joined over the WAN; the balancer asks dc1's agent, "
            "with failover=['dc2']; dc1's instance is still serving while critical, so no call needs to "
            "fail.",
            "CPU is time.thread_time of the thread doing the work; the live figure covers a whole update "
            "cycle of the watcher thread (its HTTP request, decoding, mapping and comparison). An update "
            "changes one instance: the others' entries are not decoded again.",
            f"Event loop: a test Consul server and the registering client run in processes of their own; "
            f"instances registered {stall['end'] - stall['start']:,} at a time as fast as the server takes "
            "them "
            f"(lbkit: {lb['grow_s']:.1f} s, {lb['publishes']} publishes); the control is a bare asyncio 1 ms "
            "ticker in its own process over the same window; the baseline decodes each answer whole with "
            "json.loads on the loop.",
        ],
        "data": {
            "latency_ms": latency,
            "round_trip_ms": round_trip,
            "maintenance": maintenance,
            "failover": failover,
            "cost_ms": cost,
            "stall": stall,
        },
    }


def main() -> None:
    """``python -m benchmarks.consul_propagation [--quick]``."""
    module_main("consul_propagation", run)


if __name__ == "__main__":
    main()

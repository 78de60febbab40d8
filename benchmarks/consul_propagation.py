"""Consul propagation: how fast a change in Consul reaches the watcher's publish, and what an update costs.

Against lbkit's test Consul server on 127.0.0.1, a sync ``ConsulDiscovery`` watcher runs in a thread.
Latency is measured from just before the change is sent to the agent (a deregistration, or a TTL check
failed) to the moment the watcher publishes a set without that endpoint. Each measured change follows
the previous publish by at least the watcher's ``min_interval`` plus a random 0-30 ms ("isolated"); the
"back-to-back" row makes the next change right after the previous publish, so the rate limit shows.
The cost is CPU time (``time.thread_time``) per update of a service with 1,000 instances.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from benchmarks._common import Progress, Result, fmt, median, module_main, percentile
from lbkit.discovery.consul import ConsulDiscovery
from lbkit.discovery.consul_core import ConsulConnection, ConsulOptions, ConsulWatchCore
from lbkit.endpoint import EndpointSet

__all__ = ["main", "run"]

MEDIAN_GOAL_MS = 50.0
P99_GOAL_MS = 200.0
CPU_GOAL_MS = 20.0
SERVICE = "bench-model"
BIG = 1000


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
        self, predicate: Callable[[EndpointSet], bool], since: int = 0, timeout: float = 5.0
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

    def latest(self) -> EndpointSet:
        with self.cond:
            return self.updates[-1][2]


def _register(client: Any, sid: str, port: int, *, ttl: bool) -> None:
    check = {"CheckID": f"service:{sid}", "Name": "ttl", "TTL": "60s", "Status": "passing"} if ttl else None
    client.agent.service.register(SERVICE, service_id=sid, address="127.0.0.1", port=port, check=check)
    if ttl:
        client.agent.check.ttl_pass(f"service:{sid}")


def _watch(server: Any, min_interval: float) -> tuple[Recorder, threading.Event, threading.Thread]:
    discovery = ConsulDiscovery(SERVICE, address=server.address, wait=30.0, min_interval=min_interval, env={})
    recorder = Recorder()
    stop = threading.Event()
    thread = threading.Thread(target=discovery.run, args=(recorder, stop), daemon=True)
    thread.start()
    return recorder, stop, thread


def _propagation(server: Any, changes: int, *, kind: str, isolated: bool, progress: Progress) -> list[float]:
    """Milliseconds from each change to the publish without the changed endpoint."""
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
            seen = recorder.wait_for(lambda s, a=address: a not in s.by_address, mark)  # type: ignore[misc]
            latencies.append((seen - start) * 1000.0)
            mark = recorder.mark()
            if kind == "ttl":
                client.agent.check.ttl_pass(f"service:{sids[i]}")
            else:
                _register(client, sids[i], 20000 + i, ttl=False)
            recorder.wait_for(lambda s, a=address: a in s.by_address, mark)  # type: ignore[misc]
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
        client.health.service(SERVICE, passing=True)
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def _cost(server: Any, updates: int, progress: Progress) -> dict[str, float]:
    """CPU per update with ``BIG`` instances: the core alone (parse, compare, publish) and a live watcher."""
    client = server.client()
    for i in range(BIG):
        client.agent.service.register(
            SERVICE,
            service_id=f"big-{i}",
            address=f"10.{i // 250}.{i % 250}.1",
            port=50051,
            tags=["v1", "gpu"],
            meta={"zone": f"z{i % 3}", "version": "7"},
            weights={"Passing": 1 + i % 4, "Warning": 1},
        )
    raw_index, payload = client.health.service(SERVICE, passing=True)
    body_a = json.dumps(payload)
    first = payload[0]["Service"]
    changed = dict(first, Port=50052, ModifyIndex=first["ModifyIndex"] + 1)  # as a re-registration does
    payload_b = [dict(e, Service=changed) if j == 0 else e for j, e in enumerate(payload)]
    body_b = json.dumps(payload_b)
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
    assert len(published) == updates and len(published[-1]) == BIG
    # A live watcher: its thread's CPU between consecutive publishes (HTTP, JSON, mapping, compare).
    recorder, stop, thread = _watch(server, 0.05)
    live_ms: list[float] = []
    try:
        recorder.wait_for(lambda s: len(s) == BIG, timeout=10.0)
        for n in range(updates):
            before = recorder.updates[-1][1]
            mark = recorder.mark()
            port = 50052 if n % 2 == 0 else 50051
            client.agent.service.register(SERVICE, service_id="big-0", address="10.0.0.1", port=port)
            recorder.wait_for(lambda s, p=port: f"10.0.0.1:{p}" in s.by_address, mark, 10.0)  # type: ignore[misc]
            live_ms.append((recorder.updates[-1][1] - before) * 1000.0)
            progress.step("1,000 instances")
    finally:
        stop.set()
        thread.join(5.0)
        for i in range(BIG):
            client.agent.service.deregister(f"big-{i}")
    return {
        "core_median_ms": median(core_ms),
        "core_p99_ms": percentile(core_ms, 99),
        "live_median_ms": median(live_ms),
        "live_p99_ms": percentile(live_ms, 99),
    }


def run(quick: bool = False) -> Result:
    """Propagation latency (median, p99) and watcher CPU per update; see the module doc."""
    from lbkit.testing.consul import ConsulServer

    changes = 20 if quick else 100
    updates = 10 if quick else 40
    progress = Progress("consul_propagation", 3 * changes + updates)
    scenarios = [("deregister", True), ("ttl", True), ("deregister", False)]
    latency: dict[str, list[float]] = {}
    with ConsulServer() as server:
        for kind, isolated in scenarios:
            name = f"{kind}, {'isolated' if isolated else 'back-to-back'}"
            latency[name] = _propagation(server, changes, kind=kind, isolated=isolated, progress=progress)
        round_trip = _round_trip(server, changes)
        cost = _cost(server, updates, progress)
    rows = []
    for name, values in latency.items():
        med, p99 = median(values), percentile(values, 99)
        goal = "yes" if med <= MEDIAN_GOAL_MS and p99 <= P99_GOAL_MS else "no"
        rows.append(
            [name, len(values), fmt(med), fmt(p99), fmt(max(values)), goal if "isolated" in name else "-"]
        )
    base = ["baseline: one plain GET, no watcher", len(round_trip), fmt(median(round_trip))]
    rows.append([*base, fmt(percentile(round_trip, 99)), fmt(max(round_trip)), "-"])
    cost_rows = [
        ["core: parse + compare + publish", fmt(cost["core_median_ms"]), fmt(cost["core_p99_ms"])],
        ["live watcher thread (HTTP + JSON + core)", fmt(cost["live_median_ms"]), fmt(cost["live_p99_ms"])],
    ]
    return {
        "title": "Consul propagation to the watcher",
        "tables": [
            {
                "caption": f"Change in Consul to watcher publish, ms (goal: median <= {MEDIAN_GOAL_MS:.0f}, "
                f"p99 <= {P99_GOAL_MS:.0f})",
                "columns": ["change", "n", "median", "p99", "max", "goal met"],
                "rows": rows,
            },
            {
                "caption": f"Watcher CPU per update, {BIG:,} instances in one service, ms "
                f"(goal <= {CPU_GOAL_MS:.0f})",
                "columns": ["what", "median", "p99"],
                "rows": cost_rows,
            },
        ],
        "notes": [
            "Test Consul server (lbkit.testing.consul) on 127.0.0.1; sync watcher, wait=30s, "
            f"min_interval={ConsulOptions().min_interval * 1000:.0f} ms (the default).",
            "Latency starts just before the HTTP call that makes the change, so it includes that call.",
            "Isolated: each change comes at least min_interval (+0-30 ms) after the previous publish. "
            "Back-to-back: right after it, so the next query may wait up to min_interval (the rate limit).",
            "The baseline row is the HTTP round trip of one plain read from the test server: a watcher "
            "cannot publish faster than its answer arrives.",
            "CPU is time.thread_time of the thread doing the work; the live figure covers a whole update "
            "cycle of the watcher thread (its HTTP request, JSON decoding, mapping and comparison).",
        ],
        "data": {
            "latency_ms": latency,
            "round_trip_ms": round_trip,
            "cost_ms": cost,
            "changes": changes,
            "updates": updates,
        },
    }


def main() -> None:
    """``python -m benchmarks.consul_propagation [--quick]``."""
    module_main("consul_propagation", run)


if __name__ == "__main__":
    main()

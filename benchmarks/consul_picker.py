"""Consul to picker: how fast a change in Consul takes an endpoint out of a running Balancer's picker.

Four real model servers on 127.0.0.1 are registered in lbkit's test Consul server; an ``lbkit.Balancer``
fed by ``lbkit.ConsulDiscovery`` (default options) runs over them. Each measured change is a
deregistration, or a TTL check failed (``agent.check.ttl_fail``), of one instance. Latency runs from just
before the HTTP call that makes the change to the balancer's REMOVED event for that endpoint (UNHEALTHY,
cause CONSUL_CRITICAL, for a failed check: the instance stays in the set, marked critical), which the
core emits after publishing the picker without it (checked against ``lb.core.picker`` at that moment).
After each change the instance is restored, and the next change waits until its channel is back in the
picker, then ``min_interval`` plus a random 0-30 ms, so no change meets the watcher's rate limit.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any

from benchmarks._common import Progress, Result, fmt, median, module_main, percentile
from lbkit.balancer import Balancer
from lbkit.discovery.consul import ConsulDiscovery
from lbkit.discovery.consul_core import ConsulOptions
from lbkit.events import Cause, Event, EventKind
from lbkit.testing.consul import ConsulServer
from lbkit.testing.model_server import ModelServer

__all__ = ["main", "run"]

MEDIAN_GOAL_MS = 50.0
P99_GOAL_MS = 200.0
SERVICE = "bench-picker"
INSTANCES = 4
KINDS = ("deregister", "ttl", "deregister+load")
NAMES = {
    "deregister": "deregistration",
    "ttl": "TTL check failed (critical)",
    "deregister+load": "deregistration, 2 threads calling",
}
LOAD_THREADS = 2
_SETTLE = 5.0
"""Seconds any one step may take before the run is declared broken."""


class Removals:
    """A balancer listener noting when each endpoint was REMOVED, and whether the picker then excluded it."""

    def __init__(self, lb: Balancer) -> None:
        self.lb = lb
        self.cond = threading.Condition()
        self.when: dict[str, float] = {}
        self.still_picked: dict[str, bool] = {}

    def __call__(self, event: Event) -> None:
        critical = event.kind is EventKind.UNHEALTHY and event.cause is Cause.CONSUL_CRITICAL
        if event.kind is not EventKind.REMOVED and not critical:
            return
        now = time.perf_counter()
        picked = any(e.address == event.address for e in self.lb.core.picker.endpoints)
        with self.cond:
            self.when[event.address] = now
            self.still_picked[event.address] = picked
            self.cond.notify_all()

    def forget(self, address: str) -> None:
        with self.cond:
            self.when.pop(address, None)
            self.still_picked.pop(address, None)

    def wait(self, address: str, timeout: float = _SETTLE) -> tuple[float, bool]:
        """When ``address`` was removed, and whether the picker still held it then."""
        with self.cond:
            if not self.cond.wait_for(lambda: address in self.when, timeout):
                raise TimeoutError(f"{address} was not removed within {timeout}s")
            return self.when[address], self.still_picked[address]


def _wait(condition: Any, what: str, timeout: float = _SETTLE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout}s")
        time.sleep(0.001)


def _in_picker(lb: Balancer, address: str) -> bool:
    return any(e.address == address for e in lb.core.picker.endpoints)


class CallLoad:
    """Predict calls through the balancer from ``threads`` threads, back to back, until :meth:`stop`."""

    def __init__(self, lb: Balancer, threads: int) -> None:
        from lbkit.testing.model_server import pb2, pb2_grpc

        self.stub = pb2_grpc.ModelServiceStub(lb.channel())  # type: ignore[no-untyped-call]
        self.request = pb2.PredictRequest(features=[1.0, 2.0])
        self.calls = 0
        self.errors = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        for _ in range(1_000_000):
            if self._stop.is_set():
                return
            try:
                self.stub.Predict(self.request, timeout=5)
                ok = True
            except Exception:
                ok = False
            with self._lock:
                self.calls += 1
                self.errors += not ok

    def stop(self) -> None:
        """Stop calling and join the threads."""
        self._stop.set()
        for t in self._threads:
            t.join(10.0)


def _register(client: Any, sid: str, server: ModelServer, *, ttl: bool) -> None:
    check = {"CheckID": f"service:{sid}", "Name": "ttl", "TTL": "60s"} if ttl else None
    client.agent.service.register(SERVICE, service_id=sid, address=server.host, port=server.port, check=check)
    if ttl:
        client.agent.check.ttl_pass(f"service:{sid}")


def _measure(
    consul: ConsulServer, servers: list[ModelServer], kind: str, changes: int, progress: Progress
) -> dict[str, Any]:
    """Latencies (ms) from each change of ``kind`` to the picker without the endpoint."""
    client = consul.client()
    ttl = kind == "ttl"
    load: CallLoad | None = None
    sids = [f"{kind}-{i}" for i in range(len(servers))]
    for sid, server in zip(sids, servers, strict=True):
        _register(client, sid, server, ttl=ttl)
    min_interval = ConsulOptions().min_interval
    rng = random.Random(11)
    latencies: list[float] = []
    call_ms: list[float] = []
    still_picked = 0
    lb = Balancer(ConsulDiscovery(SERVICE, address=consul.address, env={}))
    removals = Removals(lb)
    lb.add_listener(removals)
    try:
        lb.start()
        lb.wait_ready(timeout=_SETTLE, count=len(servers))
        if kind.endswith("+load"):
            load = CallLoad(lb, LOAD_THREADS)
        for n in range(changes):
            i = n % len(servers)
            sid, address = sids[i], servers[i].address
            time.sleep(min_interval + rng.uniform(0.0, 0.03))
            removals.forget(address)
            start = time.perf_counter()
            if ttl:
                client.agent.check.ttl_fail(f"service:{sid}")
            else:
                client.agent.service.deregister(sid)
            call_ms.append((time.perf_counter() - start) * 1e3)
            removed, picked = removals.wait(address)
            latencies.append((removed - start) * 1e3)
            still_picked += picked
            # Restore it: once a removed one's channel is closed (so a fresh one opens; a critical one
            # keeps its channel), and wait until it is picked.
            if not ttl:
                _wait(lambda a=address: a not in lb.members, f"{address}'s channel closing")
            if ttl:
                client.agent.check.ttl_pass(f"service:{sid}")
            else:
                _register(client, sid, servers[i], ttl=False)
            _wait(lambda a=address: _in_picker(lb, a), f"{address} back in the picker")
            progress.step(kind)
    finally:
        if load is not None:
            load.stop()
        lb.close()
        for sid in sids:
            client.agent.service.deregister(sid)
    calls, errors = (load.calls, load.errors) if load is not None else (0, 0)
    return {
        "latency_ms": latencies,
        "change_call_ms": call_ms,
        "still_picked": still_picked,
        "calls": calls,
        "failed_calls": errors,
    }


def run(quick: bool = False) -> Result:
    """Consul change to picker exclusion, median and p99, for deregistrations and failed TTL checks."""
    changes = 20 if quick else 100
    progress = Progress("consul_picker", changes * len(KINDS))
    measured: dict[str, dict[str, Any]] = {}
    servers = [ModelServer().start() for _ in range(INSTANCES)]
    try:
        with ConsulServer() as consul:
            for kind in KINDS:
                measured[kind] = _measure(consul, servers, kind, changes, progress)
    finally:
        for server in servers:
            server.stop(0)
    progress.close()
    rows = []
    passed = {}
    for kind in KINDS:
        values = measured[kind]["latency_ms"]
        med, p99 = median(values), percentile(values, 99)
        passed[kind] = med <= MEDIAN_GOAL_MS and p99 <= P99_GOAL_MS
        rows.append(
            [
                NAMES[kind],
                len(values),
                fmt(med),
                fmt(percentile(values, 90)),
                fmt(p99),
                fmt(max(values)),
                "pass" if passed[kind] else "FAIL",
            ]
        )
    confirmed = sum(changes - measured[k]["still_picked"] for k in KINDS)
    call = [x for k in KINDS for x in measured[k]["change_call_ms"]]
    loaded = measured["deregister+load"]
    return {
        "title": "Consul change to the Balancer's picker",
        "tables": [
            {
                "caption": f"Change in Consul until the running Balancer's picker excludes the endpoint, ms "
                f"(goal: median <= {MEDIAN_GOAL_MS:.0f}, p99 <= {P99_GOAL_MS:.0f})",
                "columns": ["change", "n", "median", "p90", "p99", "max", "goal"],
                "rows": rows,
            }
        ],
        "notes": [
            f"lbkit.Balancer (threads, round robin) over {INSTANCES} real model servers on 127.0.0.1, fed by "
            "lbkit.ConsulDiscovery with default options (wait 60 s, min_interval "
            f"{ConsulOptions().min_interval * 1000:.0f} ms) watching lbkit's test Consul server.",
            "Latency starts just before the HTTP call that makes the change (its own median: "
            f"{fmt(median(call))} ms) and ends at the REMOVED event (UNHEALTHY for a failed check), "
            "emitted once the new picker is published; the picker excluded the endpoint at that moment "
            f"in {confirmed} of "
            f"{changes * len(KINDS)} changes.",
            "Each change waits for the previous one's restoration (the endpoint ready and picked again) "
            "and then min_interval plus 0-30 ms, so the rate limit never delays it.",
            f"Under load, {LOAD_THREADS} threads called Predict back to back through the balancer: "
            f"{loaded['calls']:,} calls, {loaded['failed_calls']} failed.",
        ],
        "data": {
            "latency_ms": {k: measured[k]["latency_ms"] for k in KINDS},
            "change_call_ms": {k: measured[k]["change_call_ms"] for k in KINDS},
            "picker_confirmed": confirmed,
            "goal_met": passed,
            "load_calls": loaded["calls"],
            "load_failed_calls": loaded["failed_calls"],
            "changes": changes,
        },
    }


def main() -> None:
    """``python -m benchmarks.consul_picker [--quick]``."""
    module_main("consul_picker", run)


if __name__ == "__main__":
    main()

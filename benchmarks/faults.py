"""Faults under load: a server killed, failing every call, hanging or slow; lbkit against native round robin.

Four model servers (2 ms per call) run in a child process. A paced client sends a steady few hundred
unary calls per second; a fault is injected into server 1 and later lifted. Each fault is met by lbkit and
by grpcio's native round robin twice: as it comes (the bare policy) and configured at its best through
the service config, with what lbkit is given (retries of UNAVAILABLE with a per-attempt timeout and the
same budget, outlier detection, health checks), so that failed calls compare the libraries, not their
settings. For each run the table shows the calls the client saw fail, the calls that reached the bad
server after the fault (counted by the servers), how long until the client stopped sending to it, and
how long after recovery until it served again. The slow-server table shows, per selector, the share of
calls the 200 ms server got and the p99 against the same selector's all-healthy p99.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from benchmarks._common import Progress, Result, module_main, percentile
from benchmarks.e2e import _RR_CONFIG, SELECTORS, balancer_class, lbkit_available
from lbkit.discovery.static import StaticDiscovery
from lbkit.testing.proto import model_service_pb2 as pb2
from lbkit.testing.proto import model_service_pb2_grpc as pb2_grpc
from lbkit.testing.server_process import ServerProcess

__all__ = ["PacedLoad", "Record", "main", "run"]

BAD = 1
"""Index of the server the faults hit."""
FAST_MS = 2.0
SLOW_MS = 200.0
DEADLINE = 0.5
"""Seconds each call may take."""

_REQUEST = pb2.PredictRequest(features=[1.0, 2.0])
_FAULTS: dict[str, tuple[str, str]] = {
    "killed": ("kill {i}", "start {i}"),
    "fails every call": ("fail {i} 1.0", "fail {i} 0"),
    "hangs": ("hang {i} on", "hang {i} off"),
    "health NOT_SERVING": ("serving {i} off", "serving {i} on"),
}
_GONE = {"ejected", "not_ready", "unhealthy", "removed"}
_BACK = {"returned", "ready", "healthy"}

LBKIT = "lbkit"
NATIVE = "native"
"""grpcio's round_robin as it comes: the policy and nothing else."""
NATIVE_BEST = "native configured"
"""grpcio's round_robin at its best for these faults (see :func:`native_best_config`)."""
CLIENT_NAMES = {
    LBKIT: "lbkit round_robin",
    NATIVE: "native round_robin",
    NATIVE_BEST: "native round_robin, configured",
}
QUIET_S = 0.25
"""A native client has stopped sending to the bad server once the server counts no call for this long."""


@dataclass(frozen=True, slots=True)
class Record:
    """One call: start and end (monotonic seconds), whether it succeeded, who answered, its status code."""

    start: float
    end: float
    ok: bool
    server: str
    code: str


class PacedLoad:
    """``rate`` calls per second on a fixed schedule from ``workers`` threads, until :meth:`stop`."""

    def __init__(
        self,
        call: Callable[[], tuple[bool, str, str]],
        *,
        rate: float,
        workers: int,
        max_calls: int = 200_000,
    ) -> None:
        self._call = call
        self._rate = rate
        self._max = max_calls
        self._stop = threading.Event()
        self._slots = itertools.count()
        self._records: list[list[Record]] = [[] for _ in range(workers)]
        self._threads = [threading.Thread(target=self._work, args=(w,), daemon=True) for w in range(workers)]
        self._t0 = 0.0

    def start(self) -> PacedLoad:
        """Start sending."""
        self._t0 = time.monotonic()
        for t in self._threads:
            t.start()
        return self

    def _work(self, slot: int) -> None:
        mine, call, clock = self._records[slot], self._call, time.monotonic
        while not self._stop.is_set():
            k = next(self._slots)
            if k >= self._max:
                return
            wait = self._t0 + k / self._rate - clock()
            if wait > 0 and self._stop.wait(wait):
                return
            t = clock()
            ok, server, code = call()
            mine.append(Record(t, clock(), ok, server, code))

    def stop(self) -> list[Record]:
        """Stop, wait for calls in flight, and return every call's record in start order."""
        self._stop.set()
        for t in self._threads:
            t.join(DEADLINE * 4 + 5.0)
        return sorted((r for part in self._records for r in part), key=lambda r: r.start)


class CountPoller:
    """Samples the servers' call counts every ``interval`` seconds, to count calls between two moments."""

    def __init__(self, servers: ServerProcess, interval: float = 0.01) -> None:
        self._servers = servers
        self._interval = interval
        self._stop = threading.Event()
        self.samples: list[tuple[float, list[int]]] = []
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> CountPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _poll(self) -> None:
        while True:
            self.samples.append((time.monotonic(), self._servers.calls()))
            if self._stop.wait(self._interval):
                return

    def first_quiet(self, index: int, start: float, end: float, quiet: float) -> float | None:
        """When server ``index`` last got a call before its first span of ``quiet`` seconds without one,
        between ``start`` and ``end``; None if it never went quiet that long."""
        last_change, last_count = start, None
        for t, counts in self.samples:
            if t < start:
                last_count = counts[index]
                continue
            if t > end:
                break
            if last_count is not None and counts[index] != last_count:
                last_change = t
            elif t - last_change >= quiet:
                return last_change
            last_count = counts[index]
        return None

    def between(self, index: int, start: float, end: float) -> tuple[int, int]:
        """Bounds on the calls server ``index`` got from ``start`` to ``end``: counted between the samples
        just inside the span, and between those just outside it."""
        first, last = self.samples[0][1][index], self.samples[-1][1][index]
        before = [c[index] for t, c in self.samples if t <= start]
        after = [c[index] for t, c in self.samples if t >= end]
        inside = [c[index] for t, c in self.samples if start <= t <= end]
        outer = (after[0] if after else last) - (before[-1] if before else first)
        inner = inside[-1] - inside[0] if inside else 0
        return inner, outer


def _caller(stub: Any) -> Callable[[], tuple[bool, str, str]]:
    predict = stub.Predict

    def call() -> tuple[bool, str, str]:
        try:
            reply = predict(_REQUEST, timeout=DEADLINE)
        except grpc.RpcError as exc:
            trailers = dict(exc.trailing_metadata() or ())
            return False, str(trailers.get("lb-served-by", "")), str(exc.code().name)
        return True, str(reply.served_by), "OK"

    return call


class Events:
    """lbkit events, stamped with this module's monotonic clock."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, str, str]] = []

    def __call__(self, event: Any) -> None:
        kind = getattr(event.kind, "value", str(event.kind))
        self.seen.append((time.monotonic(), str(kind), str(event.address)))

    def first(self, address: str, kinds: set[str], after: float) -> float | None:
        """When the first event of ``kinds`` for ``address`` came at or after ``after``."""
        return next((t for t, k, a in self.seen if a == address and k in kinds and t >= after), None)


def _ejection(quick: bool) -> tuple[float, float]:
    """Base and longest ejection, in seconds: short, so the return after recovery is timed in seconds."""
    return (0.5, 1.0) if quick else (1.0, 2.0)


ATTEMPT_TIMEOUT = DEADLINE / 4
"""Seconds one attempt may take before lbkit retries the call elsewhere (Envoy's per-try timeout)."""


def native_best_config(quick: bool) -> dict[str, Any]:
    """The service config giving grpcio's round_robin what lbkit gets here (grpcio 1.85 accepts all of it).

    Retries: lbkit's RetryPolicy defaults as a ``retryPolicy`` for UNAVAILABLE (3 attempts, 10 ms backoff
    doubling up to 0.5 s) with the same per-attempt timeout (``perAttemptRecvTimeout``, which grpcio
    reads only with the ``grpc.experimental.enable_hedging`` channel argument) and the same budget as
    ``retryThrottling`` (100 tokens, 0.1 back per success). Outlier detection (gRFC A50,
    ``outlier_detection_experimental`` around round_robin) with lbkit's interval and ejection times;
    A50 has no consecutive-failure ejection, so failure-percentage ejection stands in for it, sized for
    four servers at this load (``minimumHosts`` 4 and ``requestVolume`` 10, where A50's defaults of 5 and 50
    would never judge). Success-rate ejection is left out: one bad server of four never falls below
    ``mean - 1.9 stdev``. Health: ``healthCheckConfig`` makes grpcio watch ``grpc.health.v1`` (gRFC A17).
    """
    base, longest = _ejection(quick)
    return {
        "loadBalancingConfig": [
            {
                "outlier_detection_experimental": {
                    "interval": "0.5s",
                    "baseEjectionTime": f"{base:g}s",
                    "maxEjectionTime": f"{longest:g}s",
                    "maxEjectionPercent": 10,
                    "failurePercentageEjection": {
                        "threshold": 85,
                        "enforcementPercentage": 100,
                        "minimumHosts": 4,
                        "requestVolume": 10,
                    },
                    "childPolicy": [{"round_robin": {}}],
                }
            }
        ],
        "healthCheckConfig": {"serviceName": ""},
        "methodConfig": [
            {
                "name": [{}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.01s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                    "perAttemptRecvTimeout": f"{ATTEMPT_TIMEOUT:g}s",
                },
            }
        ],
        "retryThrottling": {"maxTokens": 100, "tokenRatio": 0.1},
    }


def native_options(kind: str, quick: bool) -> list[tuple[str, Any]]:
    """Channel options of a native client: the bare round_robin policy, or its best configuration."""
    if kind == NATIVE:
        return [("grpc.service_config", _RR_CONFIG)]
    return [
        ("grpc.service_config", json.dumps(native_best_config(quick))),
        ("grpc.experimental.enable_hedging", 1),  # grpcio reads perAttemptRecvTimeout only with it
    ]


def _lbkit_options(quick: bool) -> dict[str, Any]:
    """Short ejections (so return is timed in seconds), health checks, and a per-attempt timeout."""
    import lbkit

    return {
        "outlier_detection": lbkit.OutlierDetection(
            consecutive_failures=5,
            interval=0.5,
            base_ejection_time=_ejection(quick)[0],
            max_ejection_time=_ejection(quick)[1],
        ),
        "health_check": lbkit.HealthCheck(interval=0.5),
        "retry": lbkit.RetryPolicy(attempt_timeout=ATTEMPT_TIMEOUT),
    }


@contextlib.contextmanager
def _client(
    kind: str, selector: str, addresses: list[str], events: Events, quick: bool, *, faults: bool = True
) -> Iterator[Any]:
    """A sync stub: lbkit with ``selector`` (and fast outlier detection), or native round robin (bare or
    configured)."""
    if kind == LBKIT:
        cls = balancer_class(False)
        with cls(
            StaticDiscovery(addresses),
            selector=selector,
            on_event=events,
            **(_lbkit_options(quick) if faults else {}),
        ) as lb:
            lb.wait_ready(timeout=10.0, count=len(addresses))
            yield pb2_grpc.ModelServiceStub(lb.channel())  # type: ignore[no-untyped-call]
        return
    target = "ipv4:" + ",".join(addresses)
    with grpc.insecure_channel(target, options=native_options(kind, quick)) as channel:
        grpc.channel_ready_future(channel).result(timeout=10.0)
        yield pb2_grpc.ModelServiceStub(channel)  # type: ignore[no-untyped-call]


def _warm(stub: Any, calls: int = 40) -> None:
    call = _caller(stub)
    for _ in range(calls):
        call()


def fault_run(
    servers: ServerProcess,
    kind: str,
    fault: str,
    *,
    rate: float,
    phases: tuple[float, float, float],
    quick: bool,
) -> dict[str, Any]:
    """One fault under load: ``phases`` are seconds before the fault, during it, and after it is lifted."""
    on, off = (cmd.format(i=BAD) for cmd in _FAULTS[fault])
    bad = servers.addresses[BAD]
    events = Events()
    with _client(kind, "round_robin", servers.addresses, events, quick) as stub:
        _warm(stub)
        load = PacedLoad(_caller(stub), rate=rate, workers=64).start()
        with CountPoller(servers) as counts:
            try:
                time.sleep(phases[0])
                t_fault = time.monotonic()
                servers.command(on)
                time.sleep(phases[1])
                t_recover = time.monotonic()
                servers.command(off)
                time.sleep(phases[2])
            finally:
                records = load.stop()
    failed = [r for r in records if not r.ok]
    failed_after = [r for r in failed if r.start >= t_fault]
    counted = fault not in ("killed",)
    seen = True  # whether the moment the client stopped sending can be told at all
    if kind == LBKIT:
        gone = events.first(bad, _GONE, t_fault)
    elif counted:
        gone = counts.first_quiet(BAD, t_fault, t_recover, QUIET_S)
    else:  # a killed server counts nothing: its last failed call, if any failed
        last = max((r.end for r in failed_after), default=None)
        seen = last is not None
        gone = None if last is None or last >= t_recover - QUIET_S else last
    back = next((r.end for r in records if r.ok and r.server == bad and r.start >= t_recover), None)
    return {
        "client": CLIENT_NAMES[kind],
        "fault": fault,
        "calls": len(records),
        "failed": len(failed),
        "failed_codes": sorted({r.code for r in failed}),
        "to_bad_after_fault": counts.between(BAD, t_fault, t_recover) if counted else None,
        "to_bad_before_ejection": counts.between(BAD, t_fault, gone or t_recover) if counted else None,
        "ejected_after_s": None if gone is None else round(gone - t_fault, 3),
        "ejected_seen": seen,
        "back_after_s": None if back is None else round(back - t_recover, 3),
        "fault_s": round(t_recover - t_fault, 3),
        "events": [(round(t - t_fault, 3), k, a) for t, k, a in events.seen if a == bad],
    }


def slow_run(
    servers: ServerProcess, kind: str, selector: str, *, slow: bool, rate: float, duration: float
) -> dict[str, Any]:
    """Steady load with server 1 at 200 ms per call (or all at 2 ms); the bad server's share and the p99."""
    servers.command(f"slow {BAD} {SLOW_MS if slow else FAST_MS}")
    try:
        # The selector alone, with lbkit's defaults: no per-attempt timeout turns slowness into failures.
        with _client(kind, selector, servers.addresses, Events(), True, faults=False) as stub:
            _warm(stub)
            servers.command("reset")
            load = PacedLoad(_caller(stub), rate=rate, workers=64).start()
            time.sleep(duration)
            records = load.stop()
            counts = servers.calls()
    finally:
        servers.command(f"slow {BAD} {FAST_MS}")
    latencies = [r.end - r.start for r in records]
    total = sum(counts)
    return {
        "share": counts[BAD] / total if total else 0.0,
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
        "failed": sum(not r.ok for r in records),
        "calls": len(records),
        "latencies_ms": sorted(round(x * 1e3, 3) for x in latencies),
    }


def _native_summary() -> str:
    """What the configured native client is given, in words, from :func:`native_best_config`."""
    config = native_best_config(quick=False)
    retry = config["methodConfig"][0]["retryPolicy"]
    od = config["loadBalancingConfig"][0]["outlier_detection_experimental"]
    fp = od["failurePercentageEjection"]
    throttle = config["retryThrottling"]
    return (
        f"a retryPolicy for {', '.join(retry['retryableStatusCodes'])} ({retry['maxAttempts']} attempts,"
        f" perAttemptRecvTimeout {retry['perAttemptRecvTimeout']}), retryThrottling ({throttle['maxTokens']}"
        f" tokens, {throttle['tokenRatio']} back per success), outlier_detection_experimental around"
        f" round_robin (failure percentage >= {fp['threshold']} % over >= {fp['requestVolume']} calls per"
        f" {od['interval']} interval, the same ejection times; gRFC A50 has no consecutive-failure"
        " ejection) and healthCheckConfig (grpc.health.v1)"
    )


def _restore(servers: ServerProcess) -> None:
    """Lift every fault from the bad server (after a run that failed midway)."""
    for _, off in _FAULTS.values():
        servers.command(off.format(i=BAD))


def _fault_goal(r: dict[str, Any]) -> str:
    """Pass or fail against the goals: no call fails (retries on), and a failing server gets <= 5 calls."""
    ok = r["failed"] == 0 and r["ejected_after_s"] is not None
    text = "0 failed, ejected"
    if r["fault"] == "fails every call":
        ok = ok and (r["to_bad_before_ejection"] or (0, 0))[1] <= 5
        text += ", <= 5 calls before ejection"
    return f"{'pass' if ok else 'FAIL'} ({text})"


def _fault_rows(
    servers: ServerProcess,
    fault: str,
    kinds: list[str],
    quick: bool,
    rate: float,
    phases: tuple[float, float, float],
    progress: Progress,
    fault_rows: list[list[Any]],
    fault_data: list[dict[str, Any]],
    errors: list[str],
) -> None:
    """Run ``fault`` with each client kind; append its table rows, data and errors."""
    for kind in kinds:
        progress.step(f"{fault} {kind}")
        if kind != LBKIT and quick and (fault != "fails every call" or kind != NATIVE_BEST):
            continue  # a quick run keeps one fault for native, in its best configuration
        try:
            r = fault_run(servers, kind, fault, rate=rate, phases=phases, quick=quick)
        except Exception as exc:
            if kind != LBKIT:
                raise
            errors.append(f"{fault}, lbkit: {type(exc).__name__}: {exc}".splitlines()[0][:200])
            fault_rows.append([fault, "lbkit round_robin", "error", "", "", "", "", "", "", "FAIL"])
            _restore(servers)
            continue
        fault_data.append(r)
        to_bad, first = _bounds(r["to_bad_after_fault"]), _bounds(r["to_bad_before_ejection"])
        fault_rows.append(
            [
                r["fault"],
                r["client"],
                r["calls"],
                r["failed"],
                ", ".join(r["failed_codes"]),
                first,
                to_bad,
                _s(r["ejected_after_s"]) if r["ejected_seen"] else "n/a",
                _s(r["back_after_s"]),
                _fault_goal(r) if kind == LBKIT else "baseline",
            ]
        )


def _bounds(value: tuple[int, int] | None) -> str:
    if value is None:
        return "n/a"
    low, high = value
    return str(high) if low == high else f"{low}-{high}"


def _s(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}"


def run(quick: bool = False) -> Result:
    """Run every fault scenario and the slow-server comparison."""
    missing = lbkit_available()
    rate = 300.0
    phases = (0.3, 0.8, 1.2) if quick else (1.0, 5.0, 4.0)
    slow_duration = 0.7 if quick else 5.0
    kinds = [NATIVE, NATIVE_BEST] + ([] if missing else [LBKIT])
    faults = list(_FAULTS)
    selectors = ["peak_ewma"] if quick else list(SELECTORS)
    slow_variants = [(NATIVE, "round_robin")] + ([] if missing else [(LBKIT, s) for s in selectors])
    progress = Progress("faults", len(kinds) * len(faults) + 2 * len(slow_variants))
    fault_rows: list[list[Any]] = []
    fault_data: list[dict[str, Any]] = []
    slow_data: dict[str, dict[str, Any]] = {}
    errors: list[str] = []
    with ServerProcess(count=4, delay_ms=FAST_MS) as shared:
        for fault in faults:
            # A kill is a SIGKILL of one server's own process; the other faults share one server process.
            killable = fault == "killed"
            servers = ServerProcess(count=4, delay_ms=FAST_MS, processes=True) if killable else shared
            with contextlib.ExitStack() as stack:
                if killable:
                    stack.enter_context(servers)
                _fault_rows(
                    servers, fault, kinds, quick, rate, phases, progress, fault_rows, fault_data, errors
                )

        for kind, selector in slow_variants:
            name = f"{kind} {selector}"
            progress.step(f"slow server, {name}, all healthy")
            try:
                healthy = slow_run(shared, kind, selector, slow=False, rate=rate, duration=slow_duration)
                progress.step(f"slow server, {name}, one slow")
                slowed = slow_run(shared, kind, selector, slow=True, rate=rate, duration=slow_duration)
            except Exception as exc:
                if kind != LBKIT:
                    raise
                errors.append(f"slow server, {name}: {type(exc).__name__}: {exc}".splitlines()[0][:200])
                continue
            slow_data[name] = {"healthy": healthy, "slow": slowed}
    progress.close()

    rr_share = slow_data.get("lbkit round_robin", slow_data["native round_robin"])["slow"]["share"]
    slow_rows: list[list[Any]] = []
    for name, d in slow_data.items():
        share, p99, p99_healthy = d["slow"]["share"], d["slow"]["p99_ms"], d["healthy"]["p99_ms"]
        ratio = p99 / p99_healthy if p99_healthy else float("nan")
        goal = ""
        if name == "lbkit peak_ewma":
            goal = "pass" if share <= 0.01 and ratio <= 1.5 else "FAIL"
            goal += " (share <= 1 %, p99 <= 1.5x healthy)"
        elif name == "lbkit least_connections":
            goal = "pass" if share <= rr_share / 2 else "FAIL"
            goal += f" (share <= {rr_share / 2:.1%}, half of round robin's)"
        elif name.endswith("round_robin"):
            goal = "expected ~25 %"
        slow_rows.append(
            [
                name,
                f"{share:.1%}",
                f"{d['healthy']['p99_ms']:.1f}",
                f"{p99:.1f}",
                f"{ratio:.2f}x",
                d["slow"]["failed"],
                goal,
            ]
        )
    notes = [
        f"Paced load of {rate:g} calls/s (64 threads at most in flight), {DEADLINE:g} s deadline per call,"
        f" servers at {FAST_MS:g} ms per call; the fault hits server {BAD} of 4.",
        f"Fault phases: {phases[0]:g} s healthy, {phases[1]:g} s faulty, {phases[2]:g} s after recovery.",
        "lbkit runs round_robin with its default retries, outlier detection of 5 consecutive failures with"
        f" short ejections ({_ejection(quick)[0]:g} s, at most {_ejection(quick)[1]:g} s, so the return is"
        f" timed in seconds), active health checks every 0.5 s, and a per-attempt timeout of"
        f" {ATTEMPT_TIMEOUT:g} s (RetryPolicy.attempt_timeout: an attempt on a hung server is retried"
        " elsewhere within the call's deadline; without it, calls sent to a hung server fail with"
        " DEADLINE_EXCEEDED until it is ejected).",
        "'native round_robin' is grpcio's policy as it comes (no retries, no outlier detection, no health"
        " checks): what an unconfigured channel does. 'native round_robin, configured' is grpcio given the"
        f" same as lbkit through its service config: {_native_summary()}. Failed calls compare the two"
        " libraries on that row, not their defaults.",
        "The servers count the calls they get, sampled every 10 ms, so counts are shown as a range (the goal"
        " is judged on its top): 'before ejection' from the fault to the first ejection, 'during fault' all"
        " the time it was faulty, including probes after each ejection ends. Retried calls succeed on other"
        " servers.",
        "'ejected after' is the first ejected/not-ready/unhealthy event for the bad server (lbkit); for"
        f" native clients, which tell nothing, the last call the bad server got before a {QUIET_S:g} s span"
        " without one (for a killed server, which counts nothing, the last failed call: n/a when none"
        " failed); 'never' if it kept getting calls. 'back after' is the first call it served after"
        " recovery ('never' within the phase after it).",
        "'killed' SIGKILLs the server's own process (the servers run one process each for this scenario);"
        " a killed server cannot count its calls: n/a.",
    ]
    notes[:0] = errors
    if missing:
        notes.insert(0, f"lbkit rows skipped: {missing}.")
    return {
        "title": "Faults under load: ejection, return and slow servers",
        "tables": [
            {
                "caption": "One server of four faulty under steady load",
                "columns": [
                    "fault",
                    "client",
                    "calls",
                    "failed (client)",
                    "codes",
                    "to bad server before ejection",
                    "to bad server during fault",
                    "ejected after s",
                    "back after s",
                    "goal",
                ],
                "rows": fault_rows,
            },
            {
                "caption": f"One server of four at {SLOW_MS:g} ms per call (others {FAST_MS:g} ms)",
                "columns": [
                    "client",
                    "share to slow server",
                    "p99 ms all healthy",
                    "p99 ms one slow",
                    "p99 vs healthy",
                    "failed",
                    "goal",
                ],
                "rows": slow_rows,
            },
        ],
        "notes": notes,
        "data": {"rate": rate, "phases_s": phases, "faults": fault_data, "slow": slow_data},
    }


def main() -> None:
    """``python -m benchmarks.faults [--quick]``."""
    module_main("faults", run)


if __name__ == "__main__":
    main()

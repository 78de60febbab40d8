"""Soak: 300 calls/s of every call kind over 6 servers found through Consul, under faults on a schedule.

``python -m benchmarks.soak --minutes 10`` gives the published figures; ``--quick`` runs 25 s of load.

Six real grpc model servers run one per process (``lbkit.testing.server_process --processes``), registered
with gRPC health checks in the Consul-compatible test server, itself in a child process so that it can be
restarted with its state, as an agent keeps its services across a restart. 300 calls/s go over
``ConsulDiscovery``, half from this process through ``lbkit.Balancer`` (threads), half from a child process
through ``lbkit.aio.Balancer`` (an event loop: one sharing a process with hundreds of call threads would
wait for the GIL): unary ``Predict``, server-streaming ``StreamPredict``, a ping-pong bidi
``UpdateFeatures`` (each update sent once the previous one's ack arrived) and client-streaming
``UploadFeatures``, each method under its own policy through ``retry=``: the reads retry, with a
per-attempt timeout; the writes, not idempotent, have their retries off.
Faults follow one another on a schedule, each on another server: a kill and a restart, a health flap, a hang,
a hang that ends in deregistration (calls in flight when the drain times out), a deregistration storm (three
servers out and back, four times) and a Consul restart. At most three servers are out at once.

Every call carries a request id (``x-request-id``) that the servers append to a shared log as they start
executing it, so the run sees which calls executed twice. Judged, each against its goal:

- **calls that could have succeeded elsewhere** (goal 0): calls that failed although, for the whole call
  (from ``SETTLE`` seconds before it started to its end), some endpoint other than those it executed on was
  serving (its process up, not hung, health SERVING, registered in Consul), the call could still have been
  moved there without running twice (no response yet; its method retries, or no server executed it and
  none was killed or hung under it), and the run's own load did not fail it (see :func:`_why_failed`:
  a call that ran only on servers with no fault, or timed out while the client was starved of CPU, is
  counted apart);
- **calls executed twice** on servers, for methods whose retries are off (goal 0);
- **calls in flight** in the balancers' counts once every call has ended (goal 0);
- **growth of RSS and of thread count** of each client process, from the end of the first round of
  faults to the end of the run (goal <= 5 %, judged on the process that grew most).

The run is bounded in calls and in time, stops by itself and stops every process it started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc

from benchmarks._common import Result, fmt, percentile, render_result

__all__ = ["Plan", "main", "plan", "run", "soak"]

SERVICE = "soak-models"
PACKAGE_SERVICE = "lbkit.inference.v1.ModelService"
RATE = 300.0
"""Calls per second, all kinds together."""
SERVERS = 6
DELAY_MS = 5.0
"""Each server's time per unary call and per streamed token."""
CALL_TIMEOUT = 3.0
ATTEMPT_TIMEOUT = 1.0
"""Per-attempt timeout of the methods that retry (for a stream, its wait for the first response): a hung
server costs them one attempt, not the call. Far above a healthy attempt's time even on a loaded machine
(a server answers in milliseconds), so that a slow client is not mistaken for a hung server."""
STARVED = 0.25
"""Seconds by which a 50 ms sleep of the client (a thread, or a task on its event loop) must overrun to
count as starved: a call that timed out while its client was that starved failed of the run's own load."""
SETTLE = 2.0
"""Seconds an endpoint must have been serving before it counts as one a call could have gone to."""
TOKENS = 4
"""Responses of each StreamPredict, requests of each UpdateFeatures and client stream."""
MAX_OUTSTANDING = 400
"""Calls the client lets run at once; a call due beyond that is not sent (and counted)."""
GROWTH_GOAL = 0.05
REQUEST_ID = "x-request-id"


@dataclass(frozen=True)
class Plan:
    """How long the run lasts and how its faults are paced."""

    seconds: float
    """Seconds of load."""
    warmup: float
    """Seconds of load before the first fault."""
    fault: float
    """Seconds each fault lasts."""
    gap: float
    """Seconds between the end of one fault and the start of the next."""
    cooldown: float
    """Seconds of load after the last fault ends."""

    @property
    def max_calls(self) -> int:
        """The most calls the run sends."""
        return int(self.seconds * RATE) + 1


def plan(minutes: float | None, quick: bool) -> Plan:
    """The plan for ``--minutes`` (default 10), or the quick one (25 s of load)."""
    if quick:
        return Plan(seconds=25.0, warmup=2.0, fault=1.0, gap=1.0, cooldown=3.0)
    seconds = 60.0 * (10.0 if minutes is None else minutes)
    if seconds < 30.0:
        raise ValueError(f"--minutes must be at least 0.5, got {minutes}")
    return Plan(seconds=seconds, warmup=5.0, fault=3.0, gap=3.0, cooldown=6.0)


# --------------------------------------------------------------------------- Consul in a child process


def _consul_child() -> None:
    """Serve the Consul test server; ``stop``/``start`` on stdin restart it with its state (child mode)."""
    from lbkit.testing.consul import ConsulServer

    server = ConsulServer().start()
    print(f"READY {server.address}", flush=True)
    try:
        for line in sys.stdin:
            verb = line.strip()
            if verb == "stop":
                server.stop()
            elif verb == "start":
                server.start()
            elif verb == "quit":
                break
            print("OK", flush=True)
    finally:
        server.stop()


class ConsulProcess:
    """The Consul test server in a child process; :meth:`stop` and :meth:`start` restart it in place."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.soak", "--consul-child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.pid = self._proc.pid
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, name="soak-consul-out", daemon=True).start()
        try:
            line = self._read(20.0)
            if not line.startswith("READY "):
                raise RuntimeError(f"consul child said {line!r}")
        except BaseException:
            self.close()
            raise
        self.address = line.split()[1]

    def _pump(self) -> None:
        assert self._proc.stdout is not None
        with contextlib.suppress(OSError, ValueError):
            for line in self._proc.stdout:
                self._lines.put(line.strip())
        self._lines.put("EOF")

    def _read(self, timeout: float = 10.0) -> str:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"consul child did not answer within {timeout} s") from None

    def command(self, verb: str) -> None:
        """Send ``stop`` or ``start`` and wait for it to be done."""
        assert self._proc.stdin is not None
        self._proc.stdin.write(verb + "\n")
        self._proc.stdin.flush()
        if self._read() != "OK":
            raise RuntimeError(f"consul child did not do {verb!r}")

    def close(self) -> None:
        """Stop the child (kill it if it does not exit within 5 s)."""
        with contextlib.suppress(OSError):
            assert self._proc.stdin is not None
            self._proc.stdin.write("quit\n")
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=5.0)


# --------------------------------------------------------------------------- what was true when


@dataclass
class Truth:
    """Which servers were serving when: the ground truth the run's failures are judged against."""

    count: int
    out: list[set[str]] = field(default_factory=list)
    """Per server, the faults in force (killed, hung, unhealthy, deregistered)."""
    changes: list[list[tuple[float, bool]]] = field(default_factory=list)
    """Per server, (time, serving) at each change."""
    strikes: list[list[tuple[float, float]]] = field(default_factory=list)
    """Per server, (start, end) of each kill or hang: calls running on it then could not finish there."""
    faults: Counter[str] = field(default_factory=Counter)
    log: list[tuple[float, str]] = field(default_factory=list)
    """(time, name) of each fault injected."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.out = [set() for _ in range(self.count)]
        self.changes = [[(0.0, True)] for _ in range(self.count)]
        self.strikes = [[] for _ in range(self.count)]

    def set(self, index: int, fault: str, on: bool) -> None:
        """Record that ``fault`` starts (``on``) or ends on server ``index`` now."""
        now = time.monotonic()
        with self.lock:
            before = not self.out[index]
            if on:
                self.out[index].add(fault)
            else:
                self.out[index].discard(fault)
            after = not self.out[index]
            if before != after:
                self.changes[index].append((now, after))
            if fault in ("killed", "hung"):
                if on:
                    self.strikes[index].append((now, float("inf")))
                elif self.strikes[index] and self.strikes[index][-1][1] == float("inf"):
                    self.strikes[index][-1] = (self.strikes[index][-1][0], now)

    def serving_throughout(self, index: int, start: float, end: float) -> bool:
        """Whether server ``index`` was serving over all of [start, end]."""
        state = True
        for t, serving in self.changes[index]:
            if t <= start:
                state = serving
            elif t <= end and not serving:
                return False
        return state

    def struck(self, index: int, start: float, end: float) -> bool:
        """Whether a kill or hang of server ``index`` overlapped [start, end]."""
        return any(s <= end and e >= start for s, e in self.strikes[index])


# --------------------------------------------------------------------------- the calls


@dataclass
class Call:
    """One call in progress: the responses it has received so far."""

    responses: int = 0


class Records:
    """What the client saw of every call, in arrays allocated before the load starts, so that keeping the
    records does not grow the process the run measures. Call ``seq`` has request id ``c{seq}``."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.start = array("d", bytes(8 * size))
        self.end = array("d", bytes(8 * size))
        self.ok = array("b", bytes(size))
        self.responses = array("i", bytes(4 * size))
        self.code = array("h", bytes(2 * size))
        self.codes = [""]
        """Error names; ``code`` holds indices into it (0: none)."""
        self.sent = 0

    def code_index(self, name: str) -> int:
        """The index of error ``name`` in :attr:`codes` (added on first use)."""
        try:
            return self.codes.index(name)
        except ValueError:
            self.codes.append(name)
            return len(self.codes) - 1


@dataclass(frozen=True)
class Kind:
    """One call kind in one client mode: its method, whether its retries are on, how to make a call."""

    name: str
    method: str
    retries: bool
    aio: bool
    invoke: Callable[[Any, list[tuple[str, str]], Call], Any]
    """``invoke(stub, metadata, call)``: the call, made and read to its end (a coroutine for asyncio)."""


def policies() -> dict[str, Any]:
    """Each method's retry policy, by ``retry=`` pattern: the reads retry (with a per-attempt timeout),
    the writes that are not idempotent have their retries off (only an attempt that provably never left
    the client is made again)."""
    import lbkit

    reads = lbkit.RetryPolicy(max_attempts=3, attempt_timeout=ATTEMPT_TIMEOUT)
    writes = lbkit.RetryPolicy(retryable_codes=())
    return {
        f"/{PACKAGE_SERVICE}/Predict": reads,
        f"/{PACKAGE_SERVICE}/StreamPredict": reads,
        f"/{PACKAGE_SERVICE}/UpdateFeatures": writes,
        f"/{PACKAGE_SERVICE}/UploadFeatures": writes,
    }


def _kinds(pb2: Any) -> list[Kind]:
    """Every call kind, sync and asyncio: unary, server stream, ping-pong bidi (each update sent once the
    previous one's ack arrived) and client stream."""
    retry = policies()

    def retries(method: str) -> bool:
        return bool(retry[f"/{PACKAGE_SERVICE}/{method}"].retryable_codes)

    predict = pb2.PredictRequest(features=[1.0, 2.0])
    stream_request = pb2.PredictRequest(features=[1.0], max_tokens=TOKENS)

    def update(i: int) -> Any:
        return pb2.FeatureUpdate(entity_id="e", sequence=i, features={"x": float(i)})

    def unary(stub: Any, md: list[tuple[str, str]], call: Call) -> None:
        stub.Predict(predict, timeout=CALL_TIMEOUT, metadata=md)
        call.responses = 1

    def server_stream(stub: Any, md: list[tuple[str, str]], call: Call) -> None:
        for _ in stub.StreamPredict(stream_request, timeout=CALL_TIMEOUT, metadata=md):
            call.responses += 1
        if call.responses != TOKENS:
            raise RuntimeError(f"{call.responses} tokens of {TOKENS}")

    def bidi(stub: Any, md: list[tuple[str, str]], call: Call) -> None:
        acks: queue.Queue[int] = queue.Queue()

        def updates() -> Iterator[Any]:
            for i in range(TOKENS):
                yield update(i)
                try:
                    if acks.get(timeout=CALL_TIMEOUT) != i:
                        return
                except queue.Empty:
                    return

        try:
            for ack in stub.UpdateFeatures(updates(), timeout=CALL_TIMEOUT, metadata=md):
                call.responses += 1
                acks.put(ack.sequence)
        finally:
            acks.put(-1)  # over: the request iterator (on grpc's thread) returns now
        if call.responses != TOKENS:
            raise RuntimeError(f"{call.responses} acks of {TOKENS}")

    def client_stream(stub: Any, md: list[tuple[str, str]], call: Call) -> None:
        summary = stub.UploadFeatures((update(i) for i in range(TOKENS)), timeout=CALL_TIMEOUT, metadata=md)
        call.responses = 1
        if summary.count != TOKENS:
            raise RuntimeError(f"{summary.count} updates of {TOKENS} arrived")

    async def aunary(stub: Any, md: list[tuple[str, str]], call: Call) -> None:
        await stub.Predict(predict, timeout=CALL_TIMEOUT, metadata=md)
        call.responses = 1

    async def aserver_stream(stub: Any, md: list[tuple[str, str]], call: Call) -> None:
        async for _ in stub.StreamPredict(stream_request, timeout=CALL_TIMEOUT, metadata=md):
            call.responses += 1
        if call.responses != TOKENS:
            raise RuntimeError(f"{call.responses} tokens of {TOKENS}")

    async def abidi(stub: Any, md: list[tuple[str, str]], call: Call) -> None:
        acks: asyncio.Queue[int] = asyncio.Queue()

        async def updates() -> AsyncIterator[Any]:
            for i in range(TOKENS):
                yield update(i)
                try:
                    if await asyncio.wait_for(acks.get(), CALL_TIMEOUT) != i:
                        return
                except asyncio.TimeoutError:
                    return

        async for ack in stub.UpdateFeatures(updates(), timeout=CALL_TIMEOUT, metadata=md):
            call.responses += 1
            acks.put_nowait(ack.sequence)
        if call.responses != TOKENS:
            raise RuntimeError(f"{call.responses} acks of {TOKENS}")

    async def aclient_stream(stub: Any, md: list[tuple[str, str]], call: Call) -> None:
        async def updates() -> AsyncIterator[Any]:
            for i in range(TOKENS):
                yield update(i)

        summary = await stub.UploadFeatures(updates(), timeout=CALL_TIMEOUT, metadata=md)
        call.responses = 1
        if summary.count != TOKENS:
            raise RuntimeError(f"{summary.count} updates of {TOKENS} arrived")

    table = (
        ("unary", "Predict", unary, aunary),
        ("server stream", "StreamPredict", server_stream, aserver_stream),
        ("ping-pong bidi", "UpdateFeatures", bidi, abidi),
        ("client stream", "UploadFeatures", client_stream, aclient_stream),
    )
    kinds = []
    for name, method, sync_invoke, aio_invoke in table:
        kinds.append(Kind(f"{name}, sync", method, retries(method), False, sync_invoke))
        kinds.append(Kind(f"{name}, asyncio", method, retries(method), True, aio_invoke))
    return kinds


class Lag:
    """How late the client's 50 ms sleeps wake, on a thread and on the asyncio loop: when the client
    itself was starved of CPU (spans of ``STARVED`` or more)."""

    def __init__(self) -> None:
        self.starved: list[tuple[float, float]] = []
        """(start, end) of each sleep that overran by ``STARVED`` seconds or more."""
        self.worst = 0.0
        self._lock = threading.Lock()

    def note(self, asked_at: float, woke: float, seconds: float) -> None:
        late = woke - asked_at - seconds
        if late > self.worst:
            self.worst = late
        if late >= STARVED:
            with self._lock:
                self.starved.append((asked_at, woke))

    def thread(self, stop: threading.Event) -> None:
        while not stop.is_set():
            asked = time.monotonic()
            time.sleep(0.05)
            self.note(asked, time.monotonic(), 0.05)

    async def loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            asked = time.monotonic()
            await asyncio.sleep(0.05)
            self.note(asked, time.monotonic(), 0.05)

    def during(self, start: float, end: float) -> bool:
        """Whether the client was starved at some time in [start, end]."""
        return any(s <= end and e >= start for s, e in self.starved)


# --------------------------------------------------------------------------- the client process's size


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _thread_names() -> list[str]:
    """The names of this process's threads, native ones included (their kernel names), less the run's own
    (named ``soak-...``)."""
    own = {t.native_id for t in threading.enumerate() if t.name.startswith("soak-")}
    names = []
    for task in os.listdir("/proc/self/task"):
        if int(task) not in own:
            with contextlib.suppress(OSError), open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
    return sorted(names)


def _threads() -> int:
    """Threads of this process, native ones included, less the run's own (named ``soak-...``)."""
    return len(_thread_names())


# --------------------------------------------------------------------------- the run


class _Cluster:
    """The servers, their registrations and Consul; every fault the schedule injects."""

    def __init__(self, log_path: str, truth: Truth) -> None:
        from lbkit.registration import GrpcCheck, Registration
        from lbkit.testing.server_process import ServerProcess

        self.truth = truth
        self.consul: ConsulProcess | None = None
        self.servers: ServerProcess | None = None
        self.registrations: list[Any] = []
        self.lost: set[int] = set()
        """Servers that could not be started again after a kill (their port was taken)."""
        try:
            self.consul = ConsulProcess()
            self.servers = ServerProcess(
                SERVERS, delay_ms=DELAY_MS, processes=True, request_log=log_path, command_timeout=10.0
            )
            self.servers.start()
            check = GrpcCheck(interval=1.0, timeout=1.0, deregister_after=300.0)
            for index, address in enumerate(self.servers.addresses):
                registration = Registration(
                    SERVICE,
                    address,
                    service_id=f"{SERVICE}-{index}",
                    check=check,
                    consul_address=self.consul.address,
                    env={},
                )
                registration.register()
                self.registrations.append(registration)
        except BaseException:
            self.close()
            raise

    @property
    def addresses(self) -> list[str]:
        assert self.servers is not None
        return self.servers.addresses

    def _server(self, text: str) -> None:
        assert self.servers is not None
        self.servers.command(text)

    # Each fault: (name, start, end); the schedule runs start, waits, runs end.
    def kill(self, k: int, on: bool) -> None:
        if on:
            self.truth.set(k, "killed", True)
            self._server(f"kill {k}")
        else:
            # The killed server's port may have been taken meanwhile (an ephemeral port is free once its
            # server dies): try again for a while, then count the server as lost for the rest of the run.
            for _ in range(20):
                try:
                    self._server(f"start {k}")
                except RuntimeError:
                    time.sleep(0.5)
                    continue
                self.truth.set(k, "killed", False)
                return
            self.lost.add(k)
            with contextlib.suppress(Exception):
                self.registrations[k].deregister()

    def flap(self, k: int, on: bool) -> None:
        self._server(f"serving {k} {'off' if on else 'on'}")
        self.truth.set(k, "unhealthy", on)

    def hang(self, k: int, on: bool) -> None:
        if on:
            self.truth.set(k, "hung", True)
        self._server(f"hang {k} {'on' if on else 'off'}")
        if not on:
            self.truth.set(k, "hung", False)

    def registered(self, k: int, on: bool) -> None:
        if on:
            self.registrations[k].register()
            self.truth.set(k, "deregistered", False)
        else:
            self.truth.set(k, "deregistered", True)
            self.registrations[k].deregister()

    def consul_up(self, on: bool) -> None:
        assert self.consul is not None
        self.consul.command("start" if on else "stop")

    def close(self) -> None:
        for registration in self.registrations:
            with contextlib.suppress(Exception):
                registration.close()
        self.registrations = []
        servers, self.servers = self.servers, None
        if servers is not None:
            servers.close()
        consul, self.consul = self.consul, None
        if consul is not None:
            consul.close()


FAULTS = (
    "kill and restart",
    "health flap",
    "hang",
    "hung, then deregistered",
    "deregistration storm",
    "Consul restart",
)
"""The faults, in the order the schedule injects them (each on the next server)."""


def _fault(cluster: _Cluster, name: str, k: int, p: Plan) -> tuple[Callable[[], None], Callable[[], None]]:
    """How to start and how to end fault ``name`` on server ``k``."""
    if name == "kill and restart":
        return lambda: cluster.kill(k, True), lambda: cluster.kill(k, False)
    if name == "health flap":
        return lambda: cluster.flap(k, True), lambda: cluster.flap(k, False)
    if name == "hang":
        return lambda: cluster.hang(k, True), lambda: cluster.hang(k, False)
    if name == "hung, then deregistered":

        def hang_then_leave() -> None:
            cluster.hang(k, True)
            time.sleep(0.3)
            cluster.registered(k, False)

        def back() -> None:
            cluster.hang(k, False)
            cluster.registered(k, True)

        return hang_then_leave, back
    if name == "deregistration storm":
        group = [i for i in ((k + j) % SERVERS for j in range(SERVERS)) if i not in cluster.lost][:3]

        def storm() -> None:
            for _ in range(3):
                for i in group:
                    cluster.registered(i, False)
                time.sleep(p.fault / 8)
                for i in group:
                    cluster.registered(i, True)
                time.sleep(p.fault / 8)
            for i in group:
                cluster.registered(i, False)

        def calm() -> None:
            for i in group:
                cluster.registered(i, True)

        return storm, calm
    if name == "Consul restart":
        return lambda: cluster.consul_up(False), lambda: cluster.consul_up(True)
    raise ValueError(f"no fault {name!r}")


def _schedule(
    cluster: _Cluster,
    p: Plan,
    stop_at: float,
    stop: threading.Event,
    after_round: Callable[[], None],
    each_round: Callable[[int], None] = lambda _n: None,
) -> list[str]:
    """Inject faults one after another until ``stop_at``, calling ``after_round`` once every kind of fault
    has been injected once, and ``each_round(n)`` after each round n (1, 2, ...); return their names, in
    order."""
    done: list[str] = []

    def pause(seconds: float) -> bool:
        return not stop.wait(max(0.0, min(seconds, stop_at - time.monotonic())))

    if not pause(p.warmup):
        return done
    step = 0
    while time.monotonic() + p.fault + p.gap < stop_at and not stop.is_set():
        name = FAULTS[step % len(FAULTS)]
        k = next((step + i) % SERVERS for i in range(SERVERS) if (step + i) % SERVERS not in cluster.lost)
        begin, end = _fault(cluster, name, k, p)
        begin()
        cluster.truth.faults[name] += 1
        cluster.truth.log.append((time.monotonic(), name))
        done.append(name)
        try:
            pause(p.fault)
        finally:
            end()
        step += 1
        if step == len(FAULTS):
            after_round()
        if step % len(FAULTS) == 0:
            each_round(step // len(FAULTS))
        if not pause(p.gap):
            break
    return done


def _balancer(aio: bool, consul_address: str) -> Any:
    """The client's balancer (sync or asyncio), every method under its own policy (:func:`policies`)."""
    import lbkit
    import lbkit.aio

    cls = lbkit.aio.Balancer if aio else lbkit.Balancer
    return cls(
        lbkit.ConsulDiscovery(
            SERVICE, address=consul_address, env={}, wait=10.0, backoff_initial=0.1, backoff_max=1.0
        ),
        selector="least_connections",
        health_check=lbkit.HealthCheck(interval=0.5, timeout=0.5),
        outlier_detection=lbkit.OutlierDetection(interval=0.5, base_ejection_time=2.0),
        retry=policies(),
        wait_timeout=CALL_TIMEOUT,
        drain_timeout=1.0,
    )


class _ClientRun:
    """One client process's half of the load: sync (``lbkit.Balancer``, a thread per call) or asyncio
    (``lbkit.aio.Balancer``, an event loop on a thread), sending every other call number at half the rate.

    The asyncio client runs in a child process of its own (:class:`_ChildClient`): an event loop sharing a
    process with hundreds of busy call threads waits for the GIL, so its calls time out for that alone.
    """

    def __init__(self, aio: bool, consul_address: str, p: Plan) -> None:
        from lbkit.testing.model_server import pb2, pb2_grpc

        self.aio = aio
        self.kinds = _kinds(pb2)
        self.p = p
        self.records = Records(p.max_calls)
        self.lag = Lag()
        self.stop = threading.Event()
        self.quiet = threading.Event()
        """Set while the client sends nothing, so that no call is running when the process is measured."""
        self.samples: dict[str, tuple[int, int]] = {}
        self.thread_names: dict[str, list[str]] = {}
        """The threads counted in each sample, by name."""
        self.rounds: list[dict[str, Any]] = []
        """A sample after each round of faults, taken with calls running (see :meth:`sample`)."""
        self.not_sent = 0
        self.running = 0
        self.idle = threading.Condition()
        self.free = threading.Semaphore(MAX_OUTSTANDING // 2)
        self.pool: ThreadPoolExecutor | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        """The asyncio calls running: held here, as the loop holds its tasks only weakly."""
        self.dispatcher: threading.Thread | None = None
        self.closed = False
        if aio:
            loop = self.loop = asyncio.new_event_loop()
            self._loop_thread = threading.Thread(target=loop.run_forever, name="soak-aio", daemon=True)
            self._loop_thread.start()

            async def open_() -> Any:
                lb = _balancer(True, consul_address)
                await lb.start()
                await lb.wait_ready(timeout=20.0, count=SERVERS)
                self.tasks.add(loop.create_task(self.lag.loop(self.stop)))
                return lb

            self.lb = self._on_loop(open_(), 30.0)
        else:
            self.lb = _balancer(False, consul_address).start()
            self.lb.wait_ready(timeout=20.0, count=SERVERS)
            # Every worker thread exists before the load: the harness's own threads do not grow during it.
            workers = MAX_OUTSTANDING // 2
            self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="soak-call")
            gate = threading.Barrier(workers + 1)
            for _ in range(workers):
                self.pool.submit(gate.wait, 10.0)
            gate.wait(10.0)
            threading.Thread(target=self.lag.thread, args=(self.stop,), name="soak-lag", daemon=True).start()
        self.stub = pb2_grpc.ModelServiceStub(self.lb.channel())

    def _on_loop(self, coro: Any, timeout: float) -> Any:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _record(self, seq: int, call: Call, error: BaseException | None) -> None:
        records = self.records
        if error is None:
            records.ok[seq] = 1
        elif isinstance(error, grpc.RpcError) and callable(getattr(error, "code", None)):
            code = error.code()
            records.code[seq] = records.code_index(code.name if code is not None else "UNKNOWN")
        else:
            records.code[seq] = records.code_index(type(error).__name__)
        records.end[seq] = time.monotonic()
        records.responses[seq] = call.responses
        self.free.release()
        with self.idle:
            self.running -= 1
            self.idle.notify_all()

    def _one(self, seq: int) -> None:
        call = Call()
        error: BaseException | None = None
        try:
            self.kinds[seq % len(self.kinds)].invoke(self.stub, [(REQUEST_ID, f"c{seq}")], call)
        except BaseException as exc:
            error = exc
        self._record(seq, call, error)

    async def _aone(self, seq: int) -> None:
        call = Call()
        error: BaseException | None = None
        try:
            await self.kinds[seq % len(self.kinds)].invoke(self.stub, [(REQUEST_ID, f"c{seq}")], call)
        except BaseException as exc:  # a CancelledError too: nobody cancels these calls
            error = exc
        self._record(seq, call, error)

    def _start_task(self, seq: int) -> None:
        task = asyncio.get_running_loop().create_task(self._aone(seq))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def start(self, load_end: float) -> None:
        """Send calls until ``load_end`` (``time.monotonic()``, the same clock in every process)."""
        self.dispatcher = threading.Thread(
            target=self._dispatch, args=(load_end,), name="soak-dispatch", daemon=True
        )
        self.dispatcher.start()

    def _dispatch(self, load_end: float) -> None:
        rate = RATE / 2
        due = time.monotonic()
        seq = int(self.aio)  # the sync client's calls are the even numbers, the asyncio client's the odd
        records = self.records
        while seq < self.p.max_calls:
            now = time.monotonic()
            if now >= load_end or self.stop.is_set():
                break
            if self.quiet.is_set():
                self.stop.wait(0.01)
                due = time.monotonic()
                continue
            if due > now:
                time.sleep(due - now)
            due = max(due + 1.0 / rate, time.monotonic() - 1.0)  # never a burst after a stall
            current, seq = seq, seq + 2
            if not self.free.acquire(blocking=False):
                self.not_sent += 1
                continue
            records.start[current] = time.monotonic()
            records.sent = current + 1
            with self.idle:
                self.running += 1
            if self.loop is not None:
                self.loop.call_soon_threadsafe(self._start_task, current)
            else:
                assert self.pool is not None
                self.pool.submit(self._one, current)

    def measure(self, name: str) -> None:
        """Sample RSS and threads with no call running (grpc runs a thread per sync stream call)."""
        self.quiet.set()
        with self.idle:
            self.idle.wait_for(lambda: self.running == 0, timeout=CALL_TIMEOUT * 2 + 1.0)
        time.sleep(0.3)  # the calls' own threads end and the balancers' done-callbacks run
        names = _thread_names()
        self.samples[name] = (_rss_bytes(), len(names))
        self.thread_names[name] = names
        self.quiet.clear()

    def sample(self, round_no: int) -> None:
        """RSS, threads (by name) and objects tracked by the garbage collector now, calls running: the
        trend over the rounds tells a leak (growing every round) from a pool or allocator settling."""
        names = _thread_names()
        self.rounds.append(
            {
                "round": round_no,
                "rss_mb": round(_rss_bytes() / 2**20, 1),
                "threads": len(names),
                "thread_names": dict(Counter(names)),
                "objects": len(gc.get_objects()),
            }
        )

    def finish(self) -> dict[str, Any]:
        """Stop sending, wait for the calls running, measure; close the balancer. The client's figures."""
        if self.dispatcher is not None:
            self.dispatcher.join(timeout=max(0.0, self.p.seconds) + 5.0)
        self.stop.set()
        with self.idle:
            self.idle.wait_for(lambda: self.running == 0, timeout=CALL_TIMEOUT * 3 + 5.0)
            unfinished = self.running
        self.measure("end")
        lb = self.lb
        figures = {
            "unfinished": unfinished,
            "not_sent": self.not_sent,
            "in_flight": {
                "total_in_flight": lb.stats.total_in_flight,
                "endpoints_in_flight": sum(abs(e.in_flight) for e in lb.stats),
            },
            "retries": {"made": lb.calls_retried, "refused by the budget": lb.budget.refused},
            "samples": self.samples,
            "thread_names": self.thread_names,
            "rounds": self.rounds,
            "starved": self.lag.starved,
            "worst_lag": self.lag.worst,
        }
        self.close()
        return figures

    def close(self) -> None:
        """Stop the load and close the balancer (once)."""
        if self.closed:
            return
        self.closed = True
        self.stop.set()
        if self.loop is not None:
            with contextlib.suppress(Exception):
                self._on_loop(self.lb.aclose(), 10.0)
            self.loop.call_soon_threadsafe(self.loop.stop)
            assert self._loop_thread is not None
            self._loop_thread.join(10.0)
            if not self._loop_thread.is_alive():
                self.loop.close()
        else:
            with contextlib.suppress(Exception):
                self.lb.close()
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


def _client_child(consul_address: str, seconds: float) -> None:
    """The asyncio client in a child process: commands on stdin, answers on stdout (child mode)."""
    p = Plan(seconds=seconds, warmup=0.0, fault=0.0, gap=0.0, cooldown=0.0)
    run = _ClientRun(True, consul_address, p)
    print("READY", flush=True)
    try:
        for line in sys.stdin:
            verb, _, arg = line.strip().partition(" ")
            if verb == "go":
                run.start(float(arg))
            elif verb == "measure":
                run.measure(arg)
            elif verb == "sample":
                run.sample(int(arg))
            elif verb == "finish":
                figures = run.finish()
                r = run.records
                figures["records"] = {
                    "start": list(r.start),
                    "end": list(r.end),
                    "ok": list(r.ok),
                    "responses": list(r.responses),
                    "code": [r.codes[i] for i in r.code],
                    "sent": r.sent,
                }
                with open(arg, "w") as f:
                    json.dump(figures, f)
            elif verb == "quit":
                break
            print("OK", flush=True)
    finally:
        run.close()


class _ChildClient:
    """The asyncio client's child process, driven like a :class:`_ClientRun`."""

    def __init__(self, consul_address: str, p: Plan) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.soak", "--client-child", consul_address, str(p.seconds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, name="soak-client-out", daemon=True).start()
        try:
            if (line := self._read(60.0)) != "READY":
                raise RuntimeError(f"the asyncio client said {line!r}")
        except BaseException:
            self.close()
            raise

    def _pump(self) -> None:
        assert self._proc.stdout is not None
        with contextlib.suppress(OSError, ValueError):
            for line in self._proc.stdout:
                self._lines.put(line.strip())
        self._lines.put("EOF")

    def _read(self, timeout: float) -> str:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"the asyncio client did not answer within {timeout} s") from None

    def send(self, text: str) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.write(text + "\n")
        self._proc.stdin.flush()

    def done(self, timeout: float) -> None:
        """Wait for the answer to the last command."""
        if (line := self._read(timeout)) != "OK":
            raise RuntimeError(f"the asyncio client said {line!r}")

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.send("quit")
            assert self._proc.stdin is not None
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=15.0)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=5.0)


def _read_log(path: str) -> dict[str, list[tuple[float, str, str]]]:
    """``{request id: [(time, method, endpoint), ...]}`` from the servers' request log."""
    executed: dict[str, list[tuple[float, str, str]]] = defaultdict(list)
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 4:
                executed[parts[1]].append((float(parts[0]), parts[2], parts[3]))
    return executed


def _descendants() -> set[int]:
    """Process ids of every live descendant of this process (from /proc)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if fields[0] != "Z":
                parents[int(entry)] = int(fields[1])
    found: set[int] = set()
    frontier = {os.getpid()}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def soak(p: Plan, *, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the soak for plan ``p``; return the raw figures (see :func:`report`)."""
    from lbkit.testing.model_server import pb2

    say = progress or (lambda _text: None)
    kinds = _kinds(pb2)
    truth = Truth(SERVERS)
    tmp = tempfile.mkdtemp(prefix="lbkit-soak-")
    log_path = os.path.join(tmp, "requests.log")
    stop = threading.Event()
    before = _descendants()
    cluster = _Cluster(log_path, truth)
    started = _descendants() - before
    sync: _ClientRun | None = None
    child: _ChildClient | None = None
    figures: dict[str, dict[str, Any]] = {}
    results = os.path.join(tmp, "asyncio-client.json")
    try:
        consul_address = cluster.consul.address if cluster.consul else ""
        child = _ChildClient(consul_address, p)
        started |= _descendants() - before  # the asyncio client's process too
        sync = _ClientRun(False, consul_address, p)
        records = sync.records
        index_of = {address: i for i, address in enumerate(cluster.addresses)}
        say(f"{len(kinds)} call kinds over {SERVERS} servers, sync here and asyncio in a child process")
        start = time.monotonic()
        load_end = start + p.seconds
        child.send(f"go {load_end!r}")
        child.done(10.0)
        sync.start(load_end)
        load_average = [os.getloadavg()[0]]

        def measure_warm() -> None:
            assert sync is not None and child is not None
            child.send("measure warm")
            sync.measure("warm")
            child.done(CALL_TIMEOUT * 2 + 10.0)

        def sample(round_no: int) -> None:
            assert sync is not None and child is not None
            child.send(f"sample {round_no}")
            sync.sample(round_no)
            child.done(10.0)

        done = _schedule(cluster, p, load_end - p.cooldown, stop, measure_warm, sample)
        say(f"{len(done)} faults done; load until the end")
        child.send(f"finish {results}")
        figures["sync"] = sync.finish()
        child.done(CALL_TIMEOUT * 3 + 30.0)
        with open(results) as f:
            figures["asyncio"] = json.load(f)
        load_average.append(os.getloadavg()[0])
        wall = time.monotonic() - start
    finally:
        stop.set()
        if sync is not None:
            sync.close()
        if child is not None:
            child.close()
        cluster.close()
    # The asyncio client's calls (the odd numbers) join the sync client's records.
    theirs = figures["asyncio"]["records"]
    for seq in range(1, theirs["sent"], 2):
        records.start[seq], records.end[seq] = theirs["start"][seq], theirs["end"][seq]
        records.ok[seq], records.responses[seq] = theirs["ok"][seq], theirs["responses"][seq]
        if theirs["code"][seq]:
            records.code[seq] = records.code_index(theirs["code"][seq])
    records.sent = max(records.sent, theirs["sent"])
    child_lag = Lag()
    child_lag.starved = [tuple(span) for span in figures["asyncio"]["starved"]]  # type: ignore[misc]
    child_lag.worst = figures["asyncio"]["worst_lag"]
    lags = {False: sync.lag, True: child_lag}
    samples = {mode: {k: tuple(v) for k, v in f["samples"].items()} for mode, f in figures.items()}
    in_flight = {mode: f["in_flight"] for mode, f in figures.items()}
    unfinished = sum(f["unfinished"] for f in figures.values())
    deadline = time.monotonic() + 10.0
    while (left := started & _descendants()) and time.monotonic() < deadline:
        time.sleep(0.1)
    executed = _read_log(log_path)
    shutil.rmtree(tmp, ignore_errors=True)
    data = _judge(kinds, records, executed, truth, index_of, samples, in_flight, unfinished, lags)
    data.update(
        executions_logged=sum(map(len, executed.values())),
        load_average=[round(x, 1) for x in load_average],
        wall_s=round(wall, 1),
        not_sent=sum(f["not_sent"] for f in figures.values()),
        retries={mode: f["retries"] for mode, f in figures.items()},
        thread_names={mode: f["thread_names"] for mode, f in figures.items()},
        rounds={mode: f["rounds"] for mode, f in figures.items()},
        servers_lost=sorted(cluster.lost),
        processes_started=len(started),
        processes_left=sorted(left),
    )
    return data


def _why_failed(
    kind: Kind,
    code: str,
    runs: list[tuple[float, str, str]],
    ran_on: set[int],
    start: float,
    end: float,
    responses: int,
    truth: Truth,
    lag: Lag,
) -> str:
    """Why a failed call failed, judged against what was true while it ran:

    - ``"no fault"``: it ran only on servers that were serving and neither killed nor hung throughout the
      call: the run's own load failed it (no failover could help);
    - ``"starved"``: it timed out while the client itself was starved of CPU (the run's own load);
    - ``"nowhere"``: no other server was serving from ``SETTLE`` s before the call to its end;
    - ``"committed"``: it could not move without running twice: a response had arrived, or its retries are
      off and a server executed it, or may have (a server was killed or hung under it);
    - ``"avoidable"``: it could have succeeded elsewhere.
    """
    if ran_on and all(
        truth.serving_throughout(i, start, end) and not truth.struck(i, start, end) for i in ran_on
    ):
        return "no fault"
    if code == "DEADLINE_EXCEEDED" and lag.during(start, end):
        return "starved"
    if not any(
        i not in ran_on and truth.serving_throughout(i, start - SETTLE, end) for i in range(truth.count)
    ):
        return "nowhere"
    if responses:
        return "committed"
    if not kind.retries and (runs or any(truth.struck(i, start, end) for i in range(truth.count))):
        return "committed"
    return "avoidable"


def _judge(
    kinds: list[Kind],
    records: Records,
    executed: dict[str, list[tuple[float, str, str]]],
    truth: Truth,
    index_of: dict[str, int],
    samples: dict[str, dict[str, tuple[int, int]]],
    in_flight: dict[str, dict[str, int]],
    unfinished: int,
    lags: dict[bool, Lag],
) -> dict[str, Any]:
    """Classify every call and judge each goal. ``samples``: per client process, its RSS and threads by
    moment (``warm``, ``end``); ``lags``: each client's starvation (by ``Kind.aio``)."""
    per_kind: dict[str, dict[str, Any]] = {
        k.name: {
            "method": k.method,
            "retries": k.retries,
            "calls": 0,
            "failed": 0,
            "avoidable": 0,
            "no_fault": 0,
            "starved": 0,
            "unfinished": 0,
            "twice": 0,
        }
        for k in kinds
    }
    latencies: dict[str, list[float]] = defaultdict(list)
    avoidable_codes: Counter[str] = Counter()
    failed_codes: Counter[str] = Counter()
    no_fault_codes: Counter[str] = Counter()
    examples: list[dict[str, Any]] = []
    sent = [t for t in records.start[: records.sent] if t]
    first = min(sent, default=0.0)
    step = max(1, round((max(sent, default=0.0) - first) / 60))
    timeline: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])
    """Per ``step`` seconds of load (60 steps in all): calls, failed, failed with no fault on their server."""
    for seq in range(records.sent):
        start = records.start[seq]
        if start == 0.0:
            continue  # not sent
        bucket = timeline[int((start - first) // step) * step]
        bucket[0] += 1
        kind = kinds[seq % len(kinds)]
        row = per_kind[kind.name]
        row["calls"] += 1
        runs = executed.get(f"c{seq}", [])
        if len(runs) > 1:
            row["twice"] += 1
        end = records.end[seq]
        if records.ok[seq]:
            latencies[kind.name].append(end - start)
            continue
        code = records.codes[records.code[seq]] or "UNFINISHED"
        if not end:
            row["unfinished"] += 1
        row["failed"] += 1
        failed_codes[code] += 1
        bucket[1] += 1
        ran_on = {index_of[e] for _, _, e in runs if e in index_of}
        end = end or start + CALL_TIMEOUT
        why = _why_failed(kind, code, runs, ran_on, start, end, records.responses[seq], truth, lags[kind.aio])
        if why == "no fault":
            row["no_fault"] += 1
            no_fault_codes[code] += 1
            bucket[2] += 1
        elif why == "starved":
            row["starved"] += 1
        elif why == "avoidable":
            row["avoidable"] += 1
            avoidable_codes[code] += 1
            if len(examples) < 20:
                examples.append(
                    {
                        "kind": kind.name,
                        "code": code,
                        "ms": round((end - start) * 1e3, 1),
                        "ran_on": sorted(ran_on),
                        "struck": [i for i in ran_on if truth.struck(i, start, end)],
                    }
                )
    for name, values in latencies.items():
        per_kind[name]["p50_ms"] = round(percentile(values, 50) * 1e3, 2)
        per_kind[name]["p99_ms"] = round(percentile(values, 99) * 1e3, 2)

    def growth(index: int) -> float | None:
        """The largest growth over the client processes (None when one was not measured)."""
        values = []
        for moments in samples.values():
            warm, end_sample = moments.get("warm"), moments.get("end")
            if not warm or not end_sample:
                return None
            values.append((end_sample[index] - warm[index]) / warm[index])
        return max(values) if values else None

    rss_growth, thread_growth = growth(0), growth(1)
    leaked = unfinished + sum(
        max(abs(v["total_in_flight"]), v["endpoints_in_flight"]) for v in in_flight.values()
    )
    twice_off = sum(r["twice"] for r in per_kind.values() if not r["retries"])
    avoidable = sum(r["avoidable"] for r in per_kind.values())
    goals = {
        "avoidable failures": {"value": avoidable, "goal": "0", "pass": avoidable == 0},
        "executed twice, retries off": {"value": twice_off, "goal": "0", "pass": twice_off == 0},
        "in flight after the run": {"value": leaked, "goal": "0", "pass": leaked == 0},
        "RSS growth": {
            "value": None if rss_growth is None else round(rss_growth * 100, 2),
            "goal": "<= 5 %",
            "pass": rss_growth is not None and rss_growth <= GROWTH_GOAL,
        },
        "thread growth": {
            "value": None if thread_growth is None else round(thread_growth * 100, 2),
            "goal": "<= 5 %",
            "pass": thread_growth is not None and thread_growth <= GROWTH_GOAL,
        },
    }
    return {
        "calls": sum(r["calls"] for r in per_kind.values()),
        "unfinished": unfinished,
        "goals": goals,
        "kinds": per_kind,
        "failed_codes": dict(failed_codes),
        "avoidable_codes": dict(avoidable_codes),
        "no_fault_codes": dict(no_fault_codes),
        "timeline": [[t, *counts] for t, counts in sorted(timeline.items())],
        "fault_log": [[round(t - first, 1), name] for t, name in truth.log],
        "avoidable_examples": examples,
        "faults": dict(truth.faults),
        "in_flight": in_flight,
        "client_starved_s": round(sum(e - s for lag in lags.values() for s, e in lag.starved), 1),
        "client_worst_lag_ms": round(max(lag.worst for lag in lags.values()) * 1e3, 1),
        "samples": {
            mode: {k: {"rss_mb": round(v[0] / 2**20, 1), "threads": v[1]} for k, v in moments.items()}
            for mode, moments in samples.items()
        },
    }


def report(data: dict[str, Any], p: Plan, *, quick: bool) -> Result:
    """The figures as a benchmark result: goals, calls by kind, faults."""
    goal_rows = []
    for name, g in data["goals"].items():
        value = g["value"]
        shown = "n/a" if value is None else (f"{value} %" if "growth" in name else str(value))
        goal_rows.append([name, shown, g["goal"], "pass" if g["pass"] else "FAIL"])
    kind_rows = [
        [
            name,
            r["method"],
            "on" if r["retries"] else "off",
            r["calls"],
            r["failed"],
            r["avoidable"],
            r["no_fault"],
            r["starved"],
            r["twice"],
            fmt(r.get("p50_ms", 0.0)),
            fmt(r.get("p99_ms", 0.0)),
        ]
        for name, r in data["kinds"].items()
    ]
    minutes = p.seconds / 60
    return {
        "title": "Soak: every call kind under kills, flaps, hangs, deregistration storms and Consul restarts",
        "tables": [
            {
                "caption": f"Goals, {fmt(minutes, 1)} minutes at {RATE:.0f} calls/s over {SERVERS} servers "
                f"({data['calls']:,} calls)",
                "columns": ["measure", "value", "goal", "judged"],
                "rows": goal_rows,
            },
            {
                "caption": "Calls by kind",
                "columns": [
                    "kind",
                    "method",
                    "retries",
                    "calls",
                    "failed",
                    "could have succeeded elsewhere",
                    "failed with no fault on its server",
                    "timed out, client starved",
                    "executed twice",
                    "p50 ms",
                    "p99 ms",
                ],
                "rows": kind_rows,
            },
            {
                "caption": "Faults injected",
                "columns": ["fault", "times"],
                "rows": [[name, n] for name, n in sorted(data["faults"].items())],
            },
        ],
        "notes": [
            "A call could have succeeded elsewhere when it failed although another endpoint than those it "
            f"executed on was serving from {SETTLE:.0f} s before it started to its end, it had no response, "
            "it could move without running twice (its method retries, or no server executed it and none was "
            "killed or hung under it), and the run's own load did not fail it: it did not run only on "
            "servers without a fault (serving, neither killed nor hung during the call), nor time out while "
            f"the client was starved (a 50 ms sleep of a client thread or of its event loop overran by "
            f"{STARVED} s or more). Executed twice: its request id is in the servers' log more than once.",
            f"Failed calls by code: {data['failed_codes'] or 'none'}; could have succeeded elsewhere: "
            f"{data['avoidable_codes'] or 'none'}; with no fault on the server it ran on (serving and "
            f"neither killed nor hung during the call): {data['no_fault_codes'] or 'none'}. Calls not sent "
            f"(each client had {MAX_OUTSTANDING // 2} running): {data['not_sent']}. Servers lost (a killed "
            f"server's port taken before it could start again): {data['servers_lost'] or 'none'}.",
            "Client RSS and threads, measured with no call running (after the first round of faults, "
            f"at the end): {data['samples']}. Load average (1 min) at the start and the end: "
            f"{data['load_average']} on {os.cpu_count()} cores.",
            "After each round of faults, with calls running (RSS MB / threads / objects the garbage "
            "collector tracks), by client: "
            + "; ".join(
                f"{mode}: " + ", ".join(f"{r['rss_mb']}/{r['threads']}/{r['objects']}" for r in rows)
                for mode, rows in data.get("rounds", {}).items()
            )
            + ". Growth in every round is a leak; growth that stops is a pool or the allocator settling.",
            "Half the calls go through lbkit.Balancer (threads), half through lbkit.aio.Balancer in a "
            "process of its own (an event loop), the same kinds in turn. Policies by method (retry= "
            "mapping): Predict and "
            f"StreamPredict RetryPolicy(max_attempts=3, attempt_timeout={ATTEMPT_TIMEOUT:g}); UpdateFeatures "
            "(ping-pong: each update sent once the previous ack came) and UploadFeatures "
            "RetryPolicy(retryable_codes=()), retries off. Calls time out after "
            f"{CALL_TIMEOUT:g} s; drain_timeout 1 s. Client starved {data['client_starved_s']} s in all; "
            f"its worst sleep overran by {data['client_worst_lag_ms']} ms. Retries by balancer: "
            f"{data['retries']} (the retry budget refuses retries while half its tokens are spent).",
        ]
        + (["Quick run: 25 s of load, figures are rough."] if quick else []),
        "data": data,
    }


def run(quick: bool = False, minutes: float | None = None) -> Result:
    """Run the soak (``quick``: 25 s of load) and return its report."""
    p = plan(minutes, quick)
    data = soak(p, progress=lambda text: print(f"soak: {text}", file=sys.stderr, flush=True))
    return report(data, p, quick=quick)


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.soak [--minutes N | --quick] [--json PATH]``; exits 1 if a goal failed."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=None, help="minutes of load (default 10)")
    parser.add_argument("--quick", action="store_true", help="25 s of load (a smoke test)")
    parser.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    parser.add_argument("--consul-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client-child", nargs=2, metavar=("CONSUL", "SECONDS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client_child:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _client_child(args.client_child[0], float(args.client_child[1]))
        return 0
    if args.consul_child:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _consul_child()
        return 0
    if args.quick and args.minutes is not None:
        parser.error("--quick and --minutes exclude each other")
    result = run(args.quick, args.minutes)
    print(render_result(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    left = result["data"]["processes_left"]
    if left:
        print(f"processes this run started are still running: {left}", file=sys.stderr)
        return 2
    return 0 if all(g["pass"] for g in result["data"]["goals"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

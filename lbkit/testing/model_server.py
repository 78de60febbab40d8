"""A real gRPC model server of the inference-service shape, for tests, examples, the demo and benchmarks.

Each response says which endpoint served it (``served_by``), and the server counts its calls, so a
test can see where calls went. Its behaviour (delay, failures, hanging, health) can be changed while
it runs. With a ``request_log``, each call that carries an ``x-request-id`` is appended to that file as it
starts executing (``monotonic-time request-id method endpoint``), so a run can count calls executed twice.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from lbkit.testing.proto import model_service_pb2 as pb2
from lbkit.testing.proto import model_service_pb2_grpc as pb2_grpc

__all__ = ["REQUEST_ID_HEADER", "Behavior", "ModelServer", "ModelServicer", "pb2", "pb2_grpc"]

SERVICE_NAME = "lbkit.inference.v1.ModelService"
REQUEST_ID_HEADER = "x-request-id"
"""The metadata key whose value a server with a request log records for each call it executes."""


@dataclass
class Behavior:
    """How a :class:`ModelServer` answers; change fields while it runs."""

    delay: float = 0.0
    """Seconds each unary call (and each streamed token) takes."""
    fail_rate: float = 0.0
    """Share of calls that fail with ``fail_code``, in [0, 1]."""
    fail_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    hang: bool = False
    """Answer nothing until the call's deadline passes or it is cancelled."""
    stall_rate: float = 0.0
    """Share of calls, in [0, 1], that first stall for ``stall`` seconds (a noisy neighbour), unless
    cancelled meanwhile."""
    stall: float = 0.2
    """Seconds a stalled call waits before it is served."""
    tokens: int = 8
    """Tokens StreamPredict sends when the request asks for none."""
    model_version: str = "v1"


class ModelServicer(pb2_grpc.ModelServiceServicer):
    """The ModelService implementation behind :class:`ModelServer`."""

    def __init__(self, name: str, behavior: Behavior, request_log: BinaryIO | None = None) -> None:
        self.name = name
        self.behavior = behavior
        self.request_log = request_log
        """An unbuffered file opened for appending (see the module doc), or None."""
        self.calls: Counter[str] = Counter()
        self.stalled = 0
        """Calls that stalled (see ``Behavior.stall_rate``)."""
        self.abandoned = 0
        """Calls that ended on the client's side (cancelled, or past their deadline) while they stalled or
        hung here: what a client's cancel looks like from the server."""
        self.headers: Counter[str] = Counter()
        """Metadata keys received, over all calls."""
        self._lock = threading.Lock()
        self._rng = random.Random()

    def _enter(self, method: str, context: grpc.ServicerContext) -> None:
        if self.request_log is not None:
            for key, value in context.invocation_metadata():
                if key == REQUEST_ID_HEADER:
                    # One unbuffered write of one line to an O_APPEND file: lines of several servers never
                    # mix, and a line written is kept even if this process is killed the next instant.
                    line = f"{time.monotonic():.6f} {value} {method} {self.name}\n"
                    with contextlib.suppress(ValueError):  # closed: the server has stopped
                        self.request_log.write(line.encode())
        b = self.behavior
        with self._lock:
            self.calls[method] += 1
            self.headers.update(key for key, _ in context.invocation_metadata())
            fail = self._rng.random() < b.fail_rate
            stall = b.stall_rate > 0 and self._rng.random() < b.stall_rate
        context.set_trailing_metadata((("lb-served-by", self.name),))
        if b.hang:
            while context.is_active():
                time.sleep(0.005)
            with self._lock:
                self.abandoned += 1
            return
        if stall:
            with self._lock:
                self.stalled += 1
            until = time.monotonic() + b.stall
            while context.is_active() and time.monotonic() < until:
                time.sleep(min(0.005, max(until - time.monotonic(), 0.0)))
            if not context.is_active():
                with self._lock:
                    self.abandoned += 1
        if fail:
            context.abort(b.fail_code, f"{self.name}: injected failure")

    def Predict(self, request: Any, context: grpc.ServicerContext) -> Any:
        start = time.perf_counter()
        self._enter("Predict", context)
        if self.behavior.delay:
            time.sleep(self.behavior.delay)
        preds = [sum(request.features)] if request.features else [0.0]
        return pb2.PredictResponse(
            predictions=preds,
            latency_ms=(time.perf_counter() - start) * 1e3,
            served_by=self.name,
            model_version=request.model_version or self.behavior.model_version,
        )

    def StreamPredict(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self._enter("StreamPredict", context)
        n = request.max_tokens or self.behavior.tokens
        for i in range(n):
            if not context.is_active():
                return
            if self.behavior.delay:
                time.sleep(self.behavior.delay)
            yield pb2.TokenResponse(token=f"tok{i}", is_finished=i == n - 1, served_by=self.name)

    def UpdateFeatures(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        self._enter("UpdateFeatures", context)
        for update in request_iterator:
            yield pb2.AckResponse(
                entity_id=update.entity_id, sequence=update.sequence, accepted=True, served_by=self.name
            )

    def UploadFeatures(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        self._enter("UploadFeatures", context)
        count = last = 0
        for update in request_iterator:
            count += 1
            last = update.sequence
        if self.behavior.delay:
            time.sleep(self.behavior.delay)
        return pb2.UploadSummary(count=count, last_sequence=last, served_by=self.name)


class ModelServer:
    """A ModelService server (with grpc.health.v1) on ``host``, port 0 meaning an ephemeral port.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. ``interceptors`` are grpc server
    interceptors (e.g. :class:`lbkit.server.LoadReportInterceptor`).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        behavior: Behavior | None = None,
        health_service: bool = True,
        max_workers: int = 32,
        credentials: grpc.ServerCredentials | None = None,
        interceptors: Sequence[grpc.ServerInterceptor] = (),
        request_log: str | None = None,
    ) -> None:
        self.host = host
        self._port = port
        self.behavior = behavior or Behavior()
        self.health_service = health_service
        self._max_workers = max_workers
        self._credentials = credentials
        self._interceptors = tuple(interceptors)
        self.request_log = request_log
        """The file calls with a request id are recorded in (see the module doc), or None."""
        self._log: BinaryIO | None = None
        self._server: grpc.Server | None = None
        self.servicer: ModelServicer | None = None
        self.health: health.HealthServicer | None = None

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`)."""
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` (``[v6]:port`` for IPv6)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self._port}"

    @property
    def calls(self) -> Counter[str]:
        """Calls received, by method name."""
        return self.servicer.calls if self.servicer else Counter()

    @property
    def total_calls(self) -> int:
        """Calls received over all methods."""
        return sum(self.calls.values())

    def start(self) -> ModelServer:
        """Bind and start serving; the port stays the same across stop and start."""
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self._max_workers),
            options=[("grpc.so_reuseport", 0)],
            interceptors=self._interceptors,
        )
        bind = f"{'[' + self.host + ']' if ':' in self.host else self.host}:{self._port}"
        if self._credentials is not None:
            port = server.add_secure_port(bind, self._credentials)
        else:
            port = server.add_insecure_port(bind)
        if port == 0:
            raise RuntimeError(f"could not bind {bind}")
        self._port = port
        if self.request_log is not None:
            self._log = cast(BinaryIO, open(self.request_log, "ab", buffering=0))  # noqa: SIM115
        self.servicer = ModelServicer(self.address, self.behavior, self._log)
        pb2_grpc.add_ModelServiceServicer_to_server(self.servicer, server)  # type: ignore[no-untyped-call]
        if self.health_service:
            self.health = health.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
            self.set_serving(True)
        server.start()
        self._server = server
        return self

    def set_serving(self, serving: bool, service: str = "") -> None:
        """Set the health status reported for ``service`` ("" is the whole server) and ModelService."""
        if self.health is None:
            raise RuntimeError("this server has no health service")
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in {service, "", SERVICE_NAME}:
            self.health.set(name, status)

    def stop(self, grace: float | None = None) -> None:
        """Stop serving; calls in flight get ``grace`` seconds to finish."""
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ModelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

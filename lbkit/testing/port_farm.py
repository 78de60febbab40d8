"""Many endpoints from few processes: grpc.aio model servers listening on many loopback ports each.

Run ``python -m lbkit.testing.port_farm --ports N``: one ``grpc.aio`` server (ModelService and
``grpc.health.v1``) binds N ephemeral ports on 127.0.0.1, prints ``READY port1,port2,...`` and then
reads one command a line, answering ``OK ...`` or ``ERR ...``:

=====================  =====================================================
``serving on|off``     the health status of every port (they share a server)
``calls``              ``OK n``: calls received since start
``quit``               stop and exit
=====================  =====================================================

Each port is an endpoint to a client: its own TCP connection, its own health stream. A single event
loop serves them all, so ten thousand idle connections and ``Watch`` streams cost no server threads.
A process holds at most about half its file limit in ports (each accepted connection takes a file
too): :class:`PortFarm` spreads N ports over as many processes as that takes. The process exits when
stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import queue
import resource
import subprocess
import sys
import threading
from collections.abc import Sequence
from types import TracebackType
from typing import IO, Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from lbkit.testing.proto import model_service_pb2 as pb2
from lbkit.testing.proto import model_service_pb2_grpc as pb2_grpc

__all__ = ["PortFarm", "main", "raise_file_limit"]

_MODULE = "lbkit.testing.port_farm"


def raise_file_limit() -> int:
    """Raise this process's open-file limit to its hard limit; return the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class _Servicer(pb2_grpc.ModelServiceServicer):
    def __init__(self) -> None:
        self.calls = 0

    async def Predict(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        self.calls += 1
        return pb2.PredictResponse(predictions=[sum(request.features)] if request.features else [0.0])


async def _serve(count: int) -> None:
    servicer = _Servicer()
    health = health_aio.HealthServicer()
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb2_grpc.add_ModelServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    ports = [server.add_insecure_port("127.0.0.1:0") for _ in range(count)]
    if 0 in ports:
        raise SystemExit(f"could not bind {count} ports")
    await server.start()
    print("READY " + ",".join(map(str, ports)), flush=True)
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str | None] = asyncio.Queue()

    def read() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line)
        loop.call_soon_threadsafe(lines.put_nowait, None)

    threading.Thread(target=read, daemon=True).start()
    try:
        while (line := await lines.get()) is not None:
            words = line.split()
            if words == ["quit"]:
                print("OK", flush=True)
                break
            if words == ["calls"]:
                print(f"OK {servicer.calls}", flush=True)
            elif len(words) == 2 and words[0] == "serving" and words[1] in ("on", "off"):
                status = health_pb2.HealthCheckResponse.SERVING
                if words[1] == "off":
                    status = health_pb2.HealthCheckResponse.NOT_SERVING
                await health.set("", status)
                print("OK", flush=True)
            elif words:
                print(f"ERR unknown command {line.strip()!r}", flush=True)
    finally:
        await server.stop(0)


def main(argv: Sequence[str] | None = None) -> None:
    """Bind the ports, print ``READY``, serve commands from stdin until ``quit`` or EOF."""
    parser = argparse.ArgumentParser(prog=f"python -m {_MODULE}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ports", type=int, required=True, help="ports to listen on")
    args = parser.parse_args(argv)
    if args.ports < 1:
        parser.error(f"--ports must be >= 1, got {args.ports}")
    raise_file_limit()
    asyncio.run(_serve(args.ports))


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    """Move a child's output lines to ``lines``; None when it ends."""
    with contextlib.suppress(OSError, ValueError):
        for line in stream:
            lines.put(line.rstrip("\n"))
    lines.put(None)


class PortFarm:
    """``ports`` endpoints on 127.0.0.1 served by child processes (see the module doc).

    ``per_process`` caps the ports of one child; by default a third of the file limit, so that each port
    can hold a connection or two.
    """

    def __init__(self, ports: int, *, per_process: int | None = None, start_timeout: float = 60.0) -> None:
        if ports < 1:
            raise ValueError(f"ports must be >= 1, got {ports}")
        limit = per_process or max(1, raise_file_limit() // 3)
        self.ports = ports
        self._sizes = [min(limit, ports - i) for i in range(0, ports, limit)]
        self._start_timeout = start_timeout
        self._procs: list[tuple[subprocess.Popen[str], queue.Queue[str | None]]] = []
        self.addresses: list[str] = []
        """``127.0.0.1:port`` of every endpoint."""

    def start(self) -> PortFarm:
        """Start the children and wait for each one's ``READY``."""
        try:
            for size in self._sizes:
                proc = subprocess.Popen(
                    [sys.executable, "-m", _MODULE, "--ports", str(size)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    # grpc prints a traceback for each stream cancelled by the stop: noise, not news.
                    stderr=subprocess.DEVNULL,
                    text=True,
                    bufsize=1,
                )
                lines: queue.Queue[str | None] = queue.Queue()
                assert proc.stdout is not None
                threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
                self._procs.append((proc, lines))
            for proc, lines in self._procs:
                line = self._next(proc, lines, self._start_timeout)
                if not line.startswith("READY "):
                    raise RuntimeError(f"port farm said {line!r} instead of READY")
                self.addresses += [f"127.0.0.1:{p}" for p in line[len("READY ") :].split(",")]
        except BaseException:
            self.close()
            raise
        return self

    @staticmethod
    def _next(proc: subprocess.Popen[str], lines: queue.Queue[str | None], timeout: float) -> str:
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"port farm did not answer within {timeout}s") from None
        if line is None:
            raise RuntimeError(f"port farm exited (code {proc.poll()})")
        return line

    def command(self, text: str, timeout: float = 10.0) -> list[str]:
        """Send ``text`` to every child; return the text after each one's ``OK``."""
        for proc, _ in self._procs:
            assert proc.stdin is not None
            proc.stdin.write(text.strip() + "\n")
            proc.stdin.flush()
        replies = [self._next(proc, lines, timeout) for proc, lines in self._procs]
        bad = [r for r in replies if not r.startswith("OK")]
        if bad:
            raise RuntimeError(f"{text!r}: {bad[0]}")
        return [r[2:].strip() for r in replies]

    def set_serving(self, serving: bool) -> None:
        """Set the health status of every endpoint."""
        self.command(f"serving {'on' if serving else 'off'}")

    def calls(self) -> int:
        """Calls received over all endpoints."""
        return sum(int(n) for n in self.command("calls"))

    def close(self) -> None:
        """Stop the children; kill any that do not exit within a few seconds."""
        procs, self._procs = [p for p, _ in self._procs], []
        for proc in procs:
            with contextlib.suppress(OSError, ValueError):
                if proc.stdin is not None:
                    proc.stdin.close()
        for proc in procs:
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5.0)
            if proc.stdout is not None:
                proc.stdout.close()

    def __enter__(self) -> PortFarm:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


if __name__ == "__main__":
    main()

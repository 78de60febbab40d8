"""Model servers in a child process, steered over stdin, so benchmarks keep servers out of the client's CPU.

Run ``python -m lbkit.testing.server_process --count 4 [--delay-ms 0] [--slow I:MS ...] [--fail I:RATE ...]``.
It starts ``count`` :class:`~lbkit.testing.model_server.ModelServer` s on 127.0.0.1 ephemeral ports, prints
``READY addr1,addr2,...`` and then reads one command a line, answering ``OK ...`` or ``ERR ...``:

===================  ===========================================================
``stop I``           stop server I (calls in flight fail)
``kill I``           SIGKILL server I's process, as in a crash (``--processes`` only)
``start I``          start server I again, on the same port
``slow I MS``        server I takes MS milliseconds per call (per token when streaming)
``fail I RATE``      server I fails that share of calls (0..1) with UNAVAILABLE
``hang I on|off``    server I answers nothing until the deadline
``stall I RATE MS``  server I stalls that share of calls (0..1) MS milliseconds first (a noisy neighbour)
``serving I on|off`` server I's grpc.health.v1 status
``calls``            ``OK n0,n1,...``: calls each server received since start or ``reset``
``reset``            zero the call counts
``quit``             stop everything and exit
===================  ===========================================================

All servers share one process by default: on a 2-core machine that leaves one core to the client, and the
client's figures do not depend on how the OS schedules N server processes. ``--processes`` runs one process
per server instead (the first process then forwards commands). The process exits when stdin closes or its
parent dies.

:class:`ServerProcess` is the Python side: a context manager with ``addresses``, ``command()``, ``calls()``
and ``close()``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import IO

from lbkit.testing.model_server import Behavior, ModelServer

__all__ = ["ServerProcess", "main"]

_MODULE = "lbkit.testing.server_process"


def _parse_pairs(items: Sequence[str], flag: str, count: int) -> list[tuple[int, float]]:
    pairs: list[tuple[int, float]] = []
    for item in items:
        index_text, sep, value_text = item.partition(":")
        try:
            index, value = int(index_text), float(value_text)
        except ValueError:
            raise SystemExit(f"{flag}: expected INDEX:VALUE, got {item!r}") from None
        if not sep or not 0 <= index < count:
            raise SystemExit(f"{flag}: bad server index in {item!r} (servers are 0..{count - 1})")
        pairs.append((index, value))
    return pairs


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise ValueError(f"expected on or off, got {text!r}")
    return text == "on"


class _Servers:
    """The servers of this process and the commands that steer them."""

    def __init__(self, behaviors: list[Behavior], ports: list[int], request_log: str | None = None) -> None:
        self.servers = [
            ModelServer(port=p, behavior=b, max_workers=64, request_log=request_log)
            for b, p in zip(behaviors, ports, strict=True)
        ]
        self._base = [0] * len(self.servers)
        self._stopped: set[int] = set()

    def start_all(self) -> list[str]:
        for server in self.servers:
            server.start()
        return [s.address for s in self.servers]

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop(0)

    def _server(self, text: str) -> tuple[int, ModelServer]:
        index = int(text)
        if not 0 <= index < len(self.servers):
            raise ValueError(f"no server {index} (servers are 0..{len(self.servers) - 1})")
        return index, self.servers[index]

    def counts(self) -> list[int]:
        return [s.total_calls + base for s, base in zip(self.servers, self._base, strict=True)]

    def execute(self, words: list[str]) -> str:
        """Run one command; return the text after ``OK``."""
        verb, args = words[0], words[1:]
        if verb == "calls" and not args:
            return ",".join(map(str, self.counts()))
        if verb == "reset" and not args:
            for server in self.servers:
                if server.servicer is not None:
                    server.servicer.calls.clear()
            self._base = [0] * len(self.servers)
            return ""
        if verb == "kill":
            raise ValueError("kill needs --processes (one process per server); stop stops a server in place")
        if verb in ("stop", "start") and len(args) == 1:
            index, server = self._server(args[0])
            if verb == "stop" and index not in self._stopped:
                self._base[index] += server.total_calls
                server.stop(0)
                self._stopped.add(index)
            elif verb == "start" and index in self._stopped:
                server.start()
                self._stopped.discard(index)
            return server.address
        if verb == "stall" and len(args) == 3:
            index, server = self._server(args[0])
            rate = float(args[1])
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"stall rate must be in [0, 1], got {rate}")
            server.behavior.stall_rate = rate
            server.behavior.stall = max(float(args[2]), 0.0) / 1e3
            return ""
        if len(args) != 2:
            raise ValueError(f"unknown command {' '.join(words)!r}")
        index, server = self._server(args[0])
        if verb == "slow":
            server.behavior.delay = max(float(args[1]), 0.0) / 1e3
        elif verb == "fail":
            rate = float(args[1])
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"fail rate must be in [0, 1], got {rate}")
            server.behavior.fail_rate = rate
        elif verb == "hang":
            server.behavior.hang = _on_off(args[1])
        elif verb == "serving":
            serving = _on_off(args[1])
            if server.health is None or index in self._stopped:
                raise ValueError(f"server {index} is stopped")
            server.set_serving(serving)
        else:
            raise ValueError(f"unknown command {' '.join(words)!r}")
        return ""


class _Forwarder:
    """Commands for one-process-per-server mode: each server is a child running this module with count 1.

    ``kill I`` SIGKILLs server I's process (a crash: calls in flight see a reset connection); ``start I``
    starts a new one on the same port, with the behaviour it was started with.
    """

    def __init__(self, behaviors: list[Behavior], ports: list[int], request_log: str | None = None) -> None:
        self.behaviors = behaviors
        self.ports = ports
        self.request_log = request_log
        self.children = [self._child(i) for i in range(len(behaviors))]
        self.killed: dict[int, int] = {}
        """Calls each killed server had counted before it died, by index."""
        self.base = [0] * len(behaviors)

    def _child(self, index: int) -> ServerProcess:
        b = self.behaviors[index]
        fail = {0: b.fail_rate} if b.fail_rate else None
        return ServerProcess(
            count=1,
            delay_ms=b.delay * 1e3,
            fail=fail,
            ports=[self.ports[index]],
            request_log=self.request_log,
        )

    def start_all(self) -> list[str]:
        addresses: list[str] = []
        for index, child in enumerate(self.children):
            child.start()
            addresses.extend(child.addresses)
            self.ports[index] = int(child.addresses[0].rpartition(":")[2])
        return addresses

    def stop_all(self) -> None:
        for child in self.children:
            child.close()

    def execute(self, words: list[str]) -> str:
        verb, args = words[0], words[1:]
        if verb == "calls" and not args:
            counts = [
                base + (self.killed[i] if i in self.killed else child.calls()[0])
                for i, (child, base) in enumerate(zip(self.children, self.base, strict=True))
            ]
            return ",".join(map(str, counts))
        if verb == "reset" and not args:
            for i, child in enumerate(self.children):
                if i not in self.killed:
                    child.command("reset")
                else:
                    self.killed[i] = 0
            self.base = [0] * len(self.children)
            return ""
        if not args:
            raise ValueError(f"unknown command {' '.join(words)!r}")
        index = int(args[0])
        if not 0 <= index < len(self.children):
            raise ValueError(f"no server {index} (servers are 0..{len(self.children) - 1})")
        child = self.children[index]
        if verb == "kill" and len(args) == 1:
            if index not in self.killed:
                self.killed[index] = child.calls()[0]
                child.kill()
            return f"127.0.0.1:{self.ports[index]}"
        if index in self.killed:
            if verb != "start" or len(args) != 1:
                raise ValueError(f"server {index} is killed; start it first")
            # Started first: if its port was taken meanwhile, the server stays killed, to be started later.
            child = self._child(index).start()
            self.base[index] += self.killed.pop(index)
            self.children[index] = child
            return child.addresses[0]
        return child.command(" ".join([verb, "0", *args[1:]]))


def _watch_parent(parent: int) -> None:
    """Exit when the parent process goes away (stdin EOF covers most cases; this covers the rest)."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(0)


def main(argv: Sequence[str] | None = None) -> None:
    """Start the servers, print ``READY``, and serve commands from stdin until ``quit`` or EOF."""
    parser = argparse.ArgumentParser(prog=f"python -m {_MODULE}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=4, help="servers to start (default 4)")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="per-call delay of every server")
    parser.add_argument("--slow", nargs="*", default=[], metavar="I:MS", help="per-call delay of server I")
    parser.add_argument("--fail", nargs="*", default=[], metavar="I:RATE", help="failure share of server I")
    parser.add_argument("--processes", action="store_true", help="one process per server (allows kill)")
    parser.add_argument("--ports", default="", help="comma-separated ports to bind (default: ephemeral)")
    parser.add_argument(
        "--request-log", default=None, metavar="FILE", help="append each call's x-request-id to FILE"
    )
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error(f"--count must be >= 1, got {args.count}")
    try:
        ports = [int(p) for p in args.ports.split(",")] if args.ports else [0] * args.count
    except ValueError:
        parser.error(f"--ports must be comma-separated ints, got {args.ports!r}")
    if len(ports) != args.count:
        parser.error(f"--ports names {len(ports)} ports for {args.count} servers")
    behaviors = [Behavior(delay=max(args.delay_ms, 0.0) / 1e3) for _ in range(args.count)]
    for index, ms in _parse_pairs(args.slow, "--slow", args.count):
        behaviors[index].delay = max(ms, 0.0) / 1e3
    for index, rate in _parse_pairs(args.fail, "--fail", args.count):
        behaviors[index].fail_rate = min(max(rate, 0.0), 1.0)

    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    servers = (_Forwarder if args.processes else _Servers)(behaviors, ports, args.request_log)
    try:
        print("READY " + ",".join(servers.start_all()), flush=True)
        for line in sys.stdin:
            words = line.split()
            if not words:
                continue
            if words == ["quit"]:
                print("OK", flush=True)
                break
            try:
                reply = servers.execute(words)
            except Exception as exc:  # any bad command is answered, never fatal
                print(f"ERR {exc}".replace("\n", " "), flush=True)
            else:
                print(f"OK {reply}".rstrip(), flush=True)
    finally:
        servers.stop_all()


class ServerProcess:
    """Model servers in a child process (see the module doc), as a context manager.

    ``slow`` maps a server index to milliseconds per call; ``fail`` maps an index to a failure share;
    every server appends the calls it executes that carry an ``x-request-id`` to ``request_log`` (see
    :mod:`lbkit.testing.model_server`).
    """

    def __init__(
        self,
        count: int = 4,
        *,
        delay_ms: float = 0.0,
        slow: dict[int, float] | None = None,
        fail: dict[int, float] | None = None,
        processes: bool = False,
        ports: Sequence[int] | None = None,
        request_log: str | None = None,
        start_timeout: float = 20.0,
        command_timeout: float = 10.0,
    ) -> None:
        self.count = count
        self._argv = [sys.executable, "-m", _MODULE, "--count", str(count), "--delay-ms", str(delay_ms)]
        if slow:
            self._argv += ["--slow", *(f"{i}:{ms}" for i, ms in slow.items())]
        if fail:
            self._argv += ["--fail", *(f"{i}:{rate}" for i, rate in fail.items())]
        if processes:
            self._argv.append("--processes")
        if ports:
            self._argv += ["--ports", ",".join(map(str, ports))]
        if request_log:
            self._argv += ["--request-log", request_log]
        self._start_timeout = start_timeout
        self._command_timeout = command_timeout
        self._proc: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._lock = threading.Lock()
        self.addresses: list[str] = []
        """``127.0.0.1:port`` of each server, by index."""

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> ServerProcess:
        """Start the child and wait for its ``READY`` line."""
        if self._proc is not None:
            raise RuntimeError("already started")
        self._proc = subprocess.Popen(
            self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        stdout = self._proc.stdout
        assert stdout is not None
        threading.Thread(target=self._read, args=(stdout,), daemon=True).start()
        try:
            line = self._next_line(self._start_timeout)
            if not line.startswith("READY "):
                raise RuntimeError(f"server process said {line!r} instead of READY")
        except BaseException:
            self.close()
            raise
        self.addresses = line[len("READY ") :].split(",")
        return self

    def _read(self, stdout: IO[str]) -> None:
        try:
            for line in stdout:
                self._lines.put(line.rstrip("\n"))
        except (OSError, ValueError):  # closed under us by kill() or close()
            pass
        self._lines.put(None)

    def _next_line(self, timeout: float) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"server process did not answer within {timeout}s") from None
        if line is None:
            code = self._proc.poll() if self._proc is not None else None
            raise RuntimeError(f"server process exited (code {code})")
        return line

    def command(self, text: str) -> str:
        """Send one command and wait for its ``OK``; return the text after it. ``ERR`` raises RuntimeError."""
        proc = self._proc
        if proc is None or proc.stdin is None:
            raise RuntimeError("server process is not running")
        with self._lock:
            proc.stdin.write(text.strip() + "\n")
            proc.stdin.flush()
            line = self._next_line(self._command_timeout)
        if line.startswith("ERR"):
            raise RuntimeError(f"{text!r}: {line[3:].strip()}")
        if not line.startswith("OK"):
            raise RuntimeError(f"{text!r}: unexpected answer {line!r}")
        return line[2:].strip()

    def calls(self) -> list[int]:
        """Calls each server received since start (or the last ``reset``)."""
        return [int(n) for n in self.command("calls").split(",")]

    def kill(self) -> None:
        """SIGKILL the child (its servers die as in a crash) and reap it."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.kill()
        proc.wait(timeout=10.0)
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()

    def close(self) -> None:
        """Stop the child and reap it; kill it if it does not exit within a few seconds."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.stdin is not None and proc.poll() is None:
                proc.stdin.write("quit\n")
                proc.stdin.flush()
        except OSError:
            pass
        try:
            if proc.stdin is not None:
                proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5.0)
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()


if __name__ == "__main__":
    main()

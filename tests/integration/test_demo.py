"""``lbkit demo`` end to end, as a user runs it: it must finish, report, and leave nothing behind."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lbkit.__main__ import main
from lbkit._demo.command import DemoOptions, _detect
from lbkit._demo.load import PacedLoad, Record
from lbkit._demo.report import Fault, SelectorRun, render_run, write_plot
from lbkit.errors import ConfigError
from lbkit.events import Cause, Event, EventKind
from lbkit.testing.consul import ConsulServer

ROOT = Path(__file__).resolve().parents[2]
ROLES = ("slow", "failing", "leaving", "steady")


def _demo(*args: str, cwd: Path, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lbkit", "demo", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def _started(stdout: str) -> tuple[int, list[int]]:
    """The model servers' process id and every port the demo listened on, from its banner."""
    pid = int(re.search(r"process (\d+)", stdout).group(1))  # type: ignore[union-attr]
    banner = stdout.split("selectors:")[0]
    ports = sorted({int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", banner)})
    return pid, ports


def _assert_all_stopped(pid: int, ports: list[int]) -> None:
    assert len(ports) == 5, ports  # the Consul server and four model servers (or their agent's)
    deadline = time.monotonic() + 5.0
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists(), f"model server process {pid} is still there"
    for port in ports:
        with socket.socket() as s, pytest.raises(ConnectionRefusedError):
            s.settimeout(1.0)
            s.connect(("127.0.0.1", port))


def _tables(stdout: str, selectors: tuple[str, ...]) -> dict[str, dict[str, list[str]]]:
    """Per selector, the table row (split into cells) of each role, and the fault lines under ``_faults``."""
    out: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for line in stdout.splitlines():
        head = line.split(":", 1)[0]
        if head in selectors and " calls in " in line:
            current = out.setdefault(head, {"_faults": []})
            continue
        if current is None:
            continue
        if not line.strip():
            current = None
            continue
        cells = line.split()
        if cells[0].startswith("127.0.0.1:") and len(cells) > 1 and cells[1] in ROLES:
            current[cells[1]] = cells
        elif cells[0] == "at":
            current["_faults"].append(line)
    return out


def test_demo_runs_each_selector_reports_and_stops_everything(tmp_path: Path) -> None:
    selectors = ("round_robin", "peak_ewma")
    started = time.monotonic()
    result = _demo("--duration", "2", "--selectors", ",".join(selectors), "--no-plot", cwd=tmp_path)
    took = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    assert took < 30.0
    tables = _tables(result.stdout, selectors)
    assert set(tables) == set(selectors), result.stdout
    for name, table in tables.items():
        for role in ROLES:
            row = table[role]
            calls, failed, ejections = int(row[3]), int(row[-2]), int(row[-1])
            assert calls > 0, f"{name}: no calls on the {role} server\n{result.stdout}"
            if role == "failing":
                assert ejections >= 1 and failed >= 5, f"{name}: failing server not ejected: {row}"
            else:  # healthy servers: nothing ejected (a call may time out on a very busy machine)
                assert ejections == 0 and failed <= 2, f"{name}: {role} server: {row}"
        faults = "\n".join(table["_faults"])
        assert re.search(r"\(failing\) starts failing every call: ejected after [\d.]+ m?s", faults), faults
        assert re.search(r"\(leaving\) deregistered from Consul: removed after [\d.]+ m?s", faults), faults
        # retries move the failing server's calls elsewhere: the client sees few failures, if any
        client = next(line for line in result.stdout.splitlines() if line.strip().startswith("all (client)"))
        assert int(client.split()[-2]) <= 5, client
    assert "Summary" in result.stdout
    assert "plot: skipped" in result.stdout
    assert not list(tmp_path.iterdir())
    _assert_all_stopped(*_started(result.stdout))


def test_demo_with_an_agent_address_writes_a_png_and_deregisters(tmp_path: Path) -> None:
    # --consul with a separately running Consul-compatible server, as with a real agent; plot on.
    out = tmp_path / "plots"
    with ConsulServer() as agent:
        result = _demo(
            "--duration", "1.5", "--selectors", "least_connections", "--out", str(out),
            "--consul", agent.address, cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"the Consul agent at {agent.address}" in result.stdout
        _, instances = agent.client().health.service("lbkit-demo")
        assert instances == []  # every instance deregistered on the way out
    png = out / "lbkit-demo.png"
    if importlib.util.find_spec("matplotlib") is None:  # an optional dependency
        assert "no plot: matplotlib is not installed" in result.stdout
        assert not png.exists()
    else:
        assert f"plot: {png}" in result.stdout
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    pid, ports = _started(result.stdout)
    _assert_all_stopped(pid, ports)


def test_ctrl_c_stops_everything(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lbkit",
            "demo",
            "--duration",
            "20",
            "--selectors",
            "round_robin",
            "--no-plot",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        start_new_session=True,  # its own process group, so Ctrl-C can be sent as a terminal does
    )
    try:
        assert proc.stdout is not None
        banner = ""
        deadline = time.monotonic() + 30.0
        while "selectors:" not in banner and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            banner += line
        assert "selectors:" in banner, banner
        time.sleep(1.0)  # the load is running
        os.killpg(proc.pid, signal.SIGINT)  # to the whole group: the demo and its model server process
        sent = time.monotonic()
        stdout, stderr = proc.communicate(timeout=15.0)
        assert time.monotonic() - sent < 10.0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "stopped:" in stderr
    assert "KeyboardInterrupt" not in stderr, stderr  # neither the demo nor its child printed a traceback
    _assert_all_stopped(*_started(banner + stdout))


def test_bad_options_are_named(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--selectors", "round_robin,fastest"])
    assert exc.value.code == 2
    assert "'fastest'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="duration"):
        DemoOptions(duration=0.5)
    with pytest.raises(ConfigError, match="ftp"):
        DemoOptions(consul="ftp://127.0.0.1:8500")


def test_bench_outside_a_checkout_says_how_to_run_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--quick"]) == 2
    assert "python -m benchmarks" in capsys.readouterr().err


# Pure pieces of the demo (no sockets): the load's bounds, fault detection, the plot without matplotlib.


def test_paced_load_sends_rate_times_duration_calls_with_bounded_concurrency() -> None:
    in_flight = [0]
    peak = [0]
    lock = threading.Lock()

    def call(n: int) -> tuple[bool, str, str]:
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.02)
        with lock:
            in_flight[0] -= 1
        return n % 10 != 0, "a", "OK"

    load = PacedLoad(call, rate=400.0, workers=3, duration=0.25).start()
    load.join(5.0)
    assert load.done()
    assert len(load.records) == 100  # 400/s for 0.25 s, exactly
    assert load.failed == 10
    assert peak[0] <= 3
    # 3 workers at 20 ms a call manage 150/s, not 400/s: the load falls behind rather than piling up
    assert load.elapsed >= 100 * 0.02 / 3


def test_detect_takes_the_first_matching_event_after_the_fault() -> None:
    start = 100.0
    events = [
        Event(EventKind.EJECTED, "a:1", "before the fault", 100.5, Cause.CONSECUTIVE_FAILURES),
        Event(EventKind.READY, "a:1", "", 101.2, Cause.CHANNEL_STATE),
        Event(EventKind.EJECTED, "b:1", "another server", 101.1, Cause.CONSECUTIVE_FAILURES),
        Event(EventKind.EJECTED, "a:1", "5 consecutive failures", 101.25, Cause.CONSECUTIVE_FAILURES),
        Event(EventKind.REMOVED, "a:1", "gone", 101.5, Cause.DISCOVERY_REMOVED),
    ]
    fault = Fault("a:1", "failing", "starts failing", at=1.0)
    _detect(fault, start, frozenset({EventKind.EJECTED, EventKind.REMOVED}), events, [])
    assert fault.detected_by == "ejected" and fault.detected_after == pytest.approx(0.25)

    back = Fault("a:1", "leaving", "registered again", at=1.0)
    _detect(back, start, frozenset(), events, [(101.1, frozenset({"a:1"}))])
    assert back.detected_by == "picker inclusion" and back.detected_after == pytest.approx(0.1)

    never = Fault("c:1", "failing", "starts failing", at=1.0)
    _detect(never, start, frozenset({EventKind.EJECTED}), events, [(101.1, frozenset({"c:1"}))])
    assert never.detected_after is None
    assert "not acted on" in render_run(
        SelectorRun("round_robin", 2.0, 10.0, [Record(0.1, 5.0, True, "c:1", "OK")], [], [never])
    )


def test_without_matplotlib_the_plot_is_skipped_with_a_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    why = write_plot([], str(tmp_path / "x.png"))
    assert why is not None and "matplotlib is not installed" in why
    assert not (tmp_path / "x.png").exists()


def test_a_refused_consul_is_told_by_the_error_type_not_its_text() -> None:
    from lbkit._demo.cluster import _short
    from lbkit.errors import RegistrationError
    from lbkit.registration import Registration

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    with pytest.raises(RegistrationError) as info:
        Registration("demo", "127.0.0.1:5000", consul_address=f"127.0.0.1:{port}").register()
    assert _short(info.value) == "connection refused (is a Consul agent listening there?)"
    # An agent's answer that merely says "refused" is shown as it is.
    answer = RegistrationError(403, "ACL refused: permission denied")
    assert _short(answer) == "ACL refused: permission denied"


def test_the_tail_scenario_hedges_reports_weights_draws_and_stops_everything(tmp_path: Path) -> None:
    result = _demo(
        "--scenario", "tail", "--duration", "1", "--out", str(tmp_path), cwd=tmp_path, timeout=90.0
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    pid = int(re.search(r"process (\d+)", out).group(1))  # type: ignore[union-attr]
    summary = out.split("hedging, in short:")[1].split("\n\n")[0]
    rows = {line.strip().split("  ")[0]: line.split() for line in summary.splitlines()[3:]}
    assert set(rows) == {"no hedging", next(r for r in rows if "fixed delay" in r), 'hedging_delay="p95"'}
    assert rows["no hedging"][-3:-1] == ["0", "0"]  # no hedge without a hedging policy
    assert "learned weights" in out and "weighted_round_robin" in out
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "lbkit-demo-tail.png").stat().st_size > 1000
    deadline = time.monotonic() + 5.0
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists(), f"model server process {pid} is still there"


def test_a_bad_scenario_is_named() -> None:
    with pytest.raises(ConfigError, match="scenario"):
        DemoOptions(scenario="chaos")

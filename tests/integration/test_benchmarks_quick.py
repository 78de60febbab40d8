"""Smoke test of the benchmark suite: ``python -m benchmarks --quick`` runs and its report names each module;
a default run leaves the docs alone, and the figures the docs quote are the generated ones.

No figure is asserted: the machine is shared and noisy. The suite's quick run is bounded by the modules'
own time limits; the subprocess timeout here is the backstop.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 300.0


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


@pytest.mark.timeout(TIMEOUT + 20)
def test_quick_suite_writes_report_json_and_plots_and_leaves_the_docs_alone(tmp_path: Path) -> None:
    docs_before = _tree_digest(ROOT / "docs")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick"],  # the defaults, as a user runs it
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _tree_digest(ROOT / "docs") == docs_before  # a default run writes nothing into docs/
    out = tmp_path / "bench-results"
    report = (out / "benchmarks.md").read_text()
    data = json.loads((out / "results.json").read_text())
    plots = out / "img"
    assert report.startswith("# lbkit benchmarks")
    assert data["machine"]["cores"] in report and data["machine"]["grpcio"] in report
    modules = data["modules"]
    assert "e2e" in modules and "faults" in modules and "subsetting" in modules
    for name, result in modules.items():
        assert "error" not in result, name
        if "skipped" in result:
            assert f"## {name}\n\nSkipped" in report
        else:
            assert f"## {result['title']}\n" in report
            assert result["tables"], name
    # The e2e tables put native round robin, the baseline, in every cell.
    e2e_tables = modules["e2e"]["tables"]
    assert e2e_tables and all(any(row[0] == "native round_robin" for row in t["rows"]) for t in e2e_tables)
    # The soak judges every goal, injected every fault, and stopped every process it started.
    from benchmarks.soak import FAULTS, plan

    soak = modules["soak"]["data"]
    assert set(soak["goals"]) == {
        "avoidable failures",
        "executed twice, retries off",
        "in flight after the run",
        "RSS growth",
        "thread growth",
    }
    assert all(isinstance(g["pass"], bool) and g["value"] is not None for g in soak["goals"].values())
    assert set(soak["faults"]) == set(FAULTS)
    assert {k["method"] for k in soak["kinds"].values()} >= {"Predict", "StreamPredict", "UpdateFeatures"}
    assert plan(None, True).max_calls * 0.5 <= soak["calls"] <= plan(None, True).max_calls
    succeeded = sum(k["calls"] - k["failed"] for k in soak["kinds"].values())
    assert soak["executions_logged"] >= succeeded  # the servers recorded each call they executed
    # Consul, the 6 servers and their parent, the asyncio client.
    assert soak["processes_started"] == 9 and soak["processes_left"] == []
    # Scale: every goal it prints is judged, over both APIs, and the stall has its control beside it.
    scale = modules["scale"]["data"]
    assert scale["goals"] and all(isinstance(g["pass"], bool) for g in scale["goals"].values())
    assert any(name.startswith("OS threads, sync") for name in scale["goals"])
    assert any(name.startswith("OS threads, aio") for name in scale["goals"])
    assert scale["stall"]["control"]["ticks"] > 0 and scale["stall"]["lbkit"]["ticks"] > 0
    assert "| FAIL |" in report or "| pass |" in report
    # matplotlib is a bench dependency: the slow-server latency CDF is drawn from the faults data.
    assert (plots / "latency_cdf_slow_server.png").stat().st_size > 1000
    assert "](img/latency_cdf_slow_server.png)" in report
    # The subsetting simulation: its goals hold at the quick scale too, and its plot is drawn.
    subsetting = modules["subsetting"]["data"]
    assert subsetting["balance"]["lbkit deterministic"]["max_over_mean"] <= 1.10
    assert subsetting["rendezvous_churn_goal_met"]
    assert (plots / "subsetting.png").stat().st_size > 1000 and "subsetting.png" in report
    # Zone-aware routing: measured local shares follow Envoy's formula, no call fails, the plot is drawn.
    zones = modules["zones"]["data"]
    assert zones["simulated"]["max_error"] < 0.02
    assert zones["grpc"]["failed"] == 0 and len(zones["grpc"]["steps"]) == 3
    assert (plots / "zones.png").stat().st_size > 1000 and "zones.png" in report

    # Tail: every variant measured, the goals of "p95" judged in the run against no hedging.
    from benchmarks.tail import GOALS, VARIANTS

    for api in modules["tail"]["data"]["apis"].values():
        assert set(api["variants"]) == set(VARIANTS) and all(v["calls"] > 0 for v in api["variants"].values())
        assert set(api["goals"]) == set(GOALS) and all(
            isinstance(g["pass"], bool) for g in api["goals"].values()
        )
        assert api["variants"]["no hedging"]["hedges_sent"] == 0

    # Faults: native grpcio at its best next to lbkit on the same fault (the unconfigured native rows
    # are in full runs only).
    clients = {row[1] for row in modules["faults"]["tables"][0]["rows"] if row[0] == "fails every call"}
    assert clients == {"native round_robin, configured", "lbkit round_robin"}

    # The summary the FAQ quotes is in the report, and --update-docs would put that very text in a page.
    from benchmarks.__main__ import SUMMARY_TITLE, refresh_blocks, summary_vs_round_robin

    summary = summary_vs_round_robin(modules)
    assert summary is not None and f"## {SUMMARY_TITLE}\n\n{summary}\n" in report
    pages = tmp_path / "docs"
    pages.mkdir()
    (pages / "faq.md").write_text((ROOT / "docs" / "faq.md").read_text())
    assert refresh_blocks(modules, pages) == [pages / "faq.md"]
    assert _generated(pages / "faq.md") == summary
    assert refresh_blocks(modules, pages) == []  # a second refresh changes nothing


def _generated(page: Path, name: str = "vs-round-robin") -> str:
    from benchmarks.__main__ import block_pattern

    found = block_pattern(name).search(page.read_text())
    assert found, f"{page.name} has no generated block {name!r}"
    return found.group(2)


RATIO = re.compile(r"\b\d+(?:\.\d+)?(?:\s*-\s*\d+(?:\.\d+)?)?\s*x\b")
"""A ratio such as 1.07x or 0.93-1.00x."""
MEASURED = re.compile(r"\b\d[\d,.]*\s*(?:ns|us|µs)\b")
"""A measured cost in nano- or microseconds (milliseconds and seconds in the docs are settings)."""


def test_the_faq_quotes_generated_figures_only() -> None:
    from benchmarks.__main__ import PLACEHOLDER, SUMMARY_TITLE, block_pattern

    faq = (ROOT / "docs" / "faq.md").read_text()
    block = _generated(ROOT / "docs" / "faq.md")
    typed = block_pattern("vs-round-robin").sub("", faq)
    assert RATIO.findall(typed) == [] and MEASURED.findall(typed) == []  # nothing typed by hand ...
    published = (ROOT / "docs" / "benchmarks.md").read_text()
    heading = f"## {SUMMARY_TITLE}\n\n"
    if heading in published:  # ... and the block is the published run's own summary
        section = published.split(heading, 1)[1].split("\n## ", 1)[0].strip()
        assert block.strip() == section
    else:  # no run has published one yet
        assert block == PLACEHOLDER


def test_update_docs_publishes_full_runs_only() -> None:
    for extra in (["--quick"], ["--only", "selectors"]):
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks", "--update-docs", *extra],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 2 and "--update-docs publishes a full run" in proc.stderr


@pytest.mark.parametrize("quick", [True, False])
def test_every_e2e_cell_holds_the_baseline_of_each_lbkit_variant(quick: bool) -> None:
    from benchmarks.e2e import NATIVE, SELECTORS, plan

    cells = plan(quick, True)
    assert {m.name for m, kind, _ in cells if kind == "unary"} == {
        "sync c=1",
        "sync c=16",
        "aio c=1",
        "aio c=64",
    }
    for _, kind, variants in cells:
        names = [v.name for v in variants]
        assert NATIVE.name in names and len(set(names)) == len(names)
        for v in variants:
            if v.kind == "lbkit":
                assert v.baseline in names
        if kind == "unary":
            assert {v.selector for v in variants if v.kind == "lbkit"} == set(SELECTORS)


def test_flat_in_n_takes_the_baselines_growth_off_in_ns_paired_by_round() -> None:
    from benchmarks.selectors import FLAT_GROWTH, excess_growth_ns, is_flat

    assert FLAT_GROWTH == 0.5
    # random.choice grows 100 -> 150 ns from the smallest N to the largest: data leaving the caches.
    base = [[100.0, 150.0]] * 5
    assert is_flat([[80.0, 130.0]] * 5, base)  # +50 ns, all of it the caches'
    assert is_flat([[600.0, 950.0]] * 5, base)  # 300 ns beyond the caches: 50% of 600
    assert not is_flat([[600.0, 1000.0]] * 5, base)  # 350 beyond: not flat, though the old rule
    # (1000/600 = 1.67 <= 1.5 x 150/100) passed it, the limit stretched by the baseline's ratio.
    # A burst of load in one round, at the largest N, slows pick and baseline alike: it cancels ...
    burst = [[100.0, 150.0], [100.0, 150.0], [100.0, 650.0], [100.0, 150.0], [100.0, 150.0]]
    assert (
        excess_growth_ns([[600.0, 1000.0], [600.0, 1000.0], [600.0, 1500.0], *[[600.0, 1000.0]] * 2], burst)
        == 350
    )
    # ... and one that hit the baseline alone is outvoted by the other rounds, not credited to the pick.
    assert excess_growth_ns([[600.0, 1000.0]] * 5, burst) == 350


def test_the_e2e_cpu_goal_follows_the_reference_where_it_costs_more() -> None:
    from benchmarks.e2e import CPU_GOAL, REFERENCE_GOAL, cpu_goal

    assert cpu_goal(None) == cpu_goal(1.01) == cpu_goal(CPU_GOAL) == CPU_GOAL
    assert cpu_goal(1.14) == REFERENCE_GOAL * 1.14  # sync streams: one event thread per channel


def test_selector_pages_quote_generated_figures_only(tmp_path: Path) -> None:
    from benchmarks.__main__ import BLOCKS, block_pattern, refresh_blocks
    from benchmarks.selector_blocks import SELECTOR_BLOCKS

    pages = sorted((ROOT / "docs" / "selectors").glob("*.md"))
    for name in SELECTOR_BLOCKS:
        assert name in BLOCKS
        assert sum(bool(block_pattern(name).search(p.read_text())) for p in pages) == 1, name
    for page in pages:
        typed = page.read_text()
        for name in SELECTOR_BLOCKS:
            typed = block_pattern(name).sub("", typed)
        assert MEASURED.findall(typed) == [] and RATIO.findall(typed) == [], page.name

    # A full run's figures fill every block; a quick run's fill none.
    sizes = (3, 100, 1000, 10000)
    labels = [
        "baseline random.choice",
        "baseline itertools.cycle",
        "baseline static stride, weights 1..10",
        "round_robin",
        "least_connections",
        "weighted",
        "peak_ewma",
        "consistent_hash maglev",
        "consistent_hash ring",
        "weighted_round_robin",
    ]
    selectors = {
        "pick_ns": {label: [[n, 100.0 + i + n / 1000] for n in sizes] for i, label in enumerate(labels)},
        "rebuild_ms_1000": {"round_robin": 0.25, "consistent_hash ring, weights 1..10": 123.4},
    }
    slow = {"share": 0.0, "p99_ms": 7.5}
    healthy = {"share": 0.25, "p99_ms": 5.0}
    faults = {"slow": {"native round_robin": {"healthy": healthy, "slow": {"share": 0.25, "p99_ms": 210.0}}}}
    faults["slow"]["lbkit peak_ewma"] = {"healthy": healthy, "slow": slow}
    for page in pages:
        (tmp_path / page.name).write_text(page.read_text())
    quick = {"selectors": {"data": {**selectors, "quick": True}}}
    assert refresh_blocks(quick, tmp_path) == []
    full = {"selectors": {"data": {**selectors, "quick": False}}, "faults": {"data": faults}}
    assert len(refresh_blocks(full, tmp_path)) == len(SELECTOR_BLOCKS)
    ring = _generated(tmp_path / "consistent-hash.md", "selector:consistent_hash")
    assert "| consistent_hash ring, ns per pick | 108 | 108 | 109 | 118 |" in ring
    assert "123.4 ms (consistent_hash ring, weights 1..10)" in ring
    ewma = _generated(tmp_path / "peak-ewma.md", "selector:peak_ewma")
    assert "peak_ewma sent it 0.0% of the calls, with a p99 of 7.5 ms against 5.0 ms" in ewma
    assert "native round_robin sent it 25.0%, p99 210.0 ms" in ewma

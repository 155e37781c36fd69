"""A tiny run of the benchmark suite (pgoutbox and the raw baseline, 200 jobs, one repetition)
and of ``bench.bounds``: the bench code works end to end. Each runs as a person runs it,
``python -m …`` in a subprocess on this session's server, and is judged by what it prints
and the figures it writes with ``--json``: tests do not import the bench. No timing is
asserted; figures on a shared machine mean nothing at this size. Peers are not needed: they
are imported only when measured."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from outbox_worker.devdb import PostgresServer
from tests.conftest import ROOT

# The slow tier (`make test-slow`): processes, servers and builds, minutes in all. The suite
# run takes over a minute on a busy two-CPU machine: the default timeout leaves too little room.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

COLUMNS = ["pgoutbox", "raw SQL"]
# Every row that has a speed target: the summary gives each one a verdict.
TARGET_ROWS = {
    "processing_1",
    "lat_p50",
    "lat_p99",
    "enqueue_single",
    "enqueue_one_asyncpg",
    "enqueue_batch",
    "growth_big",
    # Flow control's cost against the same drain without queue settings.
    "flow_global",
    "flow_keys",
    "http_job_rps",
    "rss",
    # Ahead of pgqueuer at each slot count (smoke mode measures 10 only; the rest are listed
    # as not measured).
    "steady_depth_c10_per_s",
    "steady_depth_c16_per_s",
    "steady_depth_c64_per_s",
    "steady_depth_c256_per_s",
    # The held snapshot's cost and recovery (not measured unless the xmin section runs).
    "xmin_hold_per_s",
    "xmin_recover",
}
TARGET_LINE = re.compile(r"- (\w+): .+ — .+: (met|MISSED|not measured)")
ROUNDS = 3  # bench.bounds' back-to-back rounds
IDLE_CALLS = 3


def run_bench(server: PostgresServer, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m <args>`` from the repository, on this session's server (its DATABASE_URL)."""
    proc = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": server.url},
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, (
        f"{' '.join(args)} exited {proc.returncode}\n"
        f"stdout:\n{proc.stdout[-5000:]}\nstderr:\n{proc.stderr[-5000:]}"
    )
    return proc


def test_bench_smoke_run_completes(pg_server: PostgresServer, tmp_path: Path) -> None:
    figures_path = tmp_path / "figures.json"
    # Exit 0: no section failed (every drain checks that all its jobs finished, none left).
    proc = run_bench(
        pg_server, "bench.run", "--smoke", "--systems", "pgoutbox,raw", "--json", str(figures_path)
    )
    text = proc.stdout
    assert "pgoutbox bench, smoke mode, 1 repetition(s)" in text
    # Every processing run drains the smoke size, 200 jobs.
    assert set(re.findall(r"worker\(s\): (\S+) jobs", proc.stderr)) == {"200"}, proc.stderr
    assert f"| measurement | {' | '.join(COLUMNS)} | pgoutbox / best peer |" in text

    figures: dict[str, list[float]] = json.loads(figures_path.read_text())
    results = {tuple(key.split(" | ")): values for key, values in figures.items()}
    assert {column for _, column in results} == set(COLUMNS)
    measured = {key for key, values in results.items() if values}
    for row in ("processing_1", "processing_2", "startup_1", "rss", "enqueue_single"):
        for column in COLUMNS:
            assert (row, column) in measured, (row, column)
    for row in ("lat_p50", "lat_p99", "enqueue_batch"):
        assert (row, "pgoutbox") in measured
        assert (row, "raw SQL") in measured
    for row in (
        "enqueue_one_asyncpg",
        "growth_empty",
        "growth_big",
        "flow_none",
        "flow_global",
        "flow_keys",
        "flow_none_w2",
        "flow_global_w2",
        "flow_idle_p99",
        "flow_backlog_p99",
        "http_job_rps",
        "http_nojob_rps",
        "http_bare_rps",
    ):
        assert (row, "pgoutbox") in measured, row
    for key, values in results.items():
        assert len(values) == 1, (key, values)
        assert all(value > 0 for value in values), (key, values)
    assert results[("processing_1", "pgoutbox")][0] > 0

    assert "| processing, 1 worker process (jobs/s) |" in text
    assert "| POST /reports with its job (requests/s) |" in text
    assert "| enqueue, one job per statement (autocommit), raw asyncpg (jobs/s) |" in text
    targets = text.split("\nTargets:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    verdicts = [TARGET_LINE.fullmatch(line) for line in targets]
    assert all(verdicts), targets
    assert {match.group(1) for match in verdicts if match} == TARGET_ROWS


def test_bounds_smoke_run_measures_every_way(pg_server: PostgresServer, tmp_path: Path) -> None:
    figures_path = tmp_path / "bounds.json"
    proc = run_bench(
        pg_server,
        "bench.bounds",
        "--calls",
        "30",
        "--idle-calls",
        str(IDLE_CALLS),
        "--json",
        str(figures_path),
    )
    table = proc.stdout
    figures = json.loads(figures_path.read_text())

    ways: dict[str, dict[str, list[float]]] = figures["ways"]
    assert "raw INSERT (autocommit)" in ways
    assert "AsyncSession: enqueue() (pgoutbox)" in ways
    assert "asyncpg: enqueue() in BEGIN ... COMMIT (pgoutbox)" in ways
    assert "asyncpg: enqueue(autocommit=True) (pgoutbox)" in ways
    for label, way in ways.items():
        assert len(way["wall"]) == ROUNDS, label
        assert len(way["idle"]) == IDLE_CALLS, label
        assert all(value > 0 for value in [*way["wall"], *way["cpu"], *way["idle"]]), label
        if label.startswith("AsyncSession"):
            assert len(way["steps"]) == IDLE_CALLS, label
        assert f"| {label} |" in table
    statements: dict[str, list[float]] = figures["statements"]
    assert len(statements) == 4
    for label, cpu in statements.items():
        assert len(cpu) == ROUNDS, label
        assert all(value > 0 for value in cpu), label
        assert f"| {label} |" in table

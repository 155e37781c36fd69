"""A tiny run of the benchmark suite (pgoutbox and the raw baseline, 200 jobs, one repetition):
the bench code works end to end. No timing is asserted; figures on a shared machine mean
nothing at this size. Peers are not needed: they are imported only when measured."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import bounds
from bench.config import SECTIONS, configure
from bench.report import TARGETS, render
from bench.run import run_suite
from outbox_worker.devdb import PostgresServer

# The slow tier (`make test-slow`): processes, servers and builds, minutes in all.
pytestmark = pytest.mark.slow


def test_bench_smoke_run_completes(pg_server: PostgresServer, tmp_path: Path) -> None:
    config = configure("smoke", ("pgoutbox", "raw"), SECTIONS)
    assert config.jobs == 200
    assert config.repeat == 1

    ctx = run_suite(config, tmp_path, server=pg_server, verbose=False)

    # Every drain checks that all its jobs finished and none is left; a failure lands here.
    assert ctx.failures == []
    assert [v.label for v in ctx.variants] == ["pgoutbox", "raw SQL"]
    measured = {key for key, sample in ctx.results.items() if sample.values}
    for row in ("processing_1", "processing_2", "startup_1", "rss", "enqueue_single"):
        for column in ("pgoutbox", "raw SQL"):
            assert (row, column) in measured, (row, column)
    for row in ("lat_p50", "lat_p99", "enqueue_batch"):
        assert (row, "pgoutbox") in measured
        assert (row, "raw SQL") in measured
    for row in (
        "enqueue_one_asyncpg",
        "growth_empty",
        "growth_big",
        "http_job_rps",
        "http_nojob_rps",
        "http_bare_rps",
    ):
        assert (row, "pgoutbox") in measured, row
    for (row, column), sample in ctx.results.items():
        assert all(value > 0 for value in sample.values), (row, column, sample.values)
    assert ctx.results[("processing_1", "pgoutbox")].values[0] > 0

    text = render(ctx, "smoke")
    assert "| processing, 1 worker process (jobs/s) |" in text
    assert "| POST /reports with its job (requests/s) |" in text
    assert "| enqueue, one job per statement (autocommit), raw asyncpg (jobs/s) |" in text
    assert text.count("\n- ") >= len(TARGETS)


async def test_bounds_smoke_run_measures_every_way(
    pg_server: PostgresServer, tmp_path: Path
) -> None:
    ways, statements, table = await bounds.run(
        pg_server, tmp_path, calls=30, idle_calls=3, verbose=False
    )

    labels = [way.label for way in ways]
    assert "raw INSERT (autocommit)" in labels
    assert "AsyncSession: enqueue() (pgoutbox)" in labels
    assert "asyncpg: enqueue() in BEGIN ... COMMIT (pgoutbox)" in labels
    assert "asyncpg: enqueue(autocommit=True) (pgoutbox)" in labels
    for way in ways:
        assert len(way.wall) == 3, way.label
        assert len(way.idle) == 3, way.label
        assert all(value > 0 for value in [*way.wall, *way.cpu, *way.idle]), way.label
        if way.label.startswith("AsyncSession"):
            assert len(way.steps) == 3, way.label
        assert f"| {way.label} |" in table
    assert len(statements) == 4
    for statement in statements:
        assert len(statement.cpu) == 3, statement.label
        assert all(value > 0 for value in statement.cpu), statement.label
        assert f"| {statement.label} |" in table

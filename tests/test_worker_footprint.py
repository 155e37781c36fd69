"""A worker process loads what running jobs needs and no more: not SQLAlchemy, not Alembic
(an API process that enqueues has them anyway; a worker would pay 25 MB each for nothing)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import asyncpg

from tests.conftest import ROOT

# A registry of its own that imports nothing else, run to the end of a burst.
WORKER = """
import sys
from outbox_worker import JobContext, Registry
from outbox_worker.cli import main

registry = Registry()


@registry.task()
async def noop(ctx: JobContext) -> None:
    return None


try:
    main(["run", "__main__:registry", "--burst"])
except SystemExit as exc:
    print("exit", exc.code)
print("loaded", *sorted(m for m in ("sqlalchemy", "alembic", "fastapi") if m in sys.modules))
"""


async def test_a_worker_runs_jobs_without_loading_sqlalchemy_or_alembic(
    database_url: str, pool: asyncpg.Pool
) -> None:
    await pool.execute("INSERT INTO outbox_jobs (task) SELECT 'noop' FROM generate_series(1, 5)")
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", WORKER],
        env={**os.environ, "DATABASE_URL": database_url, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[-2:] == ["exit 0", "loaded"], proc.stdout + proc.stderr[-3000:]
    assert await pool.fetchval("SELECT count(*) FROM outbox_jobs WHERE state = 'succeeded'") == 5

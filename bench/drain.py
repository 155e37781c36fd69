"""Drain throughput: N jobs pre-filled, one worker process, from ready to queue empty.

    python -m bench.drain [--jobs 20000] [--concurrency 10 16 64 100] [--prefetch 0 10]
                          [--job-ms 1] [--limit none 1000] [--repeat 3]

No-op jobs by default; ``--job-ms`` gives each job that much awaited time, as a job that calls
an API or the database has. Several ``--concurrency`` (and ``--prefetch``: jobs claimed ahead of
a free slot; the worker's default when not given) values make a sweep on one server, and so do
``--limit`` values: the queue's concurrency limit across workers (``none``: no limit), each run
of a sweep taking the values in turn.

Uses DATABASE_URL when set, else an embedded PostgreSQL in a temporary folder. The worker's
start-up (import, connect, first rescue) is reported apart from the drain.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import asyncpg
from alembic.config import Config
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

import bench.tasks  # noqa: F401  (registers the task enqueue checks against)
from alembic import command
from outbox_worker import NewJob, enqueue_many, sqlalchemy_url
from outbox_worker.devdb import PostgresServer, start_embedded

ROOT = Path(__file__).resolve().parent.parent


async def fill(url: str, jobs: int, job_ms: float, limit: int | None) -> None:
    conn = await asyncpg.connect(url)
    await conn.execute("TRUNCATE outbox_jobs")
    await conn.execute("DELETE FROM outbox_queues")
    if limit is not None:
        await conn.execute(
            "INSERT INTO outbox_queues (name, concurrency) VALUES ('default', $1)", limit
        )
    await conn.close()
    engine = create_async_engine(sqlalchemy_url(url))
    async with AsyncSession(engine) as session, session.begin():
        for start in range(0, jobs, 10_000):
            job = NewJob("waits", {"ms": job_ms}) if job_ms else NewJob("noop")
            await enqueue_many(session, [job] * min(10_000, jobs - start))
    await engine.dispose()
    conn = await asyncpg.connect(url)
    await conn.execute("VACUUM ANALYZE outbox_jobs")
    await conn.close()


def drain(url: str, concurrency: int, prefetch: int | None) -> tuple[float, float]:
    """Seconds of start-up and of draining, read from the worker's own log timestamps."""
    env = {**os.environ, "DATABASE_URL": url, "OUTBOX_LOG_FORMAT": "json", "PYTHONPATH": str(ROOT)}
    began = time.time()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "outbox_worker",
            "run",
            "bench.tasks:registry",
            "--burst",
            "--concurrency",
            str(concurrency),
            *([] if prefetch is None else ["--prefetch", str(prefetch)]),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    ready = next(json.loads(line) for line in proc.stderr.splitlines() if '"worker_ready"' in line)
    done = next(json.loads(line) for line in proc.stderr.splitlines() if '"burst_done"' in line)
    t_ready = datetime.fromisoformat(ready["timestamp"]).timestamp()
    t_done = datetime.fromisoformat(done["timestamp"]).timestamp()
    return t_ready - began, t_done - t_ready


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[100])
    parser.add_argument(
        "--prefetch", type=int, nargs="+", default=[None], help="jobs claimed ahead of a slot"
    )
    parser.add_argument("--job-ms", type=float, default=0.0, help="awaited time per job")
    parser.add_argument(
        "--limit",
        type=lambda v: None if v == "none" else int(v),
        nargs="+",
        default=[None],
        help="the queue's concurrency limit across workers (none: no limit)",
    )
    parser.add_argument("--repeat", type=int, default=3)
    opts = parser.parse_args()
    server: PostgresServer | None = None
    url = os.environ.get("DATABASE_URL")
    if not url:
        server = start_embedded()
        url = server.url
    try:
        config = Config(str(ROOT / "alembic.ini"))
        config.attributes["database_url"] = url
        config.attributes["configure_logging"] = False
        command.upgrade(config, "heads")
        for concurrency, prefetch in itertools.product(opts.concurrency, opts.prefetch):
            rates: dict[int | None, list[float]] = {limit: [] for limit in opts.limit}
            for i in range(opts.repeat):
                for limit in opts.limit:
                    asyncio.run(fill(url, opts.jobs, opts.job_ms, limit))
                    startup, seconds = drain(url, concurrency, prefetch)
                    rates[limit].append(opts.jobs / seconds)
                    print(
                        f"run {i + 1}, limit {limit or 'none'}: start-up {startup:.2f}s, drained "
                        f"{opts.jobs} in {seconds:.2f}s = {opts.jobs / seconds:,.0f} jobs/s"
                    )
            for limit, runs in rates.items():
                print(
                    f"median {statistics.median(runs):,.0f} jobs/s (min {min(runs):,.0f}, "
                    f"max {max(runs):,.0f}), concurrency {concurrency}, "
                    f"prefetch {'default' if prefetch is None else prefetch}, "
                    f"limit {limit or 'none'}, "
                    f"{f'{opts.job_ms:g} ms jobs' if opts.job_ms else 'no-op jobs'}"
                )
    finally:
        if server is not None:
            server.close()


if __name__ == "__main__":
    main()

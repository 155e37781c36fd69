"""pgoutbox itself: the real ``outbox-worker`` CLI, and ``enqueue``/``enqueue_many`` with an
``AsyncSession``, as an application uses them; and ``enqueue`` on a raw asyncpg connection,
each job committed on its own, as a service without SQLAlchemy may use it."""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path

import asyncpg
from alembic.config import Config
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

import bench.tasks  # noqa: F401  (registers the tasks enqueue checks names against)
from alembic import command
from bench.measure import ROOT, Child
from bench.pg import execute, fetchval
from bench.systems.base import Client, System, WorkerOpts, child_main
from outbox_worker import NewJob, enqueue, enqueue_many, sqlalchemy_url


def migrate(url: str) -> None:
    config = Config(str(Path(ROOT) / "alembic.ini"))
    config.attributes["database_url"] = url
    config.attributes["configure_logging"] = False
    command.upgrade(config, "heads")


async def fill_jobs(url: str, jobs: int) -> None:
    engine = create_async_engine(sqlalchemy_url(url))
    try:
        async with AsyncSession(engine) as session, session.begin():
            for start in range(0, jobs, 10_000):
                await enqueue_many(session, [NewJob("noop")] * min(10_000, jobs - start))
    finally:
        await engine.dispose()


def _log_time(child: Child, event: str) -> float | None:
    for line in child.events():
        if line.get("event") == event and "timestamp" in line:
            return datetime.fromisoformat(str(line["timestamp"])).timestamp()
    return None


class Pgoutbox(System):
    name = "pgoutbox"
    module = "bench.systems.pgoutbox"
    other_singles = ("one_asyncpg",)

    async def prepare(self, url: str) -> None:
        # Alembic runs its own event loop: give it a thread of its own.
        await asyncio.to_thread(migrate, url)

    async def fill(self, url: str, jobs: int) -> None:
        await fill_jobs(url, jobs)
        await execute(url, "VACUUM ANALYZE outbox_jobs")

    async def finished(self, url: str) -> int:
        query = "SELECT count(*) FROM outbox_jobs WHERE state = 'succeeded'"
        return int(str(await fetchval(url, query)))

    async def pending(self, url: str) -> int:
        query = "SELECT count(*) FROM outbox_jobs WHERE state IN ('queued', 'running')"
        return int(str(await fetchval(url, query)))

    def worker_args(self, url: str, settings: dict[str, int], *, burst: bool) -> list[str]:
        return [
            "-m",
            "outbox_worker",
            "run",
            "bench.tasks:registry",
            "--concurrency",
            str(settings.get("concurrency", 100)),
            *(["--burst"] if burst else []),
        ]

    def worker_env(self, url: str) -> dict[str, str]:
        return {"DATABASE_URL": url, "OUTBOX_LOG_FORMAT": "json"}

    def ready_time(self, child: Child) -> float | None:
        return _log_time(child, "worker_ready")

    def done_time(self, child: Child) -> float | None:
        return _log_time(child, "burst_done")


SYSTEM = Pgoutbox()


# ---------------------------------------------------------------------------------------------
# Child side (the worker is the real CLI; only the clients live here)
# ---------------------------------------------------------------------------------------------


class PgoutboxClient:
    def __init__(self, engine: AsyncEngine, conn: asyncpg.Connection) -> None:
        self.engine = engine
        self.conn = conn

    async def one(self, stamp: int | None) -> None:
        async with AsyncSession(self.engine) as session, session.begin():
            if stamp is None:
                await enqueue(session, "noop")
            else:
                await enqueue(session, "stamp", {"i": stamp})

    async def one_asyncpg(self, stamp: int | None) -> None:
        """One job committed on its own on a raw asyncpg connection (``autocommit=True``):
        one statement, as pgqueuer's enqueue is. The same job inside the app's transaction
        costs that transaction's BEGIN and COMMIT besides: ``make bench-bounds`` times both."""
        if stamp is None:
            await enqueue(self.conn, "noop", autocommit=True)
        else:
            await enqueue(self.conn, "stamp", {"i": stamp}, autocommit=True)

    async def batch(self, jobs: int) -> None:
        async with AsyncSession(self.engine) as session, session.begin():
            await enqueue_many(session, [NewJob("noop")] * jobs)

    async def close(self) -> None:
        await self.conn.close()
        await self.engine.dispose()


async def connect(dsn: str) -> Client:
    return PgoutboxClient(create_async_engine(sqlalchemy_url(dsn)), await asyncpg.connect(dsn))


async def _no_worker(opts: WorkerOpts) -> None:
    raise SystemExit("pgoutbox's worker is `outbox-worker run bench.tasks:registry`")


if __name__ == "__main__":
    child_main(work=_no_worker, connect=connect)

"""pgqueuer (PyPI): its QueueManager on an asyncpg connection, drain mode for processing, and
``Queries.enqueue`` (single and list form) for enqueueing. Only imported when installed."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import signal

import asyncpg

from bench.inprocess import Driver, OnJob, Producer
from bench.measure import Stamps, emit
from bench.pg import execute, fetchval
from bench.systems.base import Client, System, WorkerOpts, child_main


class Pgqueuer(System):
    name = "pgqueuer"
    module = "bench.systems.pgqueuer"

    def missing(self) -> str | None:
        if importlib.util.find_spec("pgqueuer") is None:
            return "not installed (pip install -e . --group bench)"
        return None

    async def prepare(self, url: str) -> None:
        from pgqueuer import AsyncpgDriver, Queries

        conn = await asyncpg.connect(url)
        try:
            await Queries(AsyncpgDriver(conn)).install()
        finally:
            await conn.close()

    async def fill(self, url: str, jobs: int) -> None:
        from pgqueuer import AsyncpgDriver, Queries

        conn = await asyncpg.connect(url)
        try:
            queries = Queries(AsyncpgDriver(conn))
            for start in range(0, jobs, 10_000):
                n = min(10_000, jobs - start)
                await queries.enqueue(["noop"] * n, [None] * n, [0] * n)
        finally:
            await conn.close()
        await execute(url, "VACUUM ANALYZE pgqueuer", "VACUUM ANALYZE pgqueuer_log")

    async def finished(self, url: str) -> int:
        query = "SELECT count(*) FROM pgqueuer_log WHERE status = 'successful'"
        return int(str(await fetchval(url, query)))

    async def pending(self, url: str) -> int:
        return int(str(await fetchval(url, "SELECT count(*) FROM pgqueuer")))


SYSTEM = Pgqueuer()


# ---------------------------------------------------------------------------------------------
# Child side
# ---------------------------------------------------------------------------------------------


async def work(opts: WorkerOpts) -> None:
    from pgqueuer import AsyncpgDriver, Queries, QueueManager
    from pgqueuer.models import Job
    from pgqueuer.types import QueueExecutionMode

    stamps = Stamps(opts.stamps)
    conn = await asyncpg.connect(opts.dsn)
    qm = QueueManager(Queries(AsyncpgDriver(conn)))

    async def noop(job: Job) -> None:
        return None

    async def stamp(job: Job) -> None:
        stamps.record(json.loads(job.payload or b"{}")["i"])

    qm.entrypoint("noop")(noop)
    qm.entrypoint("stamp")(stamp)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, qm.shutdown.set)
    emit("ready")
    await qm.run(
        batch_size=opts.batch_size,
        mode=QueueExecutionMode.drain if opts.burst else QueueExecutionMode.continuous,
    )
    emit("done")
    await conn.close()


class PgqueuerClient:
    def __init__(self, conn: asyncpg.Connection) -> None:
        from pgqueuer import AsyncpgDriver, Queries

        self.conn = conn
        self.queries = Queries(AsyncpgDriver(conn))

    async def one(self, stamp: int | None) -> None:
        if stamp is None:
            await self.queries.enqueue("noop", None)
        else:
            await self.queries.enqueue("stamp", json.dumps({"i": stamp}).encode())

    async def batch(self, jobs: int) -> None:
        await self.queries.enqueue(["noop"] * jobs, [None] * jobs, [0] * jobs)

    async def close(self) -> None:
        await self.conn.close()


async def connect(dsn: str) -> Client:
    return PgqueuerClient(await asyncpg.connect(dsn))


# ---------------------------------------------------------------------------------------------
# In-process worker and producer (the steady and xmin sections, bench/inprocess.py)
# ---------------------------------------------------------------------------------------------


class PgqueuerProducer:
    """``Queries.enqueue`` on an asyncpg connection: one autocommit statement per call."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        from pgqueuer import AsyncpgDriver, Queries

        self.conn = conn
        self.queries = Queries(AsyncpgDriver(conn))

    async def one(self, stamp: float) -> None:
        await self.queries.enqueue("steady", json.dumps({"t": stamp}).encode())

    async def many(self, stamp: float, jobs: int) -> None:
        payload = json.dumps({"t": stamp}).encode()
        await self.queries.enqueue(["steady"] * jobs, [payload] * jobs, [0] * jobs)

    async def close(self) -> None:
        await self.conn.close()


class PgqueuerInProcess:
    """Its QueueManager in continuous mode with ``max_concurrent_tasks`` = the concurrency
    (the cap on the jobs it holds at once) and ``batch_size`` = the variant's, at most half
    the concurrency (``run`` refuses a cap below twice the batch)."""

    def __init__(self, dsn: str, concurrency: int, batch_size: int) -> None:
        self.dsn = dsn
        self.concurrency = concurrency
        self.batch = max(1, min(batch_size or 10, concurrency // 2))
        self.settings = f"max_concurrent_tasks={concurrency}, batch_size={self.batch}"
        self.conn: asyncpg.Connection | None = None
        self.shutdown: asyncio.Event | None = None
        self.task: asyncio.Task[None] | None = None

    async def start(self, on_job: OnJob) -> None:
        from pgqueuer import AsyncpgDriver, Queries, QueueManager
        from pgqueuer.models import Job

        self.conn = await asyncpg.connect(self.dsn)
        qm = QueueManager(Queries(AsyncpgDriver(self.conn)))

        async def steady(job: Job) -> None:
            await on_job(float(json.loads(job.payload or b"{}")["t"]))

        qm.entrypoint("steady")(steady)
        self.shutdown = qm.shutdown
        self.task = asyncio.create_task(
            qm.run(batch_size=self.batch, max_concurrent_tasks=self.concurrency)
        )
        # No "ready" to wait for: the warm-up covers its start.
        await asyncio.sleep(0)

    async def producer(self) -> Producer:
        return PgqueuerProducer(await asyncpg.connect(self.dsn))

    async def stop(self) -> None:
        try:
            if self.shutdown is not None and self.task is not None:
                self.shutdown.set()
                await self.task
        finally:
            if self.conn is not None:
                with contextlib.suppress(Exception):
                    await self.conn.close()


def in_process(dsn: str, concurrency: int, batch_size: int) -> Driver:
    return PgqueuerInProcess(dsn, concurrency, batch_size)


if __name__ == "__main__":
    child_main(work=work, connect=connect)

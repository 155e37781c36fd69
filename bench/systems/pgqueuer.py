"""pgqueuer (PyPI): its QueueManager on an asyncpg connection, drain mode for processing, and
``Queries.enqueue`` (single and list form) for enqueueing. Only imported when installed."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import signal

import asyncpg

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


if __name__ == "__main__":
    child_main(work=work, connect=connect)

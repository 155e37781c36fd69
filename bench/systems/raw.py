"""The raw-SQL baseline: what a queue costs with nothing but the essential statements.

asyncpg, prepared statements, ``loops`` claim loops on one connection each: claim 100 with
``SKIP LOCKED`` in a MATERIALIZED CTE, run them, complete all 100 in one ``UPDATE … FROM
unnest``. An idle loop waits on LISTEN/NOTIFY (one listening connection per process).
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Awaitable, Callable

import asyncpg

from bench.inprocess import Driver, OnJob, Producer
from bench.measure import Stamps, emit
from bench.pg import execute, fetchval
from bench.systems.base import Client, System, WorkerOpts, child_main

SCHEMA = """
CREATE TABLE raw_jobs (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task text NOT NULL,
    args jsonb NOT NULL DEFAULT '{}',
    state text NOT NULL DEFAULT 'queued',
    attempts integer NOT NULL DEFAULT 0,
    run_at timestamptz NOT NULL DEFAULT now(),
    locked_until timestamptz,
    finished_at timestamptz
);
CREATE INDEX raw_jobs_claim_idx ON raw_jobs (run_at, id) WHERE state = 'queued';
"""

CLAIM = """
WITH c AS MATERIALIZED (
    SELECT id FROM raw_jobs
    WHERE state = 'queued' AND run_at <= now()
    ORDER BY run_at, id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE raw_jobs AS j
SET state = 'running', attempts = j.attempts + 1, locked_until = now() + interval '30 seconds'
FROM c
WHERE j.id = c.id
RETURNING j.id, j.task, j.args::text AS args
"""

COMPLETE = """
UPDATE raw_jobs AS j
SET state = 'done', finished_at = now(), locked_until = NULL
FROM unnest($1::bigint[]) AS d(id)
WHERE j.id = d.id
"""

INSERT_ONE = """
WITH i AS (INSERT INTO raw_jobs (task, args) VALUES ($1, $2::jsonb) RETURNING id)
SELECT pg_notify('raw_jobs', '') FROM i
"""

INSERT_MANY = """
WITH i AS (
    INSERT INTO raw_jobs (task, args) SELECT 'noop', a::jsonb FROM unnest($1::text[]) AS a
    RETURNING id
)
SELECT pg_notify('raw_jobs', '') WHERE EXISTS (SELECT FROM i)
"""


class Raw(System):
    name = "raw"
    module = "bench.systems.raw"

    async def prepare(self, url: str) -> None:
        await execute(url, SCHEMA)

    async def fill(self, url: str, jobs: int) -> None:
        await execute(
            url,
            f"INSERT INTO raw_jobs (task) SELECT 'noop' FROM generate_series(1, {jobs})",
            "VACUUM ANALYZE raw_jobs",
        )

    async def finished(self, url: str) -> int:
        return int(str(await fetchval(url, "SELECT count(*) FROM raw_jobs WHERE state = 'done'")))

    async def pending(self, url: str) -> int:
        query = "SELECT count(*) FROM raw_jobs WHERE state <> 'done'"
        return int(str(await fetchval(url, query)))


SYSTEM = Raw()


# ---------------------------------------------------------------------------------------------
# Child side
# ---------------------------------------------------------------------------------------------


async def _noop() -> None:
    return None


async def claim_loop(
    conn: asyncpg.Connection,
    *,
    batch_size: int,
    burst: bool,
    stop: asyncio.Event,
    wake: asyncio.Event,
    run: Callable[[asyncpg.Record], Awaitable[None]],
) -> None:
    claim = await conn.prepare(CLAIM)
    complete = await conn.prepare(COMPLETE)
    while not stop.is_set():
        wake.clear()
        rows = await claim.fetch(batch_size)
        if rows:
            await asyncio.gather(*(run(row) for row in rows))
            await complete.fetch([row["id"] for row in rows])
            continue
        if burst:
            return
        waiter = asyncio.ensure_future(wake.wait())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({waiter, stopper}, timeout=1.0, return_when="FIRST_COMPLETED")
        waiter.cancel()
        stopper.cancel()


async def work(opts: WorkerOpts) -> None:
    stamps = Stamps(opts.stamps)
    stop = asyncio.Event()
    wake = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    conns = [await asyncpg.connect(opts.dsn) for _ in range(opts.loops)]
    listener: asyncpg.Connection | None = None
    if not opts.burst:
        listener = await asyncpg.connect(opts.dsn)
        await listener.add_listener("raw_jobs", lambda *_: wake.set())

    async def run(job: asyncpg.Record) -> None:
        args = json.loads(job["args"])
        if job["task"] == "stamp":
            stamps.record(args["i"])
        else:
            await _noop()

    emit("ready")
    await asyncio.gather(
        *(
            claim_loop(
                conn, batch_size=opts.batch_size, burst=opts.burst, stop=stop, wake=wake, run=run
            )
            for conn in conns
        )
    )
    emit("done")
    for conn in [*conns, *([listener] if listener else [])]:
        await conn.close()


class RawClient:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def one(self, stamp: int | None) -> None:
        if stamp is None:
            await self.conn.fetch(INSERT_ONE, "noop", "{}")
        else:
            await self.conn.fetch(INSERT_ONE, "stamp", json.dumps({"i": stamp}))

    async def batch(self, jobs: int) -> None:
        await self.conn.fetch(INSERT_MANY, ["{}"] * jobs)

    async def close(self) -> None:
        await self.conn.close()


async def connect(dsn: str) -> Client:
    return RawClient(await asyncpg.connect(dsn))


# ---------------------------------------------------------------------------------------------
# In-process worker and producer (the steady and xmin sections, bench/inprocess.py)
# ---------------------------------------------------------------------------------------------


class RawProducer:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def one(self, stamp: float) -> None:
        await self.conn.fetch(INSERT_ONE, "steady", json.dumps({"t": stamp}))

    async def many(self, stamp: float, jobs: int) -> None:
        await self.conn.fetch(INSERT_MANY, [json.dumps({"t": stamp})] * jobs)

    async def close(self) -> None:
        await self.conn.close()


class RawInProcess:
    """Two claim loops of ``concurrency / 2`` each, as the worker child runs them, woken by
    LISTEN/NOTIFY."""

    LOOPS = 2

    def __init__(self, dsn: str, concurrency: int) -> None:
        self.dsn = dsn
        self.batch = max(1, concurrency // self.LOOPS)
        self.settings = f"{self.LOOPS} claim loops of {self.batch}"
        self.stop_event = asyncio.Event()
        self.wake = asyncio.Event()
        self.conns: list[asyncpg.Connection] = []
        self.task: asyncio.Future[list[None]] | None = None

    async def start(self, on_job: OnJob) -> None:
        self.conns = [await asyncpg.connect(self.dsn) for _ in range(self.LOOPS + 1)]
        await self.conns[-1].add_listener("raw_jobs", lambda *_: self.wake.set())

        async def run(job: asyncpg.Record) -> None:
            await on_job(float(json.loads(job["args"])["t"]))

        self.task = asyncio.gather(
            *(
                claim_loop(
                    conn,
                    batch_size=self.batch,
                    burst=False,
                    stop=self.stop_event,
                    wake=self.wake,
                    run=run,
                )
                for conn in self.conns[: self.LOOPS]
            )
        )

    async def producer(self) -> Producer:
        return RawProducer(await asyncpg.connect(self.dsn))

    async def stop(self) -> None:
        self.stop_event.set()
        self.wake.set()
        try:
            if self.task is not None:
                await self.task
        finally:
            for conn in self.conns:
                await conn.close()


def in_process(dsn: str, concurrency: int, batch_size: int) -> Driver:
    return RawInProcess(dsn, concurrency)


if __name__ == "__main__":
    child_main(work=work, connect=connect)

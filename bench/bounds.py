"""``python -m bench.bounds``: what bounds the speed targets that pgoutbox misses, measured
in one process against one server, the ways interleaved.

Each way puts one job in the database in a transaction of its own: the peers' (pgqueuer's
``enqueue``, the raw baseline's INSERT, both autocommit), pgoutbox's (``enqueue`` inside an
``AsyncSession`` transaction, as the enqueue and latency benches call it, inside a raw
asyncpg transaction, and alone with ``autocommit=True``), and the steps between them: the
raw INSERT inside an asyncpg transaction (BEGIN, INSERT, COMMIT), and an ``AsyncSession``
transaction around ``SELECT 1``, around the sample app's report-row INSERT, and around the
job row's plain-SQL INSERT sent as ``text()`` (no ``enqueue`` code at all).

Two ways of calling them:

- back to back, as the enqueue bench does: calls per second, and this process's CPU per call
  (the database's work not included: what a web process pays for it);
- one call every 20 ms, the rate of the latency bench, when every process sleeps between
  calls: the p50 of one call, and for the session ways the p50 of each step.

Then what one more statement costs a request that already has its transaction (the request
path's question): CPU per statement, many of them inside one open transaction.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import insert, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

import bench.tasks  # noqa: F401  (registers the tasks enqueue checks names against)
from app.models import Report
from bench import pg
from bench.config import configure
from bench.context import Context
from bench.measure import run_async
from bench.plain import JOB_INSERT
from bench.systems import load
from bench.systems.base import Client
from outbox_worker import enqueue, sqlalchemy_url
from outbox_worker.devdb import PostgresServer

# Session steps, in order: AsyncSession() and begin(); the statement (asyncpg's BEGIN goes out
# with it, lazily); COMMIT; closing the session (the connection back to the pool).
STEPS = ("open", "statement", "commit", "close")
# Back-to-back figures are the median of this many rounds, the ways taking turns.
ROUNDS = 3


@dataclass
class Way:
    label: str
    call: Callable[[int], Awaitable[None]]
    # Per call, back to back: wall seconds, this process's CPU seconds.
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    # Per call, one every interval: wall seconds, and the session steps where there are any.
    idle: list[float] = field(default_factory=list)
    steps: list[list[float]] = field(default_factory=list)


def session_way(
    label: str, engine: AsyncEngine, body: Callable[[AsyncSession, int], Awaitable[object]]
) -> Way:
    steps: list[list[float]] = []

    async def call(i: int) -> None:
        t0 = time.perf_counter()
        async with AsyncSession(engine) as session:
            async with session.begin():
                t1 = time.perf_counter()
                await body(session, i)
                t2 = time.perf_counter()
            t3 = time.perf_counter()
        steps.append([t1 - t0, t2 - t1, t3 - t2, time.perf_counter() - t3])

    return Way(label, call, steps=steps)


def job_params(i: int) -> dict[str, Any]:
    """The row enqueue(session, "stamp", {"i": i}) writes, with none of its code."""
    return {
        "queue": "default",
        "task": "stamp",
        "args": json.dumps({"i": i}),
        "priority": 0,
        "max_attempts": 5,
        "dedupe_key": None,
    }


_SELECT_ONE = text("SELECT 1")


async def select_one(session: AsyncSession, i: int) -> object:
    return (await session.execute(_SELECT_ONE)).first()


async def report_row(session: AsyncSession, i: int) -> object:
    return await session.execute(insert(Report).values(id=uuid.uuid4(), params={"i": i}))


async def job_text(session: AsyncSession, i: int) -> object:
    return (await session.execute(JOB_INSERT, job_params(i))).first()


async def job_enqueue(session: AsyncSession, i: int) -> object:
    return await enqueue(session, "stamp", {"i": i})


async def report_row_of_job(session: AsyncSession, i: int) -> object:
    """The report row as POST /reports writes it: with its job's id."""
    values = {"id": uuid.uuid4(), "params": {"i": i}, "job_id": i}
    return await session.execute(insert(Report).values(**values))


async def job_text_keyed(session: AsyncSession, i: int) -> object:
    params = {**job_params(i), "dedupe_key": str(uuid.uuid4())}
    return (await session.execute(JOB_INSERT, params)).scalar_one()


async def job_enqueue_keyed(session: AsyncSession, i: int) -> object:
    """As POST /reports enqueues: keyed by the new report's id."""
    return await enqueue(session, "stamp", {"i": i}, key=str(uuid.uuid4()))


@dataclass
class Statement:
    label: str
    body: Callable[[AsyncSession, int], Awaitable[object]]
    cpu: list[float] = field(default_factory=list)


def statements() -> list[Statement]:
    return [
        Statement("SELECT 1", select_one),
        Statement("the report row, as POST /reports writes it (ORM INSERT)", report_row_of_job),
        Statement("the job's plain INSERT with a key, as text()", job_text_keyed),
        Statement("enqueue(..., key=...), as POST /reports calls it", job_enqueue_keyed),
    ]


async def client_of(system: str, url: str) -> Client:
    module = importlib.import_module(f"bench.systems.{system}")
    client: Client = await module.connect(url)
    return client


async def open_ways(ctx: Context, stack: AsyncExitStack) -> tuple[list[Way], AsyncEngine]:
    async def database(system: str) -> str:
        template = await ctx.template(load(system))
        return await stack.enter_async_context(ctx.fresh(template))

    ways: list[Way] = []
    peer = load("pgqueuer").missing()
    if peer is None:
        pgqueuer = await client_of("pgqueuer", await database("pgqueuer"))
        stack.push_async_callback(pgqueuer.close)
        ways.append(Way("pgqueuer enqueue (autocommit)", pgqueuer.one))
    else:
        ctx.note(f"pgqueuer left out: {peer}")
    raw_url = await database("raw")
    raw = await client_of("raw", raw_url)
    stack.push_async_callback(raw.close)
    ways.append(Way("raw INSERT (autocommit)", raw.one))
    conn = await asyncpg.connect(raw_url)
    stack.push_async_callback(conn.close)
    raw_insert: str = importlib.import_module("bench.systems.raw").INSERT_ONE

    async def in_transaction(i: int) -> None:
        async with conn.transaction():
            await conn.fetch(raw_insert, "stamp", json.dumps({"i": i}))

    ways.append(Way("raw INSERT in BEGIN ... COMMIT (asyncpg)", in_transaction))

    pgoutbox_url = await database("pgoutbox")
    pgoutbox_conn = await asyncpg.connect(pgoutbox_url)
    stack.push_async_callback(pgoutbox_conn.close)

    async def enqueue_in_transaction(i: int) -> None:
        async with pgoutbox_conn.transaction():
            await enqueue(pgoutbox_conn, "stamp", {"i": i})

    ways.append(Way("asyncpg: enqueue() in BEGIN ... COMMIT (pgoutbox)", enqueue_in_transaction))

    async def enqueue_alone(i: int) -> None:
        await enqueue(pgoutbox_conn, "stamp", {"i": i}, autocommit=True)

    ways.append(Way("asyncpg: enqueue(autocommit=True) (pgoutbox)", enqueue_alone))
    engine = create_async_engine(sqlalchemy_url(pgoutbox_url))
    stack.push_async_callback(engine.dispose)
    ways += [
        session_way("AsyncSession: SELECT 1", engine, select_one),
        session_way("AsyncSession: report-row INSERT (ORM)", engine, report_row),
        session_way("AsyncSession: the job's plain INSERT as text()", engine, job_text),
        session_way("AsyncSession: enqueue() (pgoutbox)", engine, job_enqueue),
    ]
    return ways, engine


async def measure_statements(engine: AsyncEngine, statements: list[Statement], calls: int) -> None:
    """Each statement ``calls`` times inside one open transaction (rolled back), in rounds:
    what one more statement costs a request that already has its transaction."""
    for turn in range(ROUNDS):
        for statement in statements:
            async with AsyncSession(engine) as session:
                for i in range(min(200, calls) if turn == 0 else 20):
                    await statement.body(session, i)
                cpu = time.process_time()
                for i in range(calls // ROUNDS):
                    await statement.body(session, i)
                statement.cpu.append((time.process_time() - cpu) / (calls // ROUNDS))
                await session.rollback()


async def measure(ways: list[Way], calls: int, idle_calls: int, interval: float) -> None:
    """Back to back in rounds, each way in turn; then one call per interval, round robin."""
    for way in ways:
        for i in range(min(200, calls)):  # warm-up: prepared statements, pools, caches
            await way.call(i)
        way.steps.clear()
    for _ in range(ROUNDS):
        for way in ways:
            cpu, wall = time.process_time(), time.perf_counter()
            for i in range(calls // ROUNDS):
                await way.call(i)
            n = calls // ROUNDS
            way.wall.append((time.perf_counter() - wall) / n)
            way.cpu.append((time.process_time() - cpu) / n)
    for way in ways:
        way.steps.clear()
    began = time.monotonic()
    for n in range(idle_calls * len(ways)):
        way = ways[n % len(ways)]
        delay = began + n * interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        t0 = time.perf_counter()
        await way.call(n)
        way.idle.append(time.perf_counter() - t0)


def figures(ways: list[Way], measured: list[Statement]) -> dict[str, Any]:
    """Every figure behind the table, in seconds, each call or round on its own."""
    return {
        "ways": {
            way.label: {"wall": way.wall, "cpu": way.cpu, "idle": way.idle, "steps": way.steps}
            for way in ways
        },
        "statements": {statement.label: statement.cpu for statement in measured},
    }


def render(ways: list[Way], measured: list[Statement], interval: float, machine: str) -> str:
    def ms(value: float) -> str:
        return f"{value * 1000:.2f}"

    lines = [
        f"Machine: {machine}",
        "",
        f"| way | back to back (per s) | CPU here per call (us) | one every {interval * 1000:.0f} "
        "ms: p50 (ms) | " + " | ".join(f"{step} p50 (ms)" for step in STEPS) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(STEPS),
    ]
    for way in ways:
        steps = [
            ms(statistics.median(s[k] for s in way.steps)) if way.steps else ""
            for k in range(len(STEPS))
        ]
        lines.append(
            f"| {way.label} | {1 / statistics.median(way.wall):,.0f} "
            f"| {statistics.median(way.cpu) * 1e6:.0f} | {ms(statistics.median(way.idle))} | "
            + " | ".join(steps)
            + " |"
        )
    lines += [
        "",
        "| statement, one more inside an open AsyncSession transaction | CPU here (us) |",
        "|---|---:|",
    ]
    lines += [f"| {st.label} | {statistics.median(st.cpu) * 1e6:.0f} |" for st in measured]
    return "\n".join(lines) + "\n"


async def run(
    server: PostgresServer, workdir: Path, calls: int, idle_calls: int, verbose: bool = True
) -> tuple[list[Way], list[Statement], str]:
    config = configure("full", ("pgoutbox", "raw", "pgqueuer"), ())
    interval = 1 / config.latency_rate
    ctx = Context(server=server, config=config, workdir=workdir, verbose=verbose)
    try:
        async with AsyncExitStack() as stack:
            ways, engine = await open_ways(ctx, stack)
            ctx.say(f"{len(ways)} ways, {calls} calls back to back, {idle_calls} idle calls each")
            await measure(ways, calls, idle_calls, interval)
            measured = statements()
            await measure_statements(engine, measured, calls)
        machine = await pg.describe(server.url)
    finally:
        await ctx.close()
    return ways, measured, render(ways, measured, interval, machine)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bounds", description=__doc__)
    parser.add_argument("--calls", type=int, default=3000, help="back-to-back calls per way")
    parser.add_argument("--idle-calls", type=int, default=150, help="idle calls per way")
    parser.add_argument("--output", type=Path, help="also write the table (Markdown) here")
    parser.add_argument("--json", type=Path, help="also write every figure behind it here")
    opts = parser.parse_args(argv)
    results: list[tuple[list[Way], list[Statement], str]] = []

    async def measured() -> None:
        server = pg.start_server()
        try:
            with tempfile.TemporaryDirectory(prefix="pgoutbox-bounds-") as workdir:
                results.append(await run(server, Path(workdir), opts.calls, opts.idle_calls))
        finally:
            server.close()

    run_async(measured)
    ways, statements, table = results[0]
    print(table, end="")
    if opts.output:
        opts.output.write_text(table)
    if opts.json:
        opts.json.write_text(json.dumps(figures(ways, statements), indent=2) + "\n")


if __name__ == "__main__":
    main()

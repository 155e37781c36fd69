"""JOB_CLAIM: never more than asked, never the same job twice, in the promised order, served by
the ready lanes' indexes; and many worker processes run every job exactly once."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import pytest
import structlog
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

import tests.workload  # noqa: F401 -- registers the tasks enqueue checks names against
from outbox_worker import NewJob, enqueue_many, sql
from outbox_worker._worker.claimer import Claimer
from outbox_worker._worker.slots import Slots
from tests.conftest import WorkerProcess, wait_until

LEASE_SECONDS = 30.0


async def claim(
    conn: asyncpg.Connection, limit: int, worker_id: str, queues: list[str] | None = None
) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        *sql.bind(
            sql.JOB_CLAIM,
            queues=queues or ["default"],
            limit=limit,
            ahead=0,
            worker_id=worker_id,
            lease_seconds=LEASE_SECONDS,
        )
    )
    return rows


async def test_concurrent_claims_never_exceed_their_limit_nor_overlap(
    database_url: str, pool: asyncpg.Pool
) -> None:
    total = 500
    await pool.execute(
        "INSERT INTO outbox_jobs (task, args) "
        "SELECT 'echo', jsonb_build_object('n', g) FROM generate_series(1, $1) g",
        total,
    )
    all_ids = {r["id"] for r in await pool.fetch("SELECT id FROM outbox_jobs")}
    assert len(all_ids) == total

    connections = [await asyncpg.connect(database_url) for _ in range(8)]
    limits = [1, 2, 3, 4, 5, 7, 2, 1]
    claimed_by: dict[int, str] = {}
    try:
        for round_number in range(10 * total):
            # One claim per connection per round, all at the same time.
            asked = [limits[(i + round_number) % len(limits)] for i in range(len(connections))]
            results = await asyncio.gather(
                *(
                    claim(conn, limit, f"claimer-{i}")
                    for i, (conn, limit) in enumerate(zip(connections, asked, strict=True))
                )
            )
            for i, (rows, limit) in enumerate(zip(results, asked, strict=True)):
                assert len(rows) <= limit, f"asked for {limit}, got {len(rows)}"
                for row in rows:
                    assert row["id"] not in claimed_by, (
                        f"job {row['id']} claimed by {claimed_by[row['id']]} and claimer-{i}"
                    )
                    assert row["attempts"] == 1
                    assert row["task"] == "echo"
                    claimed_by[row["id"]] = f"claimer-{i}"
            # A round where nobody got anything had nobody holding locks either: all are gone.
            if not any(results):
                break
        else:
            pytest.fail("claims never ran dry")
    finally:
        for conn in connections:
            await conn.close()

    assert set(claimed_by) == all_ids
    rows = await pool.fetch(
        "SELECT id, state, attempts, locked_by, locked_until > now() AS lease_ahead, "
        "started_at IS NOT NULL AS started FROM outbox_jobs"
    )
    in_table = {r["id"]: r for r in rows}
    assert {i for i, r in in_table.items() if r["state"] == "running"} == set(claimed_by)
    for job_id, holder in claimed_by.items():
        row = in_table[job_id]
        assert row["attempts"] == 1
        assert row["locked_by"] == holder
        assert row["lease_ahead"] is True
        assert row["started"] is True


async def test_claim_order_priority_then_run_at_then_id(pool: asyncpg.Pool) -> None:
    # Explicit ids, inserted in a scrambled order, so that neither insertion order nor
    # physical order can pass for the id tie-break.
    await pool.execute(
        """
        INSERT INTO outbox_jobs (id, queue, task, priority, run_at)
        OVERRIDING SYSTEM VALUE
        VALUES
            (10, 'default', 'echo',   0, now() - interval '3 minutes'),
            (30, 'default', 'echo',   5, now() - interval '1 minute'),
            (50, 'default', 'echo', 100, now() + interval '1 hour'),
            ( 1, 'default', 'echo',  -1, now() - interval '10 minutes'),
            ( 5, 'default', 'echo',   0, now() - interval '3 minutes'),
            (60, 'other',   'echo', 100, now() - interval '1 hour'),
            (40, 'default', 'echo',   5, now() - interval '2 minutes'),
            (20, 'default', 'echo',   0, now() - interval '4 minutes')
        """
    )
    expected = [40, 30, 20, 5, 10, 1]

    async with pool.acquire() as conn:
        # A bigger claim takes the head of the same order (rolled back: looked at only).
        tx = conn.transaction()
        await tx.start()
        try:
            head = await claim(conn, 3, "w")
        finally:
            await tx.rollback()
        assert {r["id"] for r in head} == set(expected[:3])

        order = []
        for _ in range(len(expected) + 2):
            rows = await claim(conn, 1, "w")
            assert len(rows) <= 1
            if not rows:
                break
            order.append(rows[0]["id"])
        assert order == expected

        # The other queue's job is claimable, but only by a claim that names its queue.
        assert [r["id"] for r in await claim(conn, 10, "w", ["other"])] == [60]
        assert await claim(conn, 10, "w", ["default", "other"]) == []

    states = {r["id"]: r["state"] for r in await pool.fetch("SELECT id, state FROM outbox_jobs")}
    assert states[50] == "queued"
    assert all(state == "running" for job_id, state in states.items() if job_id != 50)


def _plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _plan_nodes(child)


async def explain_claim(conn: asyncpg.Connection, options: str = "") -> dict[str, Any]:
    """The plan of a claim of 10 jobs from the default queue, as JSON (``options`` such as
    ``"ANALYZE, BUFFERS, "``: an analyzed claim does claim)."""
    raw = await conn.fetchval(
        f"EXPLAIN ({options}FORMAT JSON) " + sql.JOB_CLAIM, ["default"], 10, 0, "w", LEASE_SECONDS
    )
    plan: dict[str, Any] = json.loads(raw)[0]["Plan"]
    return plan


def assert_reads_lanes_in_order(plan: dict[str, Any]) -> None:
    """The lanes' indexes hand rows over in the claim's order (a Merge Append): no sort of
    the tables' rows, stop after $2 (the claimed rows alone may be sorted again, to place
    them in that order)."""
    nodes = list(_plan_nodes(plan))
    assert any(n["Node Type"] == "Merge Append" for n in nodes), plan
    sorts = [n for n in nodes if n["Node Type"] in ("Sort", "Incremental Sort")]
    assert not any(
        str(n.get("Relation Name")).startswith("outbox_")
        for sort in sorts
        for n in _plan_nodes(sort)
    ), plan


async def test_claim_reads_the_ready_lanes_in_order_on_a_large_table(pool: asyncpg.Pool) -> None:
    await pool.execute(
        """
        INSERT INTO outbox_jobs
            (task, args, state, attempts, run_at, started_at, finished_at, result)
        SELECT 'echo', jsonb_build_object('n', g), 'succeeded', 1,
               now() - g * interval '1 second', now() - g * interval '1 second',
               now() - g * interval '1 second' + interval '10 ms', '"done"'
        FROM generate_series(1, 100000) g
        """
    )
    # Queued jobs, half of them due, over three priorities and two queues.
    await pool.execute(
        """
        INSERT INTO outbox_jobs (queue, task, args, priority, run_at)
        SELECT CASE WHEN g % 10 = 0 THEN 'reports' ELSE 'default' END, 'echo',
               jsonb_build_object('n', g), g % 3, now() + (g - 5000) * interval '1 second'
        FROM generate_series(1, 10000) g
        """
    )
    await pool.execute("ANALYZE outbox_jobs, outbox_ready")
    table_pages = await pool.fetchval(
        "SELECT pg_relation_size('outbox_jobs') / current_setting('block_size')::int"
    )
    assert table_pages > 1000, "the table is too small for the buffer check to mean anything"

    async with pool.acquire() as conn:
        plan = await explain_claim(conn)
        nodes = list(_plan_nodes(plan))
        indexes = {n.get("Index Name") for n in nodes}
        assert {"outbox_ready_0_claim_idx", "outbox_ready_1_claim_idx"} <= indexes, plan
        assert "outbox_ready_later_due_idx" not in indexes, plan
        seq_scans = [
            n
            for n in nodes
            if n["Node Type"] == "Seq Scan"
            and n.get("Relation Name") in ("outbox_jobs", "outbox_ready_0", "outbox_ready_later")
        ]
        assert seq_scans == [], plan
        assert_reads_lanes_in_order(plan)

        tx = conn.transaction()
        await tx.start()
        try:
            analyzed = await explain_claim(conn, "ANALYZE, BUFFERS, ")
        finally:
            await tx.rollback()
    assert analyzed["Actual Rows"] == 10
    buffers = analyzed["Shared Hit Blocks"] + analyzed["Shared Read Blocks"]
    assert buffers < 1000, f"claiming 10 jobs touched {buffers} buffers: {analyzed}"
    assert buffers < table_pages / 10, f"{buffers} buffers of a {table_pages}-page table"
    assert await pool.fetchval("SELECT count(*) FROM outbox_jobs WHERE state = 'running'") == 0


@pytest.mark.timeout(300)
async def test_three_worker_processes_run_every_job_exactly_once(
    engine: AsyncEngine, pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    total = 2000
    async with AsyncSession(engine) as session:
        jobs = await enqueue_many(session, [NewJob("echo", {"n": n}) for n in range(total)])
        await session.commit()
    assert len({job.id for job in jobs}) == total

    workers = [spawn_worker("--concurrency", "20", "--burst") for _ in range(3)]
    codes = [await asyncio.to_thread(w.wait, 180) for w in workers]
    assert codes == [0, 0, 0], "\n".join(w.output()[-3000:] for w in workers)

    rows = await pool.fetch("SELECT id, state, attempts, args::text, result::text FROM outbox_jobs")
    assert len(rows) == total
    assert {r["state"] for r in rows} == {"succeeded"}
    assert {r["attempts"] for r in rows} == {1}
    assert all(json.loads(r["result"]) == json.loads(r["args"]) for r in rows)

    executions = await pool.fetch("SELECT job_id, attempt, pid FROM test_executions")
    per_job: dict[int, int] = {}
    for row in executions:
        per_job[row["job_id"]] = per_job.get(row["job_id"], 0) + 1
    twice = {job_id: n for job_id, n in per_job.items() if n != 1}
    assert twice == {}, f"jobs executed more than once: {twice}"
    assert set(per_job) == {job.id for job in jobs}
    assert {row["attempt"] for row in executions} == {1}
    pids = {row["pid"] for row in executions}
    assert pids <= {w.pid for w in workers}
    assert len(pids) > 1, f"only {pids} did any work"


async def test_a_worker_never_runs_more_jobs_than_its_concurrency_nor_holds_more_than_prefetch(
    engine: AsyncEngine, pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    """Claims overlap with completions (the claimer reserves rows and rides claims on the
    statement that writes successes) and jobs are claimed ahead of free slots, yet the
    handlers running never exceed --concurrency, nor the rows the database shows as running
    under the worker's name --concurrency plus --prefetch."""
    concurrency, prefetch, total = 7, 3, 600
    rng = random.Random(6)
    async with AsyncSession(engine) as session:
        await enqueue_many(
            session,
            [
                NewJob("counts_overlap", {"seconds": rng.choice([0, 0, 0.001, 0.004])})
                for _ in range(total)
            ],
        )
        await session.commit()

    worker = spawn_worker("--concurrency", str(concurrency), "--prefetch", str(prefetch), "--burst")
    most_running = 0
    while worker.proc.poll() is None:
        running = await pool.fetchval(
            "SELECT count(*) FROM outbox_jobs WHERE state = 'running' GROUP BY locked_by "
            "ORDER BY 1 DESC LIMIT 1"
        )
        most_running = max(most_running, running or 0)
        await asyncio.sleep(0.002)
    assert worker.wait(30) == 0, worker.output()[-3000:]

    results = await pool.fetch("SELECT state, result::text FROM outbox_jobs")
    assert {r["state"] for r in results} == {"succeeded"}
    overlap = [json.loads(r["result"]) for r in results]
    assert max(overlap) <= concurrency, f"{max(overlap)} handlers ran at once"
    assert max(overlap) > concurrency // 2, f"slots left unused: at most {max(overlap)} at once"
    assert 0 < most_running <= concurrency + prefetch, f"{most_running} rows under one worker"


def _claimer(pool: asyncpg.Pool, lease_seconds: float = 30.0) -> tuple[Claimer, dict[int, Any]]:
    """A claimer of four slots whose claimed jobs are held but never run; and what it holds."""
    slots = Slots(4, log=structlog.get_logger("test"))
    claimer = Claimer(
        pool=pool,
        worker_id="w",
        queues=["default"],
        lease_seconds=lease_seconds,
        slots=slots,
        start=slots.hold,
        log=structlog.get_logger("test"),
    )
    return claimer, slots.held


async def _blocked_claim(pool: asyncpg.Pool, claim: Awaitable[Any]) -> asyncio.Task[Any]:
    """Start a claim that waits on a table lock held by another transaction."""
    task = asyncio.ensure_future(claim)
    await wait_until(
        lambda: pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE '%open_queues%'"
        ),
        what="the claim waiting on the lock",
    )
    return task


async def test_a_claim_interrupted_in_flight_hands_back_rows_it_may_have_taken(
    engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    """A claim whose answer is lost may have committed: the claimer's next claim first hands
    back every row running under its name that it never started."""
    async with AsyncSession(engine) as session:
        await enqueue_many(session, [NewJob("noop") for _ in range(6)])
        await session.commit()
    claimer, started = _claimer(pool)
    # Two rows claimed under the worker's name whose answer never reached it.
    async with pool.acquire() as conn:
        lost = await claim(conn, 2, "w")

    async with pool.acquire() as locker, locker.transaction():
        await locker.execute("LOCK TABLE outbox_jobs IN EXCLUSIVE MODE")
        task = await _blocked_claim(pool, claimer.claim())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert started == {}

    asked, got = await claimer.claim()
    assert (asked, got) == (4, 4)
    running = await pool.fetch(
        "SELECT id, attempts FROM outbox_jobs WHERE state = 'running' AND locked_by = 'w'"
    )
    assert {r["id"] for r in running} == set(started), "a row runs under w that w never started"
    assert {r["attempts"] for r in running} == {1}
    # The lost rows are due again, their attempt not counted (they never ran).
    handed_back = await pool.fetch(
        "SELECT state, attempts, locked_by FROM outbox_jobs WHERE id = ANY($1::bigint[])",
        [r["id"] for r in lost],
    )
    assert [tuple(r) for r in handed_back] == [("queued", 0, None)] * 2


async def test_a_claim_answered_after_half_a_lease_is_handed_back_unstarted(
    engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    async with AsyncSession(engine) as session:
        await enqueue_many(session, [NewJob("noop") for _ in range(3)])
        await session.commit()
    claimer, started = _claimer(pool, lease_seconds=0.4)
    async with pool.acquire() as locker, locker.transaction():
        await locker.execute("LOCK TABLE outbox_jobs IN EXCLUSIVE MODE")
        task = await _blocked_claim(pool, claimer.claim())
        await asyncio.sleep(0.3)  # longer than half the lease
    assert await task == (4, 0)
    assert started == {}
    rows = await pool.fetch("SELECT state, attempts, locked_by FROM outbox_jobs")
    assert [tuple(r) for r in rows] == [("queued", 0, None)] * 3

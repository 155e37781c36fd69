"""outbox_ready: every queued job is claimable however it became queued (plain SQL, a retry,
an operator); stale ready rows are passed over and go with their lane; jobs due later wait
outside the lanes until promoted; lanes are emptied and switched without losing a job, and
keep claims short while another session holds a snapshot that stops vacuum."""

from __future__ import annotations

import asyncio
import random

import asyncpg
import structlog

from outbox_worker import sql
from outbox_worker._worker.maintenance import ReadyLanes
from outbox_worker.testing import DrainResult, drain
from tests.conftest import wait_until
from tests.test_claiming import _plan_nodes, assert_reads_lanes_in_order, claim, explain_claim
from tests.testing_tasks import tasks


async def maintain(conn: asyncpg.Connection | asyncpg.Pool, max_copy: int = 10_000) -> str:
    """One upkeep step that may switch lanes at once (no minimum time in a lane)."""
    done: str = await conn.fetchval(
        *sql.bind(sql.READY_MAINTAIN, switch_every=0.0, max_copy=max_copy, lock_wait=0.1)
    )
    return done


async def lanes(pool: asyncpg.Pool) -> dict[str, int]:
    rows = await pool.fetch(
        "SELECT tableoid::regclass::text AS lane, count(*) FROM outbox_ready GROUP BY 1"
    )
    return {r["lane"]: r["count"] for r in rows}


async def current_lane(pool: asyncpg.Pool) -> int:
    lane: int = await pool.fetchval("SELECT current FROM outbox_lanes")
    return lane


async def test_jobs_queued_by_plain_sql_get_a_ready_row_and_are_claimed(
    pool: asyncpg.Pool,
) -> None:
    await pool.execute(
        "INSERT INTO outbox_jobs (task, args) SELECT 'echo', '{}' FROM generate_series(1, 3)"
    )
    await pool.execute("INSERT INTO outbox_jobs (task, state) VALUES ('echo', 'succeeded')")
    assert await lanes(pool) == {"outbox_ready_0": 3}
    async with pool.acquire() as conn:
        assert len(await claim(conn, 10, "w")) == 3


async def test_a_requeued_job_gets_a_new_ready_row_and_runs_again(pool: asyncpg.Pool) -> None:
    job_id = await pool.fetchval("INSERT INTO outbox_jobs (task) VALUES ('echo') RETURNING id")
    async with pool.acquire() as conn:
        [row] = await claim(conn, 1, "w")
        assert await lanes(pool) == {}
        # The worker fails the attempt with no delay: queued again, due now.
        failed = await conn.fetch(
            *sql.bind(
                sql.JOB_FAIL_MANY,
                ids=[job_id],
                attempts=[row["attempts"]],
                errors=["boom"],
                delays=[0.0],
                give_up=[False],
                worker_id="w",
            )
        )
        assert [r["state"] for r in failed] == ["queued"]
        [again] = await claim(conn, 1, "w2")
    assert (again["id"], again["attempts"]) == (job_id, 2)


async def test_stale_ready_rows_are_passed_over_and_go_with_their_lane(pool: asyncpg.Pool) -> None:
    ids = [
        await pool.fetchval("INSERT INTO outbox_jobs (task) VALUES ('echo') RETURNING id")
        for _ in range(4)
    ]
    cancelled, deleted, later, moved = ids
    await pool.execute("UPDATE outbox_jobs SET state = 'cancelled' WHERE id = $1", cancelled)
    await pool.execute("DELETE FROM outbox_jobs WHERE id = $1", deleted)
    await pool.execute(
        "UPDATE outbox_jobs SET run_at = now() + interval '30 seconds' WHERE id = $1", later
    )
    await pool.execute("UPDATE outbox_jobs SET queue = 'other' WHERE id = $1", moved)
    async with pool.acquire() as conn:
        assert await claim(conn, 10, "w") == []
        [other] = await claim(conn, 10, "w", ["other"])
    assert other["id"] == moved
    # Once their lane is emptied, only the rescheduled job's rows are left (it is queued).
    assert await maintain(pool) == "switched"
    assert await maintain(pool) == "emptied"
    assert {r["job_id"] for r in await pool.fetch("SELECT job_id FROM outbox_ready")} == {later}


async def test_a_job_another_transaction_holds_keeps_its_ready_row(pool: asyncpg.Pool) -> None:
    job_id = await pool.fetchval("INSERT INTO outbox_jobs (task) VALUES ('echo') RETURNING id")
    async with pool.acquire() as holder, holder.transaction():
        await holder.execute("SELECT 1 FROM outbox_jobs WHERE id = $1 FOR UPDATE", job_id)
        async with pool.acquire() as conn:
            assert await claim(conn, 10, "w") == []
    async with pool.acquire() as conn:
        assert [r["id"] for r in await claim(conn, 10, "w")] == [job_id]


async def an_hour_passes(pool: asyncpg.Pool) -> None:
    """Every job and ready row due now, as if the time they were scheduled for had come (the
    job's own row changed without the trigger, which would write a fresh ready row)."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("ALTER TABLE outbox_jobs DISABLE TRIGGER outbox_jobs_ready_requeued")
        await conn.execute("UPDATE outbox_jobs SET run_at = now() WHERE state = 'queued'")
        await conn.execute("ALTER TABLE outbox_jobs ENABLE TRIGGER outbox_jobs_ready_requeued")
        await conn.execute("UPDATE outbox_ready SET run_at = now()")


async def test_claim_reads_lanes_in_order_while_they_have_no_statistics(pool: asyncpg.Pool) -> None:
    # Autovacuum never analyzes the lanes, so the planner knows only their size on disk and
    # guesses every condition's selectivity: a guess that makes 20,000 ready rows look like
    # one must not lead it to probe and sort them all for a claim of 10.
    await pool.execute(
        "INSERT INTO outbox_jobs (task) SELECT 'echo' FROM generate_series(1, 20000)"
    )
    await pool.execute("ANALYZE outbox_jobs")
    unknown = await pool.fetchval(
        "SELECT bool_and(reltuples < 0) FROM pg_class"
        " WHERE relname IN ('outbox_ready_0', 'outbox_ready_1')"
    )
    assert unknown, "the lanes have statistics: the test would not test the planner's guess"
    async with pool.acquire() as conn:
        assert_reads_lanes_in_order(await explain_claim(conn))


async def test_jobs_due_beyond_the_horizon_wait_outside_the_lanes_until_promoted(
    pool: asyncpg.Pool,
) -> None:
    job_id = await pool.fetchval(
        "INSERT INTO outbox_jobs (task, run_at) VALUES ('echo', now() + interval '1 hour') "
        "RETURNING id"
    )
    assert await lanes(pool) == {"outbox_ready_later": 1}
    assert await maintain(pool) in ("idle", "switched")
    assert await lanes(pool) == {"outbox_ready_later": 1}
    await an_hour_passes(pool)
    async with pool.acquire() as conn:
        assert await claim(conn, 10, "w") == []  # not promoted yet: the claim does not look
        assert "promoted" in (await maintain(conn)).split(",")
        assert set(await lanes(pool)) <= {"outbox_ready_0", "outbox_ready_1"}
        assert [r["id"] for r in await claim(conn, 10, "w")] == [job_id]


async def test_a_lane_is_emptied_only_once_few_rows_are_left_then_lanes_switch(
    pool: asyncpg.Pool,
) -> None:
    await pool.execute("INSERT INTO outbox_jobs (task) SELECT 'echo' FROM generate_series(1, 50)")
    assert await maintain(pool) == "switched"  # lane 0 (with the 50) is no longer current
    assert await current_lane(pool) == 1
    assert await maintain(pool, max_copy=10) == "waiting"
    assert await lanes(pool) == {"outbox_ready_0": 50}
    assert await maintain(pool, max_copy=100) == "emptied"
    assert await lanes(pool) == {"outbox_ready_1": 50}
    assert await pool.fetchval("SELECT pg_relation_size('outbox_ready_0')") == 0
    assert await maintain(pool) == "switched"
    assert await current_lane(pool) == 0
    async with pool.acquire() as conn:
        assert len(await claim(conn, 100, "w")) == 50


async def test_a_lane_a_dump_holds_is_left_for_later_and_claims_go_on(
    pool: asyncpg.Pool,
) -> None:
    await pool.execute("INSERT INTO outbox_jobs (task) SELECT 'echo' FROM generate_series(1, 5)")
    assert await maintain(pool) == "switched"
    async with pool.acquire() as dump, dump.transaction(isolation="repeatable_read"):
        # What pg_dump takes on every table it dumps.
        await dump.execute("LOCK TABLE outbox_ready_0 IN ACCESS SHARE MODE")
        lanes_upkeep = ReadyLanes(pool=pool, log=_quiet_log())
        assert await lanes_upkeep.maintain_once() == "busy"
        async with pool.acquire() as conn:
            assert len(await claim(conn, 2, "w")) == 2
    assert await maintain(pool) == "emptied"
    async with pool.acquire() as conn:
        assert len(await claim(conn, 10, "w")) == 3


async def _churn(conn: asyncpg.Connection, batches: int, *, switching: bool) -> None:
    """Enqueue, claim and finish 200 jobs a batch, with an upkeep step after each or not."""
    for _ in range(batches):
        await conn.execute(
            "INSERT INTO outbox_jobs (task) SELECT 'echo' FROM generate_series(1, 200)"
        )
        rows = await claim(conn, 200, "w")
        assert len(rows) == 200
        await conn.fetch(
            *sql.bind(
                sql.JOB_COMPLETE_MANY,
                ids=[r["id"] for r in rows],
                attempts=[r["attempts"] for r in rows],
                results=[None] * len(rows),
                worker_id="w",
            )
        )
        if switching:
            await maintain(conn)


READING_SCANS = {
    "Seq Scan",
    "Index Scan",
    "Index Only Scan",
    "Bitmap Heap Scan",
    "Bitmap Index Scan",
}


async def _claim_reads(conn: asyncpg.Connection) -> int:
    """Buffers the claim's reading of the ready lanes touches to claim 10 fresh jobs."""
    await conn.execute("INSERT INTO outbox_jobs (task) SELECT 'echo' FROM generate_series(1, 10)")
    plan = await explain_claim(conn, "ANALYZE, BUFFERS, ")
    assert plan["Actual Rows"] == 10
    # Whatever plan the lanes' statistics lead to (an index scan, a bitmap scan or a
    # sequential scan with a sort): the scans that look for ready rows, not the deletion of
    # the ones found.
    return sum(
        n["Shared Hit Blocks"] + n["Shared Read Blocks"]
        for n in _plan_nodes(plan)
        if n["Node Type"] in READING_SCANS
        and (
            str(n.get("Relation Name")).startswith("outbox_ready")
            or str(n.get("Index Name")).startswith("outbox_ready")
        )
    )


async def test_under_a_held_snapshot_claims_read_only_the_recent_lanes(
    database_url: str, pool: asyncpg.Pool
) -> None:
    holder = await asyncpg.connect(database_url)
    try:
        await holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        await holder.fetchval("SELECT count(*) FROM outbox_jobs")  # takes the snapshot
        async with pool.acquire() as conn:
            # 6,000 jobs claimed and finished with the lanes left as they are: vacuum can
            # remove none of their entries, and the claim steps over all of them.
            await _churn(conn, 30, switching=False)
            stuck = await _claim_reads(conn)
            # Two steps empty the lane with all that and make it current again.
            assert [await maintain(conn), await maintain(conn)] == ["switched", "emptied"]
            await _churn(conn, 30, switching=True)
            switching = await _claim_reads(conn)
        assert await holder.fetchval("SELECT count(*) FROM outbox_jobs") == 0  # still held
    finally:
        await holder.close()
    assert switching * 4 < stuck, (switching, stuck)


async def test_rows_enqueued_claimed_and_requeued_while_lanes_switch_are_never_lost(
    database_url: str, pool: asyncpg.Pool
) -> None:
    total = 3000
    stop = asyncio.Event()
    runs: dict[int, int] = {}
    failed_once: set[int] = set()

    async def enqueue() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            for start in range(0, total, 100):
                async with conn.transaction():
                    await conn.execute(
                        "INSERT INTO outbox_jobs (task, args) SELECT 'echo', "
                        "jsonb_build_object('n', g) FROM generate_series($1::int, $2::int) g",
                        start,
                        start + 99,
                    )
                    await asyncio.sleep(random.random() / 100)
        finally:
            await conn.close()

    async def work(name: str) -> None:
        conn = await asyncpg.connect(database_url)
        try:
            while not stop.is_set():
                rows = await claim(conn, random.randint(1, 50), name)
                for r in rows:
                    runs[r["id"]] = runs.get(r["id"], 0) + 1
                # One job in ten fails once and comes back at once: a re-queue mid-switch.
                retry = [r for r in rows if r["id"] % 10 == 0 and r["id"] not in failed_once]
                done = [r for r in rows if r not in retry]
                failed_once.update(r["id"] for r in retry)
                await conn.fetch(
                    *sql.bind(
                        sql.JOB_FAIL_MANY,
                        ids=[r["id"] for r in retry],
                        attempts=[r["attempts"] for r in retry],
                        errors=["once"] * len(retry),
                        delays=[0.0] * len(retry),
                        give_up=[False] * len(retry),
                        worker_id=name,
                    )
                )
                await conn.fetch(
                    *sql.bind(
                        sql.JOB_COMPLETE_MANY,
                        ids=[r["id"] for r in done],
                        attempts=[r["attempts"] for r in done],
                        results=[None] * len(done),
                        worker_id=name,
                    )
                )
                if not rows:
                    await asyncio.sleep(0.005)
        finally:
            await conn.close()

    async def upkeep() -> list[str]:
        conn = await asyncpg.connect(database_url)
        steps = []
        try:
            while not stop.is_set():
                try:
                    steps.append(await maintain(conn, max_copy=random.choice([5, 500])))
                except asyncpg.LockNotAvailableError:
                    steps.append("busy")
                await asyncio.sleep(0.01)
        finally:
            await conn.close()
        return steps

    async def all_finished() -> bool:
        done: int = await pool.fetchval(
            "SELECT count(*) FROM outbox_jobs WHERE state = 'succeeded'"
        )
        return done == total

    async with asyncio.timeout(120):
        workers = [asyncio.create_task(work(f"w{i}")) for i in range(3)]
        keeper = asyncio.create_task(upkeep())
        await enqueue()
        await wait_until(all_finished, timeout=100, what="every job succeeded")
        stop.set()
        await asyncio.gather(*workers)
        steps = await keeper

    assert {"switched", "emptied"} <= set(steps), steps
    assert len(runs) == total
    assert all(runs[i] == (2 if i in failed_once else 1) for i in runs)
    assert len(failed_once) == total // 10


def _quiet_log() -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger("test")
    return logger


async def test_drain_brings_in_jobs_that_came_due_while_no_worker_ran(
    pool: asyncpg.Pool, database_url: str
) -> None:
    job_id = await pool.fetchval(
        "INSERT INTO outbox_jobs (task, args, run_at) "
        """VALUES ('t_add', '{"a": 1, "b": 2}', now() + interval '1 hour') RETURNING id"""
    )
    await an_hour_passes(pool)
    assert await drain(tasks, database_url) == DrainResult(succeeded=1, job_ids=(job_id,))

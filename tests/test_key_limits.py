"""A queue's limit per concurrency key: at most N running jobs of one key across every worker,
each key's jobs in claim order, the keys served in turn so that one key's backlog never holds
back another's; and the ready lanes keep taking turns whatever a paused or keyed queue holds."""

from __future__ import annotations

import json
import signal
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime
from typing import Any

import asyncpg
import pytest

from outbox_worker import sql
from tests.conftest import WorkerProcess, wait_until
from tests.test_queue_limits import handler_spans, most_at_once

QUEUE = "slow"  # the workload's sleepy task runs on this queue


async def add_jobs(
    pool: asyncpg.Pool,
    key: str | None,
    count: int,
    *,
    seconds: float = 0.0,
    priority: int = 0,
    run_in: float = 0.0,
) -> list[int]:
    rows = await pool.fetch(
        "INSERT INTO outbox_jobs (queue, task, args, concurrency_key, priority, run_at) "
        "SELECT $1, 'sleepy', jsonb_build_object('seconds', $3::float8), $2, $4, "
        "       now() + make_interval(secs => $5) "
        "FROM generate_series(1, $6) RETURNING id",
        QUEUE,
        key,
        seconds,
        priority,
        run_in,
        count,
    )
    return sorted(row["id"] for row in rows)


async def claim(conn: asyncpg.Connection, limit: int) -> list[tuple[str | None, int]]:
    """One claim of the keyed queue for ``limit`` free slots: (key, id) of each job taken."""
    rows = await conn.fetch(
        *sql.bind(
            sql.JOB_CLAIM_LIMITED,
            queue=QUEUE,
            limit=limit,
            ahead=0,
            worker_id="w",
            lease_seconds=30,
        )
    )
    keys = await conn.fetch(
        "SELECT id, concurrency_key FROM outbox_jobs WHERE id = ANY($1::bigint[])",
        [row["id"] for row in rows],
    )
    key_of = {row["id"]: row["concurrency_key"] for row in keys}
    return [(key_of[row["id"]], row["id"]) for row in rows]


async def finish_running(pool: asyncpg.Pool) -> None:
    await pool.execute(
        "UPDATE outbox_jobs SET state = 'succeeded', finished_at = now(), locked_by = NULL, "
        "locked_until = NULL WHERE state = 'running'"
    )


async def limit_per_key(pool: asyncpg.Pool, limit: int) -> None:
    await pool.execute(
        "INSERT INTO outbox_queues (name, key_concurrency) VALUES ($1, $2)", QUEUE, limit
    )


async def ready_rows(pool: asyncpg.Pool) -> int:
    n: int = await pool.fetchval("SELECT count(*) FROM outbox_ready WHERE queue = $1", QUEUE)
    return n


async def test_keys_take_turns_so_a_backlog_holds_back_no_other_key(pool: asyncpg.Pool) -> None:
    """One free slot at a time: A's thousand jobs take one turn in three while B and C have
    jobs, then every turn."""
    await add_jobs(pool, "A", 1000)
    await add_jobs(pool, "B", 2)
    await add_jobs(pool, "C", 1)
    await limit_per_key(pool, 1)
    served = []
    async with pool.acquire() as conn:
        for _ in range(8):
            [(key, _job)] = await claim(conn, 1)
            served.append(key)
            await finish_running(pool)
    assert served == ["A", "B", "C", "A", "B", "A", "A", "A"]


async def test_a_key_at_its_limit_waits_while_other_keys_run(pool: asyncpg.Pool) -> None:
    await add_jobs(pool, "A", 50)
    await add_jobs(pool, "B", 50)
    await limit_per_key(pool, 2)
    async with pool.acquire() as conn:
        first = await claim(conn, 10)
        assert sorted(str(key) for key, _ in first) == ["A", "A", "B", "B"]
        assert await claim(conn, 10) == []
        await pool.execute(
            "UPDATE outbox_jobs SET state = 'succeeded', locked_by = NULL, locked_until = NULL "
            "WHERE id = $1",
            first[0][1],
        )
        assert [key for key, _ in await claim(conn, 10)] == [first[0][0]]


async def test_a_key_limited_to_one_runs_its_jobs_in_priority_then_run_at_then_id_order(
    pool: asyncpg.Pool,
) -> None:
    low = await add_jobs(pool, "A", 2, run_in=-5)
    high = await add_jobs(pool, "A", 1, priority=5, run_in=-1)
    older_high = await add_jobs(pool, "A", 1, priority=5, run_in=-3)
    later = await add_jobs(pool, "A", 1, priority=9, run_in=3600)  # not due: waits its turn
    await limit_per_key(pool, 1)
    order = []
    async with pool.acquire() as conn:
        for _ in range(4):
            taken = await claim(conn, 5)
            assert len(taken) == 1, "one job of the key at a time"
            order.append(taken[0][1])
            await finish_running(pool)
        assert await claim(conn, 5) == []
    assert order == [*older_high, *high, *low]
    assert await pool.fetchval("SELECT state FROM outbox_jobs WHERE id = $1", later[0]) == "queued"


async def test_jobs_without_a_key_take_the_free_slots_the_keys_leave(pool: asyncpg.Pool) -> None:
    await add_jobs(pool, "A", 5)
    loose = await add_jobs(pool, None, 5)
    await limit_per_key(pool, 1)
    async with pool.acquire() as conn:
        taken = await claim(conn, 4)
    assert [key for key, _ in taken].count("A") == 1
    assert sorted(job for key, job in taken if key is None) == loose[:3]


async def test_a_parked_queue_keeps_no_ready_rows_and_gets_them_back(pool: asyncpg.Pool) -> None:
    """Paused or limited per key, a queue's claims do not read the ready lanes: its rows are
    taken out (and new jobs get none), so that they cannot keep a lane from being emptied;
    resumed or unlimited, every queued job of it has its row again."""
    await add_jobs(pool, "A", 40)
    await add_jobs(pool, None, 10, run_in=3600)  # the later partition holds these
    assert await ready_rows(pool) == 50

    await pool.execute("INSERT INTO outbox_queues (name, paused_at) VALUES ($1, now())", QUEUE)
    assert await ready_rows(pool) == 0
    await add_jobs(pool, "A", 5)
    assert await ready_rows(pool) == 0
    # A lane holding more live rows than it may copy waits for claims to take them; none of
    # a paused queue's are left to wait for.
    result = await pool.fetchval(
        "SELECT outbox_ready_maintain(interval '0 seconds', 10, interval '1 second')"
    )
    assert "waiting" not in result

    await pool.execute("UPDATE outbox_queues SET key_concurrency = 2, paused_at = NULL")
    assert await ready_rows(pool) == 0, "a queue limited per key claims through its index"
    await pool.execute("UPDATE outbox_queues SET key_concurrency = NULL")
    assert await ready_rows(pool) == 55
    await pool.execute("UPDATE outbox_queues SET paused_at = now()")
    await pool.execute("DELETE FROM outbox_queues")
    assert await ready_rows(pool) == 55


async def test_three_workers_never_run_two_jobs_of_one_key_at_once(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    keys = [f"tenant-{n}" for n in range(5)]
    await limit_per_key(pool, 1)
    # Serving the keyed queue alone: each claims on the statement that writes its successes.
    workers = [spawn_worker("--concurrency", "10", "--queues", QUEUE) for _ in range(3)]
    for worker in workers:  # all three claiming before the first job is due
        await worker.wait_for_log('"worker_ready"')
    for key in keys:
        await add_jobs(pool, key, 8, seconds=0.05)

    async def all_done() -> bool:
        done: int = await pool.fetchval(
            "SELECT count(*) FROM outbox_jobs WHERE state = 'succeeded'"
        )
        return done == 8 * len(keys)

    await wait_until(all_done, timeout=120, what="every job done")
    for worker in workers:
        worker.signal(signal.SIGTERM)
    assert [worker.wait() for worker in workers] == [0, 0, 0]
    rows = await pool.fetch(
        "SELECT j.concurrency_key AS key, s.at AS started, e.at AS ended "
        "FROM test_executions AS s JOIN test_executions AS e USING (job_id, attempt) "
        "JOIN outbox_jobs AS j ON j.id = s.job_id "
        "WHERE s.event = 'start' AND e.event = 'end'"
    )
    per_key: dict[str, list[tuple[datetime, datetime]]] = defaultdict(list)
    for row in rows:
        per_key[row["key"]].append((row["started"], row["ended"]))
    assert sorted(per_key) == keys
    assert {key: most_at_once(spans) for key, spans in per_key.items()} == dict.fromkeys(keys, 1)
    assert most_at_once(await handler_spans(pool)) > 1, "the keys never ran side by side"


def plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes.extend(plan_nodes(child))
    return nodes


@pytest.mark.slow
async def test_the_claim_reads_an_index_with_ten_thousand_keys_and_a_million_rows(
    pool: asyncpg.Pool,
) -> None:
    """A million rows, a tenth of them queued over 10,000 keys, 500 keys at their limit: a
    claim of 50 reads the index key by key and each listed job by primary key, a few
    thousand buffers, never the table."""
    await pool.execute(
        "INSERT INTO outbox_jobs (queue, task, concurrency_key, state, finished_at) "
        "SELECT $1, 'sleepy', 'tenant-' || (g / 10 % 10000), "
        "       CASE WHEN g % 10 = 0 THEN 'queued' ELSE 'succeeded' END, "
        "       CASE WHEN g % 10 = 0 THEN NULL ELSE now() END "
        "FROM generate_series(1, 1000000) AS g",
        QUEUE,
    )
    await pool.execute("ANALYZE outbox_jobs")
    await limit_per_key(pool, 1)
    async with pool.acquire() as conn:
        # 500 keys busy: each has a job running under the limit.
        assert len(await claim(conn, 500)) == 500
        statement, *args = sql.bind(
            sql.JOB_CLAIM_LIMITED, queue=QUEUE, limit=50, ahead=0, worker_id="w", lease_seconds=30
        )
        async with conn.transaction():
            [plan] = json.loads(
                await conn.fetchval("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement, *args)
            )
            claimed = await conn.fetchval(
                "SELECT count(*) FROM outbox_jobs WHERE state = 'running'"
            )
    nodes = plan_nodes(plan["Plan"])
    scans = {
        (node["Node Type"], node.get("Index Name"))
        for node in nodes
        if node.get("Relation Name") == "outbox_jobs" and "Scan" in node["Node Type"]
    }
    assert not any(kind == "Seq Scan" for kind, _ in scans), scans
    assert {index for _, index in scans} <= {"outbox_jobs_queued_idx", "outbox_jobs_pkey"}, scans
    assert claimed == 550
    buffers = plan["Plan"]["Shared Hit Blocks"] + plan["Plan"]["Shared Read Blocks"]
    table_pages = await pool.fetchval(
        "SELECT pg_relation_size('outbox_jobs') / current_setting('block_size')::int"
    )
    assert buffers < table_pages // 2, f"{buffers} buffers for a claim of 50 ({table_pages} pages)"

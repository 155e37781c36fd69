"""The library through PgBouncer in transaction mode (tests/pgbouncer/conftest.py): enqueue on
a raw connection and on a SQLAlchemy session, claim and complete, retries, the rescue of a
killed worker's job, cancel, unique keys, effectively-once and the admin routes, with
prepared statements off and the workers listening on a direct URL or polling only.

Most are the suite's own tests, imported here to run again on this package's fixtures: the
same assertions, every connection but the tests' own view of the table through PgBouncer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from outbox_worker import NewJob, Outbox, db
from tests.conftest import WorkerProcess, wait_until
from tests.pgbouncer.conftest import ListenMode
from tests.test_admin_retry_cancel import (
    test_cancel_of_a_running_job_stops_its_handler,
    test_retry_and_cancel_follow_the_state_machine,
)
from tests.test_dedupe import (
    test_enqueue_many_with_a_key_already_in_the_table,
    test_same_key_in_a_later_transaction,
)
from tests.test_effectively_once import test_kill_9_inside_the_transaction_never_writes_twice
from tests.test_enqueue import (
    test_domain_row_and_job_commit_together_or_not_at_all,
    test_returned_job_is_the_new_row,
)
from tests.test_rescue import test_job_of_a_killed_worker_is_finished_by_another
from tests.test_retries import (
    stop,
    test_flaky_job_is_retried_with_growing_gaps_then_succeeds,
)
from tests.workload import registry as workload_registry

# The suite's tests above, collected again here on this package's fixtures.
__all__ = [
    "test_cancel_of_a_running_job_stops_its_handler",
    "test_domain_row_and_job_commit_together_or_not_at_all",
    "test_enqueue_many_with_a_key_already_in_the_table",
    "test_flaky_job_is_retried_with_growing_gaps_then_succeeds",
    "test_job_of_a_killed_worker_is_finished_by_another",
    "test_kill_9_inside_the_transaction_never_writes_twice",
    "test_retry_and_cancel_follow_the_state_machine",
    "test_returned_job_is_the_new_row",
    "test_same_key_in_a_later_transaction",
]


@pytest.mark.parametrize("prepared_statements", [True, False])
async def test_only_a_pool_without_prepared_statements_survives_transaction_pooling(
    bouncer_url: str, prepared_statements: bool
) -> None:
    """What OUTBOX_PREPARED_STATEMENTS=false is for, shown on the worker's own pool: a
    statement prepared on one server connection is unknown on the next."""
    pool = await db.create_pool(bouncer_url, size=2, prepared_statements=prepared_statements)
    try:
        async with pool.acquire() as first, pool.acquire() as second:
            query = "SELECT pg_backend_pid()"
            server = await first.fetchval(query)
            async with second.transaction():
                # The database's only server connection is now the second client's, so the
                # first one's next statement runs on a new one.
                assert await second.fetchval(query) == server
                if prepared_statements:
                    with pytest.raises(asyncpg.InvalidSQLStatementNameError):
                        await first.fetchval(query)
                else:
                    assert await first.fetchval(query) != server
    finally:
        await pool.close()


async def test_jobs_enqueued_through_pgbouncer_are_claimed_and_completed(
    bouncer_url: str,
    engine: AsyncEngine,
    pool: asyncpg.Pool,
    spawn_worker: Callable[..., WorkerProcess],
    listen_mode: ListenMode,
) -> None:
    # Listening, the worker polls once a minute: only the jobs' NOTIFYs, sent through
    # PgBouncer and heard on the direct URL, can start them within the wait below, once its
    # LISTEN is armed and its first claim has found nothing.
    worker = spawn_worker("--poll-interval-seconds", "60" if listen_mode == "direct" else "0.2")
    await worker.wait_for_log('"worker_ready"')
    if listen_mode == "direct":
        await worker.wait_for_log('"listening"')
        await asyncio.sleep(0.5)
    outbox = Outbox(workload_registry)

    conn = await asyncpg.connect(bouncer_url, statement_cache_size=0)
    try:
        async with conn.transaction():
            jobs = [await outbox.enqueue(conn, "echo", {"via": "asyncpg"})]
            jobs += await outbox.enqueue_many(
                conn, [NewJob("echo", {"via": "enqueue_many", "n": n}) for n in range(3)]
            )
        jobs.append(await outbox.enqueue(conn, "echo", {"via": "autocommit"}, autocommit=True))
    finally:
        await conn.close()
    async with AsyncSession(engine) as session:
        jobs.append(await outbox.enqueue(session, "echo", {"via": "sqlalchemy"}))
        await session.commit()

    ids = [job.id for job in jobs]

    async def all_succeeded() -> bool:
        states = await pool.fetch("SELECT state FROM outbox_jobs WHERE id = ANY($1)", ids)
        return [r["state"] for r in states] == ["succeeded"] * len(ids)

    await wait_until(all_succeeded, timeout=30, what="every job to succeed")
    results = await pool.fetch(
        "SELECT args = result AS echoed, attempts FROM outbox_jobs WHERE id = ANY($1)", ids
    )
    assert [(r["echoed"], r["attempts"]) for r in results] == [(True, 1)] * len(ids)
    await stop(worker)

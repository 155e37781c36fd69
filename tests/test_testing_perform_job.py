"""outbox_worker.testing.perform_job: one handler run alone, with a real context and JSON
args, and its ctx.transaction() on real PostgreSQL when given a database."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg
import pytest

from outbox_worker import InvalidArgs, OutboxError, UnknownTask, current_correlation_id
from outbox_worker.testing import perform_job
from tests.testing_tasks import tasks


async def test_perform_job_calls_the_handler_with_a_real_context_and_json_args() -> None:
    seen = await perform_job(
        tasks, "t_context", {"items": (1, 2), "n": 1}, job_id=9, attempt=2, correlation_id="c-1"
    )
    assert seen == {
        "args": {"items": [1, 2], "n": 1},
        "job_id": 9,
        "task": "t_context",
        "queue": "default",
        "attempt": 2,
        "max_attempts": 5,
        "correlation_id": "c-1",
        "seen_correlation_id": "c-1",
        "cancel_requested": False,
    }
    assert current_correlation_id.get() is None
    assert await perform_job(tasks, "t_add", {"a": 2, "b": 3}) == 5


async def test_perform_job_refuses_what_a_worker_could_not_run() -> None:
    with pytest.raises(UnknownTask, match="'t_add'"):
        await perform_job(tasks, "nobody_has_it", {})
    with pytest.raises(InvalidArgs, match="do not fit"):
        await perform_job(tasks, "t_add", {"b": 1})
    with pytest.raises(InvalidArgs, match="not JSON"):
        await perform_job(tasks, "t_context", {"when": datetime.now(UTC)})


async def test_perform_job_raises_what_the_handler_raises_and_keeps_its_timeout() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        await perform_job(tasks, "t_fails", {"message": "boom"})
    with pytest.raises(TimeoutError):
        await perform_job(tasks, "t_hangs")


async def test_without_a_database_ctx_transaction_says_what_to_pass() -> None:
    with pytest.raises(OutboxError, match=r"perform_job\(\.\.\., database=\.\.\.\)"):
        await perform_job(tasks, "t_writes", {"note": "x"})


@pytest.mark.parametrize("given", ["url", "pool"])
async def test_ctx_transaction_commits_the_handlers_writes_and_no_job_row(
    pool: asyncpg.Pool, database_url: str, given: str
) -> None:
    database = database_url if given == "url" else pool
    assert await perform_job(tasks, "t_writes", {"note": "hi"}, database=database) == "hi"
    assert await pool.fetch("SELECT job_id, note FROM test_effects") == [(7, "hi")]
    assert await pool.fetchval("SELECT count(*) FROM outbox_jobs") == 0


@pytest.mark.parametrize("given", ["pool", "connection"])
async def test_a_handler_that_raises_in_ctx_transaction_leaves_no_write(
    pool: asyncpg.Pool, given: str
) -> None:
    async with pool.acquire() as conn:
        outer = conn.transaction()
        await outer.start()
        with pytest.raises(RuntimeError, match="after the write"):
            await perform_job(
                tasks, "t_writes_then_fails", database=conn if given == "connection" else pool
            )
        # On the connection, only the savepoint was rolled back: its transaction goes on.
        assert await conn.fetchval("SELECT count(*) FROM test_effects") == 0
        await conn.execute("INSERT INTO test_effects (job_id, note) VALUES (9, 'kept')")
        await outer.commit()
    assert await pool.fetch("SELECT job_id, note FROM test_effects") == [(9, "kept")]


async def test_on_a_connection_ctx_transaction_is_a_savepoint_of_its_transaction(
    pool: asyncpg.Pool,
) -> None:
    async with pool.acquire() as conn:
        outer = conn.transaction()
        await outer.start()
        await perform_job(tasks, "t_writes", {"note": "inside"}, database=conn)
        assert await conn.fetchval("SELECT note FROM test_effects") == "inside"
        assert await pool.fetchval("SELECT count(*) FROM test_effects") == 0
        await outer.rollback()
    assert await pool.fetchval("SELECT count(*) FROM test_effects") == 0

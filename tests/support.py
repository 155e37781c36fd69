"""Helpers shared by test modules: the enqueuing caller's session type, and bringing the
session's PostgreSQL server back after a test took it away.

Helpers the bench needs as well live in :mod:`outbox_worker.devdb` (``admin``, ``free_port``,
``with_application_name``), since tests do not import the bench.
"""

from __future__ import annotations

import asyncio
import json
import random
from datetime import datetime
from typing import Any, TypeAlias

import asyncpg
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from outbox_worker import Job
from outbox_worker.devdb import PostgresServer

# The enqueuing caller's side, as the ``db`` fixture gives it: a session or a connection.
Enqueuer: TypeAlias = AsyncSession | AsyncConnection

# What a client sees while the server stops, is down, or recovers.
DOWN = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.CannotConnectNowError,
)


async def ensure_server_up(pg_server: PostgresServer) -> None:
    """Leave the session's server running whatever a restart test did to it."""
    try:
        conn = await asyncpg.connect(pg_server.url_for("postgres"), timeout=5)
    except DOWN:
        await asyncio.to_thread(pg_server.start_server)
    else:
        await conn.close()


# The enqueue tests' view of the table: what another connection reads, and a returned Job
# checked against it.


async def job_rows(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    """Every committed row, as a separate connection sees it."""
    return list(await pool.fetch("SELECT *, args::text AS args_text FROM outbox_jobs ORDER BY id"))


async def db_now(db: Enqueuer) -> datetime:
    """The transaction's now(), which the insert uses for run_at and created_at."""
    value = (await db.execute(text("SELECT now()"))).scalar_one()
    assert isinstance(value, datetime)
    return value


def assert_job_matches_row(job: Job, row: asyncpg.Record) -> None:
    assert job.id == row["id"]
    assert job.queue == row["queue"]
    assert job.task == row["task"]
    assert job.args == json.loads(row["args_text"])
    assert job.state == row["state"]
    assert job.priority == row["priority"]
    assert job.attempts == row["attempts"]
    assert job.max_attempts == row["max_attempts"]
    assert job.run_at == row["run_at"]
    assert job.dedupe_key == row["dedupe_key"]
    assert job.correlation_id == row["correlation_id"]
    assert job.created_at == row["created_at"]


# Hostile text, for the tests of hostile input (tests/test_hostile*.py).

INT32_MAX = 2**31 - 1
RTL = "\u202e"  # RIGHT-TO-LEFT OVERRIDE
ZWSP = "\u200b"  # ZERO WIDTH SPACE
ZWJ_FAMILY = "\U0001f468\u200d\U0001f469\u200d\U0001f467"  # one glyph, five code points


def astral(n: int, seed: int = 5) -> str:
    """``n`` random characters outside the BMP: four bytes each, and incompressible."""
    rng = random.Random(seed)
    return "".join(chr(rng.randrange(0x1F300, 0x1FAFF)) for _ in range(n))


async def job_states(pool: asyncpg.Pool) -> dict[str, int]:
    """How many jobs are in each state (a state no job is in left out)."""
    rows = await pool.fetch("SELECT state, count(*) AS n FROM outbox_jobs GROUP BY state")
    return {r["state"]: r["n"] for r in rows}


# The admin token the library's admin host runs with in the admin routes' and the dashboard's
# tests (the ``admin_app`` fixture, tests/admin_support.py, tests/dashboard_support.py).
ADMIN_TOKEN = "s3cret-admin-token-for-tests"


async def insert_job(
    pool: asyncpg.Pool, task: str, args: dict[str, Any] | None = None, max_attempts: int = 5
) -> int:
    """One job by plain SQL, as another service would enqueue it; its id."""
    job_id: int = await pool.fetchval(
        "INSERT INTO outbox_jobs (task, args, max_attempts) "
        "VALUES ($1, $2::jsonb, $3) RETURNING id",
        task,
        json.dumps(args or {}),
        max_attempts,
    )
    return job_id


async def insert_sleepy(
    pool: asyncpg.Pool, count: int, seconds: float, *, max_attempts: int = 5
) -> list[int]:
    """``count`` jobs of the workload's ``sleepy`` task, in id order."""
    rows = await pool.fetch(
        "INSERT INTO outbox_jobs (queue, task, args, max_attempts) "
        "SELECT 'slow', 'sleepy', jsonb_build_object('seconds', $2::float8), $3 "
        "FROM generate_series(1, $1) RETURNING id",
        count,
        seconds,
        max_attempts,
    )
    return sorted(r["id"] for r in rows)


async def count_started(pool: asyncpg.Pool, job_ids: list[int]) -> int:
    """How many of these jobs a handler of the workload has started (test_executions)."""
    n: int = await pool.fetchval(
        "SELECT count(DISTINCT job_id) FROM test_executions "
        "WHERE event = 'start' AND job_id = ANY($1::bigint[])",
        job_ids,
    )
    return n


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text page, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(
    page: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float | None:
    return page.get((name, frozenset(labels.items())))

"""Helpers for the admin JSON routes' tests (tests/test_admin_*.py): the admin token the host
runs with and its bearer header, and job rows written by SQL with any columns."""

from __future__ import annotations

import asyncpg

from tests.support import ADMIN_TOKEN

TOKEN = ADMIN_TOKEN  # what the admin_app fixture runs the host with
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def insert_job(pool: asyncpg.Pool, task: str = "echo", **columns: object) -> int:
    names = ["task", *columns]
    values = [task, *columns.values()]
    placeholders = ", ".join(f"${i}" for i in range(1, len(values) + 1))
    job_id: int = await pool.fetchval(
        f"INSERT INTO outbox_jobs ({', '.join(names)}) VALUES ({placeholders}) RETURNING id",
        *values,
    )
    return job_id

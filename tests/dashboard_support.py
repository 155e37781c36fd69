"""Helpers for the dashboard's tests (tests/test_dashboard_*.py): the admin token the host
runs with, a signed-in cookie, and jobs read and written by SQL."""

from __future__ import annotations

import asyncpg

from outbox_worker.web.auth import COOKIE, cookie_value
from tests.support import ADMIN_TOKEN

TOKEN = ADMIN_TOKEN  # what the admin_app fixture and the served host run with
HOST = "http://testserver"
SIGNED_IN = {"Cookie": f"{COOKIE}={cookie_value(TOKEN)}"}


async def job_state(pool: asyncpg.Pool, job_id: int) -> str:
    state: str = await pool.fetchval("SELECT state FROM outbox_jobs WHERE id = $1", job_id)
    return state


async def insert_dead(pool: asyncpg.Pool, task: str = "echo") -> int:
    job_id: int = await pool.fetchval(
        "INSERT INTO outbox_jobs (task, state, attempts, max_attempts, last_error, finished_at) "
        "VALUES ($1, 'dead', 1, 1, 'boom', now()) RETURNING id",
        task,
    )
    return job_id

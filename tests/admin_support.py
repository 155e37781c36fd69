"""Helpers for the admin faces' tests (tests/test_admin_*.py, the dashboard's): the admin token
the host runs with and its bearer header, job rows written by SQL with any columns, the queue
settings table as it stands, and a commit the database refuses."""

from __future__ import annotations

from typing import Any

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


def refuse_commit_ddl(*tables: str) -> str:
    """A commit the database refuses, with no mock: a deferred constraint trigger on each of
    ``tables`` runs at COMMIT and raises in any transaction that set
    pgoutbox_test.refuse_commit, so the write itself succeeds and only the commit fails, as a
    deferred foreign key or exclusion would."""
    triggers = "".join(
        f"CREATE CONSTRAINT TRIGGER refuse_commit AFTER INSERT OR UPDATE ON {table}\n"
        "    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_commit();\n"
        for table in tables
    )
    return f"""
CREATE FUNCTION refuse_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('pgoutbox_test.refuse_commit', true) = 'on' THEN
        RAISE EXCEPTION 'the test refuses this commit';
    END IF;
    RETURN NULL;
END $$;
{triggers}"""


async def queue_settings_rows(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    """Every row of outbox_queues, every column: what "nothing changed" compares."""
    return [dict(row) for row in await pool.fetch("SELECT * FROM outbox_queues ORDER BY name")]

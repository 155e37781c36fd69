"""Hostile input through plain SQL: the table's constraints refuse what no worker could run,
and they agree with the library's own name check.
"""

from __future__ import annotations

import asyncpg
import pytest

from outbox_worker.names import is_valid_name
from tests.support import RTL, ZWSP, astral

NAMES = [
    # refused by both
    "",
    "1a",
    "_a",
    "a b",
    "a\n",
    "a" * 129,
    "\u0435cho",
    "\uff45cho",
    "\u212aelvin",
    f"echo{ZWSP}",
    f"{RTL}echo",
    "\u0131",
    "\u00e9",
    "a\u00a0b",
    "a;b",
    "a'b",
    "a/b",
    "a*",
    # accepted by both
    "a",
    "Z",
    "a" * 128,
    "x:y.z-w_9",
    "a--",
    "A.",
    "q:",
]


async def test_the_table_and_the_library_agree_on_names(pool: asyncpg.Pool) -> None:
    disagreements = []
    for name in NAMES:
        for column in ("task", "queue"):
            refused_by: str | None = None
            try:
                await pool.execute(
                    "INSERT INTO outbox_jobs (task, queue) VALUES ($1, $2)",
                    name if column == "task" else "echo",
                    name if column == "queue" else "default",
                )
            except asyncpg.CheckViolationError as exc:
                refused_by = exc.constraint_name
            if refused_by not in (None, f"outbox_jobs_{column}_name_valid"):
                disagreements.append((column, name, f"refused by {refused_by}"))
            if (refused_by is None) != is_valid_name(name):
                disagreements.append((column, name, f"table refused by {refused_by}"))
    assert disagreements == []
    accepted = sum(is_valid_name(name) for name in NAMES)
    assert await pool.fetchval("SELECT count(*) FROM outbox_jobs") == 2 * accepted


BAD_SQL: list[tuple[str, str, type[Exception], str | None]] = [
    (
        "state-upper-case",
        "INSERT INTO outbox_jobs (task, state) VALUES ('echo', 'QUEUED')",
        asyncpg.CheckViolationError,
        "outbox_jobs_state_valid",
    ),
    (
        "state-trailing-space",
        "INSERT INTO outbox_jobs (task, state) VALUES ('echo', 'queued ')",
        asyncpg.CheckViolationError,
        "outbox_jobs_state_valid",
    ),
    (
        "args-true",
        "INSERT INTO outbox_jobs (task, args) VALUES ('echo', 'true')",
        asyncpg.CheckViolationError,
        "outbox_jobs_args_is_object",
    ),
    (
        "args-number",
        "INSERT INTO outbox_jobs (task, args) VALUES ('echo', '1')",
        asyncpg.CheckViolationError,
        "outbox_jobs_args_is_object",
    ),
    (
        "args-sql-null",
        "INSERT INTO outbox_jobs (task, args) VALUES ('echo', NULL)",
        asyncpg.NotNullViolationError,
        None,
    ),
    (
        "args-nul-escape",
        "INSERT INTO outbox_jobs (task, args) VALUES ('echo', '{\"a\": \"\\u0000\"}')",
        asyncpg.UntranslatableCharacterError,
        None,
    ),
    (
        "task-injection-in-check",
        "INSERT INTO outbox_jobs (task) VALUES ('echo''); DROP TABLE outbox_jobs; --')",
        asyncpg.CheckViolationError,
        "outbox_jobs_task_name_valid",
    ),
    (
        "priority-over-int4",
        "INSERT INTO outbox_jobs (task, priority) VALUES ('echo', 2147483648)",
        asyncpg.NumericValueOutOfRangeError,
        None,
    ),
    (
        "max-attempts-negative",
        "INSERT INTO outbox_jobs (task, state, max_attempts) VALUES ('echo', 'dead', -5)",
        asyncpg.CheckViolationError,
        "outbox_jobs_attempts_valid",
    ),
    (
        "running-lease-but-no-worker",
        "INSERT INTO outbox_jobs (task, state, attempts, locked_until) "
        "VALUES ('echo', 'running', 1, 'infinity')",
        asyncpg.CheckViolationError,
        "outbox_jobs_running_is_locked",
    ),
    (
        # Too big for the unique index even compressed: refused, nothing half-written.
        "dedupe-key-10k-incompressible",
        f"INSERT INTO outbox_jobs (task, dedupe_key) VALUES ('echo', '{astral(2600)}')",
        asyncpg.ProgramLimitExceededError,
        None,
    ),
]


async def test_plain_sql_with_bad_values_is_refused(pool: asyncpg.Pool) -> None:
    for name, statement, error, constraint in BAD_SQL:
        with pytest.raises(error) as caught:
            await pool.execute(statement)
        if constraint is not None:
            assert getattr(caught.value, "constraint_name", None) == constraint, name
    assert await pool.fetchval("SELECT count(*) FROM outbox_jobs") == 0
    assert await pool.fetchval("SELECT to_regclass('outbox_jobs') IS NOT NULL")

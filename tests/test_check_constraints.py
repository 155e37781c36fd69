"""The table's CHECK constraints refuse bad plain-SQL inserts into outbox_jobs, on a real
PostgreSQL, and let the edge values that are allowed in.
"""

from __future__ import annotations

import asyncpg
import pytest

BAD_INSERTS: list[tuple[str, str, str]] = [
    (
        "bad-state",
        "INSERT INTO outbox_jobs (task, state) VALUES ('echo', 'pending')",
        "outbox_jobs_state_valid",
    ),
    (
        "bad-task-name",
        "INSERT INTO outbox_jobs (task) VALUES ('echo; DROP TABLE outbox_jobs')",
        "outbox_jobs_task_name_valid",
    ),
    (
        "empty-task-name",
        "INSERT INTO outbox_jobs (task) VALUES ('')",
        "outbox_jobs_task_name_valid",
    ),
    (
        "task-name-newline",
        "INSERT INTO outbox_jobs (task) VALUES (E'echo\\n')",
        "outbox_jobs_task_name_valid",
    ),
    (
        "task-name-too-long",
        f"INSERT INTO outbox_jobs (task) VALUES ('{'a' * 129}')",
        "outbox_jobs_task_name_valid",
    ),
    (
        "bad-queue-name",
        "INSERT INTO outbox_jobs (task, queue) VALUES ('echo', '1 queue')",
        "outbox_jobs_queue_name_valid",
    ),
    (
        "args-array",
        "INSERT INTO outbox_jobs (task, args) VALUES ('echo', '[1, 2]')",
        "outbox_jobs_args_is_object",
    ),
    (
        "args-string",
        "INSERT INTO outbox_jobs (task, args) VALUES ('echo', '\"x\"')",
        "outbox_jobs_args_is_object",
    ),
    (
        "args-json-null",
        "INSERT INTO outbox_jobs (task, args) VALUES ('echo', 'null')",
        "outbox_jobs_args_is_object",
    ),
    (
        "attempts-over-max",
        "INSERT INTO outbox_jobs (task, state, attempts, max_attempts) "
        "VALUES ('echo', 'dead', 6, 5)",
        "outbox_jobs_attempts_valid",
    ),
    (
        "attempts-negative",
        "INSERT INTO outbox_jobs (task, attempts) VALUES ('echo', -1)",
        "outbox_jobs_attempts_valid",
    ),
    (
        "max-attempts-zero",
        "INSERT INTO outbox_jobs (task, state, max_attempts) VALUES ('echo', 'dead', 0)",
        "outbox_jobs_attempts_valid",
    ),
    (
        "queued-without-attempts-left",
        "INSERT INTO outbox_jobs (task, state, attempts, max_attempts) "
        "VALUES ('echo', 'queued', 5, 5)",
        "outbox_jobs_queued_has_attempts_left",
    ),
    *(
        (
            f"run-at-{name}",
            f"INSERT INTO outbox_jobs (task, run_at) VALUES ('echo', '{value}')",
            "outbox_jobs_run_at_readable",
        )
        for name, value in [
            ("bc", "0001-12-31 23:59:59 BC"),
            ("earliest-postgres-takes", "4713-01-01 00:00:00+00 BC"),
            ("year-10000", "10000-01-01 00:00:00+00"),
            ("infinity", "infinity"),
            ("minus-infinity", "-infinity"),
            ("just-before-year-1-utc", "0001-01-01 00:00:00+01"),
        ]
    ),
    (
        "running-without-locked-by",
        "INSERT INTO outbox_jobs (task, state, attempts, locked_until) "
        "VALUES ('echo', 'running', 1, now() + interval '30 seconds')",
        "outbox_jobs_running_is_locked",
    ),
    (
        "running-without-locked-until",
        "INSERT INTO outbox_jobs (task, state, attempts, locked_by) "
        "VALUES ('echo', 'running', 1, 'worker-1')",
        "outbox_jobs_running_is_locked",
    ),
]


@pytest.mark.parametrize(
    ("statement", "constraint"),
    [(statement, constraint) for _, statement, constraint in BAD_INSERTS],
    ids=[name for name, _, _ in BAD_INSERTS],
)
async def test_check_constraints_refuse_bad_plain_inserts(
    pool: asyncpg.Pool, statement: str, constraint: str
) -> None:
    with pytest.raises(asyncpg.CheckViolationError) as caught:
        await pool.execute(statement)
    assert caught.value.constraint_name == constraint
    assert await pool.fetchval("SELECT count(*) FROM outbox_jobs") == 0


async def test_check_constraints_accept_valid_plain_inserts(pool: asyncpg.Pool) -> None:
    """The control for the refusals above: the edge values that are allowed go in."""
    await pool.execute(
        """
        INSERT INTO outbox_jobs (task, queue, args, state, attempts, max_attempts,
                                 locked_by, locked_until)
        VALUES ('echo', 'default', '{}', 'queued', 4, 5, NULL, NULL),
               ('echo', 'q', '{"a": [1]}', 'dead', 5, 5, NULL, NULL),
               ('echo', 'Q.1:x-y_z', '{}', 'running', 1, 1, 'worker-1',
                now() + interval '30 seconds'),
               ('echo', 'default', '{}', 'succeeded', 1, 5, NULL, NULL),
               ('echo', 'default', '{}', 'cancelled', 0, 5, NULL, NULL)
        """
    )
    states = [r["state"] for r in await pool.fetch("SELECT state FROM outbox_jobs ORDER BY id")]
    assert states == ["queued", "dead", "running", "succeeded", "cancelled"]

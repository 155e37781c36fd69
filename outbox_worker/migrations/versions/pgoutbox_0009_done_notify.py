"""outbox_jobs.notify_done: a NOTIFY when a job someone waits for finishes.

``wait_for_job`` LISTENs on ``outbox_job_done`` and sets ``notify_done`` on the job it waits
for; a row trigger whose WHEN clause is that flag and a finished state then sends the job's
id. Jobs nobody waits for never reach the trigger's function: a NOTIFY per finished job
would serialise the workers' commits, and the WHEN clause costs them nothing measurable.

Revision ID: pgoutbox_0009
Revises: pgoutbox_0008
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "pgoutbox_0009"
down_revision: str | None = "pgoutbox_0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPGRADE = [
    "ALTER TABLE outbox_jobs ADD COLUMN notify_done boolean NOT NULL DEFAULT false",
    """
    CREATE FUNCTION outbox_jobs_done_notify() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('outbox_job_done', NEW.id::text);
        RETURN NULL;
    END
    $$
    """,
    """
    CREATE TRIGGER outbox_jobs_done_notify AFTER UPDATE OF state ON outbox_jobs
        FOR EACH ROW
        WHEN (NEW.notify_done AND NEW.state IN ('succeeded', 'dead', 'cancelled'))
        EXECUTE FUNCTION outbox_jobs_done_notify()
    """,
]

DOWNGRADE = [
    "DROP TRIGGER IF EXISTS outbox_jobs_done_notify ON outbox_jobs",
    "DROP FUNCTION IF EXISTS outbox_jobs_done_notify()",
    "ALTER TABLE outbox_jobs DROP COLUMN IF EXISTS notify_done",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)

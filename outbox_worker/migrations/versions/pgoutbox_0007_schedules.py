"""outbox_schedules: periodic jobs, one row per schedule declared in code.

The row holds the schedule's definition as the last worker to start declared it (so that all
workers fire the same expression during a rolling deploy) and where its ticks stand:
``last_tick``, the latest tick dealt with (enqueued, or passed over as missed), and
``next_tick``. A worker fires a schedule by locking its row with ``SKIP LOCKED``, enqueueing
the due ticks' jobs and moving ``last_tick`` in one transaction: the database, not a leader,
makes each tick happen once.

Revision ID: pgoutbox_0007
Revises: pgoutbox_0006
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op
from outbox_worker.names import name_check

revision: str = "pgoutbox_0007"
down_revision: str | None = "pgoutbox_0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        f"""
        CREATE TABLE outbox_schedules (
            name          text PRIMARY KEY,
            task          text NOT NULL,
            queue         text NOT NULL,
            args          jsonb NOT NULL DEFAULT '{{}}',
            priority      integer NOT NULL DEFAULT 0,
            max_attempts  integer NOT NULL DEFAULT 5,
            cron          text NOT NULL,
            timezone      text NOT NULL DEFAULT 'UTC',
            missed        text NOT NULL DEFAULT 'latest',
            grace_seconds double precision NOT NULL DEFAULT 60,
            last_tick     timestamptz NOT NULL,
            next_tick     timestamptz NOT NULL,
            last_job_id   bigint,
            declared_at   timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT outbox_schedules_name_valid CHECK ({name_check("name")}),
            CONSTRAINT outbox_schedules_task_name_valid CHECK ({name_check("task")}),
            CONSTRAINT outbox_schedules_queue_name_valid CHECK ({name_check("queue")}),
            CONSTRAINT outbox_schedules_missed_valid
                CHECK (missed IN ('skip', 'latest') OR missed ~ '^[0-9]+$')
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS outbox_schedules")

"""outbox_jobs.snoozes: how many times handlers snoozed the job.

A snooze (``SnoozeJob``) puts the job back to queued without spending an attempt, so the
attempts no longer bound how often it comes back: this count does, against the task's
``max_snoozes``. A column with a constant default is added without rewriting the table.

Revision ID: pgoutbox_0008
Revises: pgoutbox_0007
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "pgoutbox_0008"
down_revision: str | None = "pgoutbox_0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("ALTER TABLE outbox_jobs ADD COLUMN snoozes integer NOT NULL DEFAULT 0")
    op.execute(
        "ALTER TABLE outbox_jobs ADD CONSTRAINT outbox_jobs_snoozes_valid CHECK (snoozes >= 0)"
    )


def downgrade() -> None:
    op.execute("ALTER TABLE outbox_jobs DROP COLUMN IF EXISTS snoozes")

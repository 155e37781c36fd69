"""outbox_jobs.progress: what a running job's handler last reported of its progress.

A fraction from 0 to 1 or a small JSON object, written by the worker's heartbeat with the
lease it extends (fenced like every write of a running job), so reporting costs a handler no
round trip.

Revision ID: pgoutbox_0011
Revises: pgoutbox_0010
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "pgoutbox_0011"
down_revision: str | None = "pgoutbox_0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("ALTER TABLE outbox_jobs ADD COLUMN progress jsonb")


def downgrade() -> None:
    op.execute("ALTER TABLE outbox_jobs DROP COLUMN IF EXISTS progress")

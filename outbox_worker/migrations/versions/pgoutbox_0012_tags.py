"""outbox_jobs.tags: labels given at enqueue, to find jobs by (``GET /jobs?tag=``).

Revision ID: pgoutbox_0012
Revises: pgoutbox_0011
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "pgoutbox_0012"
down_revision: str | None = "pgoutbox_0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("ALTER TABLE outbox_jobs ADD COLUMN tags text[]")


def downgrade() -> None:
    op.execute("ALTER TABLE outbox_jobs DROP COLUMN IF EXISTS tags")

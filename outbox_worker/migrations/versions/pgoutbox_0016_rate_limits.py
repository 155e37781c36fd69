"""Rate limits: at most N starts of a queue's jobs in any window of P seconds.

``rate_limit`` and ``rate_period`` are the setting; ``rate_starts`` holds when the queue's
jobs were claimed within the last window, rewritten by each claim of the queue under its
row's lock, so that the limit holds across every worker.

Revision ID: pgoutbox_0016
Revises: pgoutbox_0015
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "pgoutbox_0016"
down_revision: str | None = "pgoutbox_0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE outbox_queues
            ADD COLUMN rate_limit integer
                CONSTRAINT outbox_queues_rate_limit_positive CHECK (rate_limit > 0),
            ADD COLUMN rate_period double precision NOT NULL DEFAULT 1
                CONSTRAINT outbox_queues_rate_period_valid
                    CHECK (rate_period > 0 AND rate_period <= 86400),
            ADD COLUMN rate_starts timestamptz[] NOT NULL DEFAULT '{}'
        """
    )


def downgrade() -> None:
    op.execute(
        "ALTER TABLE outbox_queues DROP COLUMN IF EXISTS rate_starts, "
        "DROP COLUMN IF EXISTS rate_period, DROP COLUMN IF EXISTS rate_limit"
    )

"""outbox_workers (who is alive) and outbox_jobs.cancel_requested_at (cooperative cancel).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPGRADE = [
    # Set by an operator's cancel of a running job; its worker sees it at the next heartbeat,
    # stops the handler and records the job as cancelled.
    "ALTER TABLE outbox_jobs ADD COLUMN cancel_requested_at timestamptz",
    # One row per worker process, refreshed every heartbeat: readiness checks and the
    # "no worker alive" alert read last_seen_at. Rows of workers gone for a day are pruned.
    """
    CREATE TABLE outbox_workers (
        id           text PRIMARY KEY,
        queues       text[] NOT NULL,
        concurrency  integer NOT NULL,
        in_flight    integer NOT NULL DEFAULT 0,
        started_at   timestamptz NOT NULL DEFAULT now(),
        last_seen_at timestamptz NOT NULL DEFAULT now()
    )
    """,
]

DOWNGRADE = [
    "DROP TABLE IF EXISTS outbox_workers",
    "ALTER TABLE outbox_jobs DROP COLUMN IF EXISTS cancel_requested_at",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)

"""Job keys with a scope: one active job per key, and debounced jobs.

``dedupe_key`` (unchanged) allows one job per ``(task, key)`` until the job is pruned; a
throttled key is such a key with its time window appended. Two more keys, each enforced by a
partial unique index, so that the database decides between concurrent enqueues:

- ``active_key``: at most one queued or running job per ``(task, key)``; once the job has
  finished, the key enqueues a new one;
- ``debounce_key`` and ``debounce_until``: at most one job per ``(task, key)`` that no worker
  has claimed yet (queued, ``started_at`` NULL). Enqueueing again while it waits replaces its
  args and pushes its ``run_at``, never past ``debounce_until``; once claimed, the next
  enqueue writes a follow-up job.

Revision ID: pgoutbox_0010
Revises: pgoutbox_0009
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "pgoutbox_0010"
down_revision: str | None = "pgoutbox_0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPGRADE = [
    "ALTER TABLE outbox_jobs ADD COLUMN active_key text",
    "ALTER TABLE outbox_jobs ADD COLUMN debounce_key text",
    "ALTER TABLE outbox_jobs ADD COLUMN debounce_until timestamptz",
    """
    CREATE UNIQUE INDEX outbox_jobs_active_key_idx ON outbox_jobs (task, active_key)
        WHERE active_key IS NOT NULL AND state IN ('queued', 'running')
    """,
    """
    CREATE UNIQUE INDEX outbox_jobs_debounce_key_idx ON outbox_jobs (task, debounce_key)
        WHERE debounce_key IS NOT NULL AND state = 'queued' AND started_at IS NULL
    """,
]

DOWNGRADE = [
    "DROP INDEX IF EXISTS outbox_jobs_debounce_key_idx",
    "DROP INDEX IF EXISTS outbox_jobs_active_key_idx",
    "ALTER TABLE outbox_jobs DROP COLUMN IF EXISTS debounce_until",
    "ALTER TABLE outbox_jobs DROP COLUMN IF EXISTS debounce_key",
    "ALTER TABLE outbox_jobs DROP COLUMN IF EXISTS active_key",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)

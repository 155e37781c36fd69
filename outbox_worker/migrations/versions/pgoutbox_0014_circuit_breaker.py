"""Circuit breaker: a queue pauses itself after N failures in a row of one of its tasks.

``outbox_queues.breaker_threshold`` is the setting (NULL: off). ``outbox_breakers`` counts,
per queue and task, the attempts that failed since the task last succeeded: each batch of
failures written adds to it and each batch of successes sets it back to 0, both under the
row's lock, so "in a row" is the order in which the database committed them, across every
worker. The statement that takes the count to the threshold pauses the queue (``paused_by``
'breaker'); resuming it sets its counts back to 0.

Revision ID: pgoutbox_0014
Revises: pgoutbox_0013
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "pgoutbox_0014"
down_revision: str | None = "pgoutbox_0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPGRADE = [
    """
    ALTER TABLE outbox_queues ADD COLUMN breaker_threshold integer
        CONSTRAINT outbox_queues_breaker_threshold_positive CHECK (breaker_threshold > 0)
    """,
    """
    CREATE TABLE outbox_breakers (
        queue      text NOT NULL,
        task       text NOT NULL,
        failures   integer NOT NULL DEFAULT 0,
        last_error text,
        PRIMARY KEY (queue, task)
    )
    """,
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS outbox_breakers")
    op.execute("ALTER TABLE outbox_queues DROP COLUMN IF EXISTS breaker_threshold")

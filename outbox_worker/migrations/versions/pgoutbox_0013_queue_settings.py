"""outbox_queues: settings per queue that every worker obeys (pause, concurrency limit).

They change at runtime, by SQL, the CLI, the admin API or the dashboard.

A queue without a row has no limit and is not paused. A limited queue's row also lists the
jobs its limit let start (``held_ids``, ``held_attempts``, ``held_until``): a claim locks the
row, counts the entries still running under a live lease, and claims at most what is left.
The list is rewritten by every claim, so an entry whose job finished, failed or whose lease
lapsed (its worker killed) stops counting at the next claim: nothing a crash can leak.

When a limit is set on a queue whose jobs are already running (claimed without it), a
trigger enters them in the list, so they count against it too.

Revision ID: pgoutbox_0013
Revises: pgoutbox_0012
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op
from outbox_worker.names import name_check

revision: str = "pgoutbox_0013"
down_revision: str | None = "pgoutbox_0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPGRADE = [
    f"""
    CREATE TABLE outbox_queues (
        name          text PRIMARY KEY,
        concurrency   integer,
        paused_at     timestamptz,
        paused_by     text,
        pause_reason  text,
        updated_at    timestamptz NOT NULL DEFAULT now(),
        held_ids      bigint[] NOT NULL DEFAULT '{{}}',
        held_attempts integer[] NOT NULL DEFAULT '{{}}',
        held_until    timestamptz[] NOT NULL DEFAULT '{{}}',
        CONSTRAINT outbox_queues_name_valid CHECK ({name_check("name")}),
        CONSTRAINT outbox_queues_concurrency_positive CHECK (concurrency > 0),
        CONSTRAINT outbox_queues_held_aligned CHECK (
            cardinality(held_ids) = cardinality(held_attempts)
            AND cardinality(held_ids) = cardinality(held_until))
    )
    """,
    # A plpgsql function's statements each take a fresh snapshot: jobs claimed by statements
    # that committed while this row was being changed are seen.
    """
    CREATE FUNCTION outbox_queues_hold_running() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        SELECT coalesce(array_agg(j.id ORDER BY j.id), '{}'),
               coalesce(array_agg(j.attempts ORDER BY j.id), '{}'),
               coalesce(array_agg(j.locked_until ORDER BY j.id), '{}')
        INTO NEW.held_ids, NEW.held_attempts, NEW.held_until
        FROM outbox_jobs AS j
        WHERE j.state = 'running' AND j.queue = NEW.name AND j.locked_until > now();
        RETURN NEW;
    END
    $$
    """,
    """
    CREATE TRIGGER outbox_queues_limit_set BEFORE INSERT ON outbox_queues
        FOR EACH ROW WHEN (NEW.concurrency IS NOT NULL)
        EXECUTE FUNCTION outbox_queues_hold_running()
    """,
    """
    CREATE TRIGGER outbox_queues_limit_changed BEFORE UPDATE OF concurrency ON outbox_queues
        FOR EACH ROW WHEN (OLD.concurrency IS NULL AND NEW.concurrency IS NOT NULL)
        EXECUTE FUNCTION outbox_queues_hold_running()
    """,
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS outbox_queues")
    op.execute("DROP FUNCTION IF EXISTS outbox_queues_hold_running()")

"""Rate limits per key: at most N starts of one key's jobs in any window of P seconds.

``key_rate_limit`` and ``key_rate_period`` are the setting. ``key_starts`` maps each key
that started jobs within the last window to when it did (seconds since the epoch), and is
rewritten by each claim of the queue under its row's lock, as ``rate_starts`` is for the
queue as a whole: a separate table would be read in the claim's snapshot, taken before that
lock is granted, and miss the starts of a claim that committed in between. A queue with a
rate per key is claimed key by key like one with a limit per key, so it keeps no ready rows.

Revision ID: pgoutbox_0018
Revises: pgoutbox_0017
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op
from outbox_worker.migrations.versions.pgoutbox_0006_ready_lanes import lane_of
from outbox_worker.migrations.versions.pgoutbox_0015_concurrency_keys import (
    IS_PARKED,
    parked,
    parked_changed,
    ready_triggers,
)

revision: str = "pgoutbox_0018"
down_revision: str | None = "pgoutbox_0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

IS_PARKED_OR_KEY_RATED = IS_PARKED + " OR {row}.key_rate_limit IS NOT NULL"


def parked_trigger(columns: str) -> list[str]:
    return [
        "DROP TRIGGER IF EXISTS outbox_queues_parked_changed ON outbox_queues",
        f"""
        CREATE TRIGGER outbox_queues_parked_changed
            AFTER INSERT OR DELETE OR UPDATE OF {columns} ON outbox_queues
            FOR EACH ROW EXECUTE FUNCTION outbox_queues_parked_changed()
        """,
    ]


def upgrade() -> None:
    for statement in [
        """
        ALTER TABLE outbox_queues
            ADD COLUMN key_rate_limit integer
                CONSTRAINT outbox_queues_key_rate_limit_positive CHECK (key_rate_limit > 0),
            ADD COLUMN key_rate_period double precision NOT NULL DEFAULT 1
                CONSTRAINT outbox_queues_key_rate_period_valid
                    CHECK (key_rate_period > 0 AND key_rate_period <= 86400),
            ADD COLUMN key_starts jsonb NOT NULL DEFAULT '{}'
        """,
        *ready_triggers(skip_parked=True, is_parked=IS_PARKED_OR_KEY_RATED),
        parked_changed("CREATE OR REPLACE", IS_PARKED_OR_KEY_RATED),
        *parked_trigger("paused_at, key_concurrency, key_rate_limit"),
    ]:
        op.execute(statement)


def downgrade() -> None:
    for statement in [
        *ready_triggers(skip_parked=True),
        parked_changed("CREATE OR REPLACE", IS_PARKED),
        *parked_trigger("paused_at, key_concurrency"),
        # Ready rows for the jobs of the queues parked only by their rate per key, which the
        # older claims read from the lanes.
        f"""
        INSERT INTO outbox_ready (lane, job_id, queue, priority, run_at)
        SELECT {lane_of("j.run_at")}, j.id, j.queue, j.priority, j.run_at
        FROM outbox_jobs AS j, outbox_lanes AS l
        WHERE j.state = 'queued'
          AND {parked("{row}.key_rate_limit IS NOT NULL").format(queue="j.queue")}
          AND NOT {parked(IS_PARKED).format(queue="j.queue")}
        """,
        "ALTER TABLE outbox_queues DROP COLUMN IF EXISTS key_starts, "
        "DROP COLUMN IF EXISTS key_rate_period, DROP COLUMN IF EXISTS key_rate_limit",
    ]:
        op.execute(statement)

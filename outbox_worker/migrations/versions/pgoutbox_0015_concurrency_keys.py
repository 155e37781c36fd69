"""Concurrency keys: at most N running jobs per key of a queue, the keys served in turn.

Also: queues whose claims do not read the ready lanes (a paused queue, a queue with a limit
per key) keep no rows there. A long pause of a large backlog left its rows in the lanes,
where no claim took them, so that a lane could not be emptied and the lanes stopped taking
turns. Now the triggers write no ready row for a job of such a queue, a queue that becomes
one has its rows removed, and one that stops being one gets them back, in the same
transaction as the change of its settings.

``outbox_jobs.concurrency_key`` is given at enqueue (a tenant, a customer, an account).
``outbox_queues.key_concurrency`` limits how many jobs of one key run at once across every
worker; ``key_cursor`` is the key the queue's last claim served, so that the next one starts
after it, and ``held_keys`` the key of each job in the queue's list of jobs its limits let
start. ``outbox_jobs_queued_idx`` serves those claims: the keys of a queue in order, and each
key's jobs in claim order.

Revision ID: pgoutbox_0015
Revises: pgoutbox_0014
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op
from outbox_worker.migrations.versions.pgoutbox_0006_ready_lanes import lane_of

revision: str = "pgoutbox_0015"
down_revision: str | None = "pgoutbox_0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The function and triggers of pgoutbox_0013, before and after this revision.
HOLD_RUNNING = """
    CREATE OR REPLACE FUNCTION outbox_queues_hold_running() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        SELECT coalesce(array_agg(j.id ORDER BY j.id), '{{}}'),
               coalesce(array_agg(j.attempts ORDER BY j.id), '{{}}'),
               coalesce(array_agg(j.locked_until ORDER BY j.id), '{{}}'){keys_select}
        INTO NEW.held_ids, NEW.held_attempts, NEW.held_until{keys_into}
        FROM outbox_jobs AS j
        WHERE j.state = 'running' AND j.queue = NEW.name AND j.locked_until > now();
        RETURN NEW;
    END
    $$
"""
WITH_KEYS = HOLD_RUNNING.format(
    keys_select=",\n               coalesce(array_agg(j.concurrency_key ORDER BY j.id), '{}')",
    keys_into=", NEW.held_keys",
)
WITHOUT_KEYS = HOLD_RUNNING.format(keys_select="", keys_into="")


def triggers(limited: str, columns: str, was_unlimited: str) -> list[str]:
    """The triggers that enter a queue's running jobs in its list when it gets a limit."""
    return [
        "DROP TRIGGER IF EXISTS outbox_queues_limit_set ON outbox_queues",
        "DROP TRIGGER IF EXISTS outbox_queues_limit_changed ON outbox_queues",
        f"""
        CREATE TRIGGER outbox_queues_limit_set BEFORE INSERT ON outbox_queues
            FOR EACH ROW WHEN ({limited.format(row="NEW")})
            EXECUTE FUNCTION outbox_queues_hold_running()
        """,
        f"""
        CREATE TRIGGER outbox_queues_limit_changed BEFORE UPDATE OF {columns} ON outbox_queues
            FOR EACH ROW WHEN ({was_unlimited} AND {limited.format(row="NEW")})
            EXECUTE FUNCTION outbox_queues_hold_running()
        """,
    ]


# A queue whose claims do not read the lanes: paused, or limited per key. {row} is the
# queue's row.
IS_PARKED = "{row}.paused_at IS NOT NULL OR {row}.key_concurrency IS NOT NULL"


def parked(is_parked: str) -> str:
    """Whether the queue named {queue} is parked."""
    return f"""EXISTS (SELECT 1 FROM outbox_queues AS q
                    WHERE q.name = {{queue}}
                      AND ({is_parked.format(row="q")}))"""


PARKED = parked(IS_PARKED)


def ready_triggers(skip_parked: bool, is_parked: str = IS_PARKED) -> list[str]:
    """The functions of pgoutbox_0006's triggers that write ready rows: with this revision,
    none for the jobs of a parked queue."""
    inserted = f"AND NOT {parked(is_parked).format(queue='n.queue')}" if skip_parked else ""
    requeued = f"WHERE NOT {parked(is_parked).format(queue='NEW.queue')}" if skip_parked else ""
    return [
        f"""
        CREATE OR REPLACE FUNCTION outbox_jobs_ready_inserted() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO outbox_ready (lane, job_id, queue, priority, run_at)
            SELECT {lane_of("n.run_at")}, n.id, n.queue, n.priority, n.run_at
            FROM inserted_jobs AS n, outbox_lanes AS l
            WHERE n.state = 'queued' {inserted};
            RETURN NULL;
        END
        $$
        """,
        f"""
        CREATE OR REPLACE FUNCTION outbox_jobs_ready_requeued() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO outbox_ready (lane, job_id, queue, priority, run_at)
            SELECT {lane_of("NEW.run_at")}, NEW.id, NEW.queue, NEW.priority, NEW.run_at
            FROM outbox_lanes AS l
            {requeued};
            RETURN NULL;
        END
        $$
        """,
    ]


def parked_changed(create: str, is_parked: str) -> str:
    """The trigger function that takes a queue's ready rows away when it becomes parked,
    and gives them back when it stops being parked."""
    return f"""
    {create} FUNCTION outbox_queues_parked_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        was boolean := TG_OP <> 'INSERT' AND ({is_parked.format(row="OLD")});
        now_parked boolean := TG_OP <> 'DELETE' AND ({is_parked.format(row="NEW")});
    BEGIN
        IF now_parked AND NOT was THEN
            DELETE FROM outbox_ready WHERE queue = NEW.name;
        ELSIF was AND NOT now_parked THEN
            INSERT INTO outbox_ready (lane, job_id, queue, priority, run_at)
            SELECT {lane_of("j.run_at")}, j.id, j.queue, j.priority, j.run_at
            FROM outbox_jobs AS j, outbox_lanes AS l
            WHERE j.state = 'queued' AND j.queue = OLD.name;
        END IF;
        RETURN NULL;
    END
    $$
    """


UPGRADE = [
    "ALTER TABLE outbox_jobs ADD COLUMN concurrency_key text",
    # Every queued job, by queue and key, each key's in claim order: the keys of a queue with
    # a limit per key, each key's jobs, and its jobs without a key; and every count of a
    # queue's queued jobs. It takes the place of outbox_jobs_claim_idx (priority DESC,
    # run_at, id), which no claim has read since the ready lanes.
    """
    CREATE INDEX outbox_jobs_queued_idx
        ON outbox_jobs (queue, concurrency_key, priority DESC, run_at, id)
        WHERE state = 'queued'
    """,
    "DROP INDEX outbox_jobs_claim_idx",
    """
    ALTER TABLE outbox_queues
        ADD COLUMN key_concurrency integer
            CONSTRAINT outbox_queues_key_concurrency_positive CHECK (key_concurrency > 0),
        ADD COLUMN key_cursor text,
        ADD COLUMN held_keys text[] NOT NULL DEFAULT '{}'
    """,
    *ready_triggers(skip_parked=True),
    parked_changed("CREATE", IS_PARKED),
    """
    CREATE TRIGGER outbox_queues_parked_changed
        AFTER INSERT OR DELETE OR UPDATE OF paused_at, key_concurrency ON outbox_queues
        FOR EACH ROW EXECUTE FUNCTION outbox_queues_parked_changed()
    """,
    WITH_KEYS,
    *triggers(
        "{row}.concurrency IS NOT NULL OR {row}.key_concurrency IS NOT NULL",
        "concurrency, key_concurrency",
        "OLD.concurrency IS NULL AND OLD.key_concurrency IS NULL",
    ),
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in [
        *triggers("{row}.concurrency IS NOT NULL", "concurrency", "OLD.concurrency IS NULL"),
        WITHOUT_KEYS,
        "DROP TRIGGER IF EXISTS outbox_queues_parked_changed ON outbox_queues",
        "DROP FUNCTION IF EXISTS outbox_queues_parked_changed()",
        *ready_triggers(skip_parked=False),
        # Ready rows for the parked queues' jobs, which the older claims read.
        f"""
        INSERT INTO outbox_ready (lane, job_id, queue, priority, run_at)
        SELECT {lane_of("j.run_at")}, j.id, j.queue, j.priority, j.run_at
        FROM outbox_jobs AS j, outbox_lanes AS l
        WHERE j.state = 'queued' AND {PARKED.format(queue="j.queue")}
        """,
        "CREATE INDEX outbox_jobs_claim_idx ON outbox_jobs (priority DESC, run_at, id) "
        "WHERE state = 'queued'",
        "DROP INDEX IF EXISTS outbox_jobs_queued_idx",
    ]:
        op.execute(statement)
    op.execute(
        "ALTER TABLE outbox_queues DROP COLUMN IF EXISTS held_keys, "
        "DROP COLUMN IF EXISTS key_cursor, DROP COLUMN IF EXISTS key_concurrency"
    )
    op.execute("ALTER TABLE outbox_jobs DROP COLUMN IF EXISTS concurrency_key")

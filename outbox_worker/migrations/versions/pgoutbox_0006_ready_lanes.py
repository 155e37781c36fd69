"""outbox_ready: the queued jobs' claim index, kept in lanes that are truncated in turn.

A claim used to read ``outbox_jobs_claim_idx``. Each claim and each re-queue leaves a dead
entry there, and while any transaction in the database holds an old snapshot (an ``idle in
transaction`` session, a report, a ``pg_dump``) vacuum can remove none of them: every claim
stepped over all of them, so a snapshot held for ten minutes made each claim read hundreds of
thousands of entries to find a few live ones.

Now every queued job also has a small row in ``outbox_ready``, written by triggers on
``outbox_jobs`` (so a plain-SQL insert or re-queue is claimable like one from the library),
and a claim reads and deletes those rows. The table is partitioned into two lanes that take
turns: new rows go to the current lane; the other lane, once its rows are claimed (or the few
left are copied across), is emptied with ``TRUNCATE``, which frees its dead rows and index
entries at once, whatever snapshot is held. Jobs due later than a horizon wait in a third
partition, ``later``, which is never truncated and is promoted into the current lane as they
come due, so that the lanes hold only what is about to run.

``outbox_ready_maintain()`` does one step of that upkeep (promote, empty a lane, or switch
lanes); each worker calls it every second, and ``SKIP LOCKED`` on the one row of
``outbox_lanes`` lets only one of them act at a time.

Revision ID: pgoutbox_0006
Revises: pgoutbox_0005
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "pgoutbox_0006"
down_revision: str | None = "pgoutbox_0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# No "%" anywhere in this revision's SQL: the offline script (outbox-worker migrate --sql)
# would print it doubled.

# A job due further ahead than this waits in the later partition; promotion (every second)
# moves it to the current lane this long before it is due.
HORIZON = "interval '60 seconds'"
LATER = 2


def lane_of(run_at: str) -> str:
    """Where a new ready row goes: the later partition, or the current lane (``l``, the row
    of outbox_lanes)."""
    return f"CASE WHEN {run_at} > now() + {HORIZON} THEN {LATER} ELSE l.current END"


# A ready row still stands for its job: queued, with the same order and queue. Others were
# superseded by a fresh row (the triggers write one on every change) or their job is gone.
# A CASE, so that the job is found by primary key: with "state = 'queued'" as a plain
# condition the planner may scan outbox_jobs_claim_idx (which has id among its columns) for
# each ready row instead.
CURRENT = """ON j.id = r.job_id
                  AND CASE WHEN j.state = 'queued' AND j.run_at = r.run_at
                                AND j.priority = r.priority AND j.queue = r.queue
                           THEN true ELSE false END"""

UPGRADE = [
    """
    CREATE TABLE outbox_lanes (
        only_row    boolean     PRIMARY KEY DEFAULT true CHECK (only_row),
        current     smallint    NOT NULL DEFAULT 0 CHECK (current IN (0, 1)),
        switched_at timestamptz NOT NULL DEFAULT now()
    )
    """,
    "INSERT INTO outbox_lanes DEFAULT VALUES",
    """
    CREATE TABLE outbox_ready (
        lane     smallint    NOT NULL,
        job_id   bigint      NOT NULL,
        queue    text        NOT NULL,
        priority integer     NOT NULL,
        run_at   timestamptz NOT NULL
    ) PARTITION BY LIST (lane)
    """,
    "CREATE TABLE outbox_ready_0 PARTITION OF outbox_ready FOR VALUES IN (0)",
    "CREATE TABLE outbox_ready_1 PARTITION OF outbox_ready FOR VALUES IN (1)",
    f"CREATE TABLE outbox_ready_later PARTITION OF outbox_ready FOR VALUES IN ({LATER})",
    # The claim's order, per lane: a Merge Append of the two lanes reads them in order and
    # stops after its limit.
    "CREATE INDEX outbox_ready_0_claim_idx ON outbox_ready_0 (priority DESC, run_at, job_id)",
    "CREATE INDEX outbox_ready_1_claim_idx ON outbox_ready_1 (priority DESC, run_at, job_id)",
    "CREATE INDEX outbox_ready_later_due_idx ON outbox_ready_later (run_at)",
    # Lanes are emptied by TRUNCATE, not by vacuum. Left unvacuumed and unanalyzed, a lane's
    # row count is unknown to the planner, which then reckons from its actual size: never
    # the stale "nearly empty" that a vacuum or analyze taken between two claims would
    # record, under which the planner reads a lane whole for every claim.
    "ALTER TABLE outbox_ready_0 SET (autovacuum_enabled = false)",
    "ALTER TABLE outbox_ready_1 SET (autovacuum_enabled = false)",
    # Every inserting statement adds one ready row per queued job it inserted, in one INSERT
    # … SELECT from its transition table (per-row triggers cost a function call per job).
    f"""
    CREATE FUNCTION outbox_jobs_ready_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO outbox_ready (lane, job_id, queue, priority, run_at)
        SELECT {lane_of("n.run_at")}, n.id, n.queue, n.priority, n.run_at
        FROM inserted_jobs AS n, outbox_lanes AS l
        WHERE n.state = 'queued';
        RETURN NULL;
    END
    $$
    """,
    """
    CREATE TRIGGER outbox_jobs_ready_inserted AFTER INSERT ON outbox_jobs
        REFERENCING NEW TABLE AS inserted_jobs
        FOR EACH STATEMENT EXECUTE FUNCTION outbox_jobs_ready_inserted()
    """,
    # A job that becomes queued again (a retry, a rescue, a release, an operator's retry) or
    # whose order changes while queued gets a new ready row; the old one, if any, is passed
    # over by claims (they check the job) and dropped when its lane is emptied. A row
    # trigger whose WHEN the server checks itself: claims, completions and heartbeats never
    # call the function.
    f"""
    CREATE FUNCTION outbox_jobs_ready_requeued() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO outbox_ready (lane, job_id, queue, priority, run_at)
        SELECT {lane_of("NEW.run_at")}, NEW.id, NEW.queue, NEW.priority, NEW.run_at
        FROM outbox_lanes AS l;
        RETURN NULL;
    END
    $$
    """,
    """
    CREATE TRIGGER outbox_jobs_ready_requeued
        AFTER UPDATE OF state, run_at, priority, queue ON outbox_jobs
        FOR EACH ROW
        WHEN (NEW.state = 'queued' AND (OLD.state <> 'queued' OR OLD.run_at <> NEW.run_at
              OR OLD.priority <> NEW.priority OR OLD.queue <> NEW.queue))
        EXECUTE FUNCTION outbox_jobs_ready_requeued()
    """,
    # TRUNCATE … RESTART IDENTITY would let new jobs take the ids of old ready rows.
    """
    CREATE FUNCTION outbox_jobs_ready_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        TRUNCATE outbox_ready;
        RETURN NULL;
    END
    $$
    """,
    """
    CREATE TRIGGER outbox_jobs_ready_truncated AFTER TRUNCATE ON outbox_jobs
        FOR EACH STATEMENT EXECUTE FUNCTION outbox_jobs_ready_truncated()
    """,
    # One round of upkeep, waiting at most lock_wait for a lane's lock. Returns what it did,
    # comma-separated: 'promoted' (jobs coming due moved into the current lane), then one of
    # 'emptied' (the other lane copied out and truncated), 'waiting' (the other lane still
    # holds more than max_copy rows, which claims will take first since they are the oldest)
    # or 'switched'; 'idle' for nothing, 'busy' when another worker is at it.
    f"""
    CREATE FUNCTION outbox_ready_maintain(
        switch_every interval, max_copy integer, lock_wait interval
    ) RETURNS text LANGUAGE plpgsql AS $$
    DECLARE
        cur       smallint;
        other     smallint;
        switched  timestamptz;
        moved     bigint;
        left_over bigint;
        done      text[] := '{{}}';
    BEGIN
        SELECT l.current, l.switched_at INTO cur, switched
        FROM outbox_lanes AS l FOR UPDATE SKIP LOCKED;
        IF NOT FOUND THEN
            RETURN 'busy';
        END IF;
        other := 1 - cur;
        PERFORM set_config(
            'lock_timeout', ceil(extract(epoch FROM lock_wait) * 1000)::bigint::text, true);

        WITH due AS (
            DELETE FROM outbox_ready_later AS r
            WHERE r.ctid = ANY(ARRAY(
                SELECT d.ctid FROM outbox_ready_later AS d
                WHERE d.run_at <= now() + {HORIZON}
                ORDER BY d.run_at LIMIT 100000))
            RETURNING r.job_id, r.queue, r.priority, r.run_at
        )
        INSERT INTO outbox_ready (lane, job_id, queue, priority, run_at)
        SELECT cur, job_id, queue, priority, run_at FROM due;
        GET DIAGNOSTICS moved = ROW_COUNT;
        IF moved > 0 THEN
            done := done || 'promoted'::text;
        END IF;

        IF pg_relation_size(('outbox_ready_' || other)::regclass) > 0 THEN
            SELECT count(*) INTO left_over
            FROM (SELECT 1 FROM outbox_ready AS r JOIN outbox_jobs AS j {CURRENT}
                  WHERE r.lane = other LIMIT max_copy + 1) AS s;
            IF left_over > max_copy THEN
                done := done || 'waiting'::text;
            ELSE
                EXECUTE 'LOCK TABLE outbox_ready_' || other || ' IN ACCESS EXCLUSIVE MODE';
                -- Only the rows of jobs still queued: stale ones end here.
                INSERT INTO outbox_ready (lane, job_id, queue, priority, run_at)
                SELECT cur, r.job_id, r.queue, r.priority, r.run_at
                FROM outbox_ready AS r JOIN outbox_jobs AS j {CURRENT}
                WHERE r.lane = other;
                EXECUTE 'TRUNCATE outbox_ready_' || other;
                done := done || 'emptied'::text;
            END IF;
        ELSIF now() - switched >= switch_every THEN
            UPDATE outbox_lanes SET current = other, switched_at = now();
            done := done || 'switched'::text;
        END IF;
        RETURN CASE WHEN cardinality(done) = 0 THEN 'idle' ELSE array_to_string(done, ',') END;
    END
    $$
    """,
    # The jobs queued before this revision.
    f"""
    INSERT INTO outbox_ready (lane, job_id, queue, priority, run_at)
    SELECT CASE WHEN j.run_at > now() + {HORIZON} THEN {LATER} ELSE 0 END,
           j.id, j.queue, j.priority, j.run_at
    FROM outbox_jobs AS j
    WHERE j.state = 'queued'
    """,
]

DOWNGRADE = [
    "DROP TRIGGER IF EXISTS outbox_jobs_ready_requeued ON outbox_jobs",
    "DROP TRIGGER IF EXISTS outbox_jobs_ready_inserted ON outbox_jobs",
    "DROP TRIGGER IF EXISTS outbox_jobs_ready_truncated ON outbox_jobs",
    "DROP FUNCTION IF EXISTS outbox_jobs_ready_requeued()",
    "DROP FUNCTION IF EXISTS outbox_jobs_ready_inserted()",
    "DROP FUNCTION IF EXISTS outbox_jobs_ready_truncated()",
    "DROP FUNCTION IF EXISTS outbox_ready_maintain(interval, integer, interval)",
    "DROP TABLE IF EXISTS outbox_ready",
    "DROP TABLE IF EXISTS outbox_lanes",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)

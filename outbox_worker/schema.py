"""``outbox_jobs`` as SQLAlchemy Core metadata: the model Alembic's autogenerate compares against.

No queries live here (they are in ``outbox_worker.sql``); the DDL that SQLAlchemy cannot
express (the NOTIFY trigger, storage parameters) is in the migrations
(``migrations/versions/pgoutbox_0001_outbox_jobs.py``).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Double,
    Identity,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    Table,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

from outbox_worker.names import name_check

metadata = MetaData()

FINISHED_STATES = "('succeeded', 'dead', 'cancelled')"

outbox_jobs = Table(
    "outbox_jobs",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("queue", Text, nullable=False, server_default=text("'default'")),
    Column("task", Text, nullable=False),
    Column("args", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("state", Text, nullable=False, server_default=text("'queued'")),
    Column("priority", Integer, nullable=False, server_default=text("0")),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("max_attempts", Integer, nullable=False, server_default=text("5")),
    Column("run_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("dedupe_key", Text),
    Column("correlation_id", Text),
    Column("last_error", Text),
    Column("result", JSONB),
    Column("locked_by", Text),
    Column("locked_until", DateTime(timezone=True)),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("cancel_requested_at", DateTime(timezone=True)),
    Column("snoozes", Integer, nullable=False, server_default=text("0")),
    Column("notify_done", Boolean, nullable=False, server_default=text("false")),
    Column("active_key", Text),
    Column("debounce_key", Text),
    Column("debounce_until", DateTime(timezone=True)),
    Column("progress", JSONB),
    Column("tags", ARRAY(Text)),
    Column("concurrency_key", Text),
    Column("trace_context", JSONB),
    CheckConstraint(
        "state IN ('queued', 'running', 'succeeded', 'dead', 'cancelled')",
        name="outbox_jobs_state_valid",
    ),
    CheckConstraint(name_check("task"), name="outbox_jobs_task_name_valid"),
    CheckConstraint(name_check("queue"), name="outbox_jobs_queue_name_valid"),
    CheckConstraint(
        "attempts >= 0 AND max_attempts >= 1 AND attempts <= max_attempts",
        name="outbox_jobs_attempts_valid",
    ),
    CheckConstraint(
        "state <> 'queued' OR attempts < max_attempts",
        name="outbox_jobs_queued_has_attempts_left",
    ),
    CheckConstraint("snoozes >= 0", name="outbox_jobs_snoozes_valid"),
    CheckConstraint(
        "state <> 'running' OR (locked_by IS NOT NULL AND locked_until IS NOT NULL)",
        name="outbox_jobs_running_is_locked",
    ),
    CheckConstraint(
        "jsonb_typeof(args) = 'object'",
        name="outbox_jobs_args_is_object",
    ),
    CheckConstraint(
        "jsonb_typeof(trace_context) = 'object'",
        name="outbox_jobs_trace_context_object",
    ),
    # Python's datetime (so asyncpg) reads no timestamptz outside years 1 to 9999, and reads
    # infinity as a naive datetime: one such row would break every listing that includes it.
    CheckConstraint(
        "run_at >= '0001-01-01 00:00:00+00' AND run_at < '10000-01-01 00:00:00+00'",
        name="outbox_jobs_run_at_readable",
    ),
    # Queued jobs by queue and key, each key's in claim order: the claims of a queue with a
    # limit per key (JOB_CLAIM_LIMITED), and counts of a queue's queued jobs.
    Index(
        "outbox_jobs_queued_idx",
        "queue",
        "concurrency_key",
        text("priority DESC"),
        "run_at",
        "id",
        postgresql_where=text("state = 'queued'"),
    ),
    # Serves JOB_RESCUE_EXPIRED: only running rows, a handful. It leaves locked_until out of
    # every index so that a heartbeat (which changes only locked_until) is a HOT update.
    Index("outbox_jobs_running_idx", "id", postgresql_where=text("state = 'running'")),
    # Unique job keys, decided by this index, not by a check then an insert: JOB_INSERT's
    # ON CONFLICT names its columns.
    Index(
        "outbox_jobs_dedupe_idx",
        "task",
        "dedupe_key",
        unique=True,
        postgresql_where=text("dedupe_key IS NOT NULL"),
    ),
    # Serves JOB_PRUNE_FINISHED and the admin statements on dead jobs.
    Index(
        "outbox_jobs_active_key_idx",
        "task",
        "active_key",
        unique=True,
        postgresql_where=text("active_key IS NOT NULL AND state IN ('queued', 'running')"),
    ),
    Index(
        "outbox_jobs_debounce_key_idx",
        "task",
        "debounce_key",
        unique=True,
        postgresql_where=text(
            "debounce_key IS NOT NULL AND state = 'queued' AND started_at IS NULL"
        ),
    ),
    Index(
        "outbox_jobs_finished_idx",
        "state",
        "finished_at",
        postgresql_where=text(f"state IN {FINISHED_STATES}"),
    ),
)

outbox_workers = Table(
    "outbox_workers",
    metadata,
    Column("id", Text, primary_key=True),
    Column("queues", ARRAY(Text), nullable=False),
    Column("concurrency", Integer, nullable=False),
    Column("in_flight", Integer, nullable=False, server_default=text("0")),
    Column("started_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("last_seen_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
)

# Dashboard sessions signed out before their cookie expires (outbox_worker.web.auth).
outbox_revoked_sessions = Table(
    "outbox_revoked_sessions",
    metadata,
    Column("id", Text, primary_key=True),
    Column("expires_at", DateTime(timezone=True), nullable=False),
)

# The claim's view of the queued jobs (migration pgoutbox_0006): one row per queued job,
# written by triggers on outbox_jobs, in two lanes truncated in turn and a partition for jobs
# due beyond the horizon. outbox_lanes says which lane new rows go to.
outbox_lanes = Table(
    "outbox_lanes",
    metadata,
    Column("only_row", Boolean, primary_key=True, server_default=text("true")),
    Column("current", SmallInteger, nullable=False, server_default=text("0")),
    Column("switched_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    CheckConstraint("only_row", name="outbox_lanes_only_row_check"),
    CheckConstraint("current IN (0, 1)", name="outbox_lanes_current_check"),
)


def _ready_columns() -> list[Column[object]]:
    return [
        Column("lane", SmallInteger, nullable=False),
        Column("job_id", BigInteger, nullable=False),
        Column("queue", Text, nullable=False),
        Column("priority", Integer, nullable=False),
        Column("run_at", DateTime(timezone=True), nullable=False),
    ]


outbox_ready = Table(
    "outbox_ready", metadata, *_ready_columns(), postgresql_partition_by="LIST (lane)"
)
outbox_ready_lanes = [
    Table(
        f"outbox_ready_{lane}",
        metadata,
        *_ready_columns(),
        Index(f"outbox_ready_{lane}_claim_idx", text("priority DESC"), "run_at", "job_id"),
    )
    for lane in (0, 1)
]
outbox_ready_later = Table(
    "outbox_ready_later",
    metadata,
    *_ready_columns(),
    Index("outbox_ready_later_due_idx", "run_at"),
)

# Periodic jobs (migration pgoutbox_0007): each schedule's definition as last declared and
# where its ticks stand (outbox_worker.schedules).
outbox_schedules = Table(
    "outbox_schedules",
    metadata,
    Column("name", Text, primary_key=True),
    Column("task", Text, nullable=False),
    Column("queue", Text, nullable=False),
    Column("args", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("priority", Integer, nullable=False, server_default=text("0")),
    Column("max_attempts", Integer, nullable=False, server_default=text("5")),
    Column("cron", Text, nullable=False),
    Column("timezone", Text, nullable=False, server_default=text("'UTC'::text")),
    Column("missed", Text, nullable=False, server_default=text("'latest'::text")),
    Column("grace_seconds", Double, nullable=False, server_default=text("60")),
    Column("last_tick", DateTime(timezone=True), nullable=False),
    Column("next_tick", DateTime(timezone=True), nullable=False),
    Column("last_job_id", BigInteger),
    Column("declared_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    CheckConstraint(name_check("name"), name="outbox_schedules_name_valid"),
    CheckConstraint(name_check("task"), name="outbox_schedules_task_name_valid"),
    CheckConstraint(name_check("queue"), name="outbox_schedules_queue_name_valid"),
    CheckConstraint(
        "missed IN ('skip', 'latest') OR missed ~ '^[0-9]+$'", name="outbox_schedules_missed_valid"
    ),
)

# Settings per queue (migration pgoutbox_0013): a pause and a global concurrency limit, and
# the jobs that limit let start (outbox_worker.flow).
outbox_queues = Table(
    "outbox_queues",
    metadata,
    Column("name", Text, primary_key=True),
    Column("concurrency", Integer),
    Column("paused_at", DateTime(timezone=True)),
    Column("paused_by", Text),
    Column("pause_reason", Text),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("breaker_threshold", Integer),
    Column("key_concurrency", Integer),
    Column("key_cursor", Text),
    Column("held_ids", ARRAY(BigInteger), nullable=False, server_default=text("'{}'::bigint[]")),
    Column("held_attempts", ARRAY(Integer), nullable=False, server_default=text("'{}'::integer[]")),
    Column(
        "held_until",
        ARRAY(DateTime(timezone=True)),
        nullable=False,
        server_default=text("'{}'::timestamp with time zone[]"),
    ),
    Column("held_keys", ARRAY(Text), nullable=False, server_default=text("'{}'::text[]")),
    Column("rate_limit", Integer),
    Column("rate_period", Double, nullable=False, server_default=text("1")),
    Column(
        "rate_starts",
        ARRAY(DateTime(timezone=True)),
        nullable=False,
        server_default=text("'{}'::timestamp with time zone[]"),
    ),
    Column("key_rate_limit", Integer),
    Column("key_rate_period", Double, nullable=False, server_default=text("1")),
    Column("key_starts", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    CheckConstraint(name_check("name"), name="outbox_queues_name_valid"),
    CheckConstraint("concurrency > 0", name="outbox_queues_concurrency_positive"),
    CheckConstraint("breaker_threshold > 0", name="outbox_queues_breaker_threshold_positive"),
    CheckConstraint("key_concurrency > 0", name="outbox_queues_key_concurrency_positive"),
    CheckConstraint("rate_limit > 0", name="outbox_queues_rate_limit_positive"),
    CheckConstraint(
        "rate_period > 0 AND rate_period <= 86400", name="outbox_queues_rate_period_valid"
    ),
    CheckConstraint("key_rate_limit > 0", name="outbox_queues_key_rate_limit_positive"),
    CheckConstraint(
        "key_rate_period > 0 AND key_rate_period <= 86400",
        name="outbox_queues_key_rate_period_valid",
    ),
    CheckConstraint(
        "cardinality(held_ids) = cardinality(held_attempts)"
        " AND cardinality(held_ids) = cardinality(held_until)",
        name="outbox_queues_held_aligned",
    ),
)

# The circuit breaker's counts (migration pgoutbox_0014): per queue and task, the attempts that
# failed since the task last succeeded.
outbox_breakers = Table(
    "outbox_breakers",
    metadata,
    Column("queue", Text, primary_key=True),
    Column("task", Text, primary_key=True),
    Column("failures", Integer, nullable=False, server_default=text("0")),
    Column("last_error", Text),
)

"""Admin statements: the admin service's reads and changes (outbox_worker.admin), one
implementation for the CLI, the HTTP API and the dashboard, run on the caller's SQLAlchemy
session. The worker runs three of them too, in its own form (outbox_worker.sql.worker):
QUEUE_ACTIVE_STATS as it is, JOB_PRUNE_FINISHED and WORKERS_ALIVE declared for asyncpg.

``:name`` parameters only, cast as ``CAST(:x AS type)``, never ``:x::type``, which
SQLAlchemy's ``text()`` misreads. Each comment names the parameters and the index the
statement relies on.
"""

from __future__ import annotations

from outbox_worker.sql.client import JOB_SELECT_LIST

# ---------------------------------------------------------------------------------------------
# One job: read, retry, cancel
# ---------------------------------------------------------------------------------------------

# :id. Index: primary key.
JOB_GET = f"""
SELECT {JOB_SELECT_LIST}
FROM outbox_jobs AS j
WHERE j.id = :id
"""

# :id. Locks the row so that the retry or cancel that follows decides on a state that
# cannot change under it. Index: primary key.
JOB_GET_FOR_UPDATE = f"""
SELECT {JOB_SELECT_LIST}
FROM outbox_jobs AS j
WHERE j.id = :id
FOR UPDATE
"""

# :id, :state (the state it was read in, under JOB_GET_FOR_UPDATE's lock). Back to queued and
# due now, keeping its attempt history; it gets at least one more attempt.
# Index: primary key.
JOB_RETRY = f"""
UPDATE outbox_jobs AS j
SET state = 'queued',
    run_at = now(),
    finished_at = NULL,
    cancel_requested_at = NULL,
    max_attempts = GREATEST(j.max_attempts, j.attempts + 1)
WHERE j.id = :id AND j.state = :state
RETURNING {JOB_SELECT_LIST}
"""

# :id. A queued job is cancelled at once. Index: primary key.
JOB_CANCEL_QUEUED = f"""
UPDATE outbox_jobs AS j
SET state = 'cancelled', finished_at = now()
WHERE j.id = :id AND j.state = 'queued'
RETURNING {JOB_SELECT_LIST}
"""

# :id. A running job is asked to stop: its worker sees the request at its next heartbeat,
# stops the handler and writes JOB_CANCEL_MANY. Index: primary key.
JOB_REQUEST_CANCEL = f"""
UPDATE outbox_jobs AS j
SET cancel_requested_at = coalesce(j.cancel_requested_at, now())
WHERE j.id = :id AND j.state = 'running'
RETURNING {JOB_SELECT_LIST}
"""

# ---------------------------------------------------------------------------------------------
# Many jobs: list, retry the dead, prune the finished
# ---------------------------------------------------------------------------------------------

# :state, :queue, :task, :tag, :concurrency_key (each NULL for any), :before_id (keyset
# cursor, NULL for the first page), :limit. Newest first. Index: primary key, scanned
# backwards from :before_id.
JOB_LIST = f"""
SELECT {JOB_SELECT_LIST}
FROM outbox_jobs AS j
WHERE (CAST(:state AS text) IS NULL OR j.state = :state)
  AND (CAST(:queue AS text) IS NULL OR j.queue = :queue)
  AND (CAST(:task AS text) IS NULL OR j.task = :task)
  AND (CAST(:tag AS text) IS NULL OR j.tags @> ARRAY[CAST(:tag AS text)])
  AND (CAST(:concurrency_key AS text) IS NULL OR j.concurrency_key = :concurrency_key)
  AND (CAST(:before_id AS bigint) IS NULL OR j.id < :before_id)
ORDER BY j.id DESC
LIMIT :limit
"""

# :queue, :task (each NULL for any), :batch. Dead jobs back to queued, one batch per call.
# Index: outbox_jobs_finished_idx (state = 'dead').
JOB_RETRY_DEAD_MANY = """
WITH chosen AS MATERIALIZED (
    SELECT id
    FROM outbox_jobs AS d
    WHERE state = 'dead'
      AND (CAST(:queue AS text) IS NULL OR queue = :queue)
      AND (CAST(:task AS text) IS NULL OR task = :task)
      -- An active key allows one queued or running job: of the dead jobs of a key that no
      -- live job holds, the newest.
      AND (d.active_key IS NULL
           OR (NOT EXISTS (SELECT FROM outbox_jobs AS o
                           WHERE o.task = d.task AND o.active_key = d.active_key
                             AND o.state IN ('queued', 'running'))
               AND d.id = (SELECT max(o.id) FROM outbox_jobs AS o
                           WHERE o.task = d.task AND o.active_key = d.active_key
                             AND o.state = 'dead')))
    ORDER BY finished_at
    LIMIT :batch
    FOR UPDATE SKIP LOCKED
)
UPDATE outbox_jobs AS j
SET state = 'queued',
    run_at = now(),
    finished_at = NULL,
    cancel_requested_at = NULL,
    max_attempts = GREATEST(j.max_attempts, j.attempts + 1)
FROM chosen
WHERE j.id = chosen.id
RETURNING j.id
"""

# :state, :older_than (seconds), :batch. One batch of the oldest finished jobs of a state,
# each batch its own short transaction. Used by the admin service (SQLAlchemy) and, as
# JOB_PRUNE_FINISHED_PG, by the worker's pruner (asyncpg). Index: outbox_jobs_finished_idx.
JOB_PRUNE_FINISHED = """
WITH doomed AS MATERIALIZED (
    SELECT id
    FROM outbox_jobs
    WHERE state = :state
      AND finished_at < now() - make_interval(secs => CAST(:older_than AS float8))
    ORDER BY finished_at
    LIMIT :batch
    FOR UPDATE SKIP LOCKED
)
DELETE FROM outbox_jobs AS j
USING doomed
WHERE j.id = doomed.id
"""

# ---------------------------------------------------------------------------------------------
# Queues and workers: the dashboard's figures and the metrics
# ---------------------------------------------------------------------------------------------

# No parameters. Cheap enough for every metrics scrape: reads only queued and running rows
# (outbox_jobs_queued_idx, outbox_jobs_running_idx), one row per queue.
QUEUE_ACTIVE_STATS = """
SELECT queue,
       count(*) FILTER (WHERE state = 'queued') AS queued,
       count(*) FILTER (WHERE state = 'queued' AND run_at <= now()) AS due,
       count(*) FILTER (WHERE state = 'running') AS running,
       coalesce(extract(epoch FROM now() - min(run_at)
                FILTER (WHERE state = 'queued' AND run_at <= now())), 0)::float8
           AS oldest_due_seconds
FROM outbox_jobs
WHERE state IN ('queued', 'running')
GROUP BY queue
"""

# :window (seconds). Finished jobs per queue and state, and how many finished within the
# window (throughput). Index: outbox_jobs_finished_idx.
QUEUE_FINISHED_STATS = """
SELECT queue, state, count(*) AS jobs,
       count(*) FILTER (
           WHERE finished_at > now() - make_interval(secs => CAST(:window AS float8))
       ) AS recent
FROM outbox_jobs
WHERE state IN ('succeeded', 'dead', 'cancelled')
GROUP BY queue, state
"""

# :seconds. Workers whose heartbeat was seen within that many seconds.
WORKERS_ALIVE = """
SELECT id, queues, concurrency, in_flight, started_at, last_seen_at
FROM outbox_workers
WHERE last_seen_at > now() - make_interval(secs => CAST(:seconds AS float8))
ORDER BY id
"""

# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------

# Every schedule with the state of the job of its latest tick (NULL once pruned). A schedule
# whose next tick is overdue by more than a few seconds is one no running worker fires: taken
# out of the code, or its workers are down. Index: primary keys.
SCHEDULES_LIST = """
SELECT s.name, s.task, s.queue, s.cron, s.timezone, s.missed, s.grace_seconds,
       s.args, s.last_tick, s.next_tick, s.last_job_id, j.state AS last_job_state,
       s.declared_at,
       CAST(greatest(extract(epoch FROM now() - s.next_tick), 0) AS float8) AS overdue_seconds
FROM outbox_schedules AS s
LEFT JOIN outbox_jobs AS j ON j.id = s.last_job_id
ORDER BY s.name
"""

# ---------------------------------------------------------------------------------------------
# Queue settings (outbox_worker.queue_settings): the row of outbox_queues each change writes
# ---------------------------------------------------------------------------------------------

_QUEUE_SETTINGS = (
    "name, concurrency, key_concurrency, rate_limit, rate_period, key_rate_limit, "
    "key_rate_period, breaker_threshold, paused_at, paused_by, pause_reason, updated_at"
)

# No parameters. Every queue with settings. Index: primary key.
QUEUE_SETTINGS_LIST = f"""
SELECT {_QUEUE_SETTINGS}
FROM outbox_queues
ORDER BY name
"""


def _queue_set(**columns: str) -> str:
    """The upsert of a queue's row that sets ``columns`` (column -> SQL type), each from the
    parameter of its own name. Index: primary key."""
    casts = ", ".join(f"CAST(:{column} AS {kind})" for column, kind in columns.items())
    sets = ", ".join(f"{column} = excluded.{column}" for column in columns)
    return f"""
INSERT INTO outbox_queues AS q (name, {", ".join(columns)})
VALUES (:name, {casts})
ON CONFLICT (name) DO UPDATE
SET {sets}, updated_at = now()
RETURNING {_QUEUE_SETTINGS}
"""


# :name and the setting (NULL: none): :concurrency, :key_concurrency, :rate_limit with
# :rate_period (seconds), :key_rate_limit with :key_rate_period, :breaker_threshold.
QUEUE_SET_CONCURRENCY = _queue_set(concurrency="integer")
QUEUE_SET_KEY_CONCURRENCY = _queue_set(key_concurrency="integer")
QUEUE_SET_RATE = _queue_set(rate_limit="integer", rate_period="float8")
QUEUE_SET_KEY_RATE = _queue_set(key_rate_limit="integer", key_rate_period="float8")
QUEUE_SET_BREAKER = _queue_set(breaker_threshold="integer")

# :name, :by (who paused it: an operator, or the circuit breaker), :reason. A queue paused
# already keeps the time it was first paused. Index: primary key.
QUEUE_PAUSE = f"""
INSERT INTO outbox_queues AS q (name, paused_at, paused_by, pause_reason)
VALUES (:name, now(), :by, :reason)
ON CONFLICT (name) DO UPDATE
SET paused_at = coalesce(q.paused_at, now()),
    paused_by = excluded.paused_by,
    pause_reason = excluded.pause_reason,
    updated_at = now()
RETURNING {_QUEUE_SETTINGS}
"""

# :name. No row back when the queue has no settings (it was not paused). Its tasks' runs of
# failures start again from 0, so that the next failure does not pause it again at once.
# Indexes: primary keys.
QUEUE_RESUME = f"""
WITH reset AS (
    UPDATE outbox_breakers SET failures = 0 WHERE queue = :name AND failures > 0
)
UPDATE outbox_queues
SET paused_at = NULL, paused_by = NULL, pause_reason = NULL, updated_at = now()
WHERE name = :name
RETURNING {_QUEUE_SETTINGS}
"""

"""App-side statements: they join the caller's transaction, on whatever it holds (a
SQLAlchemy session or connection, asyncpg or psycopg; outbox_worker.drivers renders the
``:name`` parameters for each). Enqueue and its backpressure count, and the reads and the
clear of the test helpers (outbox_worker.testing).

``:name`` parameters only, cast as ``CAST(:x AS type)``, never ``:x::type``, which
SQLAlchemy's ``text()`` misreads. Each comment names the parameters and the index the
statement relies on.
"""

from __future__ import annotations

# Columns of a Job, JSON columns as text so that every path decodes them the same way.
JOB_SELECT_LIST = """
    j.id, j.queue, j.task, j.args::text AS args, j.state, j.priority, j.attempts,
    j.max_attempts, j.run_at, j.dedupe_key, j.correlation_id, j.last_error,
    j.result::text AS result, j.locked_by, j.locked_until, j.created_at, j.started_at,
    j.finished_at, j.cancel_requested_at
"""

# ---------------------------------------------------------------------------------------------
# Enqueue
# ---------------------------------------------------------------------------------------------

# What the database decides for a new job; enqueue knows every other column of the row it
# wrote (it sent them, and a new row has no attempts, lock, error or result yet), so reading
# them back would only cost decoding.
_INSERTED = "j.id, j.run_at, j.created_at"

# :queue, :task, :args (JSON text), :priority, :max_attempts, :run_at (timestamptz or NULL),
# :delay (seconds, used when :run_at is NULL), :dedupe_key, :correlation_id.
# Index: outbox_jobs_dedupe_idx decides the conflict; no row back means the key exists.
JOB_INSERT = f"""
INSERT INTO outbox_jobs AS j
    (queue, task, args, priority, max_attempts, run_at, dedupe_key, correlation_id)
VALUES (
    :queue, :task, CAST(:args AS jsonb), :priority, :max_attempts,
    COALESCE(CAST(:run_at AS timestamptz), now() + make_interval(secs => CAST(:delay AS float8))),
    :dedupe_key, :correlation_id
)
ON CONFLICT (task, dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING
RETURNING {_INSERTED}
"""

# Parallel arrays, one element per job, in the order of JOB_INSERT's parameters:
# :queues, :tasks, :args (JSON text), :priorities, :max_attempts, :run_ats, :delays,
# :dedupe_keys, :correlation_ids. Ids are drawn in input order before the insert so the
# answer can be matched back to the input (RETURNING alone promises no order); a row whose
# key already existed comes back with NULL columns. The sequence is looked up once (an
# InitPlan), not once per row.
# Index: outbox_jobs_dedupe_idx decides each conflict.
JOB_INSERT_MANY = f"""
WITH input AS MATERIALIZED (
    SELECT nextval((SELECT pg_get_serial_sequence('outbox_jobs', 'id')::regclass)) AS id, u.*
    FROM unnest(
        CAST(:queues AS text[]), CAST(:tasks AS text[]), CAST(:args AS text[]),
        CAST(:priorities AS integer[]), CAST(:max_attempts AS integer[]),
        CAST(:run_ats AS timestamptz[]), CAST(:delays AS float8[]),
        CAST(:dedupe_keys AS text[]), CAST(:correlation_ids AS text[])
    ) WITH ORDINALITY AS u(queue, task, args, priority, max_attempts, run_at, delay,
                           dedupe_key, correlation_id, ord)
),
j AS (
    INSERT INTO outbox_jobs
        (id, queue, task, args, priority, max_attempts, run_at, dedupe_key, correlation_id)
    OVERRIDING SYSTEM VALUE
    SELECT id, queue, task, args::jsonb, priority, max_attempts,
           COALESCE(run_at, now() + make_interval(secs => delay)), dedupe_key, correlation_id
    FROM input
    -- Keyed rows in key order, so that two calls with the same keys in different orders
    -- lock them in the same order and cannot deadlock.
    ORDER BY task, dedupe_key, ord
    ON CONFLICT (task, dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING
    RETURNING id, run_at, created_at
)
SELECT {_INSERTED}
FROM input LEFT JOIN j ON j.id = input.id
ORDER BY input.ord
"""

# A batch of one task's jobs that differ only in their args and have no key (a fan-out, the
# common use of enqueue_many): :args (JSON text[]), and JOB_INSERT's other parameters once
# for all. Nothing can conflict, so every row is written and the ids drawn for the input are
# the answer: no ON CONFLICT, sort or join back, one array to encode instead of nine, and one
# row back: the ids in input order, and the run_at and created_at all the rows share
# (created_at is its column default, the transaction's now()). Index: none read.
JOB_INSERT_MANY_UNIFORM = """
WITH input AS MATERIALIZED (
    SELECT nextval((SELECT pg_get_serial_sequence('outbox_jobs', 'id')::regclass)) AS id,
           a.args, a.ord,
           COALESCE(CAST(:run_at AS timestamptz),
                    now() + make_interval(secs => CAST(:delay AS float8))) AS run_at
    FROM unnest(CAST(:args AS text[])) WITH ORDINALITY AS a(args, ord)
),
j AS (
    INSERT INTO outbox_jobs
        (id, queue, task, args, priority, max_attempts, run_at, correlation_id)
    OVERRIDING SYSTEM VALUE
    SELECT id, :queue, :task, args::jsonb, :priority, :max_attempts, run_at, :correlation_id
    FROM input
)
SELECT array_agg(id ORDER BY ord) AS ids, min(run_at) AS run_at, now() AS created_at
FROM input
"""

# :task, :dedupe_key. Index: outbox_jobs_dedupe_idx.
JOB_GET_BY_KEY = f"""
SELECT {JOB_SELECT_LIST}
FROM outbox_jobs AS j
WHERE j.task = :task AND j.dedupe_key = :dedupe_key
"""

# :tasks, :dedupe_keys (parallel arrays). Index: outbox_jobs_dedupe_idx.
JOB_GET_BY_KEYS = f"""
SELECT {JOB_SELECT_LIST}
FROM outbox_jobs AS j
JOIN unnest(CAST(:tasks AS text[]), CAST(:dedupe_keys AS text[])) AS k(task, dedupe_key)
  ON j.task = k.task AND j.dedupe_key = k.dedupe_key
"""

# :queue, :limit. How deep a queue is, counted no further than the limit (backpressure
# needs only "over or not"). Index: outbox_jobs_claim_idx.
QUEUE_DEPTH_UPTO = """
SELECT count(*) FROM (
    SELECT 1 FROM outbox_jobs WHERE state = 'queued' AND queue = :queue LIMIT :limit
) AS capped
"""

# ---------------------------------------------------------------------------------------------
# Test helpers (outbox_worker.testing: in the test's own transaction, on any driver)
# ---------------------------------------------------------------------------------------------

# :task, :args (JSON text the job's args must contain, as jsonb's @> defines it), :queue,
# :state, :priority, :max_attempts, :dedupe_key, :correlation_id (each but :task NULL for
# any). Oldest first. Index: none serves every filter; a test's table holds few rows.
JOB_FIND = f"""
SELECT {JOB_SELECT_LIST}
FROM outbox_jobs AS j
WHERE j.task = :task
  AND (CAST(:args AS jsonb) IS NULL OR j.args @> CAST(:args AS jsonb))
  AND (CAST(:queue AS text) IS NULL OR j.queue = :queue)
  AND (CAST(:state AS text) IS NULL OR j.state = :state)
  AND (CAST(:priority AS integer) IS NULL OR j.priority = :priority)
  AND (CAST(:max_attempts AS integer) IS NULL OR j.max_attempts = :max_attempts)
  AND (CAST(:dedupe_key AS text) IS NULL OR j.dedupe_key = :dedupe_key)
  AND (CAST(:correlation_id AS text) IS NULL OR j.correlation_id = :correlation_id)
ORDER BY j.id
"""

# :limit. The newest jobs, newest first: what a failed assertion lists as the table's
# content (asked for one more than it shows, to tell whether there are more). Index: primary
# key.
JOB_LIST_NEWEST = f"""
SELECT {JOB_SELECT_LIST}
FROM outbox_jobs AS j
ORDER BY j.id DESC
LIMIT :limit
"""

# No parameters. Every job gone, for the next test, with its ready rows; answers how many.
# A DELETE, not a TRUNCATE: it waits for no lock a worker or an open transaction holds.
JOB_DELETE_ALL = """
WITH gone AS (DELETE FROM outbox_jobs RETURNING 1),
     unready AS (DELETE FROM outbox_ready)
SELECT count(*) FROM gone
"""

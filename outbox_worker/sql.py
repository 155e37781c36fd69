"""Every statement of the queue, one named constant each (River's Noun+Verb names).

Worker-side statements run on asyncpg (``$n`` parameters, prepared and cached per connection
unless OUTBOX_PREPARED_STATEMENTS is off). App-side statements run through the caller's
SQLAlchemy session (``:name`` parameters; always ``CAST(:x AS type)``, never ``:x::type``,
which SQLAlchemy's ``text()`` misreads). Each comment names the parameters and the index the
statement relies on; ``tests/test_sql.py`` prepares every one against the migrated schema.
"""

from __future__ import annotations

# Columns of a Job, JSON columns as text so that every path decodes them the same way.
JOB_SELECT_LIST = """
    j.id, j.queue, j.task, j.args::text AS args, j.state, j.priority, j.attempts,
    j.max_attempts, j.run_at, j.dedupe_key, j.correlation_id, j.last_error,
    j.result::text AS result, j.locked_by, j.locked_until, j.created_at, j.started_at,
    j.finished_at
"""

# ---------------------------------------------------------------------------------------------
# App side (SQLAlchemy, joins the caller's transaction)
# ---------------------------------------------------------------------------------------------

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
RETURNING {JOB_SELECT_LIST}
"""

# Parallel arrays, one element per job, in the order of JOB_INSERT's parameters:
# :queues, :tasks, :args (JSON text), :priorities, :max_attempts, :run_ats, :delays,
# :dedupe_keys, :correlation_ids. Ids are drawn in input order before the insert so the
# answer can be matched back to the input (RETURNING alone promises no order); a row whose
# key already existed comes back with NULL job columns.
# Index: outbox_jobs_dedupe_idx decides each conflict.
JOB_INSERT_MANY = f"""
WITH input AS MATERIALIZED (
    SELECT nextval(pg_get_serial_sequence('outbox_jobs', 'id')) AS id, u.*
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
    ORDER BY ord
    ON CONFLICT (task, dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING
    RETURNING *
)
SELECT input.ord, {JOB_SELECT_LIST}
FROM input LEFT JOIN j ON j.id = input.id
ORDER BY input.ord
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

# ---------------------------------------------------------------------------------------------
# Worker side (asyncpg hot path)
# ---------------------------------------------------------------------------------------------

# $1 queues text[], $2 how many (the worker's free slots), $3 worker id, $4 lease seconds.
# PRINCIPLES rule 3: lock in a MATERIALIZED CTE, then update, so that no more than $2 rows are
# ever claimed. Index: outbox_jobs_claim_idx, read in its order and stopped after $2 rows.
JOB_CLAIM = """
WITH claimable AS MATERIALIZED (
    SELECT id
    FROM outbox_jobs
    WHERE state = 'queued' AND run_at <= now() AND queue = ANY($1::text[])
    ORDER BY priority DESC, run_at, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE outbox_jobs AS j
SET state = 'running',
    attempts = j.attempts + 1,
    locked_by = $3,
    locked_until = now() + make_interval(secs => $4::float8),
    started_at = now()
FROM claimable
WHERE j.id = claimable.id
RETURNING j.id, j.task, j.queue, j.args::text AS args, j.attempts, j.max_attempts,
          j.correlation_id
"""

# $1 ids bigint[], $2 attempts int[], $3 results text[] (JSON or NULL), $4 worker id.
# Fenced (rule 2): only rows this worker still holds for that very attempt change; the ids
# that come back are the ones that did. Index: primary key.
JOB_COMPLETE_MANY = """
UPDATE outbox_jobs AS j
SET state = 'succeeded',
    result = done.result::jsonb,
    finished_at = now(),
    locked_by = NULL,
    locked_until = NULL
FROM unnest($1::bigint[], $2::integer[], $3::text[]) AS done(id, attempt, result)
WHERE j.id = done.id
  AND j.state = 'running' AND j.locked_by = $4 AND j.attempts = done.attempt
RETURNING j.id
"""

# $1 ids bigint[], $2 attempts int[], $3 errors text[], $4 retry delays float8[] (seconds),
# $5 give up now bool[] (unknown task, poison args), $6 worker id.
# Fenced like JOB_COMPLETE_MANY. Out of attempts (by the row's own max_attempts, which an
# operator may have changed) or giving up: dead; otherwise queued again after the delay.
# Index: primary key.
JOB_FAIL_MANY = """
UPDATE outbox_jobs AS j
SET state = CASE WHEN f.give_up OR j.attempts >= j.max_attempts THEN 'dead' ELSE 'queued' END,
    run_at = CASE WHEN f.give_up OR j.attempts >= j.max_attempts THEN j.run_at
                  ELSE now() + make_interval(secs => f.delay) END,
    finished_at = CASE WHEN f.give_up OR j.attempts >= j.max_attempts THEN now() END,
    last_error = f.error,
    locked_by = NULL,
    locked_until = NULL
FROM unnest($1::bigint[], $2::integer[], $3::text[], $4::float8[], $5::boolean[])
     AS f(id, attempt, error, delay, give_up)
WHERE j.id = f.id
  AND j.state = 'running' AND j.locked_by = $6 AND j.attempts = f.attempt
RETURNING j.id, j.state
"""

# $1 ids bigint[], $2 attempts int[], $3 worker id. On shutdown, hands unfinished jobs back
# for an immediate retry elsewhere; the interrupted attempt is not counted. Fenced.
# Index: primary key.
JOB_RELEASE_MANY = """
UPDATE outbox_jobs AS j
SET state = 'queued',
    attempts = j.attempts - 1,
    run_at = now(),
    locked_by = NULL,
    locked_until = NULL
FROM unnest($1::bigint[], $2::integer[]) AS r(id, attempt)
WHERE j.id = r.id
  AND j.state = 'running' AND j.locked_by = $3 AND j.attempts = r.attempt
RETURNING j.id
"""

# $1 worker id, $2 ids bigint[] of the jobs the worker knows it holds. After a claim whose
# answer was lost with the connection, hands back rows claimed under this worker's name that
# it never started; they never ran, so the attempt is not counted.
# Index: outbox_jobs_running_idx (only running rows are read).
JOB_RELEASE_ORPHANS = """
UPDATE outbox_jobs AS j
SET state = 'queued',
    attempts = j.attempts - 1,
    run_at = now(),
    locked_by = NULL,
    locked_until = NULL
WHERE j.state = 'running' AND j.locked_by = $1 AND NOT (j.id = ANY($2::bigint[]))
RETURNING j.id
"""

# $1 ids bigint[], $2 attempts int[], $3 worker id, $4 lease seconds. One statement per
# heartbeat for every job in flight. SKIP LOCKED: a row held by a handler's own
# effectively-once transaction must not stall the leases of all the others.
# Index: primary key. Changes only locked_until, which no index covers: a HOT update.
JOB_EXTEND_LEASES = """
WITH owned AS MATERIALIZED (
    SELECT j.id
    FROM outbox_jobs AS j
    JOIN unnest($1::bigint[], $2::integer[]) AS h(id, attempt)
      ON j.id = h.id AND j.attempts = h.attempt
    WHERE j.state = 'running' AND j.locked_by = $3
    FOR UPDATE OF j SKIP LOCKED
)
UPDATE outbox_jobs AS j
SET locked_until = now() + make_interval(secs => $4::float8)
FROM owned
WHERE j.id = owned.id
RETURNING j.id
"""

# $1 how many at most. Jobs whose lease expired belong to a worker that died or stalled:
# back to queued at once, or dead when that was their last attempt (rule 1). Safe to run
# from every worker at once (SKIP LOCKED). Index: outbox_jobs_running_idx.
JOB_RESCUE_EXPIRED = """
WITH expired AS MATERIALIZED (
    SELECT id
    FROM outbox_jobs
    WHERE state = 'running' AND locked_until < now()
    ORDER BY id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE outbox_jobs AS j
SET state = CASE WHEN j.attempts >= j.max_attempts THEN 'dead' ELSE 'queued' END,
    run_at = now(),
    finished_at = CASE WHEN j.attempts >= j.max_attempts THEN now() END,
    last_error = format('lease expired: worker %s stopped renewing it (attempt %s of %s)',
                        j.locked_by, j.attempts, j.max_attempts),
    locked_by = NULL,
    locked_until = NULL
FROM expired
WHERE j.id = expired.id
RETURNING j.id, j.task, j.state, j.attempts
"""

# $1 state text, $2 retention seconds, $3 batch size. Index: outbox_jobs_finished_idx.
JOB_PRUNE_FINISHED = """
WITH doomed AS MATERIALIZED (
    SELECT id
    FROM outbox_jobs
    WHERE state = $1 AND finished_at < now() - make_interval(secs => $2::float8)
    ORDER BY finished_at
    LIMIT $3
    FOR UPDATE SKIP LOCKED
)
DELETE FROM outbox_jobs AS j
USING doomed
WHERE j.id = doomed.id
"""

# $1 lock key bigint. Maintenance that one worker at a time should do (pruning) takes this
# inside its transaction; the lock ends with the transaction.
MAINTENANCE_TRY_LOCK = "SELECT pg_try_advisory_xact_lock($1::bigint)"

# No parameters. The channel JOB_INSERT's trigger notifies; the notifier LISTENs on it.
NOTIFY_CHANNEL = "outbox_jobs"

# :id. Index: primary key.
JOB_GET = f"""
SELECT {JOB_SELECT_LIST}
FROM outbox_jobs AS j
WHERE j.id = :id
"""

"""Every statement of the queue, one named constant each (River's Noun+Verb names).

Worker-side statements run on asyncpg (``$n`` parameters, prepared and cached per connection
unless OUTBOX_PREPARED_STATEMENTS is off). App-side statements run in the caller's
transaction, written once with ``:name`` parameters (always ``CAST(:x AS type)``, never
``:x::type``, which SQLAlchemy's ``text()`` misreads): as they are through a SQLAlchemy
session, through :func:`positional` on a raw asyncpg connection, and through
:func:`pyformat` on psycopg. Each comment names the parameters and the index the statement
relies on; ``tests/test_sql.py`` prepares every one against the migrated schema.
"""

from __future__ import annotations

import re

# ``:name``, but not the ``::type`` of a cast (nor the second colon of one).
_NAMED = re.compile(r"(?<![:\w]):([a-z_]+)\b")


def positional(statement: str, *names: str) -> str:
    """An app-side statement in asyncpg's form: ``:name`` becomes ``$n`` in the order given.

    For the few statements both sides run, so that each exists once.
    """
    for number, name in enumerate(names, start=1):
        statement = re.sub(rf"(?<![:\w]):{name}\b", f"${number}", statement)
    if _NAMED.search(statement):
        raise ValueError("a :name parameter was left unnumbered")
    return statement


def parameter_names(statement: str) -> tuple[str, ...]:
    """The ``:name`` parameters of an app-side statement, in the order they first appear:
    the order :func:`positional` numbers them in for enqueue on a raw asyncpg connection."""
    return tuple(dict.fromkeys(_NAMED.findall(statement)))


def pyformat(statement: str) -> str:
    """An app-side statement in psycopg's form, for enqueue on a raw psycopg connection:
    ``:name`` becomes ``%(name)s`` and a literal ``%`` is doubled."""
    return _NAMED.sub(r"%(\1)s", statement.replace("%", "%%"))


# Columns of a Job, JSON columns as text so that every path decodes them the same way.
JOB_SELECT_LIST = """
    j.id, j.queue, j.task, j.args::text AS args, j.state, j.priority, j.attempts,
    j.max_attempts, j.run_at, j.dedupe_key, j.correlation_id, j.last_error,
    j.result::text AS result, j.locked_by, j.locked_until, j.created_at, j.started_at,
    j.finished_at, j.cancel_requested_at
"""

# ---------------------------------------------------------------------------------------------
# App side (joins the caller's transaction: SQLAlchemy, asyncpg or psycopg)
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

# ---------------------------------------------------------------------------------------------
# Worker side (asyncpg hot path)
# ---------------------------------------------------------------------------------------------

# The claim, shared by JOB_CLAIM and JOB_COMPLETE_AND_CLAIM: $1 queues text[], $2 how many
# (the slots the worker reserved), $3 worker id, $4 lease seconds.
# Lock in a MATERIALIZED CTE, then update, so that no more than $2 rows are ever claimed
# (with WHERE id IN (SELECT … LIMIT … FOR UPDATE) PostgreSQL may run the subquery again and
# lock more). Index: outbox_jobs_claim_idx, read in its order and stopped after $2 rows; the
# update finds the rows by primary key (= ANY(ARRAY(...))).
_CLAIMABLE = """
claimable AS MATERIALIZED (
    SELECT id
    FROM outbox_jobs
    WHERE state = 'queued' AND run_at <= now() AND queue = ANY($1::text[])
    ORDER BY priority DESC, run_at, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
"""
_CLAIM_UPDATE = """
UPDATE outbox_jobs AS j
SET state = 'running',
    attempts = j.attempts + 1,
    locked_by = $3,
    locked_until = now() + make_interval(secs => $4::float8),
    started_at = now()
WHERE j.id = ANY(ARRAY(SELECT id FROM claimable))
RETURNING j.id, j.task, j.queue, j.args::text AS args, j.attempts, j.max_attempts,
          j.correlation_id
"""

# See _CLAIMABLE for the parameters and the index.
JOB_CLAIM = f"WITH {_CLAIMABLE}{_CLAIM_UPDATE}"

# A success, fenced: only rows the worker (%(worker)s) still holds for that very
# attempt change; the ids that come back are the ones that did. Index: primary key.
_COMPLETE = """
UPDATE outbox_jobs AS j
SET state = 'succeeded',
    result = done.result::jsonb,
    finished_at = now(),
    locked_by = NULL,
    locked_until = NULL
FROM unnest(%(ids)s::bigint[], %(attempts)s::integer[], %(results)s::text[])
     AS done(id, attempt, result)
WHERE j.id = done.id
  AND j.state = 'running' AND j.locked_by = %(worker)s AND j.attempts = done.attempt
RETURNING j.id
"""

# $1 ids bigint[], $2 attempts int[], $3 results text[] (JSON or NULL), $4 worker id.
# See _COMPLETE: fenced, primary key.
JOB_COMPLETE_MANY = _COMPLETE % {"ids": "$1", "attempts": "$2", "results": "$3", "worker": "$4"}

# $1-$4 as JOB_CLAIM, then $5 ids bigint[], $6 attempts int[], $7 results text[] of the
# successes to write. One round trip and one commit for a batch of successes and the jobs
# that take their slots. Both parts read the same snapshot, in which the finished rows are
# running and the claimed ones queued, so no row is touched twice. Rows come back with
# claimed = false for each success written (id only), true for each job claimed.
# Indexes: primary key (the successes), outbox_jobs_claim_idx (the claim).
JOB_COMPLETE_AND_CLAIM = f"""
WITH done AS (
{_COMPLETE % {"ids": "$5", "attempts": "$6", "results": "$7", "worker": "$3"}}
),
{_CLAIMABLE},
claimed AS (
{_CLAIM_UPDATE}
)
SELECT false AS claimed, id, NULL::text AS task, NULL::text AS queue, NULL::text AS args,
       NULL::integer AS attempts, NULL::integer AS max_attempts, NULL::text AS correlation_id
FROM done
UNION ALL
SELECT true, id, task, queue, args, attempts, max_attempts, correlation_id
FROM claimed
"""

# $1 ids bigint[], $2 attempts int[], $3 errors text[], $4 retry delays float8[] (seconds),
# $5 give up now bool[] (unknown task, poison args), $6 worker id.
# Fenced like JOB_COMPLETE_MANY. A job an operator asked to cancel ends cancelled (the failure
# beat the worker's next heartbeat). Out of attempts (by the row's own max_attempts, which
# an operator may have changed) or giving up: dead; otherwise queued again after the delay.
# Index: primary key.
JOB_FAIL_MANY = """
UPDATE outbox_jobs AS j
SET state = CASE WHEN j.cancel_requested_at IS NOT NULL THEN 'cancelled'
                 WHEN f.give_up OR j.attempts >= j.max_attempts THEN 'dead'
                 ELSE 'queued' END,
    run_at = CASE WHEN j.cancel_requested_at IS NOT NULL
                    OR f.give_up OR j.attempts >= j.max_attempts THEN j.run_at
                  ELSE now() + make_interval(secs => f.delay) END,
    finished_at = CASE WHEN j.cancel_requested_at IS NOT NULL
                         OR f.give_up OR j.attempts >= j.max_attempts THEN now() END,
    last_error = f.error,
    locked_by = NULL,
    locked_until = NULL
FROM unnest($1::bigint[], $2::integer[], $3::text[], $4::float8[], $5::boolean[])
     AS f(id, attempt, error, delay, give_up)
WHERE j.id = f.id
  AND j.state = 'running' AND j.locked_by = $6 AND j.attempts = f.attempt
RETURNING j.id, j.state
"""

# Where an interrupted attempt (released on shutdown, or its lease expired) leaves its job:
# cancelled if an operator asked for that, dead if it was the last attempt (it started, so
# it counts), else due again now. The SET list of JOB_RELEASE_MANY and JOB_RESCUE_EXPIRED.
_INTERRUPTED = """state = CASE WHEN j.cancel_requested_at IS NOT NULL THEN 'cancelled'
                 WHEN j.attempts >= j.max_attempts THEN 'dead'
                 ELSE 'queued' END,
    run_at = now(),
    finished_at = CASE WHEN j.cancel_requested_at IS NOT NULL
                         OR j.attempts >= j.max_attempts THEN now() END,"""

# $1 ids bigint[], $2 attempts int[], $3 worker id. On shutdown, hands unfinished jobs back
# for an immediate retry elsewhere. The interrupted attempt did start, so it counts: a job
# interrupted on its last attempt goes dead (as a crash would leave it), so that no job ever
# starts more than max_attempts times. A job whose cancel was requested ends cancelled.
# Fenced. Index: primary key.
JOB_RELEASE_MANY = f"""
UPDATE outbox_jobs AS j
SET {_INTERRUPTED}
    last_error = CASE WHEN j.cancel_requested_at IS NOT NULL THEN j.last_error
                      ELSE format('interrupted: worker %s shut down during attempt %s of %s',
                                  $3::text, j.attempts, j.max_attempts) END,
    locked_by = NULL,
    locked_until = NULL
FROM unnest($1::bigint[], $2::integer[]) AS r(id, attempt)
WHERE j.id = r.id
  AND j.state = 'running' AND j.locked_by = $3 AND j.attempts = r.attempt
RETURNING j.id, j.state
"""

# $1 ids bigint[], $2 attempts int[], $3 worker id. Hands back claimed rows the worker never
# started (a claim answered too late to be trusted): they never ran, so the claim's attempt
# is taken back. Fenced. Index: primary key.
JOB_UNCLAIM_MANY = """
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

# $1 worker id, $2 ids bigint[] and $3 attempts int[] (parallel) of every attempt the worker
# started whose row may still be running under its name. After a claim whose answer was
# lost with the connection, hands back the rows that claim took: running under this
# worker's name, yet no attempt it started. They never ran, so their attempt is taken back;
# a started attempt is never touched (that would let a job run more than max_attempts
# times). Worker ids are unique per process, so no other worker's row can match.
# Index: outbox_jobs_running_idx (only running rows are read).
JOB_RELEASE_ORPHANS = """
UPDATE outbox_jobs AS j
SET state = 'queued',
    attempts = j.attempts - 1,
    run_at = now(),
    locked_by = NULL,
    locked_until = NULL
WHERE j.state = 'running' AND j.locked_by = $1
  AND NOT EXISTS (
      SELECT 1 FROM unnest($2::bigint[], $3::integer[]) AS s(id, attempt)
      WHERE s.id = j.id AND s.attempt = j.attempts
  )
RETURNING j.id
"""

# $1 ids bigint[], $2 attempts int[], $3 worker id, $4 lease seconds. One statement per
# heartbeat for every job in flight; also tells which of them an operator asked to cancel.
# SKIP LOCKED: a row held by a handler's own effectively-once transaction must not stall the
# leases of all the others.
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
RETURNING j.id, j.cancel_requested_at IS NOT NULL AS cancel_requested
"""

# $1 how many at most. Jobs whose lease expired belong to a worker that died or stalled:
# back to queued at once, or dead when that was their last attempt, or cancelled
# when an operator asked for that meanwhile. Safe to run
# from every worker at once (SKIP LOCKED). Index: outbox_jobs_running_idx.
JOB_RESCUE_EXPIRED = f"""
WITH expired AS MATERIALIZED (
    SELECT id
    FROM outbox_jobs
    WHERE state = 'running' AND locked_until < now()
    ORDER BY id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE outbox_jobs AS j
SET {_INTERRUPTED}
    last_error = format('lease expired: worker %s stopped renewing it (attempt %s of %s)',
                        j.locked_by, j.attempts, j.max_attempts),
    locked_by = NULL,
    locked_until = NULL
FROM expired
WHERE j.id = expired.id
RETURNING j.id, j.task, j.state, j.attempts
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

# $1 lock key bigint. Maintenance that one worker at a time should do (pruning) takes this
# inside its transaction; the lock ends with the transaction.
MAINTENANCE_TRY_LOCK = "SELECT pg_try_advisory_xact_lock($1::bigint)"

# No parameters. Fails (UndefinedTableError) unless both tables of the schema exist; the
# worker runs it once at start. Reads no row.
SCHEMA_PROBE = "SELECT NULL FROM outbox_jobs, outbox_workers LIMIT 0"

# No parameters. The channel JOB_INSERT's trigger notifies; the notifier LISTENs on it.
NOTIFY_CHANNEL = "outbox_jobs"

# :id. Index: primary key.
JOB_GET = f"""
SELECT {JOB_SELECT_LIST}
FROM outbox_jobs AS j
WHERE j.id = :id
"""

# $1 state, $2 older_than seconds, $3 batch: JOB_PRUNE_FINISHED for the worker's pruner.
JOB_PRUNE_FINISHED_PG = positional(JOB_PRUNE_FINISHED, "state", "older_than", "batch")

# ---------------------------------------------------------------------------------------------
# Cancel, workers
# ---------------------------------------------------------------------------------------------

# $1 ids bigint[], $2 attempts int[], $3 worker id. A running job whose cancel was requested
# and whose handler the worker stopped: cancelled, fenced like every outcome.
# Index: primary key.
JOB_CANCEL_MANY = """
UPDATE outbox_jobs AS j
SET state = 'cancelled',
    finished_at = now(),
    locked_by = NULL,
    locked_until = NULL
FROM unnest($1::bigint[], $2::integer[]) AS c(id, attempt)
WHERE j.id = c.id
  AND j.state = 'running' AND j.locked_by = $3 AND j.attempts = c.attempt
RETURNING j.id
"""

# $1 worker id, $2 queues text[], $3 concurrency, $4 jobs in flight. Every heartbeat: says
# this worker is alive. Index: primary key of outbox_workers.
WORKER_HEARTBEAT = """
INSERT INTO outbox_workers AS w (id, queues, concurrency, in_flight)
VALUES ($1, $2::text[], $3, $4)
ON CONFLICT (id) DO UPDATE
SET last_seen_at = now(), in_flight = EXCLUDED.in_flight, queues = EXCLUDED.queues,
    concurrency = EXCLUDED.concurrency
"""

# $1 worker id. A worker that stops cleanly says goodbye. Index: primary key.
WORKER_DELETE = "DELETE FROM outbox_workers WHERE id = $1"

# $1 seconds. Rows of workers not seen for that long (killed without goodbye).
# Sequential scan: the table has one row per worker process.
WORKER_PRUNE_GONE = """
DELETE FROM outbox_workers WHERE last_seen_at < now() - make_interval(secs => $1::float8)
"""

# ---------------------------------------------------------------------------------------------
# Admin (SQLAlchemy, on the caller's session; one implementation for the CLI and HTTP)
# ---------------------------------------------------------------------------------------------

# :state, :queue, :task (each NULL for any), :before_id (keyset cursor, NULL for the first
# page), :limit. Newest first. Index: primary key, scanned backwards from :before_id.
JOB_LIST = f"""
SELECT {JOB_SELECT_LIST}
FROM outbox_jobs AS j
WHERE (CAST(:state AS text) IS NULL OR j.state = :state)
  AND (CAST(:queue AS text) IS NULL OR j.queue = :queue)
  AND (CAST(:task AS text) IS NULL OR j.task = :task)
  AND (CAST(:before_id AS bigint) IS NULL OR j.id < :before_id)
ORDER BY j.id DESC
LIMIT :limit
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

# :queue, :task (each NULL for any), :batch. Dead jobs back to queued, one batch per call.
# Index: outbox_jobs_finished_idx (state = 'dead').
JOB_RETRY_DEAD_MANY = """
WITH chosen AS MATERIALIZED (
    SELECT id
    FROM outbox_jobs
    WHERE state = 'dead'
      AND (CAST(:queue AS text) IS NULL OR queue = :queue)
      AND (CAST(:task AS text) IS NULL OR task = :task)
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

# No parameters. Cheap enough for every metrics scrape: reads only queued and running rows
# (outbox_jobs_claim_idx, outbox_jobs_running_idx), one row per queue.
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

# :queue, :limit. How deep a queue is, counted no further than the limit (backpressure
# needs only "over or not"). Index: outbox_jobs_claim_idx.
QUEUE_DEPTH_UPTO = """
SELECT count(*) FROM (
    SELECT 1 FROM outbox_jobs WHERE state = 'queued' AND queue = :queue LIMIT :limit
) AS capped
"""

# :seconds. Workers whose heartbeat was seen within that many seconds.
WORKERS_ALIVE = """
SELECT id, queues, concurrency, in_flight, started_at, last_seen_at
FROM outbox_workers
WHERE last_seen_at > now() - make_interval(secs => CAST(:seconds AS float8))
ORDER BY id
"""

# $1 seconds: WORKERS_ALIVE for the worker's own gauges (asyncpg).
WORKERS_ALIVE_PG = positional(WORKERS_ALIVE, "seconds")

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

# No parameters. Every job gone, for the next test; answers how many. A DELETE, not a
# TRUNCATE: it waits for no lock a worker or an open transaction holds on the table.
JOB_DELETE_ALL = """
WITH gone AS (DELETE FROM outbox_jobs RETURNING 1)
SELECT count(*) FROM gone
"""

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
    j.finished_at, j.cancel_requested_at, j.active_key, j.debounce_key,
    j.progress::text AS progress, j.tags, j.concurrency_key,
    j.trace_context::text AS trace_context
"""

# ---------------------------------------------------------------------------------------------
# Enqueue
# ---------------------------------------------------------------------------------------------

# What the database decides for a new job; enqueue knows every other column of the row it
# wrote (it sent them, and a new row has no attempts, lock, error or result yet), so reading
# them back would only cost decoding. The dedupe_key too, for a throttled key gets its window
# appended by the database's clock.
_INSERTED = "j.id, j.run_at, j.created_at, j.dedupe_key"


def _throttled(key: str, window: str) -> str:
    """A key as stored: with a throttle window (seconds) given, the start of the window of
    now() that it falls in, appended (``invoice:7@2026-12-07T10:15:00Z``)."""
    return (
        f"CASE WHEN {window} IS NULL THEN {key} ELSE {key} || '@' || to_char("
        f"to_timestamp(floor(extract(epoch FROM now()) / {window}) * {window})"
        " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') END"
    )


# Tags sent as a JSON array of texts (one encoding whatever the driver, and per row in
# arrays), as text[]; NULL stays NULL.
_TAGS_OF_JSON = (
    "CASE WHEN {tags} IS NULL THEN NULL"
    " ELSE ARRAY(SELECT jsonb_array_elements_text(CAST({tags} AS jsonb))) END"
)


def _debounce_until(max_wait: str) -> str:
    return f"now() + make_interval(secs => {max_wait})"


# :queue, :task, :args (JSON text), :priority, :max_attempts, :run_at (timestamptz or NULL),
# :delay (seconds, used when :run_at is NULL), :dedupe_key, :correlation_id, :throttle (the
# window of a throttled dedupe_key, or NULL), :active_key, :debounce_key, :debounce_max
# (seconds from now to the latest start of a debounced job, or NULL), :tags (a JSON array
# of texts, or NULL), :concurrency_key, :trace_context (the enqueuer's, a JSON object as text,
# or NULL: outbox_worker.tracing).
# Indexes: outbox_jobs_dedupe_idx, _active_key_idx and _debounce_key_idx decide a conflict
# (a job has one key at most); no row back means the key is taken.
JOB_INSERT = f"""
INSERT INTO outbox_jobs AS j
    (queue, task, args, priority, max_attempts, run_at, dedupe_key, correlation_id,
     active_key, debounce_key, debounce_until, tags, concurrency_key, trace_context)
VALUES (
    :queue, :task, CAST(:args AS jsonb), :priority, :max_attempts,
    COALESCE(CAST(:run_at AS timestamptz), now() + make_interval(secs => CAST(:delay AS float8))),
    {_throttled("CAST(:dedupe_key AS text)", "CAST(:throttle AS float8)")}, :correlation_id,
    :active_key, :debounce_key, {_debounce_until("CAST(:debounce_max AS float8)")},
    {_TAGS_OF_JSON.format(tags="CAST(:tags AS text)")}, CAST(:concurrency_key AS text),
    CAST(:trace_context AS jsonb)
)
ON CONFLICT DO NOTHING
RETURNING {_INSERTED}
"""

# Parallel arrays, one element per job, in the order of JOB_INSERT's parameters:
# :queues, :tasks, :args (JSON text), :priorities, :max_attempts, :run_ats, :delays,
# :dedupe_keys, :correlation_ids, :throttles, :active_keys, :debounce_keys, :debounce_maxes,
# :tags (each row's as JSON text, or NULL: an array of arrays cannot be unnested by row),
# :concurrency_keys; and :trace_context once for all (the rows of one call share it).
# Ids are drawn in input order before the insert so the answer can be matched back to the
# input (RETURNING alone promises no order); a row whose key was taken comes back with NULL
# columns. The sequence is looked up once (an InitPlan), not once per row.
# Indexes: as JOB_INSERT's.
JOB_INSERT_MANY = f"""
WITH input AS MATERIALIZED (
    SELECT nextval((SELECT pg_get_serial_sequence('outbox_jobs', 'id')::regclass)) AS id, u.*
    FROM unnest(
        CAST(:queues AS text[]), CAST(:tasks AS text[]), CAST(:args AS text[]),
        CAST(:priorities AS integer[]), CAST(:max_attempts AS integer[]),
        CAST(:run_ats AS timestamptz[]), CAST(:delays AS float8[]),
        CAST(:dedupe_keys AS text[]), CAST(:correlation_ids AS text[]),
        CAST(:throttles AS float8[]), CAST(:active_keys AS text[]),
        CAST(:debounce_keys AS text[]), CAST(:debounce_maxes AS float8[]),
        CAST(:tags AS text[]), CAST(:concurrency_keys AS text[])
    ) WITH ORDINALITY AS u(queue, task, args, priority, max_attempts, run_at, delay,
                           dedupe_key, correlation_id, throttle, active_key, debounce_key,
                           debounce_max, tags, concurrency_key, ord)
),
j AS (
    INSERT INTO outbox_jobs
        (id, queue, task, args, priority, max_attempts, run_at, dedupe_key, correlation_id,
         active_key, debounce_key, debounce_until, tags, concurrency_key, trace_context)
    OVERRIDING SYSTEM VALUE
    SELECT id, queue, task, args::jsonb, priority, max_attempts,
           COALESCE(run_at, now() + make_interval(secs => delay)),
           {_throttled("dedupe_key", "throttle")}, correlation_id, active_key, debounce_key,
           {_debounce_until("debounce_max")}, {_TAGS_OF_JSON.format(tags="input.tags")},
           concurrency_key, CAST(:trace_context AS jsonb)
    FROM input
    -- Keyed rows in key order, so that two calls with the same keys in different orders
    -- lock them in the same order and cannot deadlock.
    ORDER BY task, dedupe_key, active_key, debounce_key, ord
    ON CONFLICT DO NOTHING
    RETURNING id, run_at, created_at, dedupe_key
)
SELECT {_INSERTED}
FROM input LEFT JOIN j ON j.id = input.id
ORDER BY input.ord
"""

# The jobs whose keys a conflict found taken, read back: :tasks, :dedupe_keys, :throttles,
# :active_keys, :debounce_keys, :args, :delays (parallel arrays; one key per row), each row
# with the place (from 1) of the key it answers. A plain or throttled key
# names its job for as long as it is kept, an active key its queued or running job. A
# debounced key's waiting job is pushed back instead: its args become :args' and its start
# :delays seconds from now, never past its debounce_until (the row is locked: concurrent
# enqueues of one key take turns). A row that finds nothing (the job finished, or a worker
# claimed the debounced one meanwhile) is inserted again by the caller.
# Indexes: outbox_jobs_dedupe_idx, _active_key_idx, _debounce_key_idx.
JOB_FIND_KEYED = f"""
WITH k AS MATERIALIZED (
    SELECT * FROM unnest(
        CAST(:tasks AS text[]), CAST(:dedupe_keys AS text[]), CAST(:throttles AS float8[]),
        CAST(:active_keys AS text[]), CAST(:debounce_keys AS text[]), CAST(:args AS text[]),
        CAST(:delays AS float8[])
    ) WITH ORDINALITY AS k(task, dedupe_key, throttle, active_key, debounce_key, args, delay,
                           ord)
),
debounced AS (
    UPDATE outbox_jobs AS j
    SET args = k.args::jsonb,
        run_at = LEAST(now() + make_interval(secs => k.delay),
                       COALESCE(j.debounce_until, 'infinity'))
    FROM k
    WHERE k.debounce_key IS NOT NULL
      AND j.task = k.task AND j.debounce_key = k.debounce_key
      AND j.state = 'queued' AND j.started_at IS NULL
    RETURNING k.ord, {JOB_SELECT_LIST}
)
SELECT * FROM debounced
UNION ALL
SELECT k.ord, {JOB_SELECT_LIST}
FROM k JOIN outbox_jobs AS j ON j.task = k.task
WHERE (k.active_key IS NOT NULL AND j.active_key = k.active_key
       AND j.state IN ('queued', 'running'))
   OR (k.dedupe_key IS NOT NULL AND j.dedupe_key = {_throttled("k.dedupe_key", "k.throttle")})
"""

# A batch of one task's jobs that differ only in their args and have no key (a fan-out, the
# common use of enqueue_many): :args (JSON text[]), and JOB_INSERT's other parameters once
# for all. Nothing can conflict, so every row is written and the ids drawn for the input are
# the answer: no ON CONFLICT, sort or join back, one array to encode instead of nine, and one
# row back: the ids in input order, and the run_at and created_at all the rows share
# (created_at is its column default, the transaction's now()). Index: none read.
JOB_INSERT_MANY_UNIFORM = f"""
WITH input AS MATERIALIZED (
    SELECT nextval((SELECT pg_get_serial_sequence('outbox_jobs', 'id')::regclass)) AS id,
           a.args, a.ord,
           COALESCE(CAST(:run_at AS timestamptz),
                    now() + make_interval(secs => CAST(:delay AS float8))) AS run_at
    FROM unnest(CAST(:args AS text[])) WITH ORDINALITY AS a(args, ord)
),
j AS (
    INSERT INTO outbox_jobs
        (id, queue, task, args, priority, max_attempts, run_at, correlation_id, tags,
         concurrency_key, trace_context)
    OVERRIDING SYSTEM VALUE
    SELECT id, :queue, :task, args::jsonb, :priority, :max_attempts, run_at, :correlation_id,
           {_TAGS_OF_JSON.format(tags="CAST(:tags AS text)")}, CAST(:concurrency_key AS text),
           CAST(:trace_context AS jsonb)
    FROM input
)
SELECT array_agg(id ORDER BY ord) AS ids, min(run_at) AS run_at, now() AS created_at
FROM input
"""

# :queue, :limit. How deep a queue is, counted no further than the limit (backpressure
# needs only "over or not"). Index: outbox_jobs_queued_idx.
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

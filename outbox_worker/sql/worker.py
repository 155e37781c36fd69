"""Worker-side statements: the asyncpg hot path (claim, outcomes, heartbeat) and the worker's
maintenance (rescue, prune), prepared and cached per connection unless
OUTBOX_PREPARED_STATEMENTS is off.

Each is declared with :func:`~outbox_worker.sql._params.statement`: its text with ``:name``
placeholders and the names in the order asyncpg takes them, rendered into ``$n`` text once,
here, at import. Call sites bind by name: ``conn.fetch(*sql.bind(sql.JOB_CLAIM, ...))``.
Each comment says what the values mean and the index the statement relies on; the
types are the casts in the text.
"""

from __future__ import annotations

from outbox_worker.sql._params import statement
from outbox_worker.sql.admin import JOB_GET, JOB_PRUNE_FINISHED, WORKERS_ALIVE


def fence(attempt: str) -> str:
    """The fence, the queue's central invariant: a worker's write about job ``j`` applies
    only while the row is running, held by that worker (``:worker_id``), for the attempt it
    writes about (``attempt``: the column of the statement's input rows that carries it).

    A worker whose lease lapsed meanwhile (its job rescued, perhaps claimed and run again
    elsewhere) so changes nothing, and the rows that come back are the ones it did change.

    Written as a CASE, so that the job is found by primary key: with ``state = 'running'``
    as a plain condition the planner may read ``outbox_jobs_running_idx`` whole and hash-join
    it, which statistics taken while few jobs run make look cheap. Under a snapshot held
    elsewhere that index keeps an entry of every job run since, and each write read them all.
    """
    return (
        f"CASE WHEN j.state = 'running' AND j.locked_by = :worker_id AND j.attempts = {attempt}"
        " THEN true ELSE false END"
    )


# ---------------------------------------------------------------------------------------------
# Claim
# ---------------------------------------------------------------------------------------------

# The claim, shared by JOB_CLAIM, JOB_COMPLETE_AND_CLAIM and JOB_CLAIM_LIMITED: :queues to
# serve, :limit (the rows the worker reserved), of which :ahead go to its buffer of jobs
# claimed ahead of a free slot, :worker_id, :lease_seconds.
# It finds jobs through outbox_ready, not an index of outbox_jobs: the ready rows of the two
# lanes (never the later partition), in claim order through outbox_ready_{0,1}_claim_idx (a
# Merge Append), stopped after :limit rows. Autovacuum never analyzes the lanes, so the
# planner guesses the selectivity of every condition on them, and each plain condition
# (lane IN (0, 1), queue = ANY, run_at <= now()) divides its guess of their rows by 3 to
# 200: 20,000 ready rows looked like one, and it probed and sorted them all to claim 10.
# So the later partition is pruned by lane <> 2 (guessed as nearly every row), and the
# other conditions sit in a CASE, guessed as half. The lanes are truncated in turn, so the dead
# entries a claim steps over are a few seconds' worth even while vacuum is held back
# (migration pgoutbox_0006 says how).
# A ready row is a hint, the job row decides: each is checked against its job, by primary
# key, in a LATERAL subquery (OFFSET 0 keeps it one, so the planner cannot hash-join the
# whole job table instead). A row whose job is no longer queued, or whose run_at, priority
# or queue no longer match the job's (cancelled, claimed through another ready row,
# rescheduled: the triggers wrote a fresh row) is passed over and goes when its lane is
# emptied; so jobs are claimed in the order of their own columns.
# Every check of a job's state is inside a CASE, here and in the locking below. Written as
# plain conditions, "state = 'queued'" lets the planner probe outbox_jobs_queued_idx (whose
# columns include id) instead of the primary key: a scan of that whole index per ready
# row, which under a held snapshot is full of dead entries; and it would multiply the
# equalities' selectivities into "no row", making reading the lanes in order look
# expensive. As a CASE, it is a coin toss no partial index matches.
# Ready rows are locked first (SKIP LOCKED: another claim holds them), then their jobs
# (SKIP LOCKED, and still queued once locked); both in MATERIALIZED CTEs, then update, so
# that no more than :limit rows are ever claimed (with WHERE id IN (SELECT … LIMIT … FOR
# UPDATE) PostgreSQL may run the subquery again and lock more). Both locks are taken above
# the LIMIT, on the rows it lets through: locking the job inside the LATERAL probe would
# save a probe (about a seventh of the claim's database CPU), but a plan that sorted the
# lanes, as a manual ANALYZE of emptied lanes leads to, would then lock every queued job
# at each claim; this way such a plan is slow, not a storm of locks. The update finds the jobs
# by primary key (= ANY(ARRAY(...))); the claimed ready rows are deleted by TID, lane by
# lane: = ANY(ARRAY(...)) on one table is a TID scan whatever its statistics say (a join
# against the partitioned table may scan a lane once per row when its statistics call it
# empty).
# A job on its last attempt is taken only for a slot that is free now, never ahead: a claim
# counts the attempt, and a worker killed before starting a job it claimed ahead leaves that
# attempt counted; so it must never be the last one, or the rescuer would bury a job that
# never ran. Such a job past the first :limit - :ahead is locked for the statement and left
# queued, its ready row kept.
_CLAIM_PARAMS = ("queues", "limit", "ahead", "worker_id", "lease_seconds")


def _claimable(*, queues: str, limit: str, now: str) -> str:
    """The claim's CTEs up to the rows it takes, for ``queues`` (a text[] expression),
    at most ``limit`` rows of which those past the first ``now`` are not last attempts."""
    return f"""
picked AS MATERIALIZED (
    SELECT r.lane, r.ctid AS row_ref, r.job_id, r.priority, r.run_at, j.spare
    FROM outbox_ready AS r
    CROSS JOIN LATERAL (
        SELECT j.attempts + 1 < j.max_attempts AS spare
        FROM outbox_jobs AS j
        WHERE j.id = r.job_id
          AND CASE WHEN j.state = 'queued' AND j.run_at = r.run_at
                        AND j.priority = r.priority AND j.queue = r.queue
                   THEN true ELSE false END
        OFFSET 0
    ) AS j
    WHERE r.lane <> 2
      AND CASE WHEN r.run_at <= now() AND r.queue = ANY({queues}) THEN true ELSE false END
    ORDER BY r.priority DESC, r.run_at, r.job_id
    LIMIT {limit}
    FOR UPDATE OF r SKIP LOCKED
),
locked AS MATERIALIZED (
    SELECT j.id
    FROM outbox_jobs AS j
    WHERE j.id = ANY(ARRAY(SELECT job_id FROM picked))
      AND CASE WHEN j.state = 'queued' AND j.run_at <= now() AND j.queue = ANY({queues})
               THEN true ELSE false END
    FOR UPDATE SKIP LOCKED
),
claimable AS MATERIALIZED (
    SELECT lane, row_ref, job_id AS id
    FROM (SELECT p.*, row_number() OVER (ORDER BY priority DESC, run_at, job_id) AS place
          FROM picked AS p
          WHERE p.job_id IN (SELECT id FROM locked)) AS d
    WHERE spare OR place <= {now}
),
unready_0 AS (
    DELETE FROM outbox_ready_0
    WHERE ctid = ANY(ARRAY(SELECT row_ref FROM claimable WHERE lane = 0))
),
unready_1 AS (
    DELETE FROM outbox_ready_1
    WHERE ctid = ANY(ARRAY(SELECT row_ref FROM claimable WHERE lane = 1))
)
"""


# The worker's queues that claim without flow control: neither paused nor limited (a row
# of outbox_queues says so). A limited queue is claimed by JOB_CLAIM_LIMITED alone.
_OPEN_QUEUES = """
open_queues AS MATERIALIZED (
    SELECT ARRAY(
        SELECT q FROM unnest(:queues::text[]) AS q
        WHERE NOT EXISTS (
            SELECT 1 FROM outbox_queues AS s
            WHERE s.name = q AND (s.paused_at IS NOT NULL OR s.concurrency IS NOT NULL
                                  OR s.key_concurrency IS NOT NULL
                                  OR s.rate_limit IS NOT NULL))
    ) AS names
),"""
_CLAIMABLE = _OPEN_QUEUES + _claimable(
    queues="(SELECT names FROM open_queues)::text[]", limit=":limit", now=":limit - :ahead::integer"
)


def _claim_update(ids: str) -> str:
    """The claim itself, of the jobs whose ids the query ``ids`` gives."""
    return f"""
UPDATE outbox_jobs AS j
SET state = 'running',
    attempts = j.attempts + 1,
    locked_by = :worker_id,
    locked_until = now() + make_interval(secs => :lease_seconds::float8),
    started_at = now()
WHERE j.id = ANY(ARRAY({ids}))
RETURNING j.id, j.task, j.queue, j.args::text AS args, j.attempts, j.max_attempts,
          j.correlation_id, j.trace_context::text AS trace_context
"""


_CLAIM_UPDATE = _claim_update("SELECT id FROM claimable")

JOB_CLAIM = statement(f"WITH {_CLAIMABLE}{_CLAIM_UPDATE}", params=_CLAIM_PARAMS)

# ---------------------------------------------------------------------------------------------
# Outcomes: every one fenced, each for a batch of jobs (parallel arrays :ids and :attempts)
# ---------------------------------------------------------------------------------------------

# A batch of successes: :results are JSON text or NULL. Index: primary key.
_COMPLETE = f"""
UPDATE outbox_jobs AS j
SET state = 'succeeded',
    result = done.result::jsonb,
    finished_at = now(),
    locked_by = NULL,
    locked_until = NULL
FROM unnest(:ids::bigint[], :attempts::integer[], :results::text[])
     AS done(id, attempt, result)
WHERE j.id = done.id
  AND {fence("done.attempt")}
RETURNING j.id, j.queue, j.task
"""

# A success ends its task's run of failures (migration pgoutbox_0014): the circuit breaker's
# count goes back to 0. Only rows above 0 are written, and the table only has rows for
# queues with a breaker, so without failures this reads an empty table. Index: its primary
# key.
_RESET_BREAKERS = """
reset AS (
    UPDATE outbox_breakers AS b
    SET failures = 0
    WHERE b.failures > 0 AND (b.queue, b.task) IN (SELECT queue, task FROM done)
)"""

JOB_COMPLETE_MANY = statement(
    f"WITH done AS ({_COMPLETE}),{_RESET_BREAKERS}\nSELECT id FROM done",
    params=("ids", "attempts", "results", "worker_id"),
)

# JOB_CLAIM's parameters, then _COMPLETE's (:worker_id is the claim's). One round trip and
# one commit for a batch of successes and the jobs that take their slots. Both parts read
# the same snapshot, in which the finished rows are running and the claimed ones queued, so
# no row is touched twice. Rows come back with claimed = false for each success written (id
# only), true for each job claimed.
# Indexes: primary key (the successes), outbox_ready's lanes (the claim).
JOB_COMPLETE_AND_CLAIM = statement(
    params=(*_CLAIM_PARAMS, "ids", "attempts", "results"),
    text=f"""
WITH done AS (
{_COMPLETE}
),{_RESET_BREAKERS},
{_CLAIMABLE},
claimed AS (
{_CLAIM_UPDATE}
)
SELECT false AS claimed, id, NULL::text AS task, NULL::text AS queue, NULL::text AS args,
       NULL::integer AS attempts, NULL::integer AS max_attempts, NULL::text AS correlation_id,
       NULL::text AS trace_context
FROM done
UNION ALL
SELECT true, id, task, queue, args, attempts, max_attempts, correlation_id, trace_context
FROM claimed
""",
)

# A limited queue's claim: :queue, :limit and :ahead as in JOB_CLAIM, :worker_id,
# :lease_seconds. A queue is limited by a concurrency (running jobs of the queue), a
# key_concurrency (running jobs per concurrency key), a rate (starts of the queue's jobs in
# a sliding window) or a key_rate_limit (starts of one key's jobs in a window), or several
# (migrations pgoutbox_0013, pgoutbox_0015, pgoutbox_0016, pgoutbox_0018).
# The queue's row is locked first (FOR UPDATE waits: the claims of one limited queue take
# turns), so that it is read as the last claim left it: locking returns the newest version
# of the row, whatever this statement's older snapshot holds. Its list of the jobs the
# limits let start is checked against their rows: an entry counts while its job runs that
# attempt under a live lease, or, if the job's row does not show that attempt yet (claimed
# after this snapshot was taken) or is not in this snapshot at all (inserted after it: a
# claim that waited on the row while the job was enqueued and claimed), until the lease the
# claim gave it would run out. A finished, failed or rescued job, or one whose worker died
# (its lease lapsed), no longer counts. The claim takes at most the concurrency less what
# counts, and writes the list back: what still counts, and the jobs it claimed. Jobs claimed
# ahead count against the limit like running ones, so they are claimed only out of the half
# of the limit no claim would otherwise reach: a worker never holds idle the last places
# that another worker's free slots could run.
# With a key_concurrency or a key_rate_limit, keyed jobs are taken key by key, in turns:
# the walk goes through the queue's keys in order from the one after key_cursor, wrapping
# round once, each step one probe of outbox_jobs_queued_idx, until it has found as many keys
# with room (fewer of their jobs count than the limit, and fewer of their starts fall in
# the window than the rate: jsonb maps by key, built once) as the claim may take, and no
# further than eight times that plus 32 keys. A key without room takes no turn and holds
# up no other key. Each key gives its due jobs in
# claim order, no more than its room and an even share of the claim; the claim takes the
# first job of every key, then the second, and so on. key_cursor becomes the last key it
# took from, or the last key the walk reached when the claim is not full, so that the next
# claim goes on from there: a key with a huge backlog takes one turn like any other, and a
# key that waits is served by the next claim with room at the latest. Jobs without a key
# take what the keyed jobs left of the claim's free slots, in claim order, and count
# against no key's limit or rate. Such a queue keeps no ready rows (migrations
# pgoutbox_0015, pgoutbox_0018): its claims read outbox_jobs_queued_idx, not the lanes,
# which a queue limited only in all reads as any other.
# A paused queue claims nothing; a queue without a row, or without limits, claims like any
# other. Indexes: the primary keys (the row, each listed job), outbox_jobs_queued_idx
# (the keys, their jobs, the jobs without a key), outbox_ready's lanes.
_NEXT_KEY = """(SELECT j.concurrency_key FROM outbox_jobs AS j
     WHERE j.state = 'queued' AND j.queue = :queue AND j.concurrency_key > {after}
     ORDER BY j.concurrency_key LIMIT 1)"""
_FIRST_KEY = """(SELECT j.concurrency_key FROM outbox_jobs AS j
     WHERE j.state = 'queued' AND j.queue = :queue AND j.concurrency_key IS NOT NULL
     ORDER BY j.concurrency_key LIMIT 1)"""
# What one key may still start: its limit less its jobs that count, and its rate less its
# starts in the window; least() passes over the one the queue does not set.
_KEY_ROOM = """least((SELECT g.key_concurrency FROM gate AS g)
                   - coalesce(((SELECT l.live FROM key_live AS l) ->> {key})::integer, 0),
               (SELECT g.key_rate_limit FROM gate AS g)
                   - coalesce(jsonb_array_length((SELECT r.starts FROM key_rated AS r) -> {key}),
                              0))"""
_LIMITED_PARAMS = ("queue", "limit", "ahead", "worker_id", "lease_seconds")


def _limited(written: str = "") -> str:
    """The limited claim's CTEs; ``written`` names a CTE of the ids of jobs whose successes
    the same statement writes."""
    finished = f"\n      AND h.id NOT IN (SELECT id FROM {written})" if written else ""
    return f"""
gate AS MATERIALIZED (
    SELECT q.concurrency, q.key_concurrency, q.key_cursor, q.paused_at,
           q.held_ids, q.held_attempts, q.held_until, q.held_keys,
           q.rate_limit, q.rate_period, q.key_rate_limit, q.key_rate_period, q.key_starts,
           q.key_concurrency IS NOT NULL OR q.key_rate_limit IS NOT NULL AS keyed,
           ARRAY(SELECT t FROM unnest(q.rate_starts) AS t
                 WHERE t > now() - make_interval(secs => q.rate_period)) AS recent
    FROM outbox_queues AS q
    WHERE q.name = :queue
    FOR UPDATE
),
held AS MATERIALIZED (
    SELECT h.id, h.attempt, h.until, h.key
    FROM gate AS g
    CROSS JOIN LATERAL unnest(g.held_ids, g.held_attempts, g.held_until, g.held_keys)
        AS h(id, attempt, until, key)
    WHERE (g.concurrency IS NOT NULL OR g.key_concurrency IS NOT NULL)
      AND coalesce(
        (SELECT CASE WHEN j.attempts = h.attempt
                     THEN j.state = 'running' AND j.locked_until > now()
                     ELSE j.attempts < h.attempt AND h.until > now() END
         FROM outbox_jobs AS j
         WHERE j.id = h.id),
        h.until > now()){finished}
),
room AS MATERIALIZED (
    SELECT g.paused_at IS NOT NULL AS paused, g.concurrency,
           greatest(0, g.concurrency - (SELECT count(*) FROM held)) AS left_over,
           CASE WHEN g.rate_limit IS NOT NULL
                THEN greatest(0, g.rate_limit - cardinality(g.recent)) END AS starts_left
    FROM gate AS g
),
budget AS MATERIALIZED (
    SELECT coalesce(
        (SELECT least(
                    CASE WHEN r.paused THEN 0
                         WHEN r.concurrency IS NULL THEN :limit::bigint
                         ELSE least(:limit::bigint - :ahead::integer, r.left_over)
                              + least(:ahead::integer,
                                      greatest(0, r.left_over
                                                  - (:limit::bigint - :ahead::integer)
                                                  - r.concurrency / 2))
                    END,
                    r.starts_left)
         FROM room AS r),
        :limit::bigint) AS n
),
key_live AS MATERIALIZED (
    SELECT coalesce(jsonb_object_agg(k.key, k.live), '{{}}') AS live
    FROM (SELECT h.key, count(*) AS live
          FROM held AS h
          WHERE h.key IS NOT NULL
          GROUP BY h.key) AS k
),
key_rated AS MATERIALIZED (
    SELECT coalesce(jsonb_object_agg(e.key, r.starts), '{{}}') AS starts
    FROM gate AS g
    CROSS JOIN LATERAL jsonb_each(g.key_starts) AS e(key, starts)
    CROSS JOIN LATERAL (
        SELECT jsonb_agg(t.at) AS starts
        FROM jsonb_array_elements(e.starts) AS t(at)
        WHERE t.at::float8 > extract(epoch FROM now()) - g.key_rate_period
    ) AS r
    WHERE g.key_rate_limit IS NOT NULL AND r.starts IS NOT NULL
),
walk(key, pos, wrapped, room, free) AS (
    SELECT s.key, 1, s.wrapped, s.room, (s.room > 0)::integer
    FROM gate AS g
    CROSS JOIN LATERAL (
        SELECT k.key, k.wrapped, {_KEY_ROOM.format(key="k.key")} AS room
        FROM (SELECT coalesce(a.after, {_FIRST_KEY}) AS key, a.after IS NULL AS wrapped
              FROM (SELECT {_NEXT_KEY.format(after="g.key_cursor")} AS after OFFSET 0) AS a
              OFFSET 0) AS k
    ) AS s
    WHERE g.keyed AND g.paused_at IS NULL AND s.key IS NOT NULL
  UNION ALL
    SELECT n.key, w.pos + 1, n.wrapped, n.room, w.free + (n.room > 0)::integer
    FROM walk AS w
    CROSS JOIN LATERAL (
        SELECT m.key, m.wrapped, {_KEY_ROOM.format(key="m.key")} AS room
        FROM (SELECT coalesce(x.after, CASE WHEN NOT w.wrapped THEN {_FIRST_KEY} END) AS key,
                     w.wrapped OR x.after IS NULL AS wrapped
              FROM (SELECT {_NEXT_KEY.format(after="w.key")} AS after OFFSET 0) AS x
              OFFSET 0) AS m
    ) AS n
    WHERE n.key IS NOT NULL
      AND w.free < (SELECT n FROM budget)
      AND w.pos < 8 * (SELECT n FROM budget) + 32
      AND NOT (n.wrapped AND n.key > coalesce((SELECT key_cursor FROM gate), n.key))
),
shares AS MATERIALIZED (
    SELECT ceil((SELECT n FROM budget)::numeric
                / greatest(1, count(*) FILTER (WHERE w.room > 0)))::bigint AS share,
           max(w.pos) AS last_pos
    FROM walk AS w
),
keyed AS MATERIALIZED (
    SELECT w.key, w.pos, c.id, c.priority, c.run_at, c.spare
    FROM walk AS w
    CROSS JOIN LATERAL (
        SELECT j.id, j.priority, j.run_at, j.attempts + 1 < j.max_attempts AS spare
        FROM outbox_jobs AS j
        WHERE j.state = 'queued' AND j.queue = :queue AND j.concurrency_key = w.key
          AND j.run_at <= now()
        ORDER BY j.priority DESC, j.run_at, j.id
        LIMIT least(w.room, (SELECT share FROM shares))
        FOR UPDATE SKIP LOCKED
    ) AS c
    WHERE w.room > 0
),
keyed_taken AS MATERIALIZED (
    SELECT id, key, pos
    FROM (SELECT t.*, row_number() OVER (ORDER BY t.turn, t.pos) AS place
          FROM (SELECT k.*, row_number() OVER (PARTITION BY k.key
                                               ORDER BY k.priority DESC, k.run_at, k.id)
                                AS turn
                FROM keyed AS k) AS t) AS d
    WHERE spare OR place <= :limit - :ahead::integer
    ORDER BY place
    LIMIT (SELECT n FROM budget)
),
unkeyed AS MATERIALIZED (
    SELECT j.id
    FROM outbox_jobs AS j
    WHERE j.state = 'queued' AND j.queue = :queue AND j.concurrency_key IS NULL
      AND j.run_at <= now()
      AND (SELECT keyed FROM gate)
    ORDER BY j.priority DESC, j.run_at, j.id
    LIMIT greatest(0, least((SELECT n FROM budget), :limit - :ahead::integer)
                      - (SELECT count(*) FROM keyed_taken))
    FOR UPDATE SKIP LOCKED
),
open_queues AS MATERIALIZED (
    SELECT ARRAY[:queue::text] AS names
),
{
        _claimable(
            queues="(SELECT names FROM open_queues)::text[]",
            limit="(SELECT CASE WHEN keyed THEN 0 ELSE (SELECT n FROM budget) END FROM gate)",
            now=":limit - :ahead::integer",
        )
    },
claimed AS (
{
        _claim_update(
            "SELECT id FROM claimable UNION ALL SELECT id FROM keyed_taken "
            "UNION ALL SELECT id FROM unkeyed"
        )
    }
),
granted AS (
    UPDATE outbox_queues AS q
    SET held_ids = l.ids, held_attempts = l.attempts, held_until = l.until, held_keys = l.keys,
        rate_starts = CASE WHEN (SELECT rate_limit IS NULL FROM gate) THEN '{{}}'
                           ELSE (SELECT recent FROM gate)
                                || array_fill(now(), ARRAY[(SELECT count(*) FROM claimed)::integer])
                      END,
        key_starts = CASE WHEN (SELECT key_rate_limit IS NULL FROM gate) THEN '{{}}'
                          ELSE (SELECT r.starts FROM key_rated AS r)
                               || coalesce((SELECT jsonb_object_agg(
                                                       n.key,
                                                       coalesce(r.starts -> n.key, '[]')
                                                       || to_jsonb(array_fill(
                                                              extract(epoch FROM now()),
                                                              ARRAY[n.taken])))
                                            FROM key_rated AS r,
                                                 (SELECT t.key, count(*)::integer AS taken
                                                  FROM keyed_taken AS t
                                                  JOIN claimed AS c ON c.id = t.id
                                                  GROUP BY t.key) AS n), '{{}}')
                     END,
        key_cursor = coalesce(
            CASE WHEN (SELECT count(*) FROM keyed_taken) >= (SELECT n FROM budget)
                 THEN (SELECT t.key FROM keyed_taken AS t ORDER BY t.pos DESC LIMIT 1)
                 ELSE (SELECT w.key FROM walk AS w, shares AS s WHERE w.pos = s.last_pos) END,
            q.key_cursor)
    FROM (SELECT coalesce(array_agg(e.id), '{{}}') AS ids,
                 coalesce(array_agg(e.attempt), '{{}}') AS attempts,
                 coalesce(array_agg(e.until), '{{}}') AS until,
                 coalesce(array_agg(e.key), '{{}}') AS keys
          FROM (SELECT id, attempt, until, key FROM held
                UNION ALL
                SELECT c.id, c.attempts, now() + make_interval(secs => :lease_seconds::float8),
                       t.key
                FROM claimed AS c LEFT JOIN keyed_taken AS t ON t.id = c.id
                WHERE (SELECT concurrency IS NOT NULL OR key_concurrency IS NOT NULL
                       FROM gate)) AS e) AS l
    WHERE q.name = :queue
      AND (SELECT concurrency IS NOT NULL OR keyed OR rate_limit IS NOT NULL FROM gate)
      AND (EXISTS (SELECT 1 FROM claimed)
           OR (SELECT count(*) FROM held) < (SELECT cardinality(held_ids) FROM gate))
)
"""


JOB_CLAIM_LIMITED = statement(
    params=_LIMITED_PARAMS,
    text=f"""
WITH RECURSIVE {_limited()}SELECT id, task, queue, args, attempts, max_attempts, correlation_id,
       trace_context
FROM claimed
""",
)

# JOB_CLAIM_LIMITED's parameters, then _COMPLETE's: JOB_COMPLETE_AND_CLAIM for a worker whose
# queues are all limited. The jobs whose successes it writes leave the list of those the
# limits let start (they finish when this claim commits), so the claim may take the places
# they free, and the next claim does not probe them. Rows as JOB_COMPLETE_AND_CLAIM's.
JOB_COMPLETE_AND_CLAIM_LIMITED = statement(
    params=(*_LIMITED_PARAMS, "ids", "attempts", "results"),
    text=f"""
WITH RECURSIVE done AS (
{_COMPLETE}
),{_RESET_BREAKERS},
{_limited("done")}SELECT false AS claimed, id, NULL::text AS task, NULL::text AS queue,
       NULL::text AS args, NULL::integer AS attempts, NULL::integer AS max_attempts,
       NULL::text AS correlation_id, NULL::text AS trace_context
FROM done
UNION ALL
SELECT true, id, task, queue, args, attempts, max_attempts, correlation_id, trace_context
FROM claimed
""",
)

# :errors, :delays (seconds until the retry), :give_up (now: unknown task, poison args).
# A job an operator asked to cancel ends cancelled (the failure beat the worker's next
# heartbeat). Out of attempts (by the row's own max_attempts, which an operator may have
# changed) or giving up: dead; otherwise queued again after the delay. Index: primary key.
# Then the circuit breaker (migration pgoutbox_0014), for queues that have one: the failures
# written are added to their task's count, under its row's lock, and the count that reaches
# the queue's threshold pauses the queue. Each failure's row says whether its batch paused
# the queue (tripped_task, tripped_after: the task and its count). Indexes: primary keys.
JOB_FAIL_MANY = statement(
    params=("ids", "attempts", "errors", "delays", "give_up", "worker_id"),
    text=f"""
WITH failed AS (
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
    FROM unnest(:ids::bigint[], :attempts::integer[], :errors::text[], :delays::float8[],
                :give_up::boolean[])
         AS f(id, attempt, error, delay, give_up)
    WHERE j.id = f.id
      AND {fence("f.attempt")}
    RETURNING j.id, j.state, j.queue, j.task, f.error
),
counted AS (
    INSERT INTO outbox_breakers AS b (queue, task, failures, last_error)
    SELECT f.queue, f.task, count(*), left(max(f.error), 500)
    FROM failed AS f
    JOIN outbox_queues AS q ON q.name = f.queue AND q.breaker_threshold IS NOT NULL
    GROUP BY f.queue, f.task
    ON CONFLICT (queue, task) DO UPDATE
    SET failures = b.failures + excluded.failures, last_error = excluded.last_error
    RETURNING b.queue, b.task, b.failures, b.last_error
),
tripped AS (
    UPDATE outbox_queues AS q
    SET paused_at = now(),
        paused_by = 'breaker',
        pause_reason = format('task %s failed %s times in a row; last error: %s',
                              c.task, c.failures, c.last_error),
        updated_at = now()
    FROM counted AS c
    WHERE q.name = c.queue AND q.paused_at IS NULL AND c.failures >= q.breaker_threshold
    RETURNING q.name, c.task, c.failures
)
SELECT f.id, f.state, t.task AS tripped_task, t.failures AS tripped_after
FROM failed AS f
LEFT JOIN tripped AS t ON t.name = f.queue AND t.task = f.task
""",
)

# Where an interrupted attempt (released on shutdown, or its lease expired) leaves its job:
# cancelled if an operator asked for that, dead if it was the last attempt (it started, so
# it counts), else due again now. The SET list of JOB_RELEASE_MANY and JOB_RESCUE_EXPIRED.
_INTERRUPTED = """state = CASE WHEN j.cancel_requested_at IS NOT NULL THEN 'cancelled'
                 WHEN j.attempts >= j.max_attempts THEN 'dead'
                 ELSE 'queued' END,
    run_at = now(),
    finished_at = CASE WHEN j.cancel_requested_at IS NOT NULL
                         OR j.attempts >= j.max_attempts THEN now() END,"""

# On shutdown, hands unfinished jobs back for an immediate retry elsewhere. The interrupted
# attempt did start, so it counts: a job interrupted on its last attempt goes dead (as a
# crash would leave it), so that no job ever starts more than max_attempts times. A job
# whose cancel was requested ends cancelled. Index: primary key.
JOB_RELEASE_MANY = statement(
    params=("ids", "attempts", "worker_id"),
    text=f"""
UPDATE outbox_jobs AS j
SET {_INTERRUPTED}
    last_error = CASE WHEN j.cancel_requested_at IS NOT NULL THEN j.last_error
                      ELSE format('interrupted: worker %s shut down during attempt %s of %s',
                                  :worker_id::text, j.attempts, j.max_attempts) END,
    locked_by = NULL,
    locked_until = NULL
FROM unnest(:ids::bigint[], :attempts::integer[]) AS r(id, attempt)
WHERE j.id = r.id
  AND {fence("r.attempt")}
RETURNING j.id, j.state
""",
)

# A running job whose cancel was requested and whose handler the worker stopped, or whose
# handler cancelled it (CancelJob): cancelled. :reasons are the handlers' (NULL for an
# operator's cancel, which keeps the last error). Index: primary key.
JOB_CANCEL_MANY = statement(
    params=("ids", "attempts", "reasons", "worker_id"),
    text=f"""
UPDATE outbox_jobs AS j
SET state = 'cancelled',
    finished_at = now(),
    last_error = COALESCE(c.reason, j.last_error),
    locked_by = NULL,
    locked_until = NULL
FROM unnest(:ids::bigint[], :attempts::integer[], :reasons::text[]) AS c(id, attempt, reason)
WHERE j.id = c.id
  AND {fence("c.attempt")}
RETURNING j.id
""",
)

# Snoozed by their handlers (SnoozeJob): queued again after :delays seconds with the attempt
# given back, and counted in snoozes; dead instead once snoozed :max_snoozes times, and
# cancelled if an operator asked meanwhile. Index: primary key.
JOB_SNOOZE_MANY = statement(
    params=("ids", "attempts", "delays", "max_snoozes", "worker_id"),
    text=f"""
UPDATE outbox_jobs AS j
SET state = CASE WHEN j.cancel_requested_at IS NOT NULL THEN 'cancelled'
                 WHEN j.snoozes >= s.max_snoozes THEN 'dead'
                 ELSE 'queued' END,
    attempts = CASE WHEN j.cancel_requested_at IS NOT NULL OR j.snoozes >= s.max_snoozes
                    THEN j.attempts ELSE j.attempts - 1 END,
    snoozes = j.snoozes + 1,
    run_at = CASE WHEN j.cancel_requested_at IS NOT NULL OR j.snoozes >= s.max_snoozes
                  THEN j.run_at ELSE now() + make_interval(secs => s.delay) END,
    finished_at = CASE WHEN j.cancel_requested_at IS NOT NULL
                         OR j.snoozes >= s.max_snoozes THEN now() END,
    last_error = CASE WHEN j.cancel_requested_at IS NULL AND j.snoozes >= s.max_snoozes
                      THEN format('snoozed %s times: the task allows %s', j.snoozes + 1,
                                  s.max_snoozes)
                      ELSE j.last_error END,
    locked_by = NULL,
    locked_until = NULL
FROM unnest(:ids::bigint[], :attempts::integer[], :delays::float8[], :max_snoozes::integer[])
     AS s(id, attempt, delay, max_snoozes)
WHERE j.id = s.id
  AND {fence("s.attempt")}
RETURNING j.id, j.state
""",
)

# ---------------------------------------------------------------------------------------------
# Claims taken back: rows claimed under the worker's name that never ran
# ---------------------------------------------------------------------------------------------

# A claimed row that never ran, back to queued with the claim's attempt taken back: the SET
# list of JOB_UNCLAIM_MANY and JOB_RELEASE_ORPHANS.
_NEVER_STARTED = """state = 'queued',
    attempts = j.attempts - 1,
    run_at = now(),
    locked_by = NULL,
    locked_until = NULL"""

# Hands back claimed rows the worker never started (a claim answered too late to be
# trusted): they never ran, so the claim's attempt is taken back. Index: primary key.
JOB_UNCLAIM_MANY = statement(
    params=("ids", "attempts", "worker_id"),
    text=f"""
UPDATE outbox_jobs AS j
SET {_NEVER_STARTED}
FROM unnest(:ids::bigint[], :attempts::integer[]) AS r(id, attempt)
WHERE j.id = r.id
  AND {fence("r.attempt")}
RETURNING j.id
""",
)

# :ids and :attempts (parallel) of every attempt the worker started whose row may still be
# running under its name. After a claim whose answer was lost with the connection, hands
# back the rows that claim took: running under this worker's name, yet no attempt it
# started. They never ran, so their attempt is taken back; a started attempt is never
# touched (that would let a job run more than max_attempts times). Not the fence but its
# complement: the rows held by no attempt the worker knows of. Worker ids are unique per
# process, so no other worker's row can match.
# Index: outbox_jobs_running_idx (only running rows are read).
JOB_RELEASE_ORPHANS = statement(
    params=("worker_id", "ids", "attempts"),
    text=f"""
UPDATE outbox_jobs AS j
SET {_NEVER_STARTED}
WHERE j.state = 'running' AND j.locked_by = :worker_id
  AND NOT EXISTS (
      SELECT 1 FROM unnest(:ids::bigint[], :attempts::integer[]) AS s(id, attempt)
      WHERE s.id = j.id AND s.attempt = j.attempts
  )
RETURNING j.id
""",
)

# ---------------------------------------------------------------------------------------------
# Heartbeat: leases and the worker's own row
# ---------------------------------------------------------------------------------------------

# One statement per heartbeat for every job in flight (fenced, :lease_seconds from now),
# with the latest :progress each handler reported since the last beat (JSON text, NULL for
# none); also tells which of them an operator asked to cancel. SKIP LOCKED: a row held by a
# handler's own effectively-once transaction must not stall the leases of all the others.
# Index: primary key. Changes only locked_until and progress, which no index covers: a HOT
# update.
JOB_EXTEND_LEASES = statement(
    params=("ids", "attempts", "progress", "worker_id", "lease_seconds"),
    text=f"""
WITH owned AS MATERIALIZED (
    SELECT j.id, h.progress
    FROM outbox_jobs AS j
    JOIN unnest(:ids::bigint[], :attempts::integer[], :progress::text[])
         AS h(id, attempt, progress)
      ON j.id = h.id
    WHERE {fence("h.attempt")}
    FOR UPDATE OF j SKIP LOCKED
)
UPDATE outbox_jobs AS j
SET locked_until = now() + make_interval(secs => :lease_seconds::float8),
    progress = COALESCE(owned.progress::jsonb, j.progress)
FROM owned
WHERE j.id = owned.id
RETURNING j.id, j.cancel_requested_at IS NOT NULL AS cancel_requested
""",
)

# :queues it serves, :concurrency, :in_flight (jobs). Every heartbeat: says this worker is
# alive. Index: primary key of outbox_workers.
WORKER_HEARTBEAT = statement(
    params=("worker_id", "queues", "concurrency", "in_flight"),
    text="""
INSERT INTO outbox_workers AS w (id, queues, concurrency, in_flight)
VALUES (:worker_id, :queues::text[], :concurrency, :in_flight)
ON CONFLICT (id) DO UPDATE
SET last_seen_at = now(), in_flight = EXCLUDED.in_flight, queues = EXCLUDED.queues,
    concurrency = EXCLUDED.concurrency
""",
)

# A worker that stops cleanly says goodbye. Index: primary key.
WORKER_DELETE = statement("DELETE FROM outbox_workers WHERE id = :worker_id", params=("worker_id",))

# ---------------------------------------------------------------------------------------------
# Maintenance: rescue expired leases, prune finished jobs
# ---------------------------------------------------------------------------------------------

# At most :limit jobs whose lease expired: they belong to a worker that died or stalled:
# back to queued at once, or dead when that was their last attempt, or cancelled when an
# operator asked for that meanwhile. Safe to run from every worker at once (SKIP LOCKED).
# Index: outbox_jobs_running_idx.
JOB_RESCUE_EXPIRED = statement(
    params=("limit",),
    text=f"""
WITH expired AS MATERIALIZED (
    SELECT id
    FROM outbox_jobs
    WHERE state = 'running' AND locked_until < now()
    ORDER BY id
    LIMIT :limit
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
""",
)

# One step of the ready lanes' upkeep (promote jobs coming due, empty the lane not in use,
# or switch lanes), by the function of migration pgoutbox_0006: :switch_every (seconds a
# lane stays current at least), :max_copy (the most rows copied out of a lane to empty it;
# more, and the claims take them first), :lock_wait (seconds to wait for the lane's lock, so
# that claims queued behind that lock wait no longer). Returns what it did, as text.
READY_MAINTAIN = statement(
    params=("switch_every", "max_copy", "lock_wait"),
    text="""
SELECT outbox_ready_maintain(make_interval(secs => :switch_every::float8), :max_copy::integer,
                             make_interval(secs => :lock_wait::float8))
""",
)

# Maintenance that one worker at a time should do (pruning) takes this lock (:key) inside
# its transaction; the lock ends with the transaction.
MAINTENANCE_TRY_LOCK = statement("SELECT pg_try_advisory_xact_lock(:key::bigint)", params=("key",))

# admin.JOB_PRUNE_FINISHED, for the worker's pruner.
JOB_PRUNE_FINISHED_PG = statement(JOB_PRUNE_FINISHED, params=("state", "older_than", "batch"))

# ---------------------------------------------------------------------------------------------
# Start, gauges, and the test helpers' drain (which writes as a worker does)
# ---------------------------------------------------------------------------------------------

# Fails (UndefinedTableError) unless both tables of the schema exist; the worker runs it
# once at start. Reads no row.
SCHEMA_PROBE = statement("SELECT NULL FROM outbox_jobs, outbox_workers LIMIT 0")

# Not a statement: the channel client.JOB_INSERT's trigger notifies; the notifier LISTENs.
NOTIFY_CHANNEL = "outbox_jobs"

# :channel, one the notifier's connection LISTENs to alone: its start-up check that a NOTIFY
# sent through the worker's pool, as the jobs' are, reaches its LISTEN.
LISTEN_PROBE = statement(params=("channel",), text="SELECT pg_notify(:channel, '')")

# :queues (the worker's). The settings of those that have any: a limit (of the queue, per
# key, or of its rate or a key's) sends a queue's claims through JOB_CLAIM_LIMITED; the
# shortest window of its rates sets how often the worker tries again; a pause hands back
# the jobs claimed ahead of it.
# Index: primary key.
QUEUES_WATCH = statement(
    params=("queues",),
    text="""
SELECT name,
       concurrency IS NOT NULL OR key_concurrency IS NOT NULL OR rate_limit IS NOT NULL
           OR key_rate_limit IS NOT NULL AS limited,
       least(CASE WHEN rate_limit IS NOT NULL THEN rate_period END,
             CASE WHEN key_rate_limit IS NOT NULL THEN key_rate_period END) AS rate_period,
       paused_at IS NOT NULL AS paused
FROM outbox_queues
WHERE name = ANY(:queues::text[])
""",
)

# admin.WORKERS_ALIVE, for the worker's own gauges.
WORKERS_ALIVE_PG = statement(WORKERS_ALIVE, params=("seconds",))

# admin.JOB_GET, for outbox_worker.testing.drain on its asyncpg pool.
JOB_GET_PG = statement(JOB_GET, params=("id",))

# ---------------------------------------------------------------------------------------------
# Waiting for a job (outbox_worker.waiting), on the waiter's own asyncpg connection
# ---------------------------------------------------------------------------------------------

# The channel the trigger of migration pgoutbox_0009 notifies, with the job's id, when a job
# with notify_done set finishes.
DONE_CHANNEL = "outbox_job_done"

# Asks for that notification: sets notify_done on job :id if it has not finished yet (and
# is not marked already: no needless row version). Index: primary key.
JOB_WATCH = statement(
    params=("id",),
    text="""
UPDATE outbox_jobs
SET notify_done = true
WHERE id = :id::bigint AND state IN ('queued', 'running') AND NOT notify_done
""",
)

# ---------------------------------------------------------------------------------------------
# Schedules (outbox_worker.schedules): declared at start, fired by every worker that has them
# ---------------------------------------------------------------------------------------------

# One schedule as this worker's code declares it: its definition replaces the row's (the
# last worker to start wins, and every worker fires what the row says). A new schedule starts
# from now: its first tick is :next_tick, computed from this transaction's now(). A changed
# cron expression or time zone starts again from now too; otherwise the row keeps where its
# ticks stand, so ticks missed while no worker ran follow its missed policy.
# Index: primary key.
SCHEDULE_DECLARE = statement(
    params=(
        "name",
        "task",
        "queue",
        "args",
        "priority",
        "max_attempts",
        "cron",
        "timezone",
        "missed",
        "grace_seconds",
        "next_tick",
    ),
    text="""
INSERT INTO outbox_schedules AS s
    (name, task, queue, args, priority, max_attempts, cron, timezone, missed, grace_seconds,
     last_tick, next_tick, declared_at)
VALUES (:name::text, :task::text, :queue::text, :args::jsonb, :priority::integer,
        :max_attempts::integer, :cron::text, :timezone::text, :missed::text,
        :grace_seconds::float8, now(), :next_tick::timestamptz, now())
ON CONFLICT (name) DO UPDATE
SET task = EXCLUDED.task,
    queue = EXCLUDED.queue,
    args = EXCLUDED.args,
    priority = EXCLUDED.priority,
    max_attempts = EXCLUDED.max_attempts,
    missed = EXCLUDED.missed,
    grace_seconds = EXCLUDED.grace_seconds,
    declared_at = now(),
    cron = EXCLUDED.cron,
    timezone = EXCLUDED.timezone,
    last_tick = CASE WHEN (s.cron, s.timezone) = (EXCLUDED.cron, EXCLUDED.timezone)
                     THEN s.last_tick ELSE now() END,
    next_tick = CASE WHEN (s.cron, s.timezone) = (EXCLUDED.cron, EXCLUDED.timezone)
                     THEN s.next_tick ELSE EXCLUDED.next_tick END
""",
)

# The schedules among :names whose next tick has come, locked: SKIP LOCKED leaves a schedule
# another worker is firing to that worker, and the lock holds until SCHEDULE_ADVANCE in the
# same transaction has moved its ticks on. now() is the clock every tick is measured by.
# Index: primary key (a handful of rows).
SCHEDULES_DUE = statement(
    params=("names",),
    text="""
SELECT name, task, queue, args::text AS args, priority, max_attempts, cron, timezone, missed,
       grace_seconds, last_tick, now() AS now
FROM outbox_schedules
WHERE name = ANY(:names::text[]) AND next_tick <= now()
ORDER BY next_tick
FOR UPDATE SKIP LOCKED
""",
)

# One schedule's due ticks enqueued and its ticks moved on, in one statement: the jobs
# (:ticks with their unique :keys, "<schedule>@<tick>"; run_at is the tick) and the row
# (:last_tick, :next_tick). A key already taken (by a worker that fired this tick before a
# crash undid nothing: the key and last_tick commit together) enqueues nothing again.
# Rows come back per job enqueued. Indexes: outbox_jobs_dedupe_idx, primary keys.
SCHEDULE_ADVANCE = statement(
    params=(
        "name",
        "task",
        "queue",
        "args",
        "priority",
        "max_attempts",
        "ticks",
        "keys",
        "last_tick",
        "next_tick",
    ),
    text="""
WITH enqueued AS (
    INSERT INTO outbox_jobs (queue, task, args, priority, max_attempts, run_at, dedupe_key)
    SELECT :queue::text, :task::text, :args::jsonb, :priority::integer, :max_attempts::integer,
           t.tick, t.key
    FROM unnest(:ticks::timestamptz[], :keys::text[]) AS t(tick, key)
    ON CONFLICT (task, dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING
    RETURNING id, run_at
),
advanced AS (
    UPDATE outbox_schedules
    SET last_tick = :last_tick::timestamptz,
        next_tick = :next_tick::timestamptz,
        last_job_id = COALESCE((SELECT id FROM enqueued ORDER BY run_at DESC LIMIT 1),
                               last_job_id)
    WHERE name = :name::text
)
SELECT id, run_at FROM enqueued ORDER BY run_at
""",
)

# Seconds until the soonest next tick of :names (negative: one is due), or NULL when none
# of them has a row. Index: primary key.
SCHEDULES_SOONEST = statement(
    params=("names",),
    text="""
SELECT extract(epoch FROM min(next_tick) - now())::float8
FROM outbox_schedules
WHERE name = ANY(:names::text[])
""",
)

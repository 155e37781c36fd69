"""The job state machine, model-checked: hypothesis drives enqueue, claim, complete, fail,
release, heartbeat, lease expiry, rescue, retry-now, cancel and late writes of workers that
lost their lease in random orders against the real database, through the library's own SQL
(``outbox_worker.sql``) and ``enqueue``, and after every step compares every row with a small
Python model of what each of those statements must do. The operator's side (cancel and
retry) goes through the admin API that the HTTP routes, the CLI and the dashboard share.

One database for the whole test, emptied (``TRUNCATE … RESTART IDENTITY``) at the start of
every example: the per-test fixtures cannot reach inside hypothesis's examples.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncpg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import tests.workload  # noqa: F401 -- registers the tasks enqueue checks names against
from outbox_worker import NewJob, enqueue, enqueue_many, sql
from outbox_worker.admin import cancel_job, retry_job
from outbox_worker.config import sqlalchemy_url
from outbox_worker.devdb import PostgresServer, admin
from outbox_worker.errors import JobStateConflict
from tests.conftest import TEMPLATE

T = TypeVar("T")

WORKERS = ("w1", "w2", "w3")
QUEUES = ("default", "other")
TASK_MAX_ATTEMPTS = {"echo": 5, "always_fails": 3}  # as registered in tests/workload.py
KEYS = ("k1", "k2", "k3")
LEASE = 3600.0  # no lease lapses by itself during a test: expiry is a rule of its own
LATER = 3600.0  # a delay that keeps a job from being due during a test
FINISHED = ("succeeded", "dead", "cancelled")
# What a worker may write for a job it claimed; "cancel" is how it ends a job whose cancel
# an operator requested (it sees the request at a heartbeat and stops the handler).
# "unclaim" hands back a claim answered too late to be trusted, its handler never started.
WRITES = ("complete", "fail", "fail_later", "give_up", "release", "unclaim", "cancel")


@dataclass
class Job:
    """The model of one row."""

    id: int
    task: str
    queue: str
    priority: int
    max_attempts: int
    dedupe_key: str | None
    due_since: int | None  # the step that made it due (its run_at); None: not due
    state: str = "queued"
    attempts: int = 0
    locked_by: str | None = None
    expired: bool = False
    cancel_requested: bool = False
    last_error: str | None = None
    result: Any = None

    def held_by(self, worker: str, attempt: int) -> bool:
        """What every fenced write checks."""
        return self.state == "running" and self.locked_by == worker and self.attempts == attempt


@dataclass(frozen=True)
class Held:
    """A claim as a worker remembers it: it may since have been taken away."""

    worker: str
    job_id: int
    attempt: int


@dataclass
class Env:
    loop: asyncio.AbstractEventLoop
    url: str
    engine: AsyncEngine
    steps: int = 0
    writes: dict[str, int] = field(default_factory=dict)

    def run(self, coroutine: Awaitable[T]) -> T:
        return self.loop.run_until_complete(coroutine)


class JobStateMachine(RuleBasedStateMachine):
    def __init__(self, env: Env) -> None:
        super().__init__()
        self.env = env
        self.jobs: dict[int, Job] = {}
        self.held: list[Held] = []
        self.step = 0
        self.errors = 0
        # A connection per example, so that a failed example cannot leave the next one a
        # connection in the middle of something.
        self.conn: asyncpg.Connection = env.run(asyncpg.connect(env.url))
        env.run(self.conn.execute("TRUNCATE outbox_jobs RESTART IDENTITY"))

    def teardown(self) -> None:
        self.conn.terminate()

    # -- helpers ---------------------------------------------------------------------------

    def _tick(self) -> int:
        self.step += 1
        self.env.steps += 1
        return self.step

    def _count(self, what: str, rows: int) -> None:
        key = f"{what}:{'ok' if rows else 'fenced'}"
        self.env.writes[key] = self.env.writes.get(key, 0) + 1

    def _claimable(self, queues: tuple[str, ...]) -> list[Job]:
        due = [
            j
            for j in self.jobs.values()
            if j.state == "queued" and j.due_since is not None and j.queue in queues
        ]
        return sorted(due, key=lambda j: (-j.priority, j.due_since or 0, j.id))

    def _held_entry(self, data: st.DataObject, stale: bool | None = None) -> Held:
        choices = [
            h
            for h in self.held
            if stale is None or stale != self.jobs[h.job_id].held_by(h.worker, h.attempt)
        ]
        return data.draw(st.sampled_from(choices))

    def _stale(self) -> Iterator[Held]:
        return (h for h in self.held if not self.jobs[h.job_id].held_by(h.worker, h.attempt))

    def _requeue(self, job: Job, *, due: bool, tick: int) -> None:
        job.state = "queued"
        job.locked_by = None
        job.expired = False
        job.due_since = tick if due else None

    def _finish(self, job: Job, state: str) -> None:
        job.state = state
        job.locked_by = None
        job.expired = False

    # -- the app side: enqueue -------------------------------------------------------------

    @initialize(
        jobs=st.lists(
            st.tuples(st.sampled_from(sorted(TASK_MAX_ATTEMPTS)), st.integers(1, 2)),
            min_size=1,
            max_size=4,
        )
    )
    def some_due_jobs(self, jobs: list[tuple[str, int]]) -> None:
        """Every example starts with work to claim, some of it on its last attempt."""
        self.enqueue_batch([(task, None, max_attempts) for task, max_attempts in jobs])

    @rule(
        task=st.sampled_from(sorted(TASK_MAX_ATTEMPTS)),
        key=st.none() | st.sampled_from(KEYS),
        queue=st.sampled_from(QUEUES),
        priority=st.sampled_from([-1, 0, 1]),
        max_attempts=st.none() | st.integers(1, 3),
        later=st.sampled_from([False, False, False, True]),
        commit=st.sampled_from([True, True, True, False]),
    )
    def enqueue_one(
        self,
        task: str,
        key: str | None,
        queue: str,
        priority: int,
        max_attempts: int | None,
        later: bool,
        commit: bool,
    ) -> None:
        async def call() -> Any:
            async with self.env.engine.connect() as conn:
                job = await enqueue(
                    conn,
                    task,
                    {"step": self.step},
                    key=key,
                    queue=queue,
                    priority=priority,
                    max_attempts=max_attempts,
                    delay=LATER if later else None,
                )
                await (conn.commit() if commit else conn.rollback())
            return job

        tick = self._tick()
        job = self.env.run(call())
        existing = [
            j
            for j in self.jobs.values()
            if key is not None and (j.task, j.dedupe_key) == (task, key)
        ]
        if existing:
            [old] = existing
            assert job.duplicate, "a second job for the same (task, key)"
            assert (job.id, job.state, job.attempts) == (old.id, old.state, old.attempts)
            return
        assert not job.duplicate
        assert job.id > max(self.jobs, default=0)
        assert (job.task, job.queue, job.priority, job.state, job.attempts) == (
            task,
            queue,
            priority,
            "queued",
            0,
        )
        assert job.max_attempts == (max_attempts or TASK_MAX_ATTEMPTS[task])
        assert job.dedupe_key == key
        if commit:
            self.jobs[job.id] = Job(
                job.id, task, queue, priority, job.max_attempts, key, None if later else tick
            )

    @rule(
        batch=st.lists(
            st.tuples(
                st.sampled_from(sorted(TASK_MAX_ATTEMPTS)),
                st.none() | st.sampled_from(KEYS),
                st.none() | st.integers(1, 2),
            ),
            min_size=1,
            max_size=4,
        )
    )
    def enqueue_batch(self, batch: list[tuple[str, str | None, int | None]]) -> None:
        async def call() -> Any:
            async with self.env.engine.begin() as conn:
                return await enqueue_many(
                    conn, [NewJob(t, key=k, max_attempts=m) for t, k, m in batch]
                )

        tick = self._tick()
        jobs = self.env.run(call())
        assert len(jobs) == len(batch)
        seen: dict[tuple[str, str], int] = {
            (j.task, j.dedupe_key): j.id for j in self.jobs.values() if j.dedupe_key is not None
        }
        for (task, key, max_attempts), job in zip(batch, jobs, strict=True):
            if key is not None and (task, key) in seen:
                assert job.duplicate, (task, key)
                assert job.id == seen[(task, key)]
                continue
            assert not job.duplicate, (task, key)
            assert job.id not in self.jobs
            limit = max_attempts or TASK_MAX_ATTEMPTS[task]
            assert job.max_attempts == limit
            self.jobs[job.id] = Job(job.id, task, "default", 0, limit, key, tick)
            if key is not None:
                seen[(task, key)] = job.id

    # -- the worker side: claim and the fenced writes --------------------------------------

    @rule(
        worker=st.sampled_from(WORKERS),
        queues=st.sampled_from([("default",), ("other",), QUEUES]),
        limit=st.integers(1, 3),
    )
    def claim(self, worker: str, queues: tuple[str, ...], limit: int) -> None:
        self._tick()
        expected = self._claimable(queues)[:limit]
        rows = self.env.run(self.conn.fetch(sql.JOB_CLAIM, list(queues), limit, worker, LEASE))
        assert len(rows) <= limit
        assert sorted((r["id"], r["attempts"]) for r in rows) == sorted(
            (j.id, j.attempts + 1) for j in expected
        ), f"claim({worker}, {queues}, {limit})"
        for job in expected:
            job.state = "running"
            job.attempts += 1
            job.locked_by = worker
            job.expired = False
            job.due_since = None
            self.held.append(Held(worker, job.id, job.attempts))

    @precondition(lambda self: self.held)
    @rule(data=st.data(), write=st.sampled_from(WRITES))
    def write(self, data: st.DataObject, write: str) -> None:
        """A worker writes the outcome of a job it claimed, its lease intact or not."""
        self._write(self._held_entry(data), write)

    @precondition(lambda self: any(True for _ in self._stale()))
    @rule(data=st.data(), write=st.sampled_from(WRITES))
    def late_write(self, data: st.DataObject, write: str) -> None:
        """A worker that lost its lease (rescued, released, taken by another) writes anyway."""
        self._write(self._held_entry(data, stale=True), write)

    def _write(self, h: Held, write: str) -> None:
        if write == "complete":
            self._complete(h)
        elif write == "release":
            self._release(h)
        elif write == "unclaim":
            self._unclaim(h)
        elif write == "cancel":
            self._cancelled_by_worker(h)
        else:
            self._fail(h, later=write == "fail_later", give_up=write == "give_up")

    def _complete(self, h: Held) -> None:
        self._tick()
        job = self.jobs[h.job_id]
        result = {"by": h.worker, "attempt": h.attempt}
        rows = self.env.run(
            self.conn.fetch(
                sql.JOB_COMPLETE_MANY, [h.job_id], [h.attempt], [json.dumps(result)], h.worker
            )
        )
        self.held.remove(h)
        self._count("complete", len(rows))
        if job.held_by(h.worker, h.attempt):
            assert [r["id"] for r in rows] == [h.job_id]
            self._finish(job, "succeeded")
            job.result = result
        else:
            assert rows == [], f"a stale completion got through: {h}"

    def _fail(self, h: Held, later: bool, give_up: bool) -> None:
        tick = self._tick()
        job = self.jobs[h.job_id]
        self.errors += 1
        error = f"failure {self.errors} by {h.worker}"
        rows = self.env.run(
            self.conn.fetch(
                sql.JOB_FAIL_MANY,
                [h.job_id],
                [h.attempt],
                [error],
                [LATER if later else 0.0],
                [give_up],
                h.worker,
            )
        )
        self.held.remove(h)
        self._count("fail", len(rows))
        if not job.held_by(h.worker, h.attempt):
            assert rows == [], f"a stale failure got through: {h}"
            return
        job.last_error = error
        if job.cancel_requested:
            self._finish(job, "cancelled")
        elif give_up or job.attempts >= job.max_attempts:
            self._finish(job, "dead")
        else:
            self._requeue(job, due=not later, tick=tick)
        assert [(r["id"], r["state"]) for r in rows] == [(job.id, job.state)]

    def _release(self, h: Held) -> None:
        tick = self._tick()
        job = self.jobs[h.job_id]
        rows = self.env.run(
            self.conn.fetch(sql.JOB_RELEASE_MANY, [h.job_id], [h.attempt], h.worker)
        )
        self.held.remove(h)
        self._count("release", len(rows))
        if not job.held_by(h.worker, h.attempt):
            assert rows == [], f"a stale release got through: {h}"
            return
        # The interrupted attempt did start: it counts, and on the last one the job is dead.
        if job.cancel_requested:
            self._finish(job, "cancelled")
        else:
            job.last_error = (
                f"interrupted: worker {h.worker} shut down during attempt {job.attempts} "
                f"of {job.max_attempts}"
            )
            if job.attempts >= job.max_attempts:
                self._finish(job, "dead")
            else:
                self._requeue(job, due=True, tick=tick)
        assert [(r["id"], r["state"]) for r in rows] == [(h.job_id, job.state)]

    def _unclaim(self, h: Held) -> None:
        tick = self._tick()
        job = self.jobs[h.job_id]
        rows = self.env.run(
            self.conn.fetch(sql.JOB_UNCLAIM_MANY, [h.job_id], [h.attempt], h.worker)
        )
        self.held.remove(h)
        self._count("unclaim", len(rows))
        if not job.held_by(h.worker, h.attempt):
            assert rows == [], f"a stale hand-back got through: {h}"
            return
        assert [r["id"] for r in rows] == [h.job_id]
        job.attempts -= 1  # never started: the claim's attempt is taken back
        self._requeue(job, due=True, tick=tick)

    def _cancelled_by_worker(self, h: Held) -> None:
        self._tick()
        job = self.jobs[h.job_id]
        rows = self.env.run(self.conn.fetch(sql.JOB_CANCEL_MANY, [h.job_id], [h.attempt], h.worker))
        self.held.remove(h)
        self._count("cancel", len(rows))
        if not job.held_by(h.worker, h.attempt):
            assert rows == [], f"a stale cancellation got through: {h}"
            return
        assert [r["id"] for r in rows] == [h.job_id]
        self._finish(job, "cancelled")

    @rule(worker=st.sampled_from(WORKERS))
    def heartbeat(self, worker: str) -> None:
        self._tick()
        mine = [h for h in self.held if h.worker == worker]
        rows = self.env.run(
            self.conn.fetch(
                sql.JOB_EXTEND_LEASES,
                [h.job_id for h in mine],
                [h.attempt for h in mine],
                worker,
                LEASE,
            )
        )
        owned = {h.job_id for h in mine if self.jobs[h.job_id].held_by(worker, h.attempt)}
        # Each extended lease comes back with whether an operator asked to cancel the job.
        assert sorted((r["id"], r["cancel_requested"]) for r in rows) == sorted(
            (job_id, self.jobs[job_id].cancel_requested) for job_id in owned
        )
        for job_id in owned:
            self.jobs[job_id].expired = False

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def release_orphans(self, data: st.DataObject) -> None:
        """After a claim whose answer was lost, a worker hands back what it never started:
        its running rows but for the attempts it knows it started."""
        tick = self._tick()
        worker = data.draw(st.sampled_from(sorted({h.worker for h in self.held})))
        mine = sorted({(h.job_id, h.attempt) for h in self.held if h.worker == worker})
        known = data.draw(st.lists(st.sampled_from(mine), unique=True))
        rows = self.env.run(
            self.conn.fetch(
                sql.JOB_RELEASE_ORPHANS,
                worker,
                [job_id for job_id, _ in known],
                [attempt for _, attempt in known],
            )
        )
        orphans = [
            j
            for j in self.jobs.values()
            if j.state == "running" and j.locked_by == worker and (j.id, j.attempts) not in known
        ]
        assert sorted(r["id"] for r in rows) == sorted(j.id for j in orphans)
        for job in orphans:
            job.attempts -= 1
            self._requeue(job, due=True, tick=tick)

    # -- time and the operator -------------------------------------------------------------

    @precondition(lambda self: any(j.state == "running" for j in self.jobs.values()))
    @rule(data=st.data())
    def lease_expires(self, data: st.DataObject) -> None:
        self._tick()
        running = sorted(j.id for j in self.jobs.values() if j.state == "running")
        job_id = data.draw(st.sampled_from(running))
        self.env.run(
            self.conn.execute(
                "UPDATE outbox_jobs SET locked_until = now() - interval '1 second' "
                "WHERE id = $1 AND state = 'running'",
                job_id,
            )
        )
        self.jobs[job_id].expired = True

    @rule(limit=st.sampled_from([1, 1000]))
    def rescue(self, limit: int) -> None:
        tick = self._tick()
        expired = sorted(
            (j for j in self.jobs.values() if j.state == "running" and j.expired),
            key=lambda j: j.id,
        )[:limit]
        rows = self.env.run(self.conn.fetch(sql.JOB_RESCUE_EXPIRED, limit))
        for job in expired:
            job.last_error = (
                f"lease expired: worker {job.locked_by} stopped renewing it "
                f"(attempt {job.attempts} of {job.max_attempts})"
            )
            if job.cancel_requested:
                self._finish(job, "cancelled")
            elif job.attempts >= job.max_attempts:
                self._finish(job, "dead")
            else:
                self._requeue(job, due=True, tick=tick)
        assert sorted((r["id"], r["state"], r["attempts"]) for r in rows) == [
            (j.id, j.state, j.attempts) for j in expired
        ]

    @precondition(lambda self: any(j.state == "queued" for j in self.jobs.values()))
    @rule(data=st.data())
    def retry_now(self, data: st.DataObject) -> None:
        tick = self._tick()
        queued = sorted(j.id for j in self.jobs.values() if j.state == "queued")
        job_id = data.draw(st.sampled_from(queued))
        status = self.env.run(
            self.conn.execute(
                "UPDATE outbox_jobs SET run_at = now() WHERE id = $1 AND state = 'queued'", job_id
            )
        )
        assert status == "UPDATE 1"
        self.jobs[job_id].due_since = tick

    @precondition(lambda self: self.jobs)
    @rule(data=st.data())
    def operator_cancels(self, data: st.DataObject) -> None:
        """The admin API (HTTP, CLI and dashboard share it): a queued job is cancelled at
        once, a running one is asked to stop, a finished one is refused."""
        self._cancel(self.jobs[data.draw(st.sampled_from(sorted(self.jobs)))])

    @precondition(lambda self: any(j.state == "running" for j in self.jobs.values()))
    @rule(data=st.data())
    def operator_cancels_a_running_job(self, data: st.DataObject) -> None:
        running = sorted(j.id for j in self.jobs.values() if j.state == "running")
        self._cancel(self.jobs[data.draw(st.sampled_from(running))])

    def _cancel(self, job: Job) -> None:
        self._tick()

        async def call() -> Any:
            async with self.env.engine.begin() as conn:
                return await cancel_job(conn, job.id)

        if job.state in FINISHED:
            with pytest.raises(JobStateConflict):
                self.env.run(call())
            return
        answer = self.env.run(call())
        if job.state == "queued":
            self._finish(job, "cancelled")
            job.due_since = None
        else:
            job.cancel_requested = True
        assert (answer.id, answer.state) == (job.id, job.state)
        assert (answer.cancel_requested_at is not None) == job.cancel_requested

    @precondition(lambda self: self.jobs)
    @rule(data=st.data())
    def operator_retries(self, data: st.DataObject) -> None:
        """The admin API: a queued, dead or cancelled job is due now with one more attempt
        at least; a running or succeeded one is refused."""
        tick = self._tick()
        job = self.jobs[data.draw(st.sampled_from(sorted(self.jobs)))]

        async def call() -> Any:
            async with self.env.engine.begin() as conn:
                return await retry_job(conn, job.id)

        if job.state in ("running", "succeeded"):
            with pytest.raises(JobStateConflict):
                self.env.run(call())
            return
        answer = self.env.run(call())
        job.max_attempts = max(job.max_attempts, job.attempts + 1)
        job.cancel_requested = False
        self._requeue(job, due=True, tick=tick)
        assert (answer.id, answer.state, answer.max_attempts) == (
            job.id,
            "queued",
            job.max_attempts,
        )

    # -- every row against the model, after every step -------------------------------------

    @invariant()
    def rows_match_the_model(self) -> None:
        rows = self.env.run(
            self.conn.fetch(
                "SELECT id, task, queue, priority, max_attempts, dedupe_key, state, attempts, "
                "locked_by, last_error, result::text AS result, "
                "locked_until IS NOT NULL AS leased, locked_until < now() AS expired, "
                "run_at <= now() AS due, finished_at IS NOT NULL AS finished, "
                "cancel_requested_at IS NOT NULL AS cancel_requested "
                "FROM outbox_jobs ORDER BY id"
            )
        )
        assert [r["id"] for r in rows] == sorted(self.jobs)
        for row in rows:
            job = self.jobs[row["id"]]
            actual = {k: row[k] for k in ("state", "attempts", "locked_by", "last_error")}
            model = {
                "state": job.state,
                "attempts": job.attempts,
                "locked_by": job.locked_by,
                "last_error": job.last_error,
            }
            assert actual == model, f"job {job.id}: database {actual} != model {model}"
            assert (row["task"], row["queue"], row["priority"]) == (
                job.task,
                job.queue,
                job.priority,
            )
            assert (row["max_attempts"], row["dedupe_key"]) == (job.max_attempts, job.dedupe_key)
            assert row["attempts"] <= row["max_attempts"]
            assert row["cancel_requested"] == job.cancel_requested, job
            assert row["finished"] == (job.state in FINISHED), job
            assert row["leased"] == (job.state == "running"), job
            if job.state == "running":
                assert row["expired"] == job.expired, job
            if job.state == "queued":
                assert row["due"] == (job.due_since is not None), job
            stored = None if row["result"] is None else json.loads(row["result"])
            assert stored == job.result, job


# About 25 s when it passes; a failure is shrunk to a minimal sequence, which takes minutes
# of database round trips: the suite's 120 s timeout would cut the shrinking short.
@pytest.mark.timeout(900)
def test_job_state_machine_matches_its_model(
    pg_server: PostgresServer,
    template_url: str,  # the migrated template exists
) -> None:
    name = f"model_{os.getpid()}"
    loop = asyncio.new_event_loop()
    loop.run_until_complete(admin(pg_server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    loop.run_until_complete(admin(pg_server, f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}"))
    try:
        url = pg_server.url_for(name)
        engine = create_async_engine(sqlalchemy_url(url), pool_size=2)
        env = Env(loop, url, engine)

        class OnThisDatabase(JobStateMachine):
            def __init__(self) -> None:
                super().__init__(env)

        try:
            run_state_machine_as_test(
                OnThisDatabase,
                settings=settings(
                    max_examples=200,
                    stateful_step_count=40,
                    deadline=None,
                    suppress_health_check=[HealthCheck.too_slow],
                ),
            )
        finally:
            loop.run_until_complete(engine.dispose())
        # The machine did reach the interesting places, fenced writes above all.
        assert env.steps > 500
        for write in ("complete", "fail", "release", "unclaim"):
            assert env.writes.get(f"{write}:ok", 0) > 0, (env.steps, env.writes)
        fenced = sum(n for what, n in env.writes.items() if what.endswith(":fenced"))
        assert fenced >= 5, env.writes
    finally:
        loop.run_until_complete(admin(pg_server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        loop.close()

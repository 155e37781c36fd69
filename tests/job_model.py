"""The model the job state machine checks the database against (tests/test_model.py runs it):
a Python record of what each row must hold, the machine's connection and bookkeeping, the
app's side (enqueue and enqueue_many) that brings jobs in, and the comparison of every row with
the model after every step. The rules for what happens to a job once enqueued, the workers'
and the operator's, are in tests/job_state_machine.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncpg
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from sqlalchemy.ext.asyncio import AsyncEngine

import tests.workload  # noqa: F401 -- registers the tasks enqueue checks names against
from outbox_worker import NewJob, enqueue, enqueue_many

T = TypeVar("T")

WORKERS = ("w1", "w2", "w3")
QUEUES = ("default", "other")
TASK_MAX_ATTEMPTS = {"echo": 5, "always_fails": 3}  # as registered in tests/workload.py
KEYS = ("k1", "k2", "k3")
LEASE = 3600.0  # no lease lapses by itself during a test: expiry is a rule of its own
LATER = 3600.0  # a delay that keeps a job from being due during a test
FINISHED = ("succeeded", "dead", "cancelled")
# What a worker may write for a job it claimed; "cancel" is how it ends a job whose cancel
# an operator requested (it sees the request at a heartbeat and stops the handler), or one
# whose handler cancelled it ("cancel_with_reason"); "snooze" puts it back, the attempt
# given back, until MAX_SNOOZES.
# "unclaim" hands back a claim answered too late to be trusted, its handler never started.
WRITES = (
    "complete",
    "fail",
    "fail_later",
    "give_up",
    "release",
    "unclaim",
    "cancel",
    "cancel_with_reason",
    "snooze",
    "snooze_later",
)
# A task's bound on snoozes, small so that the machine reaches it.
MAX_SNOOZES = 2


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
    snoozes: int = 0
    progress: Any = None

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


class JobStateMachineBase(RuleBasedStateMachine):
    """The machine's model and connection, the app's enqueues, and the check of every row;
    JobStateMachine (tests/job_state_machine.py) adds what happens to a job after."""

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

    # -- every row against the model, after every step -------------------------------------

    @invariant()
    def rows_match_the_model(self) -> None:
        rows = self.env.run(
            self.conn.fetch(
                "SELECT id, task, queue, priority, max_attempts, dedupe_key, state, attempts, "
                "locked_by, last_error, result::text AS result, "
                "locked_until IS NOT NULL AS leased, locked_until < now() AS expired, "
                "run_at <= now() AS due, finished_at IS NOT NULL AS finished, snoozes, "
                "progress::text AS progress, "
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
            assert row["snoozes"] == job.snoozes, job
            stored_progress = None if row["progress"] is None else json.loads(row["progress"])
            assert stored_progress == job.progress, job
            assert row["finished"] == (job.state in FINISHED), job
            assert row["leased"] == (job.state == "running"), job
            if job.state == "running":
                assert row["expired"] == job.expired, job
            if job.state == "queued":
                assert row["due"] == (job.due_since is not None), job
            stored = None if row["result"] is None else json.loads(row["result"])
            assert stored == job.result, job

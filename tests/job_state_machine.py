"""The job state machine's rules for what happens to a job once enqueued, each checked
against the model of tests/job_model.py: claim, complete, fail, release, hand-back,
heartbeat and orphans of the workers, including late writes of workers that lost their lease,
through the library's own SQL (``outbox_worker.sql``); lease expiry and rescue; retry-now;
and the operator's cancel and retry through the admin API that the HTTP routes, the CLI and
the dashboard share. tests/test_model.py runs it.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule

from outbox_worker import sql
from outbox_worker.admin import cancel_job, retry_job
from outbox_worker.errors import JobStateConflict
from tests.job_model import (
    FINISHED,
    LATER,
    LEASE,
    MAX_SNOOZES,
    QUEUES,
    WORKERS,
    WRITES,
    Held,
    Job,
    JobStateMachineBase,
)


class JobStateMachine(JobStateMachineBase):
    """The whole machine: the base's enqueues and row check, and the rules below."""

    # -- the worker side: claim and the fenced writes --------------------------------------

    @rule(
        worker=st.sampled_from(WORKERS),
        queues=st.sampled_from([("default",), ("other",), QUEUES]),
        limit=st.integers(1, 3),
    )
    def claim(self, worker: str, queues: tuple[str, ...], limit: int) -> None:
        self._tick()
        expected = self._claimable(queues)[:limit]
        rows = self.env.run(self.conn.fetch(sql.JOB_CLAIM, list(queues), limit, 0, worker, LEASE))
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
        elif write in ("cancel", "cancel_with_reason"):
            self._cancelled_by_worker(h, "not wanted" if write == "cancel_with_reason" else None)
        elif write in ("snooze", "snooze_later"):
            self._snooze(h, later=write == "snooze_later")
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

    def _cancelled_by_worker(self, h: Held, reason: str | None) -> None:
        """Stopped at an operator's request (no reason), or cancelled by its handler."""
        self._tick()
        job = self.jobs[h.job_id]
        rows = self.env.run(
            self.conn.fetch(
                *sql.bind(
                    sql.JOB_CANCEL_MANY,
                    ids=[h.job_id],
                    attempts=[h.attempt],
                    reasons=[reason],
                    worker_id=h.worker,
                )
            )
        )
        self.held.remove(h)
        self._count("cancel", len(rows))
        if not job.held_by(h.worker, h.attempt):
            assert rows == [], f"a stale cancellation got through: {h}"
            return
        assert [r["id"] for r in rows] == [h.job_id]
        if reason is not None:
            job.last_error = reason
        self._finish(job, "cancelled")

    def _snooze(self, h: Held, later: bool) -> None:
        """Its handler snoozed it: queued again, the attempt given back, until the bound."""
        tick = self._tick()
        job = self.jobs[h.job_id]
        rows = self.env.run(
            self.conn.fetch(
                *sql.bind(
                    sql.JOB_SNOOZE_MANY,
                    ids=[h.job_id],
                    attempts=[h.attempt],
                    delays=[LATER if later else 0.0],
                    max_snoozes=[MAX_SNOOZES],
                    worker_id=h.worker,
                )
            )
        )
        self.held.remove(h)
        self._count("snooze", len(rows))
        if not job.held_by(h.worker, h.attempt):
            assert rows == [], f"a stale snooze got through: {h}"
            return
        if job.cancel_requested:
            self._finish(job, "cancelled")
        elif job.snoozes >= MAX_SNOOZES:
            job.last_error = f"snoozed {job.snoozes + 1} times: the task allows {MAX_SNOOZES}"
            self._finish(job, "dead")
        else:
            job.attempts -= 1
            self._requeue(job, due=not later, tick=tick)
        job.snoozes += 1
        assert [(r["id"], r["state"]) for r in rows] == [(job.id, job.state)]

    @rule(worker=st.sampled_from(WORKERS))
    def heartbeat(self, worker: str) -> None:
        """Extends the leases it holds, with each handler's latest progress report (its
        step, for every other job), which only the holder of the attempt may write."""
        tick = self._tick()
        # Once per attempt, as a worker's slots list them: a hand-back and a new claim of the
        # same attempt leave two entries of it in ``held``.
        mine = list({(h.job_id, h.attempt): h for h in self.held if h.worker == worker}.values())
        reports = [{"step": tick} if n % 2 == 0 else None for n, _ in enumerate(mine)]
        rows = self.env.run(
            self.conn.fetch(
                *sql.bind(
                    sql.JOB_EXTEND_LEASES,
                    ids=[h.job_id for h in mine],
                    attempts=[h.attempt for h in mine],
                    progress=[None if r is None else json.dumps(r) for r in reports],
                    worker_id=worker,
                    lease_seconds=LEASE,
                )
            )
        )
        owned = {h.job_id for h in mine if self.jobs[h.job_id].held_by(worker, h.attempt)}
        for h, report in zip(mine, reports, strict=True):
            if h.job_id in owned and report is not None:
                self.jobs[h.job_id].progress = report
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

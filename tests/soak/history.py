"""Crafted ends of a soak run, for testing its checker: rows of the three tables and what the
run saw, told as the worker must tell them (:func:`clean_history`), to be broken one way at
a time."""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from datetime import datetime
from typing import Any

from tests.faults.invariants import FINISHED
from tests.soak.hostile import ERROR_KINDS, RESULT_KINDS, STORED
from tests.soak.records import Fault, Ledger, Run, RunFacts, Tables, Transition, logged_run
from tests.soak.report import Verdict, judge

RUN = "t"
T0 = 1_800_000_000.0
# host:pid:random, as workers name themselves
W1, W2, W3 = "host:100:aaaa", "host:200:bbbb", "host:300:cccc"
LEASE = 8.0
RELEASED = f"interrupted: worker {W1} shut down during attempt 1 of 5"
RESCUED = f"lease expired: worker {W1} stopped renewing it (attempt 1 of 5)"


def pid(worker: str) -> int:
    return int(worker.split(":")[1])


class History:
    """The end of a crafted soak run: rows of the three tables, and what the soak saw."""

    def __init__(self) -> None:
        self.jobs: list[dict[str, Any]] = []
        self.executions: dict[int, list[Run]] = defaultdict(list)
        self.transitions: dict[int, list[Transition]] = defaultdict(list)
        self.reports: list[dict[str, Any]] = []
        self.sent: set[int] = set()
        self.ledger = Ledger(RUN)
        self.faults: list[Fault] = []
        self.sigterm_at: dict[int, float] = {}
        self.crashes: list[str] = []
        self.drain_problems: list[str] = []
        self.running_left = 0
        self.settled = True
        self._ids = itertools.count(1)

    def job(
        self,
        task: str = "soak_work",
        state: str = "succeeded",
        attempts: int = 1,
        max_attempts: int = 5,
        last_error: str | None = None,
        kind: str | None = None,
        levels: int | None = None,
        result: str | None = None,
        *,
        by_http: bool = False,
    ) -> int:
        """A job enqueued, and acknowledged, by the Python API with its marker in its args;
        by HTTP, its marker is in the app's own row instead."""
        jid = next(self._ids)
        marker = None if by_http else f"{RUN}:python-one:{jid}"
        if marker is not None:
            self.ledger.status[marker] = "acked"
        self.jobs.append(
            {
                "id": jid,
                "task": task,
                "state": state,
                "attempts": attempts,
                "max_attempts": max_attempts,
                "last_error": last_error,
                "locked_by": None,
                "locked_until": None,
                "created_at": datetime.fromtimestamp(T0),
                "finished_at": datetime.fromtimestamp(T0 + 100) if state in FINISHED else None,
                "marker": marker,
                "kind": kind,
                "levels": levels,
                "result": result,
            }
        )
        return jid

    def report(self, status: str = "done") -> int:
        """A generate_report job enqueued by POST /reports: its report row holds the key."""
        jid = self.job("generate_report", by_http=True)
        self.ledger.status[f"{RUN}:http-report:{jid}"] = "acked"
        self.reports.append({"idempotency_key": f"{RUN}-r{jid}", "job_id": jid, "status": status})
        return jid

    def ran(
        self,
        job: int,
        attempt: int,
        start: float,
        end: float | None,
        outcome: str | None = "ok",
        worker: str = W1,
    ) -> None:
        self.executions[job].append(
            logged_run(
                job,
                attempt,
                worker,
                pid(worker),
                T0 + start,
                None if end is None else T0 + end,
                outcome,
            )
        )

    def moved(
        self,
        job: int,
        new_state: str,
        attempts: int,
        at: float,
        error: str | None = None,
        worker: str = W1,
        new_attempts: int | None = None,
        old_state: str = "running",
    ) -> None:
        # A rescue finds the lease run out; every other change ends a lease still running.
        lease_end = at - 0.5 if (error or "").startswith("lease expired") else at + LEASE
        self.transitions[job].append(
            Transition(
                job,
                old_state,
                new_state,
                attempts,
                attempts if new_attempts is None else new_attempts,
                worker,
                T0 + lease_end,
                error,
                T0 + at,
            )
        )

    def claimed(self, job: int, attempt: int, at: float, worker: str = W1) -> None:
        self.transitions[job].append(
            Transition(
                job, "queued", "running", attempt - 1, attempt, None, None, None, T0 + at, worker
            )
        )

    def succeeded(self, job: int, attempt: int, start: float, worker: str = W1) -> None:
        """One attempt that ran and was completed: the common ending."""
        self.ran(job, attempt, start, start + 1, "ok", worker)
        self.moved(job, "succeeded", attempt, start + 1.1, worker=worker)
        self.jobs[job - 1]["finished_at"] = datetime.fromtimestamp(T0 + start + 1.1)

    def verdict(self) -> Verdict:
        tables = Tables(
            jobs=list(self.jobs),
            executions=self.executions,
            transitions=self.transitions,
            reports=list(self.reports),
            users=[],
            sent=self.sent,
            running_left=self.running_left,
        )
        facts = RunFacts(
            run=RUN,
            first_id=0,
            lease_seconds=LEASE,
            ledger=self.ledger,
            faults=self.faults,
            fault_errors=[],
            crashes=self.crashes,
            drain_problems=self.drain_problems,
            sigterm_at=self.sigterm_at,
            enqueue_seconds=60.0,
            settled=self.settled,
        )
        return judge(tables, facts)


def failed(verdict: Verdict) -> set[str]:
    return {name for name, n in verdict.summary["invariants"].items() if n}


def clean_history() -> History:
    """One of each story the soak tells, each as the worker must tell it."""
    h = History()
    h.succeeded(h.job(), 1, 1.0)
    # A SIGTERM drain releases a long job; the release counts, so the rerun is attempt 2.
    released = h.job(attempts=2)
    h.ran(released, 1, 1.0, 4.0, "cancelled")
    h.sigterm_at[pid(W1)] = T0 + 2.0
    h.moved(released, "queued", 1, 4.1, RELEASED)
    h.succeeded(released, 2, 5.0, W2)
    # A row locked past the lease: the lease guard stops the handler, a rescuer takes the job
    # back once the lock is gone.
    locked = h.job(attempts=2)
    h.ran(locked, 1, 1.0, 7.0, "cancelled")
    h.faults.append(Fault("row_lock", T0 + 2.0, until=T0 + 12.0, job_id=locked))
    h.moved(locked, "queued", 1, 12.5, RESCUED)
    h.succeeded(locked, 2, 13.0, W2)
    # A claim answered too late is handed back unstarted, its attempt taken back.
    unclaimed = h.job()
    h.moved(unclaimed, "queued", 1, 1.0, new_attempts=0)
    h.succeeded(unclaimed, 1, 2.0, W2)
    # Orphans of a lost claim handed back, then claimed again by the same worker: the same
    # attempt number, a new claim.
    reclaimed = h.job()
    h.moved(reclaimed, "queued", 1, 1.0, new_attempts=0)
    h.claimed(reclaimed, 1, 1.5)
    h.succeeded(reclaimed, 1, 2.0)
    # A report requested over HTTP, generated and marked done.
    h.succeeded(h.report(), 1, 1.0)
    for kind in RESULT_KINDS:
        h.succeeded(h.job("soak_hostile", kind=kind, result=json.dumps({"text": STORED})), 1, 1)
    h.succeeded(h.job("soak_hostile", kind="deep", levels=99, result="99"), 1, 1.0)
    for kind, error in ERROR_KINDS.items():
        job = h.job("soak_hostile", "dead", 3, 3, last_error=error, kind=kind)
        for attempt in (1, 2, 3):
            h.ran(job, attempt, attempt, attempt + 0.1, "fail")
            state = "dead" if attempt == 3 else "queued"
            h.moved(job, state, attempt, attempt + 0.2, f"{error}\n\nTraceback (most recent …")
    deep_error = "args are nested too deeply to decode"
    too_deep = h.job("soak_hostile", "dead", last_error=deep_error, kind="too_deep", levels=5000)
    h.moved(too_deep, "dead", 1, 1.0, deep_error)
    return h

"""What the soak keeps and reads back: the enqueuers' ledger, the faults it injected, what
the run saw, and the three tables (jobs, the execution log, the transition log) as the
checks take them."""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from outbox_worker.config import asyncpg_dsn
from tests.faults.invariants import Execution

# Clock readings come from one machine (Python's time.time() and PostgreSQL's now());
# this only absorbs rounding to microseconds.
EPSILON = 0.001


@dataclass(slots=True)
class Fault:
    kind: str
    at: float  # time.time() when it began
    pid: int | None = None  # the worker process it hit, if any
    until: float | None = None  # when it ended (SIGCONT, server back up, lock released)
    detail: str = ""
    job_id: int | None = None  # the job whose row it locked


@dataclass
class Ledger:
    """What the enqueuers believe: marker -> acked | unknown | rolled_back | rejected."""

    run: str
    status: dict[str, str] = field(default_factory=dict)
    recovered: Counter[str] = field(default_factory=Counter)  # unknown, then resolved
    errors: Counter[str] = field(default_factory=Counter)
    rejected: list[str] = field(default_factory=list)
    numbers: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def marker(self, path: str) -> str:
        return f"{self.run}:{path}:{next(self.numbers)}"

    def error(self, where: str, exc: BaseException | str) -> None:
        name = exc if isinstance(exc, str) else type(exc).__name__
        self.errors[f"{where}: {name}"] += 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Run(Execution):
    """An execution as the soak's handlers log it, one row a start: also the claim that ran
    it (its worker id, which the transition log names) and how its handler ended."""

    worker_id: str
    outcome: str | None


def logged_run(
    job_id: int,
    attempt: int,
    worker_id: str,
    pid: int,
    started: float,
    ended: float | None,
    outcome: str | None,
) -> Run:
    events = ("start",) if ended is None else ("start", "end")
    return Run(job_id, attempt, pid, started, ended, events, worker_id=worker_id, outcome=outcome)


@dataclass(frozen=True, slots=True)
class Transition:
    job_id: int
    old_state: str
    new_state: str
    old_attempts: int
    new_attempts: int
    old_locked_by: str | None
    old_locked_until: float | None
    error: str | None
    at: float
    new_locked_by: str | None = None

    @property
    def kind(self) -> str:
        if self.old_state != "running":
            return f"{self.old_state} -> {self.new_state}"
        if self.new_state == "succeeded":
            return "complete"
        if self.new_attempts < self.old_attempts:
            # The one legitimate decrement: a claim handed back unstarted.
            if self.new_state == "queued" and self.new_attempts == self.old_attempts - 1:
                return "unclaim"
            return f"running -> {self.new_state}, attempts lowered"
        error = self.error or ""
        if error.startswith("interrupted:"):
            return "release"  # queued again, or dead on its last attempt
        if error.startswith("lease expired"):
            return "rescue"
        if self.new_state in ("queued", "dead") and self.new_attempts == self.old_attempts:
            return "failure"
        return f"running -> {self.new_state}"

    def of(self, e: Run) -> bool:
        """Whether this change ended the claim (attempt and owner) that execution ran."""
        return (
            self.old_state == "running"
            and self.old_attempts == e.attempt
            and self.old_locked_by == e.worker_id
        )

    def claims(self, e: Run) -> bool:
        """Whether this change is the claim (attempt and owner) that execution ran."""
        return (
            self.old_state == "queued"
            and self.new_state == "running"
            and self.new_attempts == e.attempt
            and self.new_locked_by == e.worker_id
        )

    def ends(self, e: Run) -> bool:
        """Whether this change ended that claim after its handler started."""
        return self.of(e) and self.at >= e.started - EPSILON


@dataclass
class RunFacts:
    """What the orchestration saw, for the checks."""

    run: str
    first_id: int
    lease_seconds: float
    ledger: Ledger
    faults: list[Fault]
    fault_errors: list[str]
    crashes: list[str]
    drain_problems: list[str]  # SIGTERMs, mid-run and final, not ended by a clean exit 0
    sigterm_at: dict[int, float]
    enqueue_seconds: float
    settled: bool
    worker_events: Counter[str] = field(default_factory=Counter)  # log event -> lines


@dataclass
class Tables:
    """What the database holds at the end of the run, as the checks read it."""

    jobs: list[Mapping[str, Any]]
    executions: dict[int, list[Run]]  # by job
    transitions: dict[int, list[Transition]]  # by job, in the order they happened
    reports: list[Mapping[str, Any]]
    users: list[Mapping[str, Any]]
    sent: set[int]
    running_left: int


def _ts(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


async def read_tables(url: str, facts: RunFacts) -> Tables:
    run = facts.run
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        jobs = await conn.fetch(
            "SELECT id, task, state, attempts, max_attempts, left(last_error, 500) AS last_error, "
            "locked_by, locked_until, created_at, finished_at, args->>'marker' AS marker, "
            "args->>'kind' AS kind, (args->>'levels')::int AS levels, result::text AS result "
            "FROM outbox_jobs WHERE id > $1",
            facts.first_id,
        )
        exec_rows = await conn.fetch(
            "SELECT job_id, attempt, worker_id, pid, started_at, ended_at, outcome "
            "FROM soak_executions WHERE job_id > $1",
            facts.first_id,
        )
        trans_rows = await conn.fetch(
            "SELECT * FROM soak_transitions WHERE job_id > $1 ORDER BY seq", facts.first_id
        )
        reports = await conn.fetch(
            "SELECT idempotency_key, job_id, status FROM reports WHERE idempotency_key LIKE $1",
            f"{run}-r%",
        )
        users = await conn.fetch(
            "SELECT u.email, j.id AS job_id FROM users u LEFT JOIN outbox_jobs j "
            "ON j.task = 'send_welcome_email' AND j.dedupe_key = 'welcome:' || u.id "
            "WHERE u.email LIKE $1",
            f"{run}-u%",
        )
        sent = {r["job_id"] for r in await conn.fetch("SELECT job_id FROM sent_emails")}
        running_left: int = await conn.fetchval(
            "SELECT count(*) FROM outbox_jobs WHERE state = 'running'"
        )
    finally:
        await conn.close()

    executions: dict[int, list[Run]] = defaultdict(list)
    for r in exec_rows:
        executions[r["job_id"]].append(
            logged_run(
                r["job_id"],
                r["attempt"],
                r["worker_id"],
                r["pid"],
                r["started_at"].timestamp(),
                _ts(r["ended_at"]),
                r["outcome"],
            )
        )
    transitions: dict[int, list[Transition]] = defaultdict(list)
    for r in trans_rows:
        transitions[r["job_id"]].append(
            Transition(
                r["job_id"],
                r["old_state"],
                r["new_state"],
                r["old_attempts"],
                r["new_attempts"],
                r["old_locked_by"],
                _ts(r["old_locked_until"]),
                r["new_last_error"],
                r["at"].timestamp(),
                r["new_locked_by"],
            )
        )
    return Tables(
        list(jobs), executions, transitions, list(reports), list(users), sent, running_left
    )

"""The soak's verdict: what the jobs table, the handlers' execution log and the trigger's
transition log say, checked against what the enqueuers were told, what the fault injector
did and what the workers logged.

Invariants:

* Every committed job ends succeeded, dead with a cause, or cancelled; nothing is left
  running after the drain; no job runs after it succeeded.
* An execution is repeated only once the attempt before it was ended: a recorded failure, a
  release by a SIGTERM drain, or a rescue after its lease expired, never while its owner
  still held it. A handler that succeeded runs again only for such a cause (its outcome was
  lost with its worker, or its lease lapsed); a success is written by the attempt whose
  handler succeeded.
* Attempts are true. Every start counts, a release on shutdown included, so no job starts
  more than max_attempts times and no attempt number starts twice. The only decrement is
  the hand-back of a claim whose handler never started (answered too late, or lost with
  its connection).
* One bad job costs only itself. A result the database cannot store is stored with U+FFFD
  in place of the bad character; an error likewise, and as the real error, not a plainer
  form; a raise of what is not an Exception fails that attempt; args as deep as enqueue
  allows arrive whole; rows nested deeper than any reader decodes are buried dead, unrun.
  No worker exits but by the injector's kill -9 or a clean SIGTERM drain (exit 0).

A repeat is then attributed to the fault that made its lease expire: a kill -9 or SIGSTOP of
the worker that ran it, a lock on its row by another session, a PostgreSQL restart, a
connection kill, or none (a stalled worker).
"""

from __future__ import annotations

import itertools
import json
import re
import statistics
import sys
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TextIO

import asyncpg

from outbox_worker.config import asyncpg_dsn

TERMINAL = ("succeeded", "dead", "cancelled")
# Sub-paths of the three enqueue paths; the marker of each job says which one it took.
PATHS = {
    "http-report": "HTTP API",
    "http-signup": "HTTP API",
    "python-many": "Python API",
    "python-one": "Python API",
    "sql-keyed": "plain SQL",
    "sql-bare": "plain SQL",
}
# Clock readings come from one machine (Python's time.time() and PostgreSQL's now());
# this only absorbs rounding to microseconds.
EPSILON = 0.001

HOSTILE_TASK = "soak_hostile"
# What bench.soak_tasks.UNSTORABLE must become in the database: the bad character replaced
# by U+FFFD, the rest kept. Written out here rather than computed by the worker's own code,
# so that the check cannot agree with a wrong conversion.
STORED = "before\ufffdafter"
RESULT_KINDS = ("nul_result", "surrogate_result")
# Hostile kinds that fail every attempt -> the first line every failure must store.
ERROR_KINDS = {
    "nul_error": f"ValueError: {STORED}",
    "surrogate_error": f"ValueError: {STORED}",
    "base_exception": "HandlerEscape: hostile",
    "system_exit": "SystemExit: hostile",
    "keyboard_interrupt": "KeyboardInterrupt: hostile",
    "cancels_itself": "CancelledError: hostile",
}


@dataclass(slots=True)
class Fault:
    kind: str
    at: float  # time.time() when it began
    pid: int | None = None  # the worker process it hit, if any
    until: float | None = None  # when it ended (SIGCONT, server back up, lock released)
    detail: str = ""
    job_id: int | None = None  # the job whose row it locked


FAULT_LABELS = {
    "kill9": "kill -9 of a worker (then a replacement)",
    "sigstop": "SIGSTOP past the lease, then SIGCONT",
    "sigterm": "SIGTERM of a worker mid-run (a replacement first)",
    "row_lock": "a running job's row locked by another session",
    "pg_restart_fast": "PostgreSQL restart, fast",
    "pg_restart_immediate": "PostgreSQL restart, immediate",
    "conn_kill_listener": "connection kill: a worker's LISTEN connection",
    "conn_kill_worker": "connection kill: all of a worker's connections",
}

# The worker's log events the table counts: how often each defence was needed.
WORKER_EVENTS = {
    "job_result_unstorable": "a result stored altered (U+FFFD) or not at all",
    "job_raised_base_exception": "a handler raised what is not an Exception",
    "job_dead_without_running": "a job buried unrun (unusable args, unknown task)",
    "lease_not_extended": "a beat that could not extend a running job's lease",
    "job_stopped_lease_lapsing": "a handler stopped by the lease guard",
    "job_released": "a handler released by a SIGTERM drain",
    "claim_too_late": "a claim answered too late, handed back",
    "orphans_released": "claims lost with their connection, handed back",
    "outcome_batch_refused": "a batch of outcomes the database refused",
    "outcome_written_plainer": "an outcome written in a plainer form",
    "outcome_not_written": "an outcome abandoned to its lease",
    "outcomes_not_written": "outcomes a stopping worker could not write",
}


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


@dataclass(frozen=True, slots=True)
class Execution:
    job_id: int
    attempt: int
    task: str
    worker_id: str
    pid: int
    started: float
    ended: float | None
    outcome: str | None


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

    def of(self, e: Execution) -> bool:
        """Whether this change ended the claim (attempt and owner) that execution ran."""
        return (
            self.old_state == "running"
            and self.old_attempts == e.attempt
            and self.old_locked_by == e.worker_id
        )

    def ends(self, e: Execution) -> bool:
        """Whether this change ended that claim after its handler started."""
        return self.of(e) and self.at >= e.started - EPSILON


REPEAT_CAUSES = {
    "kill9": "after kill -9 of its worker",
    "crash": "after its worker crashed (not injected)",
    "sigstop": "after SIGSTOP of its worker past the lease",
    "row_lock": "after its row was locked past the lease (lease guard)",
    "pg": "after a PostgreSQL restart while it ran",
    "conn_kill": "after its worker's connections were killed",
    "sigterm": "after a SIGTERM drain left its outcome unwritten",
    "stall": "after a lease expiry with no fault in its worker",
    "drain": "released by a SIGTERM drain (attempt counted)",
}


def lease_cause(
    pid: int, job_id: int, lo: float, hi: float, faults: list[Fault], lease: float
) -> Fault | None:
    """The fault that made a lease of job ``job_id`` on worker ``pid`` expire between ``lo``
    and ``hi``: a kill -9 or crash of that worker, a SIGSTOP of it, a lock on the job's row,
    a PostgreSQL restart, a kill of its connections, a SIGTERM of it, in that order of
    precedence; None for none (a stalled worker)."""
    for f in faults:
        if f.kind == "kill9" and f.pid == pid and lo - EPSILON <= f.at <= hi:
            return f
    for f in faults:
        # Seen by the supervisor up to half a second after the fact.
        if f.kind == "crash" and f.pid == pid and lo - EPSILON <= f.at <= hi + 1.0:
            return f
    for f in faults:
        if f.kind == "sigstop" and f.pid == pid and f.at <= hi and (f.until or hi) >= lo:
            return f
    for f in faults:
        # The rescuer skips a locked row, so the rescue comes only once the lock is gone.
        if f.kind == "row_lock" and f.job_id == job_id and f.at <= hi and (f.until or hi) >= lo:
            return f
    for f in faults:
        if f.kind.startswith("pg_restart") and f.at <= hi and (f.until or hi) >= lo - lease:
            return f
    for f in faults:
        if f.kind.startswith("conn_kill") and f.pid == pid and lo - lease <= f.at <= hi:
            return f
    for f in faults:
        # A drain whose outcome writes ran out of time: the worker exits, the lease lapses.
        if f.kind == "sigterm" and f.pid == pid and f.at <= hi and (f.until or hi) >= lo:
            return f
    return None


def cause_key(fault: Fault | None) -> str:
    if fault is None:
        return "stall"
    if fault.kind.startswith("pg_restart"):
        return "pg"
    if fault.kind.startswith("conn_kill"):
        return "conn_kill"
    return fault.kind


def describe(fault: Fault | None) -> str:
    if fault is None:
        return "no fault injected into its worker"
    until = f"-{clock(fault.until)}" if fault.until else ""
    return f"{fault.kind} {clock(fault.at)}{until} {fault.detail}".strip()


def error_group(error: str | None) -> str:
    """A last_error with its particulars (markers, ids, numbers) blurred, to count by cause."""
    if not error or not error.strip():
        return "(no cause recorded)"
    line = error.strip().splitlines()[0]
    line = re.sub(r"\([^)]*\)", "", line)
    line = re.sub(r"worker \S+", "worker …", line)
    line = re.sub(r"has \[.*", "has [...]", line)
    line = re.sub(r"\d+", "N", line)
    return re.sub(r"\s+", " ", line).strip()[:90]


def first_line(text: str | None) -> str:
    return (text or "").split("\n", 1)[0]


def _ts(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def clock(at: float | None) -> str:
    """A time of day to the millisecond, for reading events side by side."""
    if at is None:
        return "-"
    return datetime.fromtimestamp(at).strftime("%H:%M:%S.%f")[:-3]


@dataclass
class Verdict:
    rows: list[tuple[str, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def row(self, label: str, value: object = "") -> None:
        self.rows.append((label, f"{value:,}" if isinstance(value, int) else str(value)))

    def invariant(self, name: str, problems: list[str]) -> None:
        self.summary.setdefault("invariants", {})[name] = len(problems)
        self.row(f"  {name}", "ok" if not problems else f"FAILED ({len(problems)})")
        if problems:
            shown = "\n    ".join(problems[:10])
            more = f"\n    ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            self.failures.append(f"{name}:\n    {shown}{more}")


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
    executions: dict[int, list[Execution]]  # by job
    transitions: dict[int, list[Transition]]  # by job, in the order they happened
    reports: list[Mapping[str, Any]]
    users: list[Mapping[str, Any]]
    sent: set[int]
    running_left: int


async def read_tables(url: str, facts: RunFacts) -> Tables:
    run = facts.run
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        jobs = await conn.fetch(
            "SELECT id, task, state, attempts, max_attempts, left(last_error, 500) AS last_error, "
            "created_at, finished_at, args->>'marker' AS marker, args->>'kind' AS kind, "
            "(args->>'levels')::int AS levels, result::text AS result "
            "FROM outbox_jobs WHERE id > $1",
            facts.first_id,
        )
        exec_rows = await conn.fetch(
            "SELECT job_id, attempt, task, worker_id, pid, started_at, ended_at, outcome "
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

    executions: dict[int, list[Execution]] = defaultdict(list)
    for r in exec_rows:
        executions[r["job_id"]].append(
            Execution(
                r["job_id"],
                r["attempt"],
                r["task"],
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
            )
        )
    return Tables(
        list(jobs), executions, transitions, list(reports), list(users), sent, running_left
    )


async def check(url: str, facts: RunFacts) -> Verdict:
    return judge(await read_tables(url, facts), facts)


@dataclass
class _Enqueued:
    """Which path each job came by, and what the enqueuers were told."""

    path_of: dict[int, str] = field(default_factory=dict)
    report_status: dict[int, str] = field(default_factory=dict)
    orphan_rows: list[str] = field(default_factory=list)  # a report or user without its job
    acked_absent: list[str] = field(default_factory=list)
    phantoms: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    unknown_in: int = 0
    strangers: int = 0


def _enqueued(tables: Tables, run: str, ledger: Ledger) -> _Enqueued:
    found = _Enqueued()
    job_ids = {j["id"] for j in tables.jobs}
    present: Counter[str] = Counter()
    for j in tables.jobs:
        marker = j["marker"]
        if marker and marker.startswith(f"{run}:"):
            found.path_of[j["id"]] = marker.split(":")[1]
            present[marker] += 1
    for r in tables.reports:
        marker = f"{run}:http-report:{r['idempotency_key'][len(run) + 2 :]}"
        if r["job_id"] in job_ids:
            found.path_of[r["job_id"]] = "http-report"
            found.report_status[r["job_id"]] = r["status"]
            present[marker] += 1
        else:
            found.orphan_rows.append(
                f"report {r['idempotency_key']} has no job (job_id {r['job_id']})"
            )
    for u in tables.users:
        marker = f"{run}:http-signup:{u['email'].split('@')[0][len(run) + 2 :]}"
        if u["job_id"] in job_ids:
            found.path_of[u["job_id"]] = "http-signup"
            present[marker] += 1
        else:
            found.orphan_rows.append(f"user {u['email']} has no send_welcome_email job")
    found.strangers = len(job_ids) - len(found.path_of)
    status = ledger.status
    found.acked_absent = [m for m, s in status.items() if s == "acked" and not present[m]]
    found.phantoms = [m for m, s in status.items() if s == "rolled_back" and present[m]]
    found.duplicates = [f"{m}: {n} jobs" for m, n in present.items() if n > 1]
    found.unknown = [m for m, s in status.items() if s == "unknown"]
    found.unknown_in = sum(1 for m in found.unknown if present[m])
    return found


class _Judge:
    """The per-job checks; what they find, for the table."""

    def __init__(self, tables: Tables, facts: RunFacts, enqueued: _Enqueued) -> None:
        self.tables = tables
        self.facts = facts
        self.enqueued = enqueued
        self.states: Counter[str] = Counter()
        self.dead_causes: Counter[str] = Counter()
        self.unfinished: list[str] = []
        self.dead_no_cause: list[str] = []
        self.after_success: list[str] = []
        self.left_final: list[str] = []
        self.unbacked: list[str] = []
        self.over_attempts: list[str] = []
        self.started_twice: list[str] = []
        self.lowered: list[str] = []  # attempts lowered by other than an unstarted hand-back
        self.unexplained: list[str] = []
        self.success_twice: list[str] = []  # a succeeded handler run again without a cause
        self.live_expiries: list[str] = []  # rescues of a worker not killed, stopped or locked out
        self.stale: list[str] = []  # handlers started after their claim's lease was lost
        self.raised_after_commit: list[str] = []
        self.lease_not_expired: list[str] = []
        self.missing_effects: list[str] = []
        self.bad_results: list[str] = []
        self.bad_errors: list[str] = []
        self.not_buried: list[str] = []
        self.explained: Counter[str] = Counter()
        self.success_repeats: Counter[str] = Counter()
        self.hostile: dict[str, Counter[str]] = defaultdict(Counter)  # kind -> final states
        self.retries_after_failure = 0
        self.concurrent = 0
        self.releases = 0
        self.releases_unstarted = 0
        self.unclaims = 0
        self.waits: list[tuple[float, int]] = []

    def job(self, j: Mapping[str, Any]) -> None:
        jid, state = j["id"], j["state"]
        execs = sorted(self.tables.executions.get(jid, []), key=lambda e: e.started)
        trans = self.tables.transitions.get(jid, [])
        where = f"job {jid} ({j['task']}, {self.enqueued.path_of[jid]})"
        self.states[state] += 1
        if execs:
            self.waits.append((execs[0].started - j["created_at"].timestamp(), jid))
        if state not in TERMINAL:
            self.unfinished.append(f"{where} is {state} after attempt {j['attempts']}")
        if state == "dead":
            self.dead_causes[error_group(j["last_error"])] += 1
            if not (j["last_error"] or "").strip():
                self.dead_no_cause.append(where)
        self._attempts(j, execs, trans, where)
        chain = self._stale(j, execs, trans, where)
        if state == "succeeded":
            self._success(j, execs, chain, trans, where)
        for e, nxt in itertools.pairwise(chain):
            self._repeat(jid, e, nxt, trans, where)
        if j["task"] == HOSTILE_TASK:
            self._hostile(j, execs, trans, where)

    def _attempts(
        self,
        j: Mapping[str, Any],
        execs: list[Execution],
        trans: list[Transition],
        where: str,
    ) -> None:
        """Every start counted: at most max_attempts starts, none of them twice, and
        attempts lowered only for a claim whose handler never started."""
        most = j["max_attempts"]
        if j["attempts"] > most or len(execs) > most:
            self.over_attempts.append(
                f"{where}: {len(execs)} start(s), attempts {j['attempts']} of {most}"
            )
        for attempt, n in Counter(e.attempt for e in execs).items():
            if n > 1:
                pids = [e.pid for e in execs if e.attempt == attempt]
                self.started_twice.append(f"{where}: attempt {attempt} started {n} times {pids}")
        for t in trans:
            if t.old_state in TERMINAL:
                self.left_final.append(f"{where}: {t.kind} at {clock(t.at)}")
            if t.kind == "rescue" and t.old_locked_until is not None and t.old_locked_until > t.at:
                self.lease_not_expired.append(
                    f"{where}: rescued {t.old_locked_until - t.at:.2f}s early"
                )
            if t.kind == "release":
                self.releases += 1
                self.releases_unstarted += not any(t.ends(e) for e in execs)
            elif t.kind == "unclaim":
                self.unclaims += 1
                ran = next((e for e in execs if t.ends(e)), None)
                if ran is not None:
                    self.lowered.append(
                        f"{where}: attempt {t.old_attempts} handed back uncounted at "
                        f"{clock(t.at)}, though its handler started at {clock(ran.started)} "
                        f"on pid {ran.pid}"
                    )
            elif t.new_attempts < t.old_attempts:
                self.lowered.append(
                    f"{where}: attempts {t.old_attempts} -> {t.new_attempts} ({t.kind}) "
                    f"at {clock(t.at)}"
                )

    def _stale(
        self,
        j: Mapping[str, Any],
        execs: list[Execution],
        trans: list[Transition],
        where: str,
    ) -> list[Execution]:
        """The executions that moved the job, in order. A handler that starts after its
        claim was already ended (its worker was stopped between the claim and the start,
        past the lease) is a stale execution: its writes are fenced, it does not move the
        job, so it is checked apart from the chain."""
        lease = self.facts.lease_seconds
        chain: list[Execution] = []
        for e in execs:
            gone = next((t for t in trans if t.of(e) and t.at < e.started - EPSILON), None)
            if gone is None:
                chain.append(e)
                continue
            fault = lease_cause(
                e.pid, j["id"], gone.at - lease, e.started, self.facts.faults, lease
            )
            story = (
                f"{where} attempt {e.attempt} on pid {e.pid} started {clock(e.started)}, after "
                f"its claim was ended by {gone.kind} at {clock(gone.at)} ({describe(fault)})"
            )
            if gone.kind != "rescue":
                self.unexplained.append(f"{story}: a handler ran for a claim it had given back")
                continue
            self.explained[cause_key(fault)] += 1
            self.stale.append(story)
            if j["state"] == "succeeded" and e.started > j["finished_at"].timestamp() + EPSILON:
                self.after_success.append(
                    f"{story}; the job had succeeded at {clock(j['finished_at'].timestamp())}"
                )
        return chain

    def _success(
        self,
        j: Mapping[str, Any],
        execs: list[Execution],
        chain: list[Execution],
        trans: list[Transition],
        where: str,
    ) -> None:
        jid = j["id"]
        finished = j["finished_at"].timestamp()
        late = [e for e in chain if e.started > finished + EPSILON]
        if late:
            self.after_success.append(
                f"{where}: attempt {late[0].attempt} on pid {late[0].pid} was claimed and "
                f"started at {clock(late[0].started)}, after the job succeeded "
                f"at {clock(finished)}"
            )
        completes = [t for t in trans if t.kind == "complete"]
        owners = [e for e in execs if completes and completes[0].ends(e)]
        if len(completes) != 1 or not owners:
            self.unbacked.append(
                f"{where}: {len(completes)} completion(s), "
                f"{len(owners)} execution(s) of the completing claim"
            )
        elif j["task"].startswith("soak_"):
            # Completed by the worker after the handler returned: it must have returned.
            if not any(e.outcome == "ok" for e in owners):
                self.unbacked.append(f"{where}: completed, yet its handler did not succeed")
        elif all(e.outcome == "fail" for e in owners):
            # Completed inside the handler's own transaction (ctx.transaction()); an error
            # after the COMMIT still reaches the handler, which then raises.
            self.raised_after_commit.append(
                f"{where} attempt {owners[0].attempt} on pid {owners[0].pid}: committed "
                f"its completion at {clock(completes[0].at)}, then its handler raised"
            )
        status = self.enqueued.report_status.get(jid)
        if j["task"] == "generate_report" and status != "done":
            self.missing_effects.append(f"{where}: report status {status}")
        if j["task"] == "send_welcome_email" and jid not in self.tables.sent:
            self.missing_effects.append(f"{where}: no sent_emails row")

    def _repeat(
        self, job_id: int, e: Execution, nxt: Execution, trans: list[Transition], where: str
    ) -> None:
        """``nxt`` ran after ``e``: the change that ended ``e``'s claim must explain it."""
        facts, lease = self.facts, self.facts.lease_seconds
        overlap = e.ended is not None and e.ended > nxt.started
        self.concurrent += overlap
        ended_by = next((t for t in trans if t.ends(e)), None)
        what = f"{where} attempt {e.attempt} on pid {e.pid}"
        problem: str | None = None
        cause: str | None = None
        if nxt.attempt <= e.attempt:
            problem = f"{what}: attempt {nxt.attempt} started after it (every start counts)"
        elif ended_by is None:
            problem = f"{what}: ran again, yet no state change ended that attempt"
        elif ended_by.at > nxt.started + EPSILON:
            problem = (
                f"{what}: attempt {nxt.attempt} started {ended_by.at - nxt.started:.3f}s "
                f"before this attempt was ended ({ended_by.kind})"
            )
        elif overlap and ended_by.kind != "rescue":
            # Both handlers ran at once: only a lease expiry may allow that.
            problem = f"{what}: overlapped the next attempt ({ended_by.kind})"
        elif ended_by.kind == "failure":
            if e.outcome == "ok":
                problem = f"{what}: its handler succeeded, yet it was failed"
            else:
                self.retries_after_failure += 1
        elif ended_by.kind == "rescue":
            fault = lease_cause(e.pid, job_id, e.started, ended_by.at, facts.faults, lease)
            cause = cause_key(fault)
            if cause in ("pg", "conn_kill", "sigterm", "stall"):
                self.live_expiries.append(
                    f"{what} [{REPEAT_CAUSES[cause]}]: started {clock(e.started)}, "
                    f"ended {clock(e.ended)} ({e.outcome}), lease until "
                    f"{clock(ended_by.old_locked_until)}, rescued {clock(ended_by.at)}, "
                    f"next start {clock(nxt.started)}"
                )
        elif ended_by.kind == "release":
            sigterm = facts.sigterm_at.get(e.pid)
            if sigterm is not None and sigterm <= ended_by.at + EPSILON:
                cause = "drain"
            else:
                problem = f"{what}: released while it ran, with no SIGTERM"
        elif ended_by.kind == "unclaim":
            problem = f"{what}: its claim was handed back uncounted after its handler started"
        else:
            problem = f"{what}: ran again after {ended_by.kind}"
        if problem is not None:
            self.unexplained.append(problem)
            if e.outcome == "ok":
                self.success_twice.append(problem)
        elif cause is not None:
            self.explained[cause] += 1
            if e.outcome == "ok":
                self.success_repeats[cause] += 1

    def _hostile(
        self,
        j: Mapping[str, Any],
        execs: list[Execution],
        trans: list[Transition],
        where: str,
    ) -> None:
        """Each hostile kind ends as it must, its outcome stored as it must be."""
        kind, state = j["kind"], j["state"]
        self.hostile[kind][state] += 1
        failures = [t for t in trans if t.kind == "failure"]
        what = f"{where} {kind}: {state}"
        if kind in RESULT_KINDS:
            stored = None if j["result"] is None else json.loads(j["result"])
            if state != "succeeded" or stored != {"text": STORED}:
                self.bad_results.append(f"{what}, result {j['result']!r}")
        elif kind == "deep":
            # The handler answers how deep the args it received nest.
            if state != "succeeded" or j["result"] != str(j["levels"]):
                self.bad_results.append(f"{what}, {j['levels']} levels, result {j['result']!r}")
        elif kind == "too_deep":
            # Deeper than any Python reader decodes: buried at its first claim, unrun.
            if state != "dead" or execs or not re.search(r"\bnest", j["last_error"] or ""):
                self.not_buried.append(
                    f"{what} after {len(execs)} execution(s), {j['levels']} levels, "
                    f"last error {first_line(j['last_error'])!r}"
                )
        elif kind in ERROR_KINDS:
            # Every attempt fails; each failure must store the real error. A fault may end
            # the last attempt instead (a rescue, a release), so the final last_error is
            # not required to be the handler's; at least one failure must be.
            wrong = [t for t in failures if first_line(t.error) != ERROR_KINDS[kind]]
            if state != "dead" or not failures or wrong:
                shown = first_line((wrong or failures)[0].error)[:100] if failures else None
                self.bad_errors.append(
                    f"{what} after {len(failures)} failure(s), stored {shown!r} "
                    f"(expected {ERROR_KINDS[kind]!r})"
                )
        else:
            self.bad_errors.append(f"{what}: a hostile kind the check does not know")


def judge(tables: Tables, facts: RunFacts) -> Verdict:
    """The verdict on what the tables hold: the figures, then every invariant."""
    ledger = facts.ledger
    enqueued = _enqueued(tables, facts.run, ledger)
    judged = _Judge(tables, facts, enqueued)
    for j in tables.jobs:
        if j["id"] in enqueued.path_of:
            judged.job(j)
    executions = sum(len(x) for x in tables.executions.values())
    cut_short = sum(1 for x in tables.executions.values() for e in x if e.ended is None)
    stopped = sum(1 for x in tables.executions.values() for e in x if e.outcome == "cancelled")

    v = Verdict()
    path_of = enqueued.path_of
    fault_counts = Counter(f.kind for f in facts.faults)
    committed = len(path_of)
    by_path = Counter(PATHS.get(p, p) for p in path_of.values())
    lost = len(judged.unfinished) + len(enqueued.acked_absent) + len(enqueued.orphan_rows)
    waits = sorted(judged.waits)
    states = judged.states
    v.row("jobs committed", committed)
    v.row("  through the HTTP API (POST /reports, POST /signup)", by_path["HTTP API"])
    v.row("  through the Python API (enqueue, enqueue_many)", by_path["Python API"])
    v.row("  through plain SQL INSERT", by_path["plain SQL"])
    if enqueued.strangers:
        v.row("  (jobs in the table from no enqueuer of this run)", enqueued.strangers)
    v.row(
        f"  per second over {facts.enqueue_seconds / 60:.1f} min",
        f"{committed / facts.enqueue_seconds:.1f}",
    )
    recovered = sum(ledger.recovered.values())
    unknown = enqueued.unknown
    v.row("enqueues interrupted by a fault", recovered + len(unknown))
    for what, n in sorted(ledger.recovered.items()):
        v.row(f"  retried with the same key, {what}", n)
    v.row("  not retried (bare INSERT) or given up: in the table", enqueued.unknown_in)
    v.row(
        "  not retried (bare INSERT) or given up: not in the table",
        len(unknown) - enqueued.unknown_in,
    )
    rolled = sum(1 for s in ledger.status.values() if s == "rolled_back")
    v.row(
        "jobs in transactions rolled back on purpose",
        f"{rolled:,} ({len(enqueued.phantoms)} in the table)",
    )
    v.row("succeeded", states["succeeded"])
    v.row("dead", states["dead"])
    for cause, n in judged.dead_causes.most_common():
        v.row(f"  {cause}", n)
    v.row("cancelled", states["cancelled"])
    if judged.unfinished:
        v.row("still queued or running", len(judged.unfinished))
    hostile_jobs = sum(sum(c.values()) for c in judged.hostile.values())
    v.row("hostile jobs (final states)", hostile_jobs)
    for kind, ends in sorted(judged.hostile.items()):
        v.row(f"  {kind}", ", ".join(f"{s} {n}" for s, n in sorted(ends.items())))
    v.row("executions (handler runs in the execution log)", executions)
    v.row("  retries after a failed attempt (not repeats)", judged.retries_after_failure)
    v.row("  cut short (no end recorded: its worker died)", cut_short)
    v.row("  stopped by their worker (SIGTERM drain, lease guard)", stopped)
    v.row("  overlapping a later execution of the same job", judged.concurrent)
    v.row("  completed in their own transaction, then raised", len(judged.raised_after_commit))
    v.row("releases by a SIGTERM drain (attempt counted)", judged.releases)
    v.row("  of claims whose handler had not started", judged.releases_unstarted)
    v.row("claims handed back unstarted (attempt taken back)", judged.unclaims)
    v.row(
        "repeats explained by a crash, stop, lock or lease expiry", sum(judged.explained.values())
    )
    for cause, label in REPEAT_CAUSES.items():
        if judged.explained[cause]:
            v.row(f"  {label}", judged.explained[cause])
    v.row("  (of which started only after their lease was lost)", len(judged.stale))
    v.row("  successes run again, each for such a cause", sum(judged.success_repeats.values()))
    v.row("repeats not explained (must be 0)", len(judged.unexplained))
    v.row("lost (must be 0)", lost)
    if lost:
        v.row("  committed but not finished", len(judged.unfinished))
        v.row("  acknowledged but not in the table", len(enqueued.acked_absent))
        v.row("  a report or user without its job", len(enqueued.orphan_rows))
    v.row("faults injected", sum(n for kind, n in fault_counts.items() if kind in FAULT_LABELS))
    for kind, label in FAULT_LABELS.items():
        long = sum(1 for f in facts.faults if f.kind == kind and "past the lease" in f.detail)
        v.row(
            f"  {label}",
            f"{fault_counts[kind]} ({long} past the lease)" if long else fault_counts[kind],
        )
    if facts.fault_errors:
        v.row("  faults that could not be injected", len(facts.fault_errors))
    v.row(
        "worker exits: kill -9 / SIGTERM / on their own",
        f"{fault_counts['kill9']} / {len(facts.sigterm_at)} / {fault_counts['crash']}",
    )
    v.row("worker log events")
    for event, label in WORKER_EVENTS.items():
        v.row(f"  {event}: {label}", facts.worker_events[event])
    if waits:
        p50 = statistics.median(w for w, _ in waits)
        p99 = waits[min(len(waits) - 1, int(len(waits) * 0.99))][0]
        top, top_job = waits[-1]
        v.row(
            "max time from enqueue to start",
            f"{top:.2f} s (job {top_job}, {path_of[top_job]}; p50 {p50:.3f} s, p99 {p99:.2f} s)",
        )
    v.row("enqueue errors retried", sum(ledger.errors.values()))
    for what, n in ledger.errors.most_common(8):
        v.row(f"  {what}", n)

    v.row("invariants")
    v.invariant(
        "every committed job finished: succeeded, dead with a cause, cancelled",
        judged.unfinished
        + judged.dead_no_cause
        + ([] if facts.settled else ["the queue did not empty"]),
    )
    v.invariant(
        "every acknowledged enqueue is in the table, with its domain row",
        enqueued.acked_absent + enqueued.orphan_rows,
    )
    v.invariant(
        "no job from a rolled-back enqueue, no duplicate per key",
        enqueued.phantoms + enqueued.duplicates,
    )
    v.invariant(
        "no execution after success; no job left a final state",
        judged.after_success + judged.left_final,
    )
    v.invariant(
        "every repeat explained (concurrent only across a lease expiry)",
        judged.unexplained + judged.lease_not_expired,
    )
    v.invariant(
        "no success run again without a cause (kill, stop, lock, lease expiry, release)",
        judged.success_twice,
    )
    v.invariant("every success written by the attempt whose handler succeeded", judged.unbacked)
    v.invariant(
        "no job started more than max_attempts times, no attempt started twice",
        judged.over_attempts + judged.started_twice,
    )
    v.invariant(
        "attempts lowered only to hand back a claim never started",
        judged.lowered,
    )
    v.invariant(
        "nothing left running after the drain",
        [f"{tables.running_left} running"] if tables.running_left else [],
    )
    v.invariant(
        "hostile results stored with U+FFFD in place; deep args arrive whole", judged.bad_results
    )
    v.invariant("hostile errors stored as the real error, U+FFFD in place", judged.bad_errors)
    v.invariant("args nested past any reader buried dead, never run", judged.not_buried)
    v.invariant("every succeeded app job has its effect (report, e-mail)", judged.missing_effects)
    v.invariant(
        "no worker exit but the injector's kill -9 and clean SIGTERM drains (exit 0)",
        facts.crashes + facts.drain_problems,
    )
    v.invariant("no HTTP request refused", ledger.rejected)
    v.notes += [
        f"repeat after a lease expiry of a live worker: {x}" for x in judged.live_expiries[:10]
    ]
    v.notes += [f"stale execution: {x}" for x in judged.stale[:10]]
    v.notes += [f"raised after its commit: {x}" for x in judged.raised_after_commit[:10]]
    v.summary.update(
        committed=committed,
        committed_by_path=dict(by_path),
        succeeded=states["succeeded"],
        dead=states["dead"],
        dead_causes=dict(judged.dead_causes),
        cancelled=states["cancelled"],
        hostile={kind: dict(ends) for kind, ends in judged.hostile.items()},
        executions=executions,
        retries_after_failure=judged.retries_after_failure,
        releases=judged.releases,
        unclaims=judged.unclaims,
        repeats_explained=sum(judged.explained.values()),
        repeats_explained_by=dict(judged.explained),
        success_repeats_by=dict(judged.success_repeats),
        repeats_unexplained=len(judged.unexplained),
        lost=lost,
        faults=dict(fault_counts),
        worker_events={event: facts.worker_events[event] for event in WORKER_EVENTS},
        max_enqueue_to_start=waits[-1][0] if waits else None,
        ok=not v.failures,
    )
    return v


def print_table(verdict: Verdict, title: str, out: TextIO = sys.stdout) -> None:
    width = max(len(label) for label, _ in verdict.rows) + 2
    rule = "-" * (width + 24)
    print(f"\n{title}\n{rule}", file=out)
    for label, value in verdict.rows:
        print(f"{label:<{width}}{value}", file=out)
    print(rule, file=out)
    for note in verdict.notes:
        print(note, file=out)
    if verdict.failures:
        print("INVARIANTS FAILED:", file=out)
        for failure in verdict.failures:
            print(f"  {failure}", file=out)
    else:
        print("all invariants hold", file=out)
    out.flush()

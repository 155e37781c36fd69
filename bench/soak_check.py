"""The soak's verdict: what the jobs table, the handlers' execution log and the trigger's
transition log say, checked against what the enqueuers were told and what the fault
injector did.

Invariants (PRINCIPLES, issue 5): every committed job ends succeeded, dead with a cause, or
cancelled; no job runs after it succeeded; an execution is repeated only once the attempt
before it was ended (a recorded failure, or a rescue after its lease expired: never while
its owner still held it); a success is written by the attempt whose handler succeeded;
attempts never exceed max_attempts; nothing is left running after the drain. A repeat is
then attributed to the fault that made its lease expire: a kill -9 or SIGSTOP of the worker
that ran it, a PostgreSQL restart, a connection kill, or none (a stalled worker).
"""

from __future__ import annotations

import itertools
import re
import statistics
import sys
from collections import Counter, defaultdict
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


@dataclass(slots=True)
class Fault:
    kind: str
    at: float  # time.time() when it began
    pid: int | None = None  # the worker process it hit, if any
    until: float | None = None  # when it ended (SIGCONT, server back up)
    detail: str = ""


FAULT_LABELS = {
    "kill9": "kill -9 of a worker (then a replacement)",
    "sigstop": "SIGSTOP past the lease, then SIGCONT",
    "pg_restart_fast": "PostgreSQL restart, fast",
    "pg_restart_immediate": "PostgreSQL restart, immediate",
    "conn_kill_listener": "connection kill: a worker's LISTEN connection",
    "conn_kill_worker": "connection kill: all of a worker's connections",
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
        if self.new_state == "queued" and self.new_attempts == self.old_attempts - 1:
            return "release"
        if (self.error or "").startswith("lease expired"):
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
    "pg": "after a PostgreSQL restart while it ran",
    "conn_kill": "after its worker's connections were killed",
    "stall": "after a lease expiry with no fault in its worker",
    "drain": "released by the SIGTERM drain",
}


def lease_cause(pid: int, lo: float, hi: float, faults: list[Fault], lease: float) -> Fault | None:
    """The fault that made a lease of worker ``pid`` expire between ``lo`` and ``hi``: a
    kill -9 or crash of that worker, a SIGSTOP of it, a PostgreSQL restart, a kill of its
    connections, in that order of precedence; None for none (a stalled worker)."""
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
        if f.kind.startswith("pg_restart") and f.at <= hi and (f.until or hi) >= lo - lease:
            return f
    for f in faults:
        if f.kind.startswith("conn_kill") and f.pid == pid and lo - lease <= f.at <= hi:
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
    drain_problems: list[str]
    sigterm_at: dict[int, float]
    enqueue_seconds: float
    settled: bool


async def check(url: str, facts: RunFacts) -> Verdict:
    run, ledger = facts.run, facts.ledger
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        jobs = await conn.fetch(
            "SELECT id, task, state, attempts, max_attempts, left(last_error, 500) AS last_error, "
            "created_at, finished_at, args->>'marker' AS marker FROM outbox_jobs WHERE id > $1",
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
        running_left = await conn.fetchval(
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

    # -- Which path each job came by, and what the enqueuers were told ----------------------
    job_ids = {j["id"] for j in jobs}
    path_of: dict[int, str] = {}
    present: Counter[str] = Counter()
    for j in jobs:
        marker = j["marker"]
        if marker and marker.startswith(f"{run}:"):
            path_of[j["id"]] = marker.split(":")[1]
            present[marker] += 1
    orphan_rows: list[str] = []  # a report or user committed without its job
    report_status: dict[int, str] = {}
    for r in reports:
        marker = f"{run}:http-report:{r['idempotency_key'][len(run) + 2 :]}"
        if r["job_id"] in job_ids:
            path_of[r["job_id"]] = "http-report"
            report_status[r["job_id"]] = r["status"]
            present[marker] += 1
        else:
            orphan_rows.append(f"report {r['idempotency_key']} has no job (job_id {r['job_id']})")
    for u in users:
        marker = f"{run}:http-signup:{u['email'].split('@')[0][len(run) + 2 :]}"
        if u["job_id"] in job_ids:
            path_of[u["job_id"]] = "http-signup"
            present[marker] += 1
        else:
            orphan_rows.append(f"user {u['email']} has no send_welcome_email job")
    strangers = len(job_ids) - len(path_of)

    acked_absent = [m for m, s in ledger.status.items() if s == "acked" and not present[m]]
    phantoms = [m for m, s in ledger.status.items() if s == "rolled_back" and present[m]]
    duplicates = [f"{m}: {n} jobs" for m, n in present.items() if n > 1]
    unknown = [m for m, s in ledger.status.items() if s == "unknown"]
    unknown_in = sum(1 for m in unknown if present[m])

    # -- Per job: final state, executions, repeats -----------------------------------------
    lease = facts.lease_seconds
    states: Counter[str] = Counter()
    dead_causes: Counter[str] = Counter()
    unfinished: list[str] = []
    dead_no_cause: list[str] = []
    after_success: list[str] = []
    left_final: list[str] = []
    unbacked: list[str] = []
    over_attempts: list[str] = []
    unexplained: list[str] = []
    live_expiries: list[str] = []  # rescues of a worker neither killed nor stopped
    stale: list[str] = []  # handlers started after their claim's lease was lost
    raised_after_commit: list[str] = []
    lease_not_expired: list[str] = []
    missing_effects: list[str] = []
    explained: Counter[str] = Counter()
    retries_after_failure = 0
    concurrent = 0
    cut_short = sum(1 for x in executions.values() for e in x if e.ended is None)
    orphan_releases = 0
    waits: list[tuple[float, int]] = []
    for j in jobs:
        jid, state = j["id"], j["state"]
        if jid not in path_of:
            continue
        states[state] += 1
        execs = sorted(executions.get(jid, []), key=lambda e: e.started)
        trans = transitions.get(jid, [])
        where = f"job {jid} ({j['task']}, {path_of[jid]})"
        if execs:
            waits.append((execs[0].started - j["created_at"].timestamp(), jid))
        if state not in TERMINAL:
            unfinished.append(f"{where} is {state} after attempt {j['attempts']}")
        if state == "dead":
            dead_causes[error_group(j["last_error"])] += 1
            if not (j["last_error"] or "").strip():
                dead_no_cause.append(where)
        if j["attempts"] > j["max_attempts"] or any(e.attempt > j["max_attempts"] for e in execs):
            over_attempts.append(f"{where}: attempts {j['attempts']} of {j['max_attempts']}")
        for t in trans:
            if t.old_state in TERMINAL:
                left_final.append(f"{where}: {t.kind} at {t.at:.3f}")
            if t.kind == "release" and not any(t.ends(e) for e in execs):
                orphan_releases += 1
            if t.kind == "rescue" and t.old_locked_until is not None and t.old_locked_until > t.at:
                lease_not_expired.append(f"{where}: rescued {t.old_locked_until - t.at:.2f}s early")
        # A handler that starts after its claim was already ended (its worker was stopped
        # between the claim and the start, past the lease) is a stale execution: its writes
        # are fenced, it does not move the job, so it is checked apart from the chain.
        chain: list[Execution] = []
        for e in execs:
            gone = next((t for t in trans if t.of(e) and t.at < e.started - EPSILON), None)
            if gone is None:
                chain.append(e)
                continue
            fault = lease_cause(e.pid, gone.at - lease, e.started, facts.faults, lease)
            what = f"{where} attempt {e.attempt} on pid {e.pid}"
            story = (
                f"{what} started {clock(e.started)}, after its claim was ended by "
                f"{gone.kind} at {clock(gone.at)} ({describe(fault)})"
            )
            if gone.kind != "rescue":
                unexplained.append(f"{story}: a handler ran for a claim it had given back")
                continue
            explained[cause_key(fault)] += 1
            stale.append(story)
            if state == "succeeded" and e.started > j["finished_at"].timestamp() + EPSILON:
                after_success.append(
                    f"{story}; the job had succeeded at {clock(j['finished_at'].timestamp())}"
                )
        if state == "succeeded":
            finished = j["finished_at"].timestamp()
            late = [e for e in chain if e.started > finished + EPSILON]
            if late:
                after_success.append(
                    f"{where}: attempt {late[0].attempt} on pid {late[0].pid} was claimed and "
                    f"started at {clock(late[0].started)}, after the job succeeded "
                    f"at {clock(finished)}"
                )
            completes = [t for t in trans if t.kind == "complete"]
            owners = [e for e in execs if completes and completes[0].ends(e)]
            if len(completes) != 1 or not owners:
                unbacked.append(
                    f"{where}: {len(completes)} completion(s), "
                    f"{len(owners)} execution(s) of the completing claim"
                )
            elif j["task"].startswith("soak_"):
                # Completed by the worker after the handler returned: it must have returned.
                if not any(e.outcome == "ok" for e in owners):
                    unbacked.append(f"{where}: completed, yet its handler did not succeed")
            elif all(e.outcome == "fail" for e in owners):
                # Completed inside the handler's own transaction (ctx.transaction()); an
                # error after the COMMIT still reaches the handler, which then raises.
                raised_after_commit.append(
                    f"{where} attempt {owners[0].attempt} on pid {owners[0].pid}: committed "
                    f"its completion at {clock(completes[0].at)}, then its handler raised"
                )
            if j["task"] == "generate_report" and report_status.get(jid) != "done":
                missing_effects.append(f"{where}: report status {report_status.get(jid)}")
            if j["task"] == "send_welcome_email" and jid not in sent:
                missing_effects.append(f"{where}: no sent_emails row")
        for i, e in enumerate(chain[:-1]):
            nxt = chain[i + 1]
            overlap = e.ended is not None and e.ended > nxt.started
            concurrent += overlap
            ended_by = next((t for t in trans if t.ends(e)), None)
            what = f"{where} attempt {e.attempt} on pid {e.pid}"
            if ended_by is None:
                unexplained.append(f"{what}: ran again, yet no state change ended that attempt")
            elif ended_by.at > nxt.started + EPSILON:
                unexplained.append(
                    f"{what}: attempt {nxt.attempt} started {ended_by.at - nxt.started:.3f}s "
                    f"before this attempt was ended ({ended_by.kind})"
                )
            elif overlap and ended_by.kind != "rescue":
                # Both handlers ran at once: only a lease expiry may allow that.
                unexplained.append(f"{what}: overlapped the next attempt ({ended_by.kind})")
            elif ended_by.kind == "failure":
                if e.outcome == "ok":
                    unexplained.append(f"{what}: its handler succeeded, yet it was failed")
                else:
                    retries_after_failure += 1
            elif ended_by.kind == "rescue":
                cause = cause_key(lease_cause(e.pid, e.started, ended_by.at, facts.faults, lease))
                explained[cause] += 1
                if cause in ("pg", "conn_kill", "stall"):
                    live_expiries.append(
                        f"{what} [{REPEAT_CAUSES[cause]}]: started {clock(e.started)}, "
                        f"ended {clock(e.ended)} ({e.outcome}), lease until "
                        f"{clock(ended_by.old_locked_until)}, rescued {clock(ended_by.at)}, "
                        f"next start {clock(nxt.started)}"
                    )
            elif ended_by.kind == "release":
                sigterm = facts.sigterm_at.get(e.pid)
                if sigterm is not None and sigterm <= ended_by.at + EPSILON:
                    explained["drain"] += 1
                else:
                    unexplained.append(f"{what}: released while it ran, with no SIGTERM")
            else:
                unexplained.append(f"{what}: ran again after {ended_by.kind}")

    # -- The table -----------------------------------------------------------------------
    v = Verdict()
    fault_counts = Counter(f.kind for f in facts.faults)
    committed = len(path_of)
    by_path = Counter(PATHS.get(p, p) for p in path_of.values())
    lost = len(unfinished) + len(acked_absent) + len(orphan_rows)
    waits.sort()
    v.row("jobs committed", committed)
    v.row("  through the HTTP API (POST /reports, POST /signup)", by_path["HTTP API"])
    v.row("  through the Python API (enqueue, enqueue_many)", by_path["Python API"])
    v.row("  through plain SQL INSERT", by_path["plain SQL"])
    if strangers:
        v.row("  (jobs in the table from no enqueuer of this run)", strangers)
    v.row(
        f"  per second over {facts.enqueue_seconds / 60:.1f} min",
        f"{committed / facts.enqueue_seconds:.1f}",
    )
    recovered = sum(ledger.recovered.values())
    v.row("enqueues interrupted by a fault", recovered + len(unknown))
    for what, n in sorted(ledger.recovered.items()):
        v.row(f"  retried with the same key, {what}", n)
    v.row("  not retried (bare INSERT) or given up: in the table", unknown_in)
    v.row("  not retried (bare INSERT) or given up: not in the table", len(unknown) - unknown_in)
    rolled = sum(1 for s in ledger.status.values() if s == "rolled_back")
    v.row(
        "jobs in transactions rolled back on purpose", f"{rolled:,} ({len(phantoms)} in the table)"
    )
    v.row("succeeded", states["succeeded"])
    v.row("dead", states["dead"])
    for cause, n in dead_causes.most_common():
        v.row(f"  {cause}", n)
    v.row("cancelled", states["cancelled"])
    if unfinished:
        v.row("still queued or running", len(unfinished))
    v.row(
        "executions (handler runs in the execution log)", sum(len(x) for x in executions.values())
    )
    v.row("  retries after a failed attempt (not repeats)", retries_after_failure)
    v.row("  cut short (no end recorded: its worker died)", cut_short)
    v.row("  overlapping a later execution of the same job", concurrent)
    v.row("  claims released unstarted (orphans, drain)", orphan_releases)
    v.row("  completed in their own transaction, then raised", len(raised_after_commit))
    v.row("repeats explained by a crash, stop or lease expiry", sum(explained.values()))
    for cause, label in REPEAT_CAUSES.items():
        if explained[cause]:
            v.row(f"  {label}", explained[cause])
    v.row("  (of which started only after their lease was lost)", len(stale))
    v.row("repeats not explained (must be 0)", len(unexplained))
    v.row("lost (must be 0)", lost)
    if lost:
        v.row("  committed but not finished", len(unfinished))
        v.row("  acknowledged but not in the table", len(acked_absent))
        v.row("  a report or user without its job", len(orphan_rows))
    v.row("faults injected", sum(n for kind, n in fault_counts.items() if kind in FAULT_LABELS))
    for kind, label in FAULT_LABELS.items():
        long = sum(1 for f in facts.faults if f.kind == kind and "past the lease" in f.detail)
        v.row(
            f"  {label}",
            f"{fault_counts[kind]} ({long} down past the lease)" if long else fault_counts[kind],
        )
    v.row("worker crashes (not injected; each replaced)", fault_counts["crash"])
    if facts.fault_errors:
        v.row("  faults that could not be injected", len(facts.fault_errors))
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
        unfinished + dead_no_cause + ([] if facts.settled else ["the queue did not empty"]),
    )
    v.invariant(
        "every acknowledged enqueue is in the table, with its domain row",
        acked_absent + orphan_rows,
    )
    v.invariant("no job from a rolled-back enqueue, no duplicate per key", phantoms + duplicates)
    v.invariant("no execution after success; no job left a final state", after_success + left_final)
    v.invariant(
        "every repeat explained (concurrent only across a lease expiry)",
        unexplained + lease_not_expired,
    )
    v.invariant("every success written by the attempt whose handler succeeded", unbacked)
    v.invariant("attempts never exceed max_attempts", over_attempts)
    v.invariant(
        "nothing left running after the drain",
        [f"{running_left} running"] if running_left else [],
    )
    v.invariant("every succeeded app job has its effect (report, e-mail)", missing_effects)
    v.invariant(
        "workers survive every fault and exit 0 on SIGTERM",
        facts.crashes + facts.drain_problems,
    )
    v.invariant("no HTTP request refused", ledger.rejected)
    v.notes += [f"repeat after a lease expiry of a live worker: {x}" for x in live_expiries[:10]]
    v.notes += [f"stale execution: {x}" for x in stale[:10]]
    v.notes += [f"raised after its commit: {x}" for x in raised_after_commit[:10]]
    v.summary.update(
        committed=committed,
        committed_by_path=dict(by_path),
        succeeded=states["succeeded"],
        dead=states["dead"],
        dead_causes=dict(dead_causes),
        cancelled=states["cancelled"],
        executions=sum(len(x) for x in executions.values()),
        retries_after_failure=retries_after_failure,
        repeats_explained=sum(explained.values()),
        repeats_explained_by=dict(explained),
        repeats_unexplained=len(unexplained),
        lost=lost,
        faults=dict(fault_counts),
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

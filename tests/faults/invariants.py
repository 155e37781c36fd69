"""The one invariant checker of the fault suite: what must hold after any fault, once the
workers have drained.

* Every job ends ``succeeded``, ``dead`` with a non-empty ``last_error``, or ``cancelled``;
  nothing is left ``queued`` or ``running``, no lease is left on a finished row.
* Nothing committed is lost: every expected job id is in the table, and every job that ever
  ran (``test_executions``) is still there.
* ``attempts`` never exceeds ``max_attempts``, and no attempt ran that the row never counted.
* A job that succeeded was completed by an attempt whose handler ran.
* No execution starts after its job finished, unless it is a zombie: a stalled worker
  (SIGSTOP, blocked event loop) waking up with a stale attempt that its fence then refuses.
* One attempt runs once: every start is counted, a release on shutdown included, so a
  repeat always has a higher attempt; no job starts more than ``max_attempts`` times.
* Every execution that was repeated has a cause: its worker was killed or stalled, its lease
  expired (a rescue), its handler failed, or it was released on shutdown. Executions that
  overlap in time are only allowed across a crash, a stall or a lease expiry.

The causes come from what the test did (killed and stalled pids) and from the workers' own
JSON logs (``job_rescued``, ``job_failed``, ``job_released``).

The checks of a row and of its executions (:func:`check_finished`, :func:`check_counted`,
:func:`check_started_after_finish`) take them as plain values, not from the database, so
that the soak (``tests/soak``) holds its own jobs and execution log to the same ones.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import asyncpg

FINISHED = ("succeeded", "dead", "cancelled")
# Tasks of tests/workload.py that write test_executions before anything else: when one of
# them succeeded, the attempt that completed it must have left an execution behind.
RECORDING_TASKS = frozenset(
    {
        "echo",
        "flaky",
        "always_fails",
        "sleepy",
        "hangs",
        "blocks_loop",
        "write_once",
        "blocks_loop_once",
        "hangs_in_thread",
        "deep_result",
        "hostile",
    }
)


class LoggedProcess(Protocol):
    """What the checker needs of a worker: its pid and its log (a WorkerProcess)."""

    @property
    def pid(self) -> int: ...

    def output(self) -> str: ...


def log_events(worker: LoggedProcess, *names: str) -> list[dict[str, Any]]:
    """The worker's structured log lines (JSON), optionally only those of some events."""
    found: list[dict[str, Any]] = []
    for line in worker.output().splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and (not names or entry.get("event") in names):
            found.append(entry)
    return found


def clock(at: float | None) -> str:
    """A time of day to the millisecond, for reading events side by side."""
    if at is None:
        return "-"
    return datetime.fromtimestamp(at).strftime("%H:%M:%S.%f")[:-3]


@dataclass(frozen=True, slots=True)
class Execution:
    """One run of one attempt of one job in one process. Times are seconds since the epoch,
    the soak's clock for its faults as well."""

    job_id: int
    attempt: int
    pid: int
    started: float
    ended: float | None  # None: the handler never wrote its end (killed, released, ...)
    events: tuple[str, ...]


@dataclass
class Report:
    """What the checker saw; tests assert on it to prove their fault actually hit a job."""

    jobs: int = 0
    states: Counter[str] = field(default_factory=Counter)
    executions: int = 0
    # Why executions were repeated: crash, stalled, lease_expired, failed, released.
    repeats: Counter[str] = field(default_factory=Counter)
    # Jobs executed by more than one process.
    moved: set[int] = field(default_factory=set)
    # Executions by stalled workers that started after their job had finished.
    zombies: int = 0
    overlaps: int = 0
    violations: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Evidence:
    killed: frozenset[int]
    stalled: frozenset[int]
    rescued: frozenset[tuple[int, int]]  # (job, attempt) whose lease expired
    failed: frozenset[tuple[int, int, int]]  # (job, attempt, pid)
    released: frozenset[tuple[int, int, int]]  # (job, attempt, pid)

    def causes(self, e: Execution) -> list[str]:
        found = []
        if e.pid in self.killed:
            found.append("crash")
        if e.pid in self.stalled:
            found.append("stalled")
        if (e.job_id, e.attempt) in self.rescued:
            found.append("lease_expired")
        if (e.job_id, e.attempt, e.pid) in self.failed:
            found.append("failed")
        if (e.job_id, e.attempt, e.pid) in self.released:
            found.append("released")
        return found


def _evidence(
    workers: Iterable[LoggedProcess], killed: Collection[int], stalled: Collection[int]
) -> _Evidence:
    rescued: set[tuple[int, int]] = set()
    failed: set[tuple[int, int, int]] = set()
    released: set[tuple[int, int, int]] = set()
    for worker in workers:
        for entry in log_events(worker):
            event, job_id, attempt = entry.get("event"), entry.get("job_id"), entry.get("attempt")
            if not isinstance(job_id, int) or not isinstance(attempt, int):
                continue
            if event == "job_rescued":
                rescued.add((job_id, attempt))
            elif event == "job_failed":
                failed.add((job_id, attempt, worker.pid))
            elif event == "job_released":
                released.add((job_id, attempt, worker.pid))
    return _Evidence(
        killed=frozenset(killed),
        stalled=frozenset(stalled),
        rescued=frozenset(rescued),
        failed=frozenset(failed),
        released=frozenset(released),
    )


async def _executions(conn: asyncpg.Connection) -> dict[int, list[Execution]]:
    rows = await conn.fetch(
        "SELECT job_id, attempt, pid, array_agg(event ORDER BY seq) AS events, "
        "min(at) FILTER (WHERE event IN ('run', 'start')) AS started, "
        "max(at) FILTER (WHERE event = 'end') AS ended, min(at) AS first_at "
        "FROM test_executions GROUP BY job_id, attempt, pid"
    )
    by_job: dict[int, list[Execution]] = {}
    for r in rows:
        execution = Execution(
            job_id=r["job_id"],
            attempt=r["attempt"],
            pid=r["pid"],
            started=(r["started"] or r["first_at"]).timestamp(),
            ended=None if r["ended"] is None else r["ended"].timestamp(),
            events=tuple(r["events"]),
        )
        by_job.setdefault(execution.job_id, []).append(execution)
    for executions in by_job.values():
        executions.sort(key=lambda e: (e.started, e.attempt))
    return by_job


def check_finished(job: Mapping[str, Any]) -> list[str]:
    """The row's end: succeeded, dead with a cause, or cancelled; finished, and unlocked."""
    j = job["id"]
    if job["state"] not in FINISHED:
        return [f"job {j} ({job['task']}) ended {job['state']!r}, not succeeded, dead or cancelled"]
    bad = []
    if job["state"] == "dead" and not (job["last_error"] or "").strip():
        bad.append(f"job {j} is dead without a cause (last_error {job['last_error']!r})")
    if job["state"] == "succeeded" and job["attempts"] < 1:
        bad.append(f"job {j} succeeded without ever being started (attempts {job['attempts']})")
    if job["locked_by"] is not None or job["locked_until"] is not None:
        bad.append(f"job {j} is {job['state']} but still locked by {job['locked_by']!r}")
    if job["finished_at"] is None:
        bad.append(f"job {j} is {job['state']} without finished_at")
    return bad


def check_counted(job: Mapping[str, Any], executions: Sequence[Execution]) -> list[str]:
    """Every start is counted: no attempt runs twice, none past the row's count or
    ``max_attempts``, so no job starts more than ``max_attempts`` times."""
    j = job["id"]
    bad = []
    if job["attempts"] > job["max_attempts"]:
        bad.append(f"job {j} has {job['attempts']} attempts of at most {job['max_attempts']}")
    pids: defaultdict[int, list[int]] = defaultdict(list)
    for e in executions:
        pids[e.attempt].append(e.pid)
        if any(n > 1 for n in Counter(e.events).values()):
            bad.append(
                f"job {j} attempt {e.attempt} ran more than once in process {e.pid}: {e.events}"
            )
        if e.attempt > job["attempts"]:
            bad.append(f"job {j} ran attempt {e.attempt} but the row counts {job['attempts']}")
        if e.attempt > job["max_attempts"]:
            bad.append(f"job {j} ran attempt {e.attempt} of at most {job['max_attempts']}")
    for attempt, ran_in in pids.items():
        if len(ran_in) > 1:
            bad.append(
                f"job {j} attempt {attempt} ran in processes {', '.join(map(str, ran_in))}; "
                "a started attempt is always counted, so it can never run again"
            )
    return bad


def check_started_after_finish(
    job: Mapping[str, Any], executions: Sequence[Execution], stalled: Collection[int] = ()
) -> tuple[list[str], int]:
    """No execution starts after its job finished, but a zombie: one of a worker in
    ``stalled`` with an attempt that a later one replaced. The violations, and the zombies."""
    finished = job["finished_at"]
    if finished is None:
        return [], 0
    bad, zombies = [], 0
    for e in executions:
        if e.started <= finished.timestamp():
            continue
        if e.pid in stalled and e.attempt < job["attempts"]:
            zombies += 1
        else:
            bad.append(
                f"job {job['id']} attempt {e.attempt} started in process {e.pid} at "
                f"{clock(e.started)}, after the job finished ({job['state']} at "
                f"{clock(finished.timestamp())})"
            )
    return bad, zombies


def _check_completed(job: Mapping[str, Any], executions: Sequence[Execution]) -> list[str]:
    completing = [e for e in executions if e.attempt == job["attempts"]]
    if job["state"] == "succeeded" and job["task"] in RECORDING_TASKS and not completing:
        return [
            f"job {job['id']} succeeded with attempt {job['attempts']}, which never ran "
            f"(ran: {sorted({e.attempt for e in executions})})"
        ]
    return []


def _check_repeats(
    job: Mapping[str, Any], executions: Sequence[Execution], evidence: _Evidence, report: Report
) -> None:
    bad = report.violations.append
    j = job["id"]
    if len({e.pid for e in executions}) > 1:
        report.moved.add(j)
    for i, e in enumerate(executions):
        later = executions[i + 1 :]
        # A stalled zombie may start its stale attempt after the one that replaced it.
        lower = [o for o in later if o.attempt < e.attempt and o.pid not in evidence.stalled]
        superseded = any(o.attempt == e.attempt for o in later) or any(
            o.attempt > e.attempt for o in executions
        )
        causes = evidence.causes(e)
        if lower:
            bad(f"job {j}: attempt {lower[0].attempt} started after attempt {e.attempt}")
        if superseded:
            if causes:
                report.repeats[causes[0]] += 1
            else:
                bad(
                    f"job {j} attempt {e.attempt} in process {e.pid} was repeated, and nothing "
                    "explains it: no crash, stall, lease expiry, failure or release"
                )
        # Overlaps are visible where the handler wrote both a start and an end.
        for o in later:
            if o.pid == e.pid or e.ended is None or o.started >= e.ended:
                continue
            if {"stalled", "lease_expired"} & set(causes):
                report.overlaps += 1
            else:
                bad(
                    f"job {j} ran concurrently in processes {e.pid} (attempt {e.attempt}) and "
                    f"{o.pid} (attempt {o.attempt}) without a stall or lease expiry"
                )


def _check_logs(workers: Iterable[LoggedProcess], report: Report) -> None:
    for worker in workers:
        for line in worker.output().splitlines():
            if line.startswith("{"):
                continue
            if "Task exception was never retrieved" in line or "Traceback" in line:
                report.violations.append(
                    f"worker {worker.pid} wrote an unhandled error: {line.strip()[:200]}"
                )


async def check_invariants(
    pool: asyncpg.Pool,
    *,
    workers: Sequence[LoggedProcess],
    killed: Collection[int] = (),
    stalled: Collection[int] = (),
    expected_ids: Collection[int] = (),
) -> Report:
    """Check every job of the database after the workers have drained; fail with every
    violation found, or return what was seen.

    ``killed``: pids of workers the test killed (-9). ``stalled``: pids of workers that were
    stopped (SIGSTOP) or blocked their event loop past a lease. ``expected_ids``: jobs known
    to be committed, none of which may be missing.
    """
    async with pool.acquire() as conn:
        jobs = await conn.fetch(
            "SELECT id, task, state, attempts, max_attempts, last_error, locked_by, "
            "locked_until, finished_at FROM outbox_jobs ORDER BY id"
        )
        executions = await _executions(conn)
    evidence = _evidence(workers, killed, stalled)
    report = Report(jobs=len(jobs), states=Counter(job["state"] for job in jobs))
    report.executions = sum(len(e) for e in executions.values())

    ids = {job["id"] for job in jobs}
    lost = sorted(set(expected_ids) - ids)
    if lost:
        report.violations.append(f"{len(lost)} committed jobs are missing: {lost[:20]}")
    vanished = sorted(set(executions) - ids)
    if vanished:
        report.violations.append(f"jobs ran but are no longer in the table: {vanished[:20]}")
    for job in jobs:
        ran = executions.get(job["id"], [])
        report.violations += check_finished(job)
        report.violations += check_counted(job, ran)
        late, zombies = check_started_after_finish(job, ran, evidence.stalled)
        report.violations += late
        report.zombies += zombies
        report.violations += _check_completed(job, ran)
        _check_repeats(job, ran, evidence, report)
    _check_logs(workers, report)

    if report.violations:
        shown = "\n  ".join(report.violations[:40])
        more = len(report.violations) - 40
        raise AssertionError(
            f"{len(report.violations)} invariant violations"
            f"{f' ({more} not shown)' if more > 0 else ''}:\n  {shown}\n"
            f"states {dict(report.states)}, repeats {dict(report.repeats)}"
        )
    return report

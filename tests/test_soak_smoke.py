"""The soak (``bench.soak``): its checker judged on crafted histories, each invariant shown
to fail on the history it exists to catch; then half a minute of the real thing, as a
subprocess, with a few faults and a hostile share of jobs: it must pass its own checks and
say so in its table. The long soak is ``make soak``.

The short run's faults are kill -9 of workers, SIGTERM of workers mid-run, row locks past
the lease and shorter, PostgreSQL restarts (fast, then immediate) and kills of worker and
LISTEN connections. SIGSTOP is left to ``make soak``: one that lands between a claim and the
start of its handler lets that handler start after its lease was lost, possibly after
another worker completed the job, which fails a check by chance (a real finding, but not one
for ``make test`` to flicker on).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from bench.soak_check import (
    ERROR_KINDS,
    RESULT_KINDS,
    STORED,
    TERMINAL,
    Execution,
    Fault,
    Ledger,
    RunFacts,
    Tables,
    Transition,
    Verdict,
    judge,
)
from bench.soak_tasks import HOSTILE_KINDS

# The slow tier (`make test-slow`): processes, servers and builds, minutes in all.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------
# The checker on crafted histories
# ---------------------------------------------------------------------------------------------

RUN = "t"
T0 = 1_800_000_000.0
# host:pid:random, as workers name themselves
W1, W2, W3 = "host:100:aaaa", "host:200:bbbb", "host:300:cccc"
LEASE = 8.0


class History:
    """The end of a crafted soak run: rows of the three tables, and what the soak saw."""

    def __init__(self) -> None:
        self.jobs: list[dict[str, Any]] = []
        self.executions: dict[int, list[Execution]] = defaultdict(list)
        self.transitions: dict[int, list[Transition]] = defaultdict(list)
        self.ledger = Ledger(RUN)
        self.faults: list[Fault] = []
        self.sigterm_at: dict[int, float] = {}
        self.crashes: list[str] = []
        self.drain_problems: list[str] = []
        self.running_left = 0
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
    ) -> int:
        jid = next(self._ids)
        marker = f"{RUN}:python-one:{jid}"
        self.ledger.status[marker] = "acked"
        self.jobs.append(
            {
                "id": jid,
                "task": task,
                "state": state,
                "attempts": attempts,
                "max_attempts": max_attempts,
                "last_error": last_error,
                "created_at": datetime.fromtimestamp(T0),
                "finished_at": datetime.fromtimestamp(T0 + 100) if state in TERMINAL else None,
                "marker": marker,
                "kind": kind,
                "levels": levels,
                "result": result,
            }
        )
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
            Execution(
                job,
                attempt,
                "soak_work",
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
            reports=[],
            users=[],
            sent=set(),
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
            settled=True,
        )
        return judge(tables, facts)


def pid(worker: str) -> int:
    return int(worker.split(":")[1])


def failed(verdict: Verdict) -> set[str]:
    return {name for name, n in verdict.summary["invariants"].items() if n}


RELEASED = f"interrupted: worker {W1} shut down during attempt 1 of 5"
RESCUED = f"lease expired: worker {W1} stopped renewing it (attempt 1 of 5)"


def clean_history() -> History:
    """One of each story the soak tells, each as the worker must tell it."""
    h = History()
    h.succeeded(h.job(), 1, 1.0)
    # A SIGTERM drain releases a long job; the release counts, so the rerun is attempt 2.
    released = h.job()
    h.ran(released, 1, 1.0, 4.0, "cancelled")
    h.sigterm_at[pid(W1)] = T0 + 2.0
    h.moved(released, "queued", 1, 4.1, RELEASED)
    h.succeeded(released, 2, 5.0, W2)
    # A row locked past the lease: the lease guard stops the handler, a rescuer takes the job
    # back once the lock is gone.
    locked = h.job()
    h.ran(locked, 1, 1.0, 7.0, "cancelled")
    h.faults.append(Fault("row_lock", T0 + 2.0, until=T0 + 12.0, job_id=locked))
    h.moved(locked, "queued", 1, 12.5, RESCUED)
    h.succeeded(locked, 2, 13.0, W2)
    # A claim answered too late is handed back unstarted, its attempt taken back.
    unclaimed = h.job()
    h.moved(unclaimed, "queued", 1, 1.0, new_attempts=0)
    h.succeeded(unclaimed, 1, 2.0, W2)
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


def test_the_checker_passes_every_story_told_as_it_must_be() -> None:
    verdict = clean_history().verdict()
    assert not verdict.failures, verdict.failures
    summary = verdict.summary
    assert summary["repeats_explained_by"] == {"drain": 1, "row_lock": 1}
    assert summary["releases"] == 1
    assert summary["unclaims"] == 1
    assert set(summary["hostile"]) == set(HOSTILE_KINDS), "every hostile kind is checked"


def test_a_rescue_is_put_down_to_the_fault_behind_it() -> None:
    """The clean history's rescue follows a row lock; without it, nothing explains the lapse
    (a stall); with a SIGTERM of its worker instead, the drain left it unwritten."""
    h = clean_history()
    h.faults.clear()
    assert h.verdict().summary["repeats_explained_by"] == {"drain": 1, "stall": 1}
    h.faults.append(Fault("sigterm", T0 + 2.0, pid(W1), until=T0 + 9.0))
    assert h.verdict().summary["repeats_explained_by"] == {"drain": 1, "sigterm": 1}


def _release_handing_the_attempt_back(h: History) -> None:
    """What a release did before it counted the attempt: the same attempt runs twice."""
    job = h.job()
    h.ran(job, 1, 1.0, 4.0, "cancelled")
    h.sigterm_at[pid(W1)] = T0 + 2.0
    h.moved(job, "queued", 1, 4.1, RELEASED, new_attempts=0)
    h.succeeded(job, 1, 5.0, W2)


def _more_starts_than_max_attempts(h: History) -> None:
    job = h.job(state="dead", attempts=2, max_attempts=2, last_error="PlannedFailure")
    for attempt in (1, 2, 3):
        h.ran(job, attempt, attempt, attempt + 0.1, "fail")
        h.moved(job, "queued", attempt, attempt + 0.2, "PlannedFailure")


def _started_claim_handed_back(h: History) -> None:
    """A hand-back (orphans, a late claim) that took back an attempt whose handler ran."""
    job = h.job(attempts=2)
    h.ran(job, 1, 1.0, None, None)
    h.moved(job, "queued", 1, 2.0, new_attempts=0)
    h.succeeded(job, 2, 3.0, W2)


def _attempts_lowered_while_queued(h: History) -> None:
    job = h.job()
    h.moved(job, "queued", 1, 0.5, old_state="queued", new_attempts=0)
    h.succeeded(job, 1, 1.0)


def _success_failed_and_run_again(h: History) -> None:
    job = h.job(attempts=2)
    h.ran(job, 1, 1.0, 2.0, "ok")
    h.moved(job, "queued", 1, 2.1, "PlannedFailure: but the handler had succeeded")
    h.succeeded(job, 2, 3.0, W2)


def _success_run_again_unended(h: History) -> None:
    job = h.job(attempts=2)
    h.ran(job, 1, 1.0, 2.0, "ok")
    h.succeeded(job, 2, 3.0, W2)


def _released_without_sigterm(h: History) -> None:
    job = h.job(attempts=2)
    h.ran(job, 1, 1.0, 2.0, "cancelled", W3)
    h.moved(job, "queued", 1, 2.1, RELEASED, W3)
    h.succeeded(job, 2, 3.0, W2)


def _result_written_plainer(h: History) -> None:
    h.succeeded(h.job("soak_hostile", kind="nul_result", result=None), 1, 1.0)


def _result_altered_otherwise(h: History) -> None:
    result = json.dumps({"text": "before?after"})
    h.succeeded(h.job("soak_hostile", kind="surrogate_result", result=result), 1, 1.0)


def _result_job_dead(h: History) -> None:
    job = h.job("soak_hostile", "dead", 5, 5, last_error=RESCUED, kind="nul_result")
    for attempt in range(1, 6):
        h.ran(job, attempt, 10 * attempt, None, None)
        h.moved(job, "dead" if attempt == 5 else "queued", attempt, 10 * attempt + 9, RESCUED)
        h.faults.append(Fault("kill9", T0 + 10 * attempt + 1, pid(W1)))


def _deep_args_cut(h: History) -> None:
    h.succeeded(h.job("soak_hostile", kind="deep", levels=99, result="98"), 1, 1.0)


def _error_written_plainer(h: History) -> None:
    plain = ascii("ValueError: before\x00after")
    job = h.job("soak_hostile", "dead", 1, 1, last_error=plain, kind="nul_error")
    h.ran(job, 1, 1.0, 1.1, "fail")
    h.moved(job, "dead", 1, 1.2, plain)


def _error_never_written(h: History) -> None:
    """Each failure abandoned to its lease: the job dies of lease expiries, not its error."""
    job = h.job("soak_hostile", "dead", 3, 3, last_error=RESCUED, kind="system_exit")
    for attempt in (1, 2, 3):
        h.ran(job, attempt, 10 * attempt, 10 * attempt + 0.1, "fail")
        h.moved(job, "dead" if attempt == 3 else "queued", attempt, 10 * attempt + 9, RESCUED)


def _unknown_hostile_kind(h: History) -> None:
    h.succeeded(h.job("soak_hostile", kind="brand_new"), 1, 1.0)


def _too_deep_ran(h: History) -> None:
    job = h.job("soak_hostile", "dead", last_error="RecursionError", kind="too_deep", levels=5000)
    h.ran(job, 1, 1.0, 1.1, "fail")
    h.moved(job, "dead", 1, 1.2, "RecursionError: maximum recursion depth exceeded")


def _too_deep_succeeded(h: History) -> None:
    h.succeeded(h.job("soak_hostile", kind="too_deep", levels=5000, result="5000"), 1, 1.0)


def _worker_crashed(h: History) -> None:
    h.crashes.append("soak-w3 (pid 300) exited on its own with 1")


def _drain_not_clean(h: History) -> None:
    h.drain_problems.append("soak-w4 (pid 400) exited 1 on SIGTERM")


def _left_running(h: History) -> None:
    h.running_left = 1


BROKEN: dict[Callable[[History], None], set[str]] = {
    _release_handing_the_attempt_back: {
        "every repeat explained (concurrent only across a lease expiry)",
        "no job started more than max_attempts times, no attempt started twice",
        "attempts lowered only to hand back a claim never started",
    },
    _more_starts_than_max_attempts: {
        "no job started more than max_attempts times, no attempt started twice",
    },
    _started_claim_handed_back: {
        "every repeat explained (concurrent only across a lease expiry)",
        "attempts lowered only to hand back a claim never started",
    },
    _attempts_lowered_while_queued: {
        "attempts lowered only to hand back a claim never started",
    },
    _success_failed_and_run_again: {
        "every repeat explained (concurrent only across a lease expiry)",
        "no success run again without a cause (kill, stop, lock, lease expiry, release)",
    },
    _success_run_again_unended: {
        "every repeat explained (concurrent only across a lease expiry)",
        "no success run again without a cause (kill, stop, lock, lease expiry, release)",
    },
    _released_without_sigterm: {
        "every repeat explained (concurrent only across a lease expiry)",
    },
    _result_written_plainer: {
        "hostile results stored with U+FFFD in place; deep args arrive whole"
    },
    _result_altered_otherwise: {
        "hostile results stored with U+FFFD in place; deep args arrive whole"
    },
    _result_job_dead: {"hostile results stored with U+FFFD in place; deep args arrive whole"},
    _deep_args_cut: {"hostile results stored with U+FFFD in place; deep args arrive whole"},
    _error_written_plainer: {"hostile errors stored as the real error, U+FFFD in place"},
    _error_never_written: {"hostile errors stored as the real error, U+FFFD in place"},
    _unknown_hostile_kind: {"hostile errors stored as the real error, U+FFFD in place"},
    _too_deep_ran: {"args nested past any reader buried dead, never run"},
    _too_deep_succeeded: {"args nested past any reader buried dead, never run"},
    _worker_crashed: {
        "no worker exit but the injector's kill -9 and clean SIGTERM drains (exit 0)"
    },
    _drain_not_clean: {
        "no worker exit but the injector's kill -9 and clean SIGTERM drains (exit 0)"
    },
    _left_running: {"nothing left running after the drain"},
}


@pytest.mark.parametrize(
    ("history", "invariants"), list(BROKEN.items()), ids=[f.__name__[1:] for f in BROKEN]
)
def test_each_invariant_fails_on_the_history_it_exists_to_catch(
    history: Callable[[History], None], invariants: set[str]
) -> None:
    h = clean_history()
    history(h)
    verdict = h.verdict()
    assert failed(verdict) == invariants, verdict.failures


# ---------------------------------------------------------------------------------------------
# A short run
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_short_soak_loses_nothing_and_explains_every_repeat(tmp_path: Path) -> None:
    summary_path = tmp_path / "summary.json"
    # Its own embedded server: the soak needs a database to itself.
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.soak",
            *("--minutes", "0.35", "--rate", "40", "--seed", "5", "--hostile-share", "0.2"),
            *("--workers", "3", "--concurrency", "8"),
            *("--lease-seconds", "3", "--drain-seconds", "5", "--warmup", "2"),
            *("--kill-every", "7", "--stop-every", "0", "--term-every", "8"),
            *("--row-lock-every", "5", "--restart-every", "9", "--long-outage-every", "0"),
            *("--conn-kill-every", "6", "--conn-kill-kinds", "listener,worker"),
            *("--settle-seconds", "60", "--progress-every", "600"),
            *("--work-dir", str(tmp_path / "work"), "--summary-json", str(summary_path)),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=170,
    )
    output = f"{proc.stdout}\n{proc.stderr}"
    assert proc.returncode == 0, output[-8000:]

    table = proc.stdout
    assert re.search(r"^lost \(must be 0\)\s+0$", table, re.MULTILINE), table
    assert re.search(r"^repeats not explained \(must be 0\)\s+0$", table, re.MULTILINE), table
    assert "all invariants hold" in table

    figures = json.loads(summary_path.read_text())
    assert figures["lost"] == 0
    assert figures["repeats_unexplained"] == 0
    assert set(figures["committed_by_path"]) == {"HTTP API", "Python API", "plain SQL"}
    assert figures["committed"] >= 300
    faults = Counter(figures["faults"])
    assert min(faults[kind] for kind in ("kill9", "sigterm", "row_lock", "pg_restart_fast")) >= 1
    assert faults["conn_kill_listener"] >= 1
    assert "(no cause recorded)" not in figures["dead_causes"]
    # Every hostile kind was enqueued, and each defence it calls for was seen at work.
    assert set(figures["hostile"]) == set(HOSTILE_KINDS)
    events = figures["worker_events"]
    assert events["job_result_unstorable"] >= 1
    assert events["job_raised_base_exception"] >= 1
    assert events["job_dead_without_running"] >= 1

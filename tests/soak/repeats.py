"""Why a job ran again. The transition log says which change ended each claim and when;
the fault log says what made a lease expire. A repeat is explained only by a change that
ended the claim before the next one started, and only a lease expiry lets the two overlap.

The fault suite explains repeats from pids and worker logs; the soak, which has the exact
record of every change, holds them to this stricter account instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tests.faults.invariants import clock
from tests.soak.records import EPSILON, Fault, Run, RunFacts, Transition

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


@dataclass(frozen=True, slots=True)
class Stale:
    """A handler that started after its claim was already ended: its worker was stopped
    between the claim and the start, past the lease. Its writes are fenced, so it does not
    move the job; a rescue explains it, any other ending does not."""

    story: str
    cause: str | None  # a key of REPEAT_CAUSES; None: its claim was not rescued


def split_stale(
    j: Mapping[str, Any],
    runs: Sequence[Run],
    trans: Sequence[Transition],
    facts: RunFacts,
    where: str,
) -> tuple[list[Run], list[Stale]]:
    """The executions that moved the job, in order, and the stale ones, checked apart."""
    lease = facts.lease_seconds
    chain: list[Run] = []
    stale: list[Stale] = []
    for e in runs:
        ended = [t for t in trans if t.of(e) and t.at < e.started - EPSILON]
        gone = ended[-1] if ended else None
        if gone is None or any(
            t.claims(e) and gone.at <= t.at <= e.started + EPSILON for t in trans
        ):
            # Not ended before it started, or claimed again (by the same worker, at the same
            # attempt: a claim handed back unstarted takes its attempt back) since then.
            chain.append(e)
            continue
        fault = lease_cause(e.pid, j["id"], gone.at - lease, e.started, facts.faults, lease)
        story = (
            f"{where} attempt {e.attempt} on pid {e.pid} started {clock(e.started)}, after "
            f"its claim was ended by {gone.kind} at {clock(gone.at)} ({describe(fault)})"
        )
        stale.append(Stale(story, cause_key(fault) if gone.kind == "rescue" else None))
    return chain, stale


@dataclass(frozen=True, slots=True)
class Repeat:
    """Why one execution ran after another: a cause, a retry after a failure (neither), or
    a problem."""

    overlap: bool
    problem: str | None = None
    cause: str | None = None  # a key of REPEAT_CAUSES
    live_expiry: str | None = None  # a rescue of a worker not killed, stopped or locked out


def explain_repeat(
    job_id: int,
    e: Run,
    nxt: Run,
    trans: Sequence[Transition],
    facts: RunFacts,
    where: str,
) -> Repeat:
    """``nxt`` ran after ``e``: the change that ended ``e``'s claim must explain it."""
    overlap = e.ended is not None and e.ended > nxt.started
    ended_by = next((t for t in trans if t.ends(e)), None)
    what = f"{where} attempt {e.attempt} on pid {e.pid}"

    def problem(text: str) -> Repeat:
        return Repeat(overlap, problem=f"{what}: {text}")

    if nxt.attempt <= e.attempt:
        return problem(f"attempt {nxt.attempt} started after it (every start counts)")
    if ended_by is None:
        return problem("ran again, yet no state change ended that attempt")
    if ended_by.at > nxt.started + EPSILON:
        return problem(
            f"attempt {nxt.attempt} started {ended_by.at - nxt.started:.3f}s "
            f"before this attempt was ended ({ended_by.kind})"
        )
    if overlap and ended_by.kind != "rescue":
        # Both handlers ran at once: only a lease expiry may allow that.
        return problem(f"overlapped the next attempt ({ended_by.kind})")
    if ended_by.kind == "failure":
        if e.outcome == "ok":
            return problem("its handler succeeded, yet it was failed")
        return Repeat(overlap)
    if ended_by.kind == "rescue":
        lease = facts.lease_seconds
        cause = cause_key(lease_cause(e.pid, job_id, e.started, ended_by.at, facts.faults, lease))
        live = None
        if cause in ("pg", "conn_kill", "sigterm", "stall"):
            live = (
                f"{what} [{REPEAT_CAUSES[cause]}]: started {clock(e.started)}, "
                f"ended {clock(e.ended)} ({e.outcome}), lease until "
                f"{clock(ended_by.old_locked_until)}, rescued {clock(ended_by.at)}, "
                f"next start {clock(nxt.started)}"
            )
        return Repeat(overlap, cause=cause, live_expiry=live)
    if ended_by.kind == "release":
        sigterm = facts.sigterm_at.get(e.pid)
        if sigterm is not None and sigterm <= ended_by.at + EPSILON:
            return Repeat(overlap, cause="drain")
        return problem("released while it ran, with no SIGTERM")
    if ended_by.kind == "unclaim":
        return problem("its claim was handed back uncounted after its handler started")
    return problem(f"ran again after {ended_by.kind}")

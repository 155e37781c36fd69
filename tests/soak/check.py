"""The soak's checks of each job it enqueued. What the fault suite checks of a row and its
executions (finished, every start counted, no start after success) is its checker's
(``tests/faults/invariants.py``); the rest needs what only the soak has: the ledger of what
the enqueuers were told, the transition log, the hostile kinds and the app's own tables.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.faults.invariants import (
    FINISHED,
    check_counted,
    check_finished,
    check_started_after_finish,
    clock,
)
from tests.soak.hostile import HOSTILE_TASK, check_burial, check_errors, check_result
from tests.soak.records import Ledger, Run, RunFacts, Tables, Transition
from tests.soak.repeats import explain_repeat, split_stale


@dataclass
class Enqueued:
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


def reconcile(tables: Tables, run: str, ledger: Ledger) -> Enqueued:
    """The ledger against the table: each marker found (a job's own, a report's
    Idempotency-Key, a user's e-mail) is a committed enqueue."""
    found = Enqueued()
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


@dataclass
class Findings:
    """What the per-job checks found: the problems of each invariant, and the figures."""

    # Checked by the fault suite's checker.
    not_finished: list[str] = field(default_factory=list)
    uncounted: list[str] = field(default_factory=list)
    after_success: list[str] = field(default_factory=list)
    # Checked against the transition log, the ledger, the hostile kinds, the app's tables.
    left_final: list[str] = field(default_factory=list)
    unbacked: list[str] = field(default_factory=list)
    lowered: list[str] = field(default_factory=list)
    unexplained: list[str] = field(default_factory=list)
    lease_not_expired: list[str] = field(default_factory=list)
    success_twice: list[str] = field(default_factory=list)
    missing_effects: list[str] = field(default_factory=list)
    bad_results: list[str] = field(default_factory=list)
    bad_errors: list[str] = field(default_factory=list)
    not_buried: list[str] = field(default_factory=list)
    # For the table and its notes.
    states: Counter[str] = field(default_factory=Counter)
    dead_causes: Counter[str] = field(default_factory=Counter)
    explained: Counter[str] = field(default_factory=Counter)
    success_repeats: Counter[str] = field(default_factory=Counter)
    hostile: defaultdict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    live_expiries: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    raised_after_commit: list[str] = field(default_factory=list)
    retries_after_failure: int = 0
    concurrent: int = 0
    releases: int = 0
    releases_unstarted: int = 0
    unclaims: int = 0
    waits: list[tuple[float, int]] = field(default_factory=list)

    @property
    def unfinished(self) -> int:
        return sum(n for state, n in self.states.items() if state not in FINISHED)


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


def check_left_final(trans: Sequence[Transition], where: str) -> list[str]:
    """A job that succeeded, died or was cancelled stays so."""
    return [f"{where}: {t.kind} at {clock(t.at)}" for t in trans if t.old_state in FINISHED]


def check_rescued_early(trans: Sequence[Transition], where: str) -> list[str]:
    """A rescue takes back only a lease that has run out."""
    return [
        f"{where}: rescued {t.old_locked_until - t.at:.2f}s early"
        for t in trans
        if t.kind == "rescue" and t.old_locked_until is not None and t.old_locked_until > t.at
    ]


def check_lowered(trans: Sequence[Transition], runs: Sequence[Run], where: str) -> list[str]:
    """Attempts go down only to hand back a claim whose handler never started."""
    bad = []
    for t in trans:
        if t.kind == "unclaim":
            ran = next((e for e in runs if t.ends(e)), None)
            if ran is not None:
                bad.append(
                    f"{where}: attempt {t.old_attempts} handed back uncounted at "
                    f"{clock(t.at)}, though its handler started at {clock(ran.started)} "
                    f"on pid {ran.pid}"
                )
        elif t.new_attempts < t.old_attempts:
            bad.append(
                f"{where}: attempts {t.old_attempts} -> {t.new_attempts} ({t.kind}) "
                f"at {clock(t.at)}"
            )
    return bad


def _completion(
    runs: Sequence[Run], trans: Sequence[Transition]
) -> tuple[list[Transition], list[Run]]:
    """The completions, and the executions of the claim the first one ended."""
    completes = [t for t in trans if t.kind == "complete"]
    return completes, [e for e in runs if completes and completes[0].ends(e)]


def check_backed(
    j: Mapping[str, Any], runs: Sequence[Run], trans: Sequence[Transition], where: str
) -> list[str]:
    """One completion, by a claim whose handler ran; for the soak's own tasks, which the
    worker completes after the handler returned, one whose handler succeeded."""
    completes, owners = _completion(runs, trans)
    if len(completes) != 1 or not owners:
        return [
            f"{where}: {len(completes)} completion(s), "
            f"{len(owners)} execution(s) of the completing claim"
        ]
    if j["task"].startswith("soak_") and not any(e.outcome == "ok" for e in owners):
        return [f"{where}: completed, yet its handler did not succeed"]
    return []


def raised_after_commit(
    j: Mapping[str, Any], runs: Sequence[Run], trans: Sequence[Transition], where: str
) -> list[str]:
    """An app task completed inside its own transaction (ctx.transaction()) whose handler
    then raised: an error after the COMMIT still reaches the handler. Allowed, and noted."""
    completes, owners = _completion(runs, trans)
    if len(completes) != 1 or not owners or j["task"].startswith("soak_"):
        return []
    if all(e.outcome == "fail" for e in owners):
        return [
            f"{where} attempt {owners[0].attempt} on pid {owners[0].pid}: committed "
            f"its completion at {clock(completes[0].at)}, then its handler raised"
        ]
    return []


def check_effects(
    j: Mapping[str, Any], tables: Tables, enqueued: Enqueued, where: str
) -> list[str]:
    """A succeeded app job did what it is for: a report done, an e-mail sent."""
    status = enqueued.report_status.get(j["id"])
    if j["task"] == "generate_report" and status != "done":
        return [f"{where}: report status {status}"]
    if j["task"] == "send_welcome_email" and j["id"] not in tables.sent:
        return [f"{where}: no sent_emails row"]
    return []


def _repeats(
    j: Mapping[str, Any],
    runs: Sequence[Run],
    trans: Sequence[Transition],
    facts: RunFacts,
    where: str,
    found: Findings,
) -> None:
    """Every execution after the first explained, stale ones apart."""
    chain, stale = split_stale(j, runs, trans, facts, where)
    for s in stale:
        if s.cause is None:
            found.unexplained.append(f"{s.story}: a handler ran for a claim it had given back")
        else:
            found.explained[s.cause] += 1
            found.stale.append(s.story)
    for e, nxt in itertools.pairwise(chain):
        r = explain_repeat(j["id"], e, nxt, trans, facts, where)
        found.concurrent += r.overlap
        if r.live_expiry is not None:
            found.live_expiries.append(r.live_expiry)
        if r.problem is not None:
            found.unexplained.append(r.problem)
            if e.outcome == "ok":
                found.success_twice.append(r.problem)
        elif r.cause is not None:
            found.explained[r.cause] += 1
            if e.outcome == "ok":
                found.success_repeats[r.cause] += 1
        else:
            found.retries_after_failure += 1


def _hostile(
    j: Mapping[str, Any],
    runs: Sequence[Run],
    trans: Sequence[Transition],
    where: str,
    found: Findings,
) -> None:
    kind, state = j["kind"], j["state"]
    found.hostile[kind][state] += 1
    what = f"{where} {kind}: {state}"
    found.bad_results += check_result(j, what)
    found.not_buried += check_burial(j, runs, what)
    found.bad_errors += check_errors(j, trans, what)


def check_job(
    j: Mapping[str, Any], tables: Tables, facts: RunFacts, enqueued: Enqueued, found: Findings
) -> None:
    jid, state = j["id"], j["state"]
    runs = sorted(tables.executions.get(jid, []), key=lambda e: e.started)
    trans = tables.transitions.get(jid, [])
    where = f"job {jid} ({j['task']}, {enqueued.path_of[jid]})"
    found.states[state] += 1
    if runs:
        found.waits.append((runs[0].started - j["created_at"].timestamp(), jid))
    if state == "dead":
        found.dead_causes[error_group(j["last_error"])] += 1
    found.not_finished += check_finished(j)
    found.uncounted += check_counted(j, runs)
    found.left_final += check_left_final(trans, where)
    found.lease_not_expired += check_rescued_early(trans, where)
    found.lowered += check_lowered(trans, runs, where)
    for t in trans:
        if t.kind == "release":
            found.releases += 1
            found.releases_unstarted += not any(t.ends(e) for e in runs)
        elif t.kind == "unclaim":
            found.unclaims += 1
    _repeats(j, runs, trans, facts, where, found)
    if state == "succeeded":
        # Stale handlers included: after a success, not even a fenced one may start.
        found.after_success += check_started_after_finish(j, runs)[0]
        found.unbacked += check_backed(j, runs, trans, where)
        found.raised_after_commit += raised_after_commit(j, runs, trans, where)
        found.missing_effects += check_effects(j, tables, enqueued, where)
    if j["task"] == HOSTILE_TASK:
        _hostile(j, runs, trans, where, found)


def check_jobs(tables: Tables, facts: RunFacts, enqueued: Enqueued) -> Findings:
    """Every job of the run, by the marker that says it was enqueued in it."""
    found = Findings()
    for j in tables.jobs:
        if j["id"] in enqueued.path_of:
            check_job(j, tables, facts, enqueued, found)
    return found

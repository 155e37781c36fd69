"""The soak's verdict: the figures of the run, then every invariant, as a table.

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

import statistics
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TextIO

from tests.soak.check import Enqueued, Findings, check_jobs, reconcile
from tests.soak.records import RunFacts, Tables, read_tables
from tests.soak.repeats import REPEAT_CAUSES

# Sub-paths of the three enqueue paths; the marker of each job says which one it took.
PATHS = {
    "http-report": "HTTP API",
    "http-signup": "HTTP API",
    "python-many": "Python API",
    "python-one": "Python API",
    "sql-keyed": "plain SQL",
    "sql-bare": "plain SQL",
}

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


def lost(found: Findings, enqueued: Enqueued) -> int:
    return found.unfinished + len(enqueued.acked_absent) + len(enqueued.orphan_rows)


def _enqueue_rows(v: Verdict, facts: RunFacts, enqueued: Enqueued) -> None:
    ledger = facts.ledger
    committed = len(enqueued.path_of)
    by_path = Counter(PATHS.get(p, p) for p in enqueued.path_of.values())
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
    unknown = enqueued.unknown
    v.row("enqueues interrupted by a fault", sum(ledger.recovered.values()) + len(unknown))
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


def _outcome_rows(v: Verdict, tables: Tables, found: Findings) -> None:
    states = found.states
    v.row("succeeded", states["succeeded"])
    v.row("dead", states["dead"])
    for cause, n in found.dead_causes.most_common():
        v.row(f"  {cause}", n)
    v.row("cancelled", states["cancelled"])
    if found.unfinished:
        v.row("still queued or running", found.unfinished)
    v.row("hostile jobs (final states)", sum(sum(c.values()) for c in found.hostile.values()))
    for kind, ends in sorted(found.hostile.items()):
        v.row(f"  {kind}", ", ".join(f"{s} {n}" for s, n in sorted(ends.items())))
    runs = [e for x in tables.executions.values() for e in x]
    v.row("executions (handler runs in the execution log)", len(runs))
    v.row("  retries after a failed attempt (not repeats)", found.retries_after_failure)
    v.row("  cut short (no end recorded: its worker died)", sum(e.ended is None for e in runs))
    v.row(
        "  stopped by their worker (SIGTERM drain, lease guard)",
        sum(e.outcome == "cancelled" for e in runs),
    )
    v.row("  overlapping a later execution of the same job", found.concurrent)
    v.row("  completed in their own transaction, then raised", len(found.raised_after_commit))
    v.row("releases by a SIGTERM drain (attempt counted)", found.releases)
    v.row("  of claims whose handler had not started", found.releases_unstarted)
    v.row("claims handed back unstarted (attempt taken back)", found.unclaims)


def _repeat_rows(v: Verdict, found: Findings, enqueued: Enqueued) -> None:
    v.row("repeats explained by a crash, stop, lock or lease expiry", sum(found.explained.values()))
    for cause, label in REPEAT_CAUSES.items():
        if found.explained[cause]:
            v.row(f"  {label}", found.explained[cause])
    v.row("  (of which started only after their lease was lost)", len(found.stale))
    v.row("  successes run again, each for such a cause", sum(found.success_repeats.values()))
    v.row("repeats not explained (must be 0)", len(found.unexplained))
    v.row("lost (must be 0)", lost(found, enqueued))
    if lost(found, enqueued):
        v.row("  committed but not finished", found.unfinished)
        v.row("  acknowledged but not in the table", len(enqueued.acked_absent))
        v.row("  a report or user without its job", len(enqueued.orphan_rows))


def _fault_rows(v: Verdict, facts: RunFacts) -> None:
    fault_counts = Counter(f.kind for f in facts.faults)
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


def _latency_rows(v: Verdict, facts: RunFacts, found: Findings, enqueued: Enqueued) -> None:
    waits = sorted(found.waits)
    if waits:
        p50 = statistics.median(w for w, _ in waits)
        p99 = waits[min(len(waits) - 1, int(len(waits) * 0.99))][0]
        top, top_job = waits[-1]
        v.row(
            "max time from enqueue to start",
            f"{top:.2f} s (job {top_job}, {enqueued.path_of[top_job]}; "
            f"p50 {p50:.3f} s, p99 {p99:.2f} s)",
        )
    ledger = facts.ledger
    v.row("enqueue errors retried", sum(ledger.errors.values()))
    for what, n in ledger.errors.most_common(8):
        v.row(f"  {what}", n)


def _invariant_rows(
    v: Verdict, tables: Tables, facts: RunFacts, found: Findings, enqueued: Enqueued
) -> None:
    v.row("invariants")
    v.invariant(
        "every committed job finished: succeeded, dead with a cause, cancelled",
        found.not_finished + ([] if facts.settled else ["the queue did not empty"]),
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
        found.after_success + found.left_final,
    )
    v.invariant(
        "every repeat explained (concurrent only across a lease expiry)",
        found.unexplained + found.lease_not_expired,
    )
    v.invariant(
        "no success run again without a cause (kill, stop, lock, lease expiry, release)",
        found.success_twice,
    )
    v.invariant("every success written by the attempt whose handler succeeded", found.unbacked)
    v.invariant(
        "no job started more than max_attempts times, no attempt started twice", found.uncounted
    )
    v.invariant("attempts lowered only to hand back a claim never started", found.lowered)
    v.invariant(
        "nothing left running after the drain",
        [f"{tables.running_left} running"] if tables.running_left else [],
    )
    v.invariant(
        "hostile results stored with U+FFFD in place; deep args arrive whole", found.bad_results
    )
    v.invariant("hostile errors stored as the real error, U+FFFD in place", found.bad_errors)
    v.invariant("args nested past any reader buried dead, never run", found.not_buried)
    v.invariant("every succeeded app job has its effect (report, e-mail)", found.missing_effects)
    v.invariant(
        "no worker exit but the injector's kill -9 and clean SIGTERM drains (exit 0)",
        facts.crashes + facts.drain_problems,
    )
    v.invariant("no HTTP request refused", facts.ledger.rejected)


def _summary(
    v: Verdict, tables: Tables, facts: RunFacts, found: Findings, enqueued: Enqueued
) -> dict[str, Any]:
    waits = sorted(found.waits)
    return {
        "committed": len(enqueued.path_of),
        "committed_by_path": dict(Counter(PATHS.get(p, p) for p in enqueued.path_of.values())),
        "succeeded": found.states["succeeded"],
        "dead": found.states["dead"],
        "dead_causes": dict(found.dead_causes),
        "cancelled": found.states["cancelled"],
        "hostile": {kind: dict(ends) for kind, ends in found.hostile.items()},
        "executions": sum(len(x) for x in tables.executions.values()),
        "retries_after_failure": found.retries_after_failure,
        "releases": found.releases,
        "unclaims": found.unclaims,
        "repeats_explained": sum(found.explained.values()),
        "repeats_explained_by": dict(found.explained),
        "success_repeats_by": dict(found.success_repeats),
        "repeats_unexplained": len(found.unexplained),
        "lost": lost(found, enqueued),
        "faults": dict(Counter(f.kind for f in facts.faults)),
        "worker_events": {event: facts.worker_events[event] for event in WORKER_EVENTS},
        "max_enqueue_to_start": waits[-1][0] if waits else None,
        "ok": not v.failures,
    }


def judge(tables: Tables, facts: RunFacts) -> Verdict:
    """The verdict on what the tables hold: the figures, then every invariant."""
    enqueued = reconcile(tables, facts.run, facts.ledger)
    found = check_jobs(tables, facts, enqueued)
    v = Verdict()
    _enqueue_rows(v, facts, enqueued)
    _outcome_rows(v, tables, found)
    _repeat_rows(v, found, enqueued)
    _fault_rows(v, facts)
    _latency_rows(v, facts, found, enqueued)
    _invariant_rows(v, tables, facts, found, enqueued)
    v.notes += [
        f"repeat after a lease expiry of a live worker: {x}" for x in found.live_expiries[:10]
    ]
    v.notes += [f"stale execution: {x}" for x in found.stale[:10]]
    v.notes += [f"raised after its commit: {x}" for x in found.raised_after_commit[:10]]
    v.summary.update(_summary(v, tables, facts, found, enqueued))
    return v


async def check(url: str, facts: RunFacts) -> Verdict:
    return judge(await read_tables(url, facts), facts)


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

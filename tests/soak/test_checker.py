"""The soak's checker judged on crafted histories: each invariant shown to fail on the
history it exists to catch, and the clean history passing. Those it shares with the fault
suite (a job finished, every start counted, no start after success) are checked here as the
soak routes them, on its own records."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from tests.soak.history import (
    RELEASED,
    RESCUED,
    RUN,
    T0,
    W1,
    W2,
    W3,
    History,
    clean_history,
    failed,
    pid,
)
from tests.soak.records import Fault
from tests.soak.tasks import HOSTILE_KINDS

# The slow tier (`make test-slow`), with the short soak run these checks are for.
pytestmark = pytest.mark.slow

FINISHED = "every committed job finished: succeeded, dead with a cause, cancelled"
IN_TABLE = "every acknowledged enqueue is in the table, with its domain row"
NO_PHANTOM = "no job from a rolled-back enqueue, no duplicate per key"
AFTER_SUCCESS = "no execution after success; no job left a final state"
EXPLAINED = "every repeat explained (concurrent only across a lease expiry)"
SUCCESS_TWICE = "no success run again without a cause (kill, stop, lock, lease expiry, release)"
BACKED = "every success written by the attempt whose handler succeeded"
COUNTED = "no job started more than max_attempts times, no attempt started twice"
LOWERED = "attempts lowered only to hand back a claim never started"
RUNNING_LEFT = "nothing left running after the drain"
RESULTS = "hostile results stored with U+FFFD in place; deep args arrive whole"
ERRORS = "hostile errors stored as the real error, U+FFFD in place"
BURIED = "args nested past any reader buried dead, never run"
EFFECTS = "every succeeded app job has its effect (report, e-mail)"
EXITS = "no worker exit but the injector's kill -9 and clean SIGTERM drains (exit 0)"
HTTP = "no HTTP request refused"


def test_the_checker_passes_every_story_told_as_it_must_be() -> None:
    verdict = clean_history().verdict()
    assert not verdict.failures, verdict.failures
    summary = verdict.summary
    assert summary["repeats_explained_by"] == {"drain": 1, "row_lock": 1}
    assert summary["releases"] == 1
    assert summary["unclaims"] == 2
    assert set(summary["hostile"]) == set(HOSTILE_KINDS), "every hostile kind is checked"
    assert set(summary["committed_by_path"]) == {"HTTP API", "Python API"}


def test_a_rescue_is_put_down_to_the_fault_behind_it() -> None:
    """The clean history's rescue follows a row lock; without it, nothing explains the lapse
    (a stall); with a SIGTERM of its worker instead, the drain left it unwritten."""
    h = clean_history()
    h.faults.clear()
    assert h.verdict().summary["repeats_explained_by"] == {"drain": 1, "stall": 1}
    h.faults.append(Fault("sigterm", T0 + 2.0, pid(W1), until=T0 + 9.0))
    assert h.verdict().summary["repeats_explained_by"] == {"drain": 1, "sigterm": 1}


def _left_queued(h: History) -> None:
    h.job(state="queued", attempts=0)


def _dead_without_cause(h: History) -> None:
    h.job(state="dead", last_error="  ")


def _finished_but_still_locked(h: History) -> None:
    job = h.job()
    h.succeeded(job, 1, 1.0)
    h.jobs[job - 1]["locked_by"] = W1


def _queue_never_emptied(h: History) -> None:
    h.settled = False


def _acknowledged_but_absent(h: History) -> None:
    h.ledger.status[f"{RUN}:python-one:999"] = "acked"


def _report_without_its_job(h: History) -> None:
    h.reports.append({"idempotency_key": f"{RUN}-r999", "job_id": 999, "status": "pending"})


def _rolled_back_yet_committed(h: History) -> None:
    job = h.job()
    h.succeeded(job, 1, 1.0)
    h.ledger.status[f"{RUN}:python-one:{job}"] = "rolled_back"


def _two_jobs_for_one_key(h: History) -> None:
    first, second = h.job(), h.job()
    for job in (first, second):
        h.succeeded(job, 1, 1.0)
    del h.ledger.status[h.jobs[second - 1]["marker"]]
    h.jobs[second - 1]["marker"] = h.jobs[first - 1]["marker"]


def _stale_run_after_success(h: History) -> None:
    """A worker stopped between its claim and its handler's start wakes after the job was
    rescued and succeeded elsewhere: a zombie to the fault suite, a finding to the soak."""
    job = h.job(attempts=2)
    h.faults.append(Fault("sigstop", T0 + 0.5, pid(W1), until=T0 + 12.0))
    h.moved(job, "queued", 1, 9.5, RESCUED)
    h.succeeded(job, 2, 10.0, W2)
    h.ran(job, 1, 12.0, 12.1, "lease_lost")


def _left_a_final_state(h: History) -> None:
    job = h.job()
    h.succeeded(job, 1, 1.0)
    h.moved(job, "queued", 1, 5.0, old_state="succeeded")


def _completed_twice(h: History) -> None:
    job = h.job()
    h.succeeded(job, 1, 1.0)
    h.moved(job, "succeeded", 1, 3.0)


def _completed_though_its_handler_failed(h: History) -> None:
    job = h.job()
    h.ran(job, 1, 1.0, 2.0, "fail")
    h.moved(job, "succeeded", 1, 2.1)


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


def _run_after_its_claim_handed_back(h: History) -> None:
    """A worker hands back a claim as orphaned, then runs it anyway: no claim since."""
    job = h.job()
    h.moved(job, "queued", 1, 1.0, new_attempts=0)
    h.succeeded(job, 1, 2.0)


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


def _report_never_done(h: History) -> None:
    h.succeeded(h.report(status="pending"), 1, 1.0)


def _worker_crashed(h: History) -> None:
    h.crashes.append("soak-w3 (pid 300) exited on its own with 1")


def _drain_not_clean(h: History) -> None:
    h.drain_problems.append("soak-w4 (pid 400) exited 1 on SIGTERM")


def _left_running(h: History) -> None:
    h.running_left = 1


def _http_request_refused(h: History) -> None:
    h.ledger.rejected.append("/signup 422 value is not a valid email address")


BROKEN: dict[Callable[[History], None], set[str]] = {
    _left_queued: {FINISHED},
    _dead_without_cause: {FINISHED},
    _finished_but_still_locked: {FINISHED},
    _queue_never_emptied: {FINISHED},
    _acknowledged_but_absent: {IN_TABLE},
    _report_without_its_job: {IN_TABLE},
    _rolled_back_yet_committed: {NO_PHANTOM},
    _two_jobs_for_one_key: {NO_PHANTOM},
    _stale_run_after_success: {AFTER_SUCCESS},
    _left_a_final_state: {AFTER_SUCCESS},
    _completed_twice: {BACKED},
    _completed_though_its_handler_failed: {BACKED},
    _release_handing_the_attempt_back: {EXPLAINED, COUNTED, LOWERED},
    _more_starts_than_max_attempts: {COUNTED},
    _started_claim_handed_back: {EXPLAINED, LOWERED},
    _run_after_its_claim_handed_back: {EXPLAINED},
    _attempts_lowered_while_queued: {LOWERED},
    _success_failed_and_run_again: {EXPLAINED, SUCCESS_TWICE},
    _success_run_again_unended: {EXPLAINED, SUCCESS_TWICE},
    _released_without_sigterm: {EXPLAINED},
    _result_written_plainer: {RESULTS},
    _result_altered_otherwise: {RESULTS},
    _result_job_dead: {RESULTS},
    _deep_args_cut: {RESULTS},
    _error_written_plainer: {ERRORS},
    _error_never_written: {ERRORS},
    _unknown_hostile_kind: {ERRORS},
    _too_deep_ran: {BURIED},
    _too_deep_succeeded: {BURIED},
    _report_never_done: {EFFECTS},
    _worker_crashed: {EXITS},
    _drain_not_clean: {EXITS},
    _left_running: {RUNNING_LEFT},
    _http_request_refused: {HTTP},
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


def test_every_invariant_has_a_history_it_fails_on() -> None:
    checked = set(clean_history().verdict().summary["invariants"])
    assert set().union(*BROKEN.values()) == checked

"""Faults of the user's code: handlers that hang past their timeout (awaiting, or in a
thread), a handler that blocks the event loop past the lease, stopping the heartbeat of
every job of its worker, and handlers whose outcome the database would refuse or that raise
what is not an Exception."""

from __future__ import annotations

import asyncio
import functools
import json
import signal
import time
from collections.abc import Callable

import asyncpg
import pytest

from tests.conftest import WorkerProcess, wait_until
from tests.faults.harness import (
    CALM,
    STEADY,
    busy_pids,
    insert_jobs,
    insert_mixed,
    insert_sleepy,
    settle,
    stale_attempts_ended,
    stop_workers,
)
from tests.faults.invariants import check_invariants, log_events

# The slow tier (`make test-slow`): processes, servers and builds, minutes in all.
pytestmark = pytest.mark.slow


async def _runs(pool: asyncpg.Pool, pid: int, jobs: list[int]) -> bool:
    return set(jobs) <= set((await busy_pids(pool)).get(pid, []))


async def test_handlers_hanging_past_their_timeout_go_dead_and_block_nothing(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    worker = spawn_worker(*CALM, "--concurrency", "2")  # the timeouts are the only fault
    await worker.wait_for_log("worker_ready")
    hanging = await insert_jobs(pool, "hangs", 4, max_attempts=2)
    in_threads = await insert_jobs(pool, "hangs_in_thread", 2, '{"seconds": 1.5}', max_attempts=2)
    quick = await insert_jobs(pool, "echo", 20)
    await settle(pool, timeout=60)
    assert worker.proc.poll() is None, worker.output()[-3000:]

    rows = await pool.fetch(
        "SELECT id, state, attempts, last_error FROM outbox_jobs WHERE id = ANY($1::bigint[])",
        [*hanging, *in_threads],
    )
    for row in rows:
        assert row["state"] == "dead", dict(row)
        assert row["attempts"] == 2, dict(row)
        assert row["last_error"].startswith("TimeoutError"), dict(row)
        assert "timeout of 0.5s" in row["last_error"], dict(row)
    ran = await pool.fetch(
        "SELECT job_id, array_agg(attempt ORDER BY attempt) AS attempts FROM test_executions "
        "WHERE job_id = ANY($1::bigint[]) GROUP BY job_id",
        [*hanging, *in_threads],
    )
    assert {r["job_id"]: r["attempts"] for r in ran} == {j: [1, 2] for j in hanging + in_threads}

    await stop_workers([worker])
    report = await check_invariants(pool, workers=[worker], expected_ids=hanging + in_threads)
    assert report.states == {"dead": len(hanging) + len(in_threads), "succeeded": len(quick)}
    assert report.repeats == {"failed": len(hanging) + len(in_threads)}


async def test_sigterm_is_not_held_up_by_a_timed_out_handlers_thread(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    """The timeout gave up on the handler, but its thread sleeps on: the worker must still
    exit within its drain timeout when told to stop, not when the stray thread is done."""
    worker = spawn_worker(*CALM, "--drain-timeout-seconds", "1")
    await worker.wait_for_log("worker_ready")
    job_ids = await insert_jobs(pool, "hangs_in_thread", 1, '{"seconds": 12}', max_attempts=2)
    await settle(pool, timeout=30)  # both attempts timed out: two threads sleep on
    worker.signal(signal.SIGTERM)
    started = time.monotonic()
    code = await asyncio.to_thread(worker.wait, 30)
    took = time.monotonic() - started
    assert code == 0, worker.output()[-3000:]
    report = await check_invariants(pool, workers=[worker], expected_ids=job_ids)
    assert report.states == {"dead": 1}
    # Generous: the drain timeout is 1 s, the stray threads sleep for 12.
    assert took < 7, f"the worker took {took:.1f}s to exit after SIGTERM"


async def test_handler_blocking_the_event_loop_past_the_lease(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    """The blocked worker's heartbeat cannot run: the watchdog says so, with the jobs at
    stake; another worker rescues and finishes them; the blocked worker's late completions
    change nothing, and it lives on."""
    a = spawn_worker(
        "--lease-seconds", "1.5", "--poll-interval-seconds", "0.2", "--concurrency", "3"
    )
    await a.wait_for_log("worker_ready")
    sleepers = await insert_sleepy(pool, 2, 2.0)
    await wait_until(functools.partial(_runs, pool, a.pid, sleepers), what="A to start them")
    [blocker] = await insert_jobs(pool, "blocks_loop_once", 1, '{"seconds": 6}')
    await wait_until(functools.partial(_runs, pool, a.pid, [blocker]), what="A to block")
    b = spawn_worker(*STEADY, "--concurrency", "3")
    jobs = [*sleepers, blocker]

    async def finished_by_b() -> bool:
        n = await pool.fetchval(
            "SELECT count(*) FROM outbox_jobs j WHERE j.id = ANY($1::bigint[]) "
            "AND j.state = 'succeeded' AND EXISTS (SELECT 1 FROM test_executions e "
            "WHERE e.job_id = j.id AND e.attempt = j.attempts AND e.pid = $2)",
            jobs,
            b.pid,
        )
        return bool(n == len(jobs))

    await wait_until(finished_by_b, timeout=30, what="B to finish the jobs of blocked A")
    await a.wait_for_log("event_loop_unblocked", timeout=20)

    await wait_until(
        functools.partial(stale_attempts_ended, a, jobs),
        timeout=20,
        what="A's late completions to be refused, or its handlers stopped",
    )
    blocked = log_events(a, "event_loop_blocked")
    assert blocked, a.output()[-3000:]
    assert blocked[0]["level"] == "error"
    assert set(jobs) <= set(blocked[0]["jobs"]), blocked
    assert set(jobs) <= {e["job_id"] for e in log_events(b, "job_rescued")}

    await settle(pool, timeout=20)
    assert a.proc.poll() is None, a.output()[-3000:]
    await stop_workers([a, b])
    report = await check_invariants(pool, workers=[a, b], stalled=[a.pid], expected_ids=jobs)
    assert report.states == {"succeeded": len(jobs)}
    assert report.repeats["stalled"] == len(jobs)
    # Once A's loop is back, each of its sleepers either ends on its own, beside B's new
    # attempt (an overlap the stall excuses), or is stopped first by the guard because its
    # lease has lapsed: which comes first is up to the event loop.
    stopped = {e["job_id"] for e in log_events(a, "job_stopped_lease_lapsing")}
    assert report.overlaps + len(stopped & set(sleepers)) >= len(sleepers), (report, stopped)
    rows = await pool.fetch("SELECT attempts FROM outbox_jobs WHERE id = ANY($1::bigint[])", jobs)
    assert [r["attempts"] for r in rows] == [2] * len(jobs)


# ---------------------------------------------------------------------------------------------
# One bad job never harms the others: outcomes the database would refuse, handlers that raise
# what is not an Exception. Each job's executions are counted: a job whose batch-mates were
# harmed would run again (its attempts counted, or, worse, not).
# ---------------------------------------------------------------------------------------------


async def _runs_per_job(pool: asyncpg.Pool, jobs: list[int]) -> dict[int, list[int]]:
    rows = await pool.fetch(
        "SELECT job_id, array_agg(attempt ORDER BY seq) AS attempts FROM test_executions "
        "WHERE job_id = ANY($1::bigint[]) GROUP BY job_id",
        jobs,
    )
    return {r["job_id"]: list(r["attempts"]) for r in rows}


async def _rows_by_id(pool: asyncpg.Pool, jobs: list[int]) -> dict[int, asyncpg.Record]:
    rows = await pool.fetch(
        "SELECT id, state, attempts, result::text AS result, last_error FROM outbox_jobs "
        "WHERE id = ANY($1::bigint[])",
        jobs,
    )
    return {r["id"]: r for r in rows}


async def test_results_the_database_would_refuse_cost_nothing_to_their_batch(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    """A NUL or a lone surrogate in a result used to fail the statement that wrote the whole
    batch; the worker then handed the batch's jobs back uncounted, and they ran again and
    again. Now the value is made storable, and every job of the batch runs once."""
    worker = spawn_worker(*CALM, "--concurrency", "10")
    await worker.wait_for_log("worker_ready")
    kinds = ["nul_result", "surrogate_result", "not_json"]
    jobs = await insert_mixed(
        pool,
        [("hostile", {"kind": kind}) for kind in kinds] + [("echo", {"n": n}) for n in range(6)],
    )
    await settle(pool, timeout=30)
    await stop_workers([worker])

    assert await _runs_per_job(pool, jobs) == {job_id: [1] for job_id in jobs}
    rows = await _rows_by_id(pool, jobs)
    assert {(r["state"], r["attempts"]) for r in rows.values()} == {("succeeded", 1)}
    nul, surrogate, not_json = (rows[job_id]["result"] for job_id in jobs[:3])
    assert json.loads(nul) == {"a": "x\ufffdy"}
    assert json.loads(surrogate) == {"a": "x\ufffdy"}
    assert not_json is None
    # Neither altered nor missing without a word.
    assert {e["job_id"] for e in log_events(worker, "job_result_unstorable")} == set(jobs[:3])
    await check_invariants(pool, workers=[worker], expected_ids=jobs)


async def test_errors_the_database_would_refuse_cost_nothing_to_their_batch(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    """A failure whose message holds a NUL or a lone surrogate (or cannot even be printed)
    is written with that text made storable: the job keeps its real error and its backoff,
    and the successes of its batch are written too."""
    worker = spawn_worker(*CALM, "--concurrency", "10")
    await worker.wait_for_log("worker_ready")
    kinds = ["nul_error", "surrogate_error", "unprintable_error"]
    jobs = await insert_mixed(
        pool,
        [("hostile", {"kind": kind}) for kind in kinds] + [("echo", {"n": n}) for n in range(6)],
        max_attempts=3,
    )
    await settle(pool, timeout=30)
    await stop_workers([worker])

    runs = await _runs_per_job(pool, jobs)
    assert {job_id: runs[job_id] for job_id in jobs[:3]} == {j: [1, 2, 3] for j in jobs[:3]}
    assert {job_id: runs[job_id] for job_id in jobs[3:]} == {j: [1] for j in jobs[3:]}
    rows = await _rows_by_id(pool, jobs)
    errors = [rows[job_id]["last_error"].partition("\n")[0] for job_id in jobs[:3]]
    assert errors == [
        "ValueError: bad\ufffdbyte",
        "ValueError: bad\ufffdbyte",
        "Unprintable: <str() of the exception failed>",
    ]
    assert [rows[job_id]["state"] for job_id in jobs] == ["dead"] * 3 + ["succeeded"] * 6
    await check_invariants(pool, workers=[worker], expected_ids=jobs)


async def test_handlers_raising_what_is_not_an_exception_fail_only_their_job(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    """SystemExit, KeyboardInterrupt, a library's own BaseException, a CancelledError the
    handler raised itself: each fails its attempt like any error. Before, the first ended
    the worker at once, and the others left their job running for good, holding a slot,
    with a heartbeat renewing its lease, so that SIGTERM hung."""
    worker = spawn_worker(*CALM, "--concurrency", "10", "--drain-timeout-seconds", "2")
    await worker.wait_for_log("worker_ready")
    kinds = ["base_exception", "system_exit", "keyboard_interrupt", "cancels_itself"]
    jobs = await insert_mixed(pool, [("hostile", {"kind": kind}) for kind in kinds], 3)
    sleepers = await insert_sleepy(pool, 2, 1.0)
    await settle(pool, timeout=30)
    assert worker.proc.poll() is None, worker.output()[-3000:]

    rows = await _rows_by_id(pool, jobs)
    assert [rows[job_id]["state"] for job_id in jobs] == ["dead"] * len(kinds)
    assert [rows[job_id]["last_error"].partition(":")[0] for job_id in jobs] == [
        "HandlerEscape",
        "SystemExit",
        "KeyboardInterrupt",
        "CancelledError",
    ]
    assert await _runs_per_job(pool, jobs) == {job_id: [1, 2, 3] for job_id in jobs}
    escaped = {e["job_id"] for e in log_events(worker, "job_raised_base_exception")}
    assert escaped == set(jobs[:3])

    worker.signal(signal.SIGTERM)
    started = time.monotonic()
    assert await asyncio.to_thread(worker.wait, 30) == 0, worker.output()[-3000:]
    assert time.monotonic() - started < 10
    report = await check_invariants(pool, workers=[worker], expected_ids=[*jobs, *sleepers])
    assert report.states == {"dead": len(kinds), "succeeded": len(sleepers)}


REFUSE_MARKED_SUCCESSES = """
CREATE FUNCTION refuse_marked() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state = 'succeeded' AND NEW.args->>'refuse' = 'result' AND NEW.result IS NOT NULL
       OR NEW.state = 'succeeded' AND NEW.args->>'refuse' = 'success' THEN
        RAISE EXCEPTION 'refusing % of job %', NEW.args->>'refuse', NEW.id;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refuse_marked BEFORE UPDATE ON outbox_jobs
    FOR EACH ROW EXECUTE FUNCTION refuse_marked();
"""


async def test_a_batch_the_database_refuses_lands_one_outcome_at_a_time(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    """Whatever makes the database refuse one outcome (here a trigger), the others of its
    batch land. The refused one is written in a plainer form if that is accepted (a success
    without its result); if even that is refused, the job is left to its lease and a
    rescuer, its attempts counted: it runs max_attempts times at most, then is dead."""
    await pool.execute(REFUSE_MARKED_SUCCESSES)
    worker = spawn_worker("--lease-seconds", "1.5", "--concurrency", "10")
    await worker.wait_for_log("worker_ready")
    jobs = await insert_mixed(
        pool,
        [("echo", {"refuse": "result"}), ("echo", {"refuse": "success"})]
        + [("echo", {"n": n}) for n in range(6)],
        max_attempts=2,
    )
    await settle(pool, timeout=40)
    await stop_workers([worker])

    runs = await _runs_per_job(pool, jobs)
    assert runs == {jobs[0]: [1], jobs[1]: [1, 2], **{job_id: [1] for job_id in jobs[2:]}}
    rows = await _rows_by_id(pool, jobs)
    plain, never = rows[jobs[0]], rows[jobs[1]]
    assert (plain["state"], plain["attempts"], plain["result"]) == ("succeeded", 1, None)
    assert (never["state"], never["attempts"]) == ("dead", 2)
    assert never["last_error"].startswith("lease expired"), never["last_error"]
    assert {rows[job_id]["state"] for job_id in jobs[2:]} == {"succeeded"}
    assert log_events(worker, "outcome_batch_refused")
    assert {e["job_id"] for e in log_events(worker, "outcome_written_plainer")} == {jobs[0]}
    assert {e["job_id"] for e in log_events(worker, "outcome_not_written")} == {jobs[1]}
    await check_invariants(pool, workers=[worker], expected_ids=jobs)

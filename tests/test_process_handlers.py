"""``run_in="process"`` handlers: run in the worker's own child processes, their args and
results as JSON, what they raise back as itself; a timeout kills the child, a child that dies
(an exit, a segfault) fails only its attempt, and the next process job gets a new child. A
CPU-bound handler there leaves the worker's event loop to the other jobs. Children never
outlive their worker, even one killed with SIGKILL."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from outbox_worker import JobContext, Registry, TaskDefinitionError
from outbox_worker.testing import DrainResult, drain
from tests.conftest import WorkerProcess, wait_until
from tests.faults.invariants import log_events
from tests.offload_tasks import registry
from tests.support import insert_job as enqueue

TASKS = "tests.offload_tasks:registry"


async def row(pool: asyncpg.Pool, job_id: int) -> asyncpg.Record:
    found = await pool.fetchrow(
        "SELECT state, attempts, result::text AS result, last_error, progress::text AS progress,"
        " run_at - now() AS due_in FROM outbox_jobs WHERE id = $1",
        job_id,
    )
    assert found is not None
    return found


def alive(pid: int) -> bool:
    """Whether the process runs: a zombie (dead, not yet reaped by its parent) does not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def test_a_process_task_is_a_plain_function_at_the_top_of_a_module() -> None:
    tasks = Registry()

    async def coroutine(ctx: JobContext) -> None:
        return None

    def nested(ctx: JobContext) -> None:
        return None

    with pytest.raises(TaskDefinitionError, match="plain def"):
        tasks.add(coroutine, run_in="process")
    with pytest.raises(TaskDefinitionError, match="top of a module"):
        tasks.add(nested, run_in="process")
    with pytest.raises(TaskDefinitionError, match="top of a module"):
        tasks.add(lambda ctx: None, name="anonymous", run_in="process")
    with pytest.raises(TaskDefinitionError, match="'thread' or 'process'"):
        tasks.add(nested, run_in="elsewhere")  # type: ignore[arg-type]
    spec = registry.get("whoami")
    assert spec is not None
    assert spec.run_in == "process"


async def test_a_process_handler_runs_in_a_child_and_answers_in_json(pool: asyncpg.Pool) -> None:
    jobs = [await enqueue(pool, "whoami", {"n": n}) for n in (1, 2)]
    unstorable = await enqueue(pool, "not_json")
    assert await drain(registry, pool) == DrainResult(succeeded=3, job_ids=(*jobs, unstorable))
    answers = [json.loads((await row(pool, job_id))["result"]) for job_id in jobs]
    pids = {answer["pid"] for answer in answers}
    # One child, not this process, started for the first job and reused for the second.
    assert len(pids) == 1
    assert pids != {os.getpid()}
    assert {answer["parent"] for answer in answers} == {os.getpid()}
    assert [(a["job_id"], a["attempt"], a["n"]) for a in answers] == [
        (jobs[0], 1, 1),
        (jobs[1], 1, 2),
    ]
    assert answers[0]["worker_id"].startswith("drain:")
    assert answers[0]["tuple"] == [1, 2]  # through JSON
    assert (await row(pool, unstorable))["result"] is None
    assert not alive(pids.pop())  # the drain stopped its child at the end


async def test_what_a_process_handler_raises_comes_back_as_itself(pool: asyncpg.Pool) -> None:
    kinds = ["connection", "key", "unpicklable", "snooze", "cancel", "retry", "exit", "other"]
    jobs = {kind: await enqueue(pool, "raises", {"kind": kind}) for kind in kinds}
    result = await drain(registry, pool)
    # Retried by the policy: a ConnectionError, a RetryJob. Dead at once: a KeyError (given
    # up on), and what is no ConnectionError (retry_on), an error that does not pickle too.
    assert (result.retried, result.dead, result.snoozed, result.cancelled) == (2, 4, 1, 1)
    rows = {kind: await row(pool, job_id) for kind, job_id in jobs.items()}
    errors = {kind: (r["last_error"] or "").partition("\n")[0] for kind, r in rows.items()}
    assert errors["connection"] == "ConnectionResetError: reset by peer"
    assert errors["key"] == "KeyError: 'customer_id'"
    assert errors["unpicklable"] == "HandlerProcessError: Unpicklable: code 7: no way back"
    assert errors["retry"] == "RetryJob: later, please"
    assert errors["cancel"] == "not wanted"
    assert errors["exit"] == "SystemExit: 5"
    assert errors["other"] == "LookupError: other"
    # The child's own traceback is kept, down to the line that raised.
    assert "raised in the handler's process" in rows["connection"]["last_error"]
    assert 'raise ConnectionResetError("reset by peer")' in rows["connection"]["last_error"]
    assert (rows["snooze"]["state"], rows["snooze"]["attempts"]) == ("queued", 0)
    assert rows["retry"]["due_in"].total_seconds() > 35
    assert rows["cancel"]["state"] == "cancelled"


async def test_a_process_handler_past_its_timeout_is_killed(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    job_id = await enqueue(pool, "spins", {"pid_file": str(pid_file)})
    after = await enqueue(pool, "whoami")
    started = time.monotonic()
    result = await drain(registry, pool)
    took = time.monotonic() - started
    assert result == DrainResult(retried=1, succeeded=1, job_ids=(job_id, after))
    failed = await row(pool, job_id)
    assert (failed["state"], failed["attempts"]) == ("queued", 1)  # retried by its policy
    assert failed["last_error"].startswith(
        "TimeoutError: spins ran longer than its timeout of 1.0s"
    ), failed["last_error"]
    spun = int(pid_file.read_text())
    assert not alive(spun)
    # The next process job got a new child.
    assert json.loads((await row(pool, after))["result"])["pid"] != spun
    assert took < 60  # the spinning child did not hold the drain up (it spins for ever)


async def test_a_child_that_dies_fails_only_its_attempt(pool: asyncpg.Pool) -> None:
    exits = await enqueue(pool, "dies", {"how": "exit"}, max_attempts=1)
    segfaults = await enqueue(pool, "dies", {"how": "segfault"}, max_attempts=1)
    after = await enqueue(pool, "whoami", {"n": 3})
    result = await drain(registry, pool)
    assert result == DrainResult(dead=2, succeeded=1, job_ids=(exits, segfaults, after))
    assert (await row(pool, exits))["last_error"].startswith(
        "HandlerProcessDied: the handler's process died (exit code 3)"
    )
    assert (await row(pool, segfaults))["last_error"].startswith(
        "HandlerProcessDied: the handler's process died (exit code -11: SIGSEGV)"
    )
    assert json.loads((await row(pool, after))["result"])["n"] == 3


# ---------------------------------------------------------------------------------------------
# In worker processes
# ---------------------------------------------------------------------------------------------

# A heartbeat every half second: a running job's progress (a child's pid) shows soon.
FAST_BEATS = ("--lease-seconds", "1.5", "--poll-interval-seconds", "0.1")


async def child_of(pool: asyncpg.Pool, job_id: int) -> int:
    """The pid of the handler process running ``job_id``, from the progress it reported."""

    async def reported() -> int | None:
        progress = (await row(pool, job_id))["progress"]
        return None if progress is None else int(json.loads(progress)["pid"])

    pid: int = await wait_until(reported, timeout=60, what=f"job {job_id} to report its pid")
    return pid


@pytest.mark.slow
async def test_a_cpu_bound_handler_in_a_process_leaves_the_loop_to_async_jobs(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    """A 5 s CPU loop in a handler process while 100 async jobs are enqueued one by one: all
    of them finish before it does. (As an async handler, or in a thread holding the GIL, it
    would hold them up: bench/cpu_handlers.py measures the three side by side.)"""
    worker = spawn_worker(*FAST_BEATS, "--concurrency", "20", target=TASKS)
    await worker.wait_for_log("worker_ready")
    cpu = await enqueue(pool, "burns", {"seconds": 5.0})
    pid = await child_of(pool, cpu)
    assert alive(pid)
    quick = []
    for _ in range(100):
        quick.append(await enqueue(pool, "quick"))
        await asyncio.sleep(0.005)

    async def cpu_done() -> bool:
        return bool((await row(pool, cpu))["state"] == "succeeded")

    await wait_until(cpu_done, timeout=60, what="the CPU-bound job to finish")
    rows = await pool.fetch(
        "SELECT state, finished_at, extract(epoch FROM started_at - created_at) * 1000 AS ms"
        " FROM outbox_jobs WHERE id = ANY($1::bigint[])",
        quick,
    )
    cpu_row = await pool.fetchrow("SELECT finished_at FROM outbox_jobs WHERE id = $1", cpu)
    assert {r["state"] for r in rows} == {"succeeded"}
    assert max(r["finished_at"] for r in rows) < cpu_row["finished_at"]
    waits = sorted(float(r["ms"]) for r in rows)
    print(  # for the record (-s): the pickup latency of the async jobs meanwhile
        f"async pickup while a process handler burns CPU: p50 {statistics.median(waits):.1f} ms,"
        f" p99 {waits[98]:.1f} ms, max {waits[-1]:.1f} ms"
    )


@pytest.mark.slow
async def test_a_stopping_worker_kills_its_children(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    """SIGTERM: past the drain timeout the running process job is killed and handed back,
    and the worker exits without leaving its children behind."""
    worker = spawn_worker(*FAST_BEATS, "--drain-timeout-seconds", "1", target=TASKS)
    await worker.wait_for_log("worker_ready")
    job_id = await enqueue(pool, "burns", {"seconds": 120.0})
    pid = await child_of(pool, job_id)
    worker.signal(signal.SIGTERM)
    assert await asyncio.to_thread(worker.wait, 60) == 0, worker.output()[-3000:]
    assert not alive(pid)
    released = await row(pool, job_id)
    assert (released["state"], released["attempts"]) == ("queued", 1)
    assert {e["job_id"] for e in log_events(worker, "job_released")} == {job_id}
    assert not log_events(worker, "handlers_abandoned")


@pytest.mark.slow
async def test_children_exit_when_their_worker_is_killed(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    """SIGKILL leaves the worker no chance to stop its children: they see it gone and exit,
    even in the middle of a CPU loop."""
    worker = spawn_worker(*FAST_BEATS, target=TASKS)
    await worker.wait_for_log("worker_ready")
    job_id = await enqueue(pool, "burns", {"seconds": 120.0})
    pid = await child_of(pool, job_id)
    worker.signal(signal.SIGKILL)
    worker.wait(30)

    async def gone() -> bool:
        return not alive(pid)

    await wait_until(gone, timeout=30, what=f"handler process {pid} to exit")

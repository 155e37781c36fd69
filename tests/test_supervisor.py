"""``outbox-worker run --processes N``: N worker processes under a supervisor. A child killed
-9 is replaced and the jobs go on; SIGTERM drains every child and the supervisor exits 0
with none left; the children's metrics are served once, summed; children of a supervisor
killed outright stop by themselves; and a bad --processes is one line.

Real processes on a real PostgreSQL: the supervisor's log file holds its children's lines
too, since they write to the same stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import typer

from outbox_worker.cli.run import run
from outbox_worker.cli.supervisor import worker_args, worker_environment
from outbox_worker.devdb import free_port
from tests.cli_support import UNREACHABLE_URL, assert_one_line_error, run_cli
from tests.conftest import WorkerProcess, wait_until
from tests.faults.harness import busy_pids, insert_jobs, settle
from tests.faults.invariants import log_events
from tests.support import count_started, insert_sleepy, job_states, samples, value

Supervise = Callable[..., WorkerProcess]
# Leases that lapse soon after a kill, and quick polling: a killed child's job is back
# within seconds.
QUICK = ("--lease-seconds", "2", "--poll-interval-seconds", "0.2")


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's waits for whoever adopted it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def children(supervisor: WorkerProcess) -> list[int]:
    """Every child the supervisor started, in order."""
    return [event["pid"] for event in log_events(supervisor, "worker_process_started")]


async def ready(supervisor: WorkerProcess, count: int) -> None:
    """Wait until ``count`` children (over the supervisor's life) have said worker_ready."""

    async def enough() -> bool:
        assert supervisor.proc.poll() is None, supervisor.output()
        return len(log_events(supervisor, "worker_ready")) >= count

    await wait_until(enough, timeout=60, what=f"{count} worker processes to be ready")


async def worker_pids(pool: asyncpg.Pool) -> set[int]:
    """The processes of the workers registered now (ids are ``host:pid:random``)."""
    rows = await pool.fetch("SELECT id FROM outbox_workers")
    return {int(row["id"].rsplit(":", 2)[1]) for row in rows}


@pytest.fixture
def supervise(spawn_worker: Supervise) -> Iterator[Supervise]:
    """Start ``outbox-worker run --processes …``; at the end, stop each supervisor and
    kill any child it left (a failed test must not leave workers running)."""
    started: list[WorkerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> WorkerProcess:
        supervisor = spawn_worker(*args, env=env)
        started.append(supervisor)
        return supervisor

    yield start
    for supervisor in started:
        if supervisor.proc.poll() is None:
            supervisor.signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                supervisor.proc.wait(60)
        for pid in children(supervisor):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# What the children are given
# ---------------------------------------------------------------------------------------------


def parsed(args: list[str]) -> typer.Context:
    """``run``'s context for these arguments, as the CLI parses them."""
    app = typer.Typer(add_completion=False)
    app.command()(run)
    command = typer.main.get_command(app)
    ctx = typer.Context(command, info_name="run")
    command.parse_args(ctx, args)
    return ctx


def test_children_get_the_flags_given_less_the_supervisors_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OUTBOX_METRICS_PORT", raising=False)
    monkeypatch.delenv("OUTBOX_METRICS_HOST", raising=False)
    given = parsed(
        [
            "tests.workload:registry",
            "--processes",
            "3",
            "--metrics-port",
            "9100",
            "--metrics-host",
            "0.0.0.0",
            "--no-listen",
            "--burst",
            "--lease-seconds",
            "2.5",
            "--queues",
            "a,b",
            "--concurrency",
            "4",
        ]
    )
    args = worker_args(given)
    assert args == [
        "tests.workload:registry",
        "--concurrency",
        "4",
        "--queues",
        "a,b",
        "--burst",
        "--lease-seconds",
        "2.5",
        "--no-listen",
    ]
    own = {"processes": 1, "metrics_port": None, "metrics_host": "127.0.0.1"}
    assert parsed(args).params == given.params | own
    assert worker_args(parsed(["tests.workload:registry", "--listen"]))[1:] == ["--listen"]

    environment = {
        "OUTBOX_METRICS_PORT": "9100",
        "OUTBOX_METRICS_HOST": "0.0.0.0",
        "OUTBOX_CONCURRENCY": "4",
        "PATH": "/usr/bin",
    }
    assert worker_environment(given, environment) == {
        "OUTBOX_CONCURRENCY": "4",
        "PATH": "/usr/bin",
    }


@pytest.mark.parametrize("processes", ["0", "-1", "257", "100000", "abc", "2.5", ""])
def test_bad_processes_is_one_line_error(processes: str) -> None:
    result = run_cli(UNREACHABLE_URL, "run", "tests.workload:registry", "--processes", processes)
    assert_one_line_error(result, "--processes", code=2)


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_child_killed_9_is_restarted_and_the_jobs_go_on(
    pool: asyncpg.Pool, supervise: Supervise
) -> None:
    supervisor = supervise("--processes", "2", *QUICK)
    await ready(supervisor, 2)
    first = children(supervisor)
    expected = await insert_jobs(pool, "echo", 10)
    expected += await insert_sleepy(pool, 2, 2.0)

    async def busy_child() -> list[int]:
        return sorted(set(await busy_pids(pool, "sleepy")) & set(first))

    victim = (await wait_until(busy_child, what="a child in the middle of a job"))[0]
    os.kill(victim, signal.SIGKILL)

    async def restarted() -> dict[str, Any] | None:
        events = log_events(supervisor, "worker_process_restarting")
        return next((e for e in events if e["pid"] == victim), None)

    restart = await wait_until(restarted, what="the supervisor to see the kill")
    assert (restart["signal"], restart["restart_in"], restart["restarts"]) == ("SIGKILL", 1.0, 1)
    await ready(supervisor, 3)
    [replacement] = [pid for pid in children(supervisor) if pid not in first]
    expected += await insert_jobs(pool, "echo", 10)

    await settle(pool, timeout=60)
    assert await job_states(pool) == {"succeeded": len(expected)}
    # The job the kill cut short was taken back and run again to its end by another child.
    cut_short = await pool.fetch(
        "SELECT e.job_id, j.attempts FROM test_executions e JOIN outbox_jobs j ON j.id = e.job_id "
        "WHERE e.pid = $1 GROUP BY e.job_id, j.attempts "
        "HAVING bool_or(e.event = 'start') AND NOT bool_or(e.event = 'end')",
        victim,
    )
    assert cut_short
    assert all(row["attempts"] >= 2 for row in cut_short)
    assert supervisor.proc.poll() is None
    survivor = next(pid for pid in first if pid != victim)
    assert {survivor, replacement} <= await worker_pids(pool)
    assert alive(replacement)
    assert not alive(victim)


@pytest.mark.slow
async def test_a_child_that_keeps_crashing_is_restarted_ever_later(
    supervise: Supervise, empty_databases: Callable[[], Awaitable[str]]
) -> None:
    """On a database without the schema every child exits 2 as it starts (the supervisor
    itself never connects): each place's restarts come 1, 2, then 4 seconds later."""
    supervisor = supervise("--processes", "2", env={"DATABASE_URL": await empty_databases()})

    async def three_each() -> bool:
        return len(log_events(supervisor, "worker_process_restarting")) >= 6

    await wait_until(three_each, timeout=90, what="three restarts of each child")
    restarts = log_events(supervisor, "worker_process_restarting")
    for slot in (0, 1):
        mine = [(e["restart_in"], e["exit_code"]) for e in restarts if e["slot"] == slot]
        assert mine[:3] == [(1.0, 2), (2.0, 2), (4.0, 2)], restarts
    supervisor.signal(signal.SIGTERM)
    assert await asyncio.to_thread(supervisor.wait, 60) == 0, supervisor.output()[-4000:]


@pytest.mark.slow
async def test_sigterm_drains_every_child_and_exits_0(
    pool: asyncpg.Pool, supervise: Supervise
) -> None:
    supervisor = supervise(
        "--processes",
        "2",
        "--concurrency",
        "2",
        "--prefetch",
        "0",
        "--drain-timeout-seconds",
        "30",
        "--poll-interval-seconds",
        "0.2",
    )
    await ready(supervisor, 2)
    pids = children(supervisor)
    # Two slots each and nothing claimed ahead: the four jobs running means both children
    # are busy.
    ids = await insert_sleepy(pool, 4, 3.0)

    async def all_started() -> bool:
        return await count_started(pool, ids) == len(ids)

    await wait_until(all_started, what="every job to start")
    supervisor.signal(signal.SIGTERM)
    assert await asyncio.to_thread(supervisor.wait, 90) == 0, supervisor.output()[-4000:]

    rows = await pool.fetch("SELECT state, attempts FROM outbox_jobs WHERE id = ANY($1)", ids)
    assert [(r["state"], r["attempts"]) for r in rows] == [("succeeded", 1)] * len(ids)
    ended = await pool.fetch(
        "SELECT pid, count(*) AS n FROM test_executions WHERE event = 'end' GROUP BY pid"
    )
    assert {r["pid"]: r["n"] for r in ended} == dict.fromkeys(pids, 2)
    assert not [pid for pid in pids if alive(pid)]
    assert await worker_pids(pool) == set()  # each child said goodbye: a clean stop
    exits = log_events(supervisor, "worker_process_exited")
    assert sorted((e["pid"], e["exit_code"]) for e in exits) == sorted((p, 0) for p in pids)
    assert log_events(supervisor, "supervisor_stopping")[0]["signal"] == "SIGTERM"
    assert not log_events(supervisor, "worker_process_restarting", "worker_process_killed")


@pytest.mark.slow
async def test_burst_children_are_not_replaced_and_the_supervisor_exits_0(
    pool: asyncpg.Pool, supervise: Supervise
) -> None:
    expected = await insert_jobs(pool, "echo", 20)
    supervisor = supervise("--processes", "2", "--burst")
    assert await asyncio.to_thread(supervisor.wait, 90) == 0, supervisor.output()[-4000:]
    assert await job_states(pool) == {"succeeded": len(expected)}
    exits = log_events(supervisor, "worker_process_exited")
    assert sorted(e["exit_code"] for e in exits) == [0, 0]
    assert not log_events(supervisor, "worker_process_restarting")


@pytest.mark.slow
async def test_children_stop_by_themselves_when_the_supervisor_is_killed(
    pool: asyncpg.Pool, supervise: Supervise
) -> None:
    supervisor = supervise("--processes", "2")
    await ready(supervisor, 2)
    pids = children(supervisor)
    supervisor.signal(signal.SIGKILL)
    assert await asyncio.to_thread(supervisor.wait, 10) == -signal.SIGKILL

    async def gone() -> bool:
        return not [pid for pid in pids if alive(pid)]

    await wait_until(gone, timeout=60, what="the orphaned children to stop")
    assert (
        sorted(e["supervisor_pid"] for e in log_events(supervisor, "supervisor_gone"))
        == [supervisor.pid] * 2
    )
    assert await worker_pids(pool) == set()


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_the_childrens_metrics_are_served_once_summed(
    pool: asyncpg.Pool, supervise: Supervise
) -> None:
    """The port comes from OUTBOX_METRICS_PORT, which the children must not read: each would
    try to bind it. Counters sum over the children, the dead included; a child's slots leave
    the sum when it dies."""
    port = free_port()
    supervisor = supervise(
        "--processes",
        "2",
        "--concurrency",
        "2",
        "--prefetch",
        "0",
        *QUICK,
        env={"OUTBOX_METRICS_PORT": str(port)},
    )
    await ready(supervisor, 2)
    pids = children(supervisor)
    # Two slots each and nothing claimed ahead: both children run some of these.
    ids = await insert_sleepy(pool, 6, 1.5)
    await settle(pool, timeout=60)
    ran = await pool.fetch(
        "SELECT pid, count(*) AS n FROM test_executions WHERE event = 'end' GROUP BY pid"
    )
    by_child = {r["pid"]: r["n"] for r in ran}
    assert set(by_child) == set(pids), by_child
    assert sum(by_child.values()) == len(ids)
    sleepy = {"task": "sleepy", "queue": "slow"}

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:

        async def scrape() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
            response = await client.get("/metrics")
            assert response.status_code == 200
            return samples(response.text)

        page = await scrape()
        assert value(page, "outbox_jobs_succeeded_total", **sleepy) == len(ids)
        assert value(page, "outbox_jobs_started_total", **sleepy) == len(ids)
        assert value(page, "outbox_job_run_seconds_count", **sleepy) == len(ids)
        assert value(page, "outbox_worker_slots") == 4.0  # 2 + 2, one sample
        assert not [key for key in page if "pid" in dict(key[1])]  # every gauge combined

        os.kill(pids[0], signal.SIGKILL)
        await ready(supervisor, 3)

        async def replaced() -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
            page = await scrape()
            return page if value(page, "outbox_worker_slots") == 4.0 else None

        # The dead child's slots left the sum and its replacement's joined it; what it
        # counted is still counted.
        page = await wait_until(replaced, what="the slots of the replacement alone")
        assert value(page, "outbox_jobs_succeeded_total", **sleepy) == len(ids)

    supervisor.signal(signal.SIGTERM)
    assert await asyncio.to_thread(supervisor.wait, 60) == 0, supervisor.output()[-4000:]

"""The worker's ``--metrics-port`` serving Prometheus text over real HTTP, a port it cannot
serve on as one stderr line, and ``--help`` listing the operator's commands.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from datetime import timedelta

import asyncpg
import httpx
import pytest

from outbox_worker.devdb import free_port
from tests.cli_support import (
    UNREACHABLE_URL,
    Spawn,
    assert_one_line_error,
    insert_job,
    ok,
    run_cli,
    state_of,
)
from tests.conftest import wait_until
from tests.support import samples, value


async def test_worker_serves_metrics_over_http(
    database_url: str, spawn_worker: Spawn, pool: asyncpg.Pool
) -> None:
    echo_jobs = [await insert_job(pool, args={"n": n}) for n in range(5)]
    doomed = await insert_job(pool, task="always_fails", max_attempts=1)
    later = await insert_job(pool, run_in=timedelta(hours=1))  # stays queued, not due
    port = free_port()

    worker = spawn_worker("--metrics-port", str(port), "--concurrency", "3")
    await worker.wait_for_log("worker_ready")
    assert f'"port": {port}' in worker.output()  # the metrics_serving log line

    async def finished() -> bool:
        states = [await state_of(pool, job_id) for job_id in [*echo_jobs, doomed]]
        return states == ["succeeded"] * 5 + ["dead"]

    await wait_until(finished, what="the jobs to finish")

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:

        async def scrape() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
            response = await client.get("/metrics")
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/plain")
            return samples(response.text)

        async def counted() -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
            page = await scrape()
            done = value(page, "outbox_jobs_succeeded_total", task="echo", queue="default")
            dead = value(page, "outbox_jobs_dead_total", task="always_fails", queue="default")
            return page if (done, dead) == (5.0, 1.0) else None

        page = await wait_until(counted, what="the counters to count every outcome")
        echo = {"task": "echo", "queue": "default"}
        assert value(page, "outbox_jobs_started_total", **echo) == 5.0
        assert value(page, "outbox_jobs_started_total", task="always_fails", queue="default") == 1
        assert value(page, "outbox_jobs_retried_total", **echo) is None  # none failed
        assert value(page, "outbox_job_run_seconds_count", **echo) == 5.0
        assert value(page, "outbox_job_run_seconds_bucket", le="+Inf", **echo) == 5.0
        run_seconds = value(page, "outbox_job_run_seconds_sum", **echo)
        assert run_seconds is not None
        assert run_seconds > 0
        assert value(page, "outbox_worker_slots") == 3.0
        assert value(page, "outbox_worker_slots_in_use") is not None

        # The queue gauges come from the worker's periodic query; once it has run after the
        # jobs finished, only the delayed job is left, queued but not due.
        async def settled() -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
            page = await scrape()
            depth = {
                state: value(page, "outbox_queue_depth", queue="default", state=state)
                for state in ("queued", "due", "running")
            }
            return page if depth == {"queued": 1.0, "due": 0.0, "running": 0.0} else None

        page = await wait_until(settled, timeout=45, interval=0.5, what="the queue gauges")
        assert value(page, "outbox_queue_oldest_due_seconds", queue="default") == 0.0
    assert await state_of(pool, later) == "queued"

    worker.signal(signal.SIGTERM)
    assert await asyncio.to_thread(worker.wait) == 0


def test_metrics_port_in_use_is_one_line_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            UNREACHABLE_URL, "run", "tests.workload:registry", "--metrics-port", str(port)
        )
    assert_one_line_error(result, f"cannot serve metrics on 127.0.0.1:{port}", code=2)


@pytest.mark.parametrize("port", ["0", "70000", "http"])
def test_bad_metrics_port_is_one_line_error(port: str) -> None:
    result = run_cli(UNREACHABLE_URL, "run", "tests.workload:registry", "--metrics-port", port)
    assert_one_line_error(result, "--metrics-port", code=2)


def test_help_lists_the_operator_commands() -> None:
    top = ok(run_cli(None, "--help"))
    for command in ("run", "jobs", "queues", "prune", "health"):
        assert command in top
    jobs = ok(run_cli(None, "jobs", "--help"))
    for command in ("list", "show", "retry", "cancel", "retry-dead"):
        assert command in jobs
    run = ok(run_cli(None, "run", "--help"))
    assert "--metrics-port" in run
    assert "--metrics-host" in run

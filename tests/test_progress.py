"""A handler reports its progress: no round trip per report, written by the heartbeat with
the lease it extends (the late writes of a worker that lost its lease are fenced: see
tests/job_state_machine.py), and visible in the admin API, the CLI and the dashboard."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import asyncpg
import httpx
import pytest
import structlog
from fastapi import FastAPI

from outbox_worker import JobContext
from tests.admin_support import AUTH
from tests.cli_support import cli, ok
from tests.conftest import WorkerProcess, wait_until
from tests.dashboard_support import SIGNED_IN


def context(reports: list[str]) -> JobContext:
    return JobContext(
        job_id=1,
        task="t",
        queue="default",
        attempt=1,
        max_attempts=1,
        correlation_id=None,
        worker_id="w",
        pool=None,
        log=structlog.get_logger(),
        report_progress=reports.append,
    )


def test_a_report_is_a_fraction_or_a_small_json_object() -> None:
    reports: list[str] = []
    ctx = context(reports)
    ctx.progress(0.25)
    ctx.progress(1)
    ctx.progress({"rows": 4000, "of": 10000})
    assert reports == ["0.25", "1", '{"rows":4000,"of":10000}']


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (1.5, ValueError),
        (-0.1, ValueError),
        (math.nan, ValueError),
        (True, TypeError),
        ("half", TypeError),
        ([1, 2], TypeError),
        ({"when": object()}, ValueError),
        ({"x": math.inf}, ValueError),
        ({"big": "x" * 5000}, ValueError),
    ],
)
def test_a_report_that_is_not_one_is_refused(value: Any, error: type[Exception]) -> None:
    reports: list[str] = []
    with pytest.raises(error):
        context(reports).progress(value)
    assert reports == []


async def test_progress_rides_the_heartbeat_and_shows_everywhere(
    pool: asyncpg.Pool,
    database_url: str,
    admin_app: FastAPI,
    admin_client: httpx.AsyncClient,
    spawn_worker: Callable[..., WorkerProcess],
) -> None:
    job_id = await pool.fetchval(
        "INSERT INTO outbox_jobs (task, args) VALUES ('slow_steps', $1::jsonb) RETURNING id",
        '{"steps": 3, "seconds": 1.2}',
    )
    # A heartbeat every half second.
    worker = spawn_worker("--lease-seconds", "1.5")

    async def at_step_two() -> bool:
        answer = await admin_client.get(f"/jobs/{job_id}", headers=AUTH)
        body = answer.json()
        return bool(body["state"] == "running" and body["progress"] == {"step": 2, "of": 3})

    await wait_until(at_step_two, timeout=30, interval=0.1, what="step 2 seen while running")
    shown = ok(await cli(database_url, "jobs", "show", str(job_id)))
    assert '"step": 2' in shown or '"step": 3' in shown, shown
    page = await admin_client.get(f"/dashboard/jobs/{job_id}", headers=SIGNED_IN)
    assert "job-progress" in page.text
    assert 'id="job-progress"><code>{"of": 3, "step": ' in page.text, page.text

    async def done() -> bool:
        return bool(
            await pool.fetchval("SELECT state = 'succeeded' FROM outbox_jobs WHERE id = $1", job_id)
        )

    await wait_until(done, timeout=30, what="the job to finish")
    final = await admin_client.get(f"/jobs/{job_id}", headers=AUTH)
    assert final.json()["progress"] == {"step": 3, "of": 3}
    worker.kill()

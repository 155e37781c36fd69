"""The admin service through its HTTP face, the JSON routes of
``outbox_worker.web.create_admin_router`` on the library's own host (``admin_host``): jobs
no reader takes whole, and the CLI's --json against the API's answers."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine

from outbox_worker import enqueue
from outbox_worker.jobs import MAX_JSON_DEPTH, TOO_DEEP
from tests.admin_support import AUTH, insert_job
from tests.conftest import deep_json, levels
from tests.dashboard_support import SIGNED_IN

# ---------------------------------------------------------------------------------------------
# Jobs carrying more than Python's JSON readers take: shown with markers, never a 500
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 300, 1000, 5000])
async def test_jobs_nested_deeper_than_readers_go_list_show_retry_and_cancel(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, pool: asyncpg.Pool, depth: int
) -> None:
    """Plain SQL stores what jsonb takes (thousands of levels); every answer cuts it to
    MAX_JSON_DEPTH levels and says so, and the job can still be retried and cancelled."""
    job_id = await insert_job(
        pool, "echo", args=deep_json(depth), result=deep_json(depth), state="dead", attempts=1
    )
    cut = (MAX_JSON_DEPTH, TOO_DEEP)

    listed = await admin_client.get("/jobs", headers=AUTH)
    assert listed.status_code == 200, listed.text[:300]
    [item] = listed.json()["items"]
    assert (levels(item["args"]), levels(item["result"])) == (cut, cut)
    shown = await admin_client.get(f"/jobs/{job_id}", headers=AUTH)
    assert shown.status_code == 200, shown.text[:300]
    assert levels(shown.json()["args"]) == cut

    retried = await admin_client.post(f"/jobs/{job_id}/retry", headers=AUTH)
    assert retried.status_code == 200, retried.text[:300]
    assert (retried.json()["state"], levels(retried.json()["args"])) == ("queued", cut)
    cancelled = await admin_client.post(f"/jobs/{job_id}/cancel", headers=AUTH)
    assert cancelled.status_code == 200, cancelled.text[:300]
    assert cancelled.json()["state"] == "cancelled"
    # Only the answers are cut: the row keeps what was written.
    stored = await pool.fetchval("SELECT args::text FROM outbox_jobs WHERE id = $1", job_id)
    assert stored == deep_json(depth)


@pytest.mark.parametrize(
    "context",
    [
        '{"traceparent": 5}',
        '{"traceparent": "00-not-a-trace"}',
        f'{{"traceparent": "00-{"a" * 32}-{"b" * 16}-01", "deep": {deep_json(1000)}}}',
    ],
)
async def test_a_trace_context_written_by_hand_is_shown_as_it_is(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, pool: asyncpg.Pool, context: str
) -> None:
    """Plain SQL may store any object as a job's trace context: the job shows it (cut like
    args when too deep), with a trace id only for a well-formed traceparent."""
    job_id = await insert_job(pool, "echo", trace_context=context)
    shown = await admin_client.get(f"/jobs/{job_id}", headers=AUTH)
    assert shown.status_code == 200, shown.text[:300]
    assert "traceparent" in shown.json()["trace_context"]
    page = await admin_client.get(f"/dashboard/jobs/{job_id}", headers=SIGNED_IN)
    assert page.status_code == 200, page.text[:300]
    assert ('id="job-trace-id"' in page.text) == ("a" * 32 in context)


async def test_args_as_deep_as_enqueue_takes_come_back_whole(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    args = json.loads(deep_json(MAX_JSON_DEPTH))
    async with engine.begin() as conn:
        job = await enqueue(conn, "echo", args)
    shown = await admin_client.get(f"/jobs/{job.id}", headers=AUTH)
    assert shown.status_code == 200, shown.text[:300]
    assert shown.json()["args"] == args
    assert levels(shown.json()["args"]) == (MAX_JSON_DEPTH, [])


async def test_numbers_longer_than_python_reads_are_shown_as_markers(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    job_id = await insert_job(
        pool, "echo", args='{"big": 1e5000, "fine": 10, "small": 1e-5000}', result="-1e5000"
    )
    shown = await admin_client.get(f"/jobs/{job_id}", headers=AUTH)
    assert shown.status_code == 200, shown.text[:300]
    body = shown.json()
    assert body["args"]["big"] == "(integer of 5001 digits: not shown)"
    assert (body["args"]["fine"], body["args"]["small"]) == (10, 0.0)
    assert body["result"] == "(integer of 5001 digits: not shown)"
    assert (await admin_client.get("/jobs", headers=AUTH)).status_code == 200


# ---------------------------------------------------------------------------------------------
# One JSON form of a job: the API's answers and the CLI's --json
# ---------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def cli_json(database_url: str, *args: str) -> Any:
    """``python -m outbox_worker … --json`` on this database, as an operator's script runs it."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("DATABASE_URL", "OUTBOX_DATABASE_URL") and not name.startswith("OUTBOX_")
    }
    result = subprocess.run(
        [sys.executable, "-m", "outbox_worker", *args, "--json"],
        env=env | {"PYTHONPATH": str(ROOT), "DATABASE_URL": database_url},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    return json.loads(result.stdout)


async def test_the_cli_shows_a_job_as_the_api_answers_it(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, pool: asyncpg.Pool, database_url: str
) -> None:
    """``jobs show --json`` and ``GET /jobs/{id}`` give the same object, key for key (times
    end in Z in both), and so do ``jobs list --json`` and ``GET /jobs``."""
    job_id = await insert_job(
        pool,
        "send_email",
        queue="mail",
        state="dead",
        attempts=3,
        max_attempts=3,
        priority=-2,
        args=json.dumps({"to": "ada@example.com", "n": 1.5, "tags": ["é", None], "big": 2**70}),
        result=json.dumps({"sent": False}),
        last_error="ConnectionError: refused\n  at line 2",
        dedupe_key="mail-1",
        correlation_id="req-1",
        run_at=datetime(2024, 5, 1, 12, 30, 5, tzinfo=UTC),  # no fraction of a second
        started_at=datetime(2024, 5, 1, 12, 30, 6, 250000, tzinfo=UTC),
        finished_at=datetime(2024, 5, 1, 12, 30, 7, 123456, tzinfo=UTC),
        cancel_requested_at=datetime(2024, 5, 1, 12, 30, 6, 500000, tzinfo=UTC),
    )
    await insert_job(pool, "echo")  # a second job, with its nulls, for the lists

    api = (await admin_client.get(f"/jobs/{job_id}", headers=AUTH)).json()
    shown = await asyncio.to_thread(cli_json, database_url, "jobs", "show", str(job_id))

    assert shown == api
    assert (api["run_at"], api["finished_at"]) == (
        "2024-05-01T12:30:05Z",
        "2024-05-01T12:30:07.123456Z",
    )
    listed = await asyncio.to_thread(cli_json, database_url, "jobs", "list")
    assert listed == (await admin_client.get("/jobs", headers=AUTH)).json()
    assert len(listed["items"]) == 2

"""The sample service's report routes (POST /reports, GET /reports/{id}), through the ASGI
app on real PostgreSQL, with real ``outbox-worker run --burst`` processes running the jobs the
routes enqueue: a report goes from queued to done, or to failed when its job is dead."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from app.services import reports as reports_service
from outbox_worker import Job, get_job
from tests.sample.support import SpawnWorker, comment, job_row, run_burst_worker, sign_up

UUID_TEXT = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


async def test_a_report_goes_from_queued_to_done_with_real_counts(
    client: httpx.AsyncClient, pool: asyncpg.Pool, spawn_worker: SpawnWorker
) -> None:
    for email in ("a@example.com", "b@example.com", "c@example.com"):
        await sign_up(client, email)
    comment_ids = [
        await comment(client, "alice", "first"),
        await comment(client, "bob", "second"),
        await comment(client, "alice", "third"),
        await comment(client, "alice", "x" * 300),
    ]

    response = await client.post("/reports", json={})
    assert response.status_code == 202, response.text
    queued = response.json()
    assert set(queued) == {"report_id", "job_id", "status"}
    assert queued["status"] == "queued"
    assert UUID_TEXT.fullmatch(queued["report_id"])
    report_id, job_id = queued["report_id"], queued["job_id"]
    job = await job_row(pool, job_id)
    assert (job["task"], job["queue"], job["state"]) == ("generate_report", "reports", "queued")
    assert job["args"] == {"report_id": report_id}
    assert job["dedupe_key"] == report_id

    before = await client.get(f"/reports/{report_id}")
    assert before.status_code == 200, before.text
    shown = before.json()
    assert shown["report_id"] == report_id
    assert shown["job_id"] == job_id
    assert shown["status"] == "queued"
    assert shown["params"] == {}
    assert shown["result"] is None
    assert shown["finished_at"] is None

    await run_burst_worker(spawn_worker)

    after = await client.get(f"/reports/{report_id}")
    assert after.status_code == 200, after.text
    done = after.json()
    assert done["status"] == "done"
    assert done["finished_at"] is not None
    result = done["result"]
    assert result["window"] == {"since": None, "until": None}
    assert result["total_users"] == 3
    assert result["new_users"] == 3
    assert result["total_comments"] == 4
    assert result["comments"] == 4
    assert result["active_authors"] == 2
    recent = result["recent_comments"]
    assert [c["id"] for c in recent] == sorted(comment_ids, reverse=True)
    assert [c["author"] for c in recent] == ["alice", "alice", "bob", "alice"]
    assert recent[0]["body"] == "x" * 200, "bodies are cut to 200 characters"
    assert recent[3]["body"] == "first"
    assert (await job_row(pool, job_id))["state"] == "succeeded"


async def test_a_report_window_counts_only_rows_inside_it(
    client: httpx.AsyncClient, pool: asyncpg.Pool, spawn_worker: SpawnWorker
) -> None:
    old_user = await sign_up(client, "old@example.com")
    inside_users = [
        await sign_up(client, "in1@example.com"),
        await sign_up(client, "in2@example.com"),
    ]
    await sign_up(client, "new@example.com")
    old_comment = await comment(client, "ann", "old")
    inside = [
        await comment(client, "ben", "in-a"),
        await comment(client, "cat", "in-b"),
        await comment(client, "ben", "in-c"),
    ]
    await comment(client, "dan", "new")
    await pool.execute(
        "UPDATE users SET created_at = '2020-05-01T00:00:00Z' WHERE id = $1", old_user
    )
    await pool.execute(
        "UPDATE users SET created_at = '2021-03-01T00:00:00Z' WHERE id = ANY($1::bigint[])",
        inside_users,
    )
    await pool.execute(
        "UPDATE comments SET created_at = '2020-05-01T00:00:00Z' WHERE id = $1", old_comment
    )
    for day, comment_id in enumerate(inside, start=1):
        await pool.execute(
            "UPDATE comments SET created_at = $2 WHERE id = $1",
            comment_id,
            datetime(2021, 3, day, 12, tzinfo=UTC),
        )

    window = {"since": "2021-01-01T00:00:00Z", "until": "2022-01-01T00:00:00+00:00"}
    response = await client.post("/reports", json={**window, "recent_limit": 2})
    assert response.status_code == 202, response.text
    report_id = response.json()["report_id"]

    await run_burst_worker(spawn_worker)

    done = (await client.get(f"/reports/{report_id}")).json()
    assert done["status"] == "done"
    assert done["params"] == {
        "since": "2021-01-01T00:00:00Z",
        "until": "2022-01-01T00:00:00Z",
        "recent_limit": 2,
    }
    result = done["result"]
    assert result["new_users"] == 2
    assert result["comments"] == 3
    assert result["active_authors"] == 2
    assert result["total_users"] == 4
    assert result["total_comments"] == 5
    assert [c["id"] for c in result["recent_comments"]] == [inside[2], inside[1]]


async def test_post_reports_without_any_body_is_valid(
    client: httpx.AsyncClient, pool: asyncpg.Pool, spawn_worker: SpawnWorker
) -> None:
    response = await client.post("/reports")
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "queued"
    assert await pool.fetchval("SELECT count(*) FROM reports") == 1
    shown = (await client.get(f"/reports/{body['report_id']}")).json()
    assert shown["params"] == {}
    await run_burst_worker(spawn_worker)
    done = (await client.get(f"/reports/{body['report_id']}")).json()
    assert done["status"] == "done"
    assert done["result"]["total_users"] == 0


async def test_the_widest_windows_a_report_accepts_are_ones_its_job_computes(
    client: httpx.AsyncClient, spawn_worker: SpawnWorker
) -> None:
    """The edges of what POST /reports takes (year 1 to 9999, in UTC, whatever the offset)
    all run: a window the job could not compute is refused with 422 instead."""
    await comment(client, "ann", "inside every window")
    windows = [
        {"since": "0001-01-01T00:00:00Z", "until": "9999-12-31T23:59:59.999999Z"},
        {"since": "0001-01-01T01:00:00+01:00", "until": "9999-12-31T18:59:59.999999-05:00"},
        {"since": "0001-01-01T00:00:00-23:59", "until": "9999-12-31T23:59:59.999999+23:59"},
    ]
    report_ids = []
    for window in windows:
        response = await client.post("/reports", json=window)
        assert response.status_code == 202, response.text
        report_ids.append(response.json()["report_id"])

    await run_burst_worker(spawn_worker)

    for report_id in report_ids:
        done = (await client.get(f"/reports/{report_id}")).json()
        assert done["status"] == "done", done
        assert done["result"]["comments"] == 1


async def test_a_report_shows_failed_when_its_job_is_dead(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    body = (await client.post("/reports", json={})).json()
    await pool.execute("UPDATE outbox_jobs SET state = 'dead' WHERE id = $1", body["job_id"])
    shown = (await client.get(f"/reports/{body['report_id']}")).json()
    assert shown["status"] == "failed"
    assert shown["result"] is None


async def test_a_report_read_while_its_worker_finishes_is_not_a_500(
    app: FastAPI,
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    spawn_worker: SpawnWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """GET /reports/{id} reads the report, then its job. A real worker that completes the
    report between those two reads (report 'done' and job 'succeeded' commit together) must
    give a 200 with some status, not a server error."""
    body = (await client.post("/reports", json={})).json()
    real_get_job = get_job
    finished: list[int] = []

    async def worker_finishes_between_reads(session: Any, job_id: int) -> Job | None:
        if not finished:
            await run_burst_worker(spawn_worker)
            finished.append(job_id)
        job: Job | None = await real_get_job(session, job_id)
        return job

    monkeypatch.setattr(reports_service, "get_job", worker_finishes_between_reads)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as raw:
        response = await raw.get(f"/reports/{body['report_id']}")

    assert finished == [body["job_id"]]
    assert await pool.fetchval("SELECT status FROM reports") == "done"
    assert response.status_code == 200, response.text
    assert response.json()["status"] in {"queued", "running", "done"}


async def test_a_report_whose_dead_job_was_pruned_does_not_claim_to_be_queued(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    """Retention deletes dead jobs (OUTBOX_RETENTION_DEAD); the report will never run, so it
    must not go on saying 'queued'."""
    body = (await client.post("/reports", json={})).json()
    await pool.execute(
        "UPDATE outbox_jobs SET state = 'dead', finished_at = now(), last_error = 'gave up'"
        " WHERE id = $1",
        body["job_id"],
    )
    assert (await client.get(f"/reports/{body['report_id']}")).json()["status"] == "failed"
    # What the pruner does once the retention has passed.
    await pool.execute("DELETE FROM outbox_jobs WHERE id = $1 AND state = 'dead'", body["job_id"])

    response = await client.get(f"/reports/{body['report_id']}")

    assert response.status_code == 200, response.text
    assert response.json()["status"] not in {"queued", "running"}

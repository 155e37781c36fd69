"""The Idempotency-Key of the sample service's POST /reports, through the ASGI app on real
PostgreSQL, with a real ``outbox-worker run --burst`` process running the job it enqueues:
one key is one report and one job, however often or concurrently it is sent; the same key
with another body is a 422, a bad key a 400."""

from __future__ import annotations

import asyncio

import asyncpg
import httpx
import pytest

from tests.sample.support import SpawnWorker, assert_json_detail, run_burst_worker


async def test_the_same_idempotency_key_returns_the_first_report_and_job(
    client: httpx.AsyncClient, pool: asyncpg.Pool, spawn_worker: SpawnWorker
) -> None:
    headers = {"Idempotency-Key": "order-42:report"}
    first = await client.post("/reports", json={}, headers=headers)
    second = await client.post("/reports", json={}, headers=headers)
    # No body means the same as {}.
    third = await client.post("/reports", headers=headers)

    assert first.status_code == 202, first.text
    for repeat in (second, third):
        assert repeat.status_code == first.status_code
        assert repeat.content == first.content
        assert repeat.headers["content-type"] == first.headers["content-type"]
    assert await pool.fetchval("SELECT count(*) FROM reports") == 1
    assert await pool.fetchval("SELECT count(*) FROM outbox_jobs") == 1
    assert await pool.fetchval("SELECT idempotency_key FROM reports") == "order-42:report"

    # Still the first answer once the report is done.
    await run_burst_worker(spawn_worker)
    later = await client.post("/reports", json={}, headers=headers)
    assert (later.status_code, later.content) == (first.status_code, first.content)
    assert await pool.fetchval("SELECT count(*) FROM outbox_jobs") == 1

    # Another key is another report.
    other = await client.post("/reports", json={}, headers={"Idempotency-Key": "other"})
    assert other.status_code == 202
    assert other.json()["report_id"] != first.json()["report_id"]
    assert await pool.fetchval("SELECT count(*) FROM reports") == 2


async def test_concurrent_requests_with_one_key_create_one_report_and_one_job(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    headers = {"Idempotency-Key": "burst-of-ten"}
    body = {"since": "2020-01-01T00:00:00Z"}
    responses = await asyncio.gather(
        *(client.post("/reports", json=body, headers=headers) for _ in range(10))
    )
    assert {r.status_code for r in responses} == {202}, [r.text for r in responses]
    assert len({r.content for r in responses}) == 1, [r.text for r in responses]
    assert await pool.fetchval("SELECT count(*) FROM reports") == 1
    assert await pool.fetchval("SELECT count(*) FROM outbox_jobs") == 1
    row = await pool.fetchrow("SELECT id, job_id FROM reports")
    assert responses[0].json() == {
        "report_id": str(row["id"]),
        "job_id": row["job_id"],
        "status": "queued",
    }


async def test_the_same_key_with_a_different_body_is_422(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    headers = {"Idempotency-Key": "reused"}
    first = await client.post("/reports", json={}, headers=headers)
    assert first.status_code == 202
    response = await client.post("/reports", json={"recent_limit": 3}, headers=headers)
    assert response.status_code == 422, response.text
    detail = assert_json_detail(response)
    assert "Idempotency-Key" in detail
    assert await pool.fetchval("SELECT count(*) FROM reports") == 1
    assert await pool.fetchval("SELECT count(*) FROM outbox_jobs") == 1


@pytest.mark.parametrize(
    "key",
    ["k" * 256, "k" * 300, "has space", "tab\there", "", "ctl\x7fchar"],
    ids=["256-chars", "300-chars", "space", "tab", "empty", "del"],
)
async def test_a_bad_idempotency_key_is_400(
    client: httpx.AsyncClient, pool: asyncpg.Pool, key: str
) -> None:
    response = await client.post("/reports", json={}, headers={"Idempotency-Key": key})
    assert response.status_code == 400, response.text
    assert "Idempotency-Key" in assert_json_detail(response)
    assert await pool.fetchval("SELECT count(*) FROM reports") == 0
    assert await pool.fetchval("SELECT count(*) FROM outbox_jobs") == 0


async def test_the_longest_and_oddest_valid_keys_are_accepted(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    for key in ("k" * 255, "~!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}", "1"):
        response = await client.post("/reports", json={}, headers={"Idempotency-Key": key})
        assert response.status_code == 202, (key, response.text)
    keys = await pool.fetch("SELECT idempotency_key FROM reports")
    assert {r["idempotency_key"] for r in keys} == {
        "k" * 255,
        "~!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}",
        "1",
    }

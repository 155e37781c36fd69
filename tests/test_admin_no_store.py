"""The admin service through its HTTP face, the JSON routes of
``outbox_worker.web.create_admin_router`` on the library's own host (``admin_host``):
no-store on every answer, whoever answers the invalid requests."""

from __future__ import annotations

import asyncpg
import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from tests.admin_support import AUTH, TOKEN, insert_job


async def own_validation_answer(_: Request, exc: RequestValidationError) -> JSONResponse:
    """An app's own answer to invalid requests, shaped its own way as the sample's is: the
    admin routes answer with it, and add no-store to it."""
    detail = [{"loc": list(error["loc"]), "msg": error["msg"]} for error in exc.errors()]
    return JSONResponse({"detail": detail, "answered_by": "the app"}, status_code=422)


@pytest.mark.parametrize("invalid_requests", ["fastapis-answer", "the-apps-own-answer"])
async def test_every_admin_answer_says_no_store(
    admin_host: FastAPI, admin_client: httpx.AsyncClient, pool: asyncpg.Pool, invalid_requests: str
) -> None:
    if invalid_requests == "the-apps-own-answer":
        admin_host.exception_handler(RequestValidationError)(own_validation_answer)
    dead = await insert_job(pool, "echo", state="dead", attempts=1, max_attempts=1)
    queued = await insert_job(pool, "echo")
    done = await insert_job(pool, "echo", state="succeeded", attempts=1)
    disabled = await admin_client.get("/jobs", headers=AUTH)
    admin_host.state.admin_token = TOKEN
    answers = [
        (disabled, 403),
        (await admin_client.get("/jobs"), 401),
        (await admin_client.get("/jobs", headers=AUTH), 200),
        (await admin_client.get("/jobs", params={"state": "bogus"}, headers=AUTH), 422),
        (await admin_client.get("/jobs", params={"limit": 0}, headers=AUTH), 422),
        (await admin_client.get(f"/jobs/{queued}", headers=AUTH), 200),
        (await admin_client.get("/jobs/999", headers=AUTH), 404),
        (await admin_client.get("/jobs/abc", headers=AUTH), 422),
        (await admin_client.post(f"/jobs/{dead}/retry", headers=AUTH), 200),
        (await admin_client.post(f"/jobs/{done}/retry", headers=AUTH), 409),
        (await admin_client.post(f"/jobs/{queued}/cancel", headers=AUTH), 200),
        (await admin_client.post("/jobs/retry-dead", headers=AUTH), 200),
        (await admin_client.get("/queues", headers=AUTH), 200),
        (await admin_client.get("/queues", params={"window_seconds": 0}, headers=AUTH), 422),
    ]
    for response, status in answers:
        where = f"{response.request.method} {response.request.url}"
        assert response.status_code == status, (where, response.text)
        assert response.headers.get("cache-control") == "no-store", where
        if status >= 400:
            assert response.json()["detail"], where
    # Validation errors keep their shape: FastAPI's, or the app's own.
    invalid = answers[4][0].json()
    assert invalid["detail"][0]["loc"] == ["query", "limit"]
    assert ("answered_by" in invalid) == (invalid_requests == "the-apps-own-answer")

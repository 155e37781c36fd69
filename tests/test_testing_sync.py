"""outbox_worker.testing.sync in a sync test suite, as an app built like the full-stack FastAPI
template has one: plain pytest functions with no event loop, a sync FastAPI route enqueuing
on SQLModel's sync Session, exercised with TestClient; then the jobs checked and drained
without ``await``. And the sync drain refuses to run where an event loop already runs."""

from __future__ import annotations

import asyncio
import os
import uuid
import warnings
from collections.abc import Iterator
from typing import Annotated, Any

import asyncpg
import psycopg
import pytest
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.testclient import TestClient
from pydantic import BaseModel
from sqlalchemy import Engine, create_engine, text
from sqlmodel import Session

import outbox_worker.sync
from outbox_worker import JobContext, Registry
from outbox_worker.devdb import PostgresServer
from outbox_worker.testing.sync import (
    DrainResult,
    assert_enqueued,
    clear_jobs,
    drain,
    perform_job,
    refute_enqueued,
)
from tests.conftest import TEMPLATE
from tests.drivers_support import sqlalchemy_url

tasks = Registry()


@tasks.task(queue="ts_mail")
async def ts_welcome(ctx: JobContext, email: str) -> str:
    async with ctx.transaction() as conn:
        await conn.execute(
            "INSERT INTO test_effects (job_id, note) VALUES ($1, $2)", ctx.job_id, email
        )
        ctx.result = f"welcomed {email}"
    return f"welcomed {email}"


@tasks.task()
async def ts_sum(ctx: JobContext, a: int, b: int) -> int:
    await asyncio.sleep(0)
    return a + b


# ---------------------------------------------------------------------------------------------
# The app: sync routes on SQLModel's sync Session, one per request
# ---------------------------------------------------------------------------------------------


class Signup(BaseModel):
    email: str


def get_session(request: Request) -> Iterator[Session]:
    with Session(request.app.state.engine) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]
router = APIRouter()


@router.post("/signup", status_code=201)
def signup(body: Signup, session: SessionDep) -> dict[str, int]:
    job = outbox_worker.sync.enqueue(session, "ts_welcome", {"email": body.email})
    session.commit()
    return {"job_id": job.id}


def create_app(engine: Engine) -> FastAPI:
    app = FastAPI()
    app.state.engine = engine
    app.include_router(router)
    return app


# ---------------------------------------------------------------------------------------------
# Fixtures with no event loop
# ---------------------------------------------------------------------------------------------


def _admin(server: PostgresServer, statement: str) -> None:
    with psycopg.connect(server.url_for("postgres"), autocommit=True) as conn:
        conn.execute(statement)


@pytest.fixture
def sync_database_url(pg_server: PostgresServer, template_url: str) -> Iterator[str]:
    """conftest's database_url, made without an event loop: a migrated database of its own."""
    name = f"s_{os.getpid()}_{uuid.uuid4().hex[:12]}"
    _admin(pg_server, f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    try:
        yield pg_server.url_for(name)
    finally:
        _admin(pg_server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def sync_engine(sync_database_url: str) -> Iterator[Engine]:
    engine = create_engine(sqlalchemy_url(sync_database_url, "psycopg"))
    yield engine
    engine.dispose()


# ---------------------------------------------------------------------------------------------
# A sync test suite
# ---------------------------------------------------------------------------------------------


def test_a_sync_apps_job_is_checked_and_drained_without_await(
    sync_engine: Engine, sync_database_url: str
) -> None:
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()  # a plain sync test: no event loop runs here
    with TestClient(create_app(sync_engine)) as client:
        response = client.post("/signup", json={"email": "ada@example.com"})
    assert response.status_code == 201, response.text
    job_id = response.json()["job_id"]

    with Session(sync_engine) as session:
        [job] = assert_enqueued(session, "ts_welcome", {"email": "ada@example.com"}, count=1)
        assert (job.id, job.state, job.queue) == (job_id, "queued", "ts_mail")
        refute_enqueued(session, "ts_welcome", state="succeeded")

    assert drain(tasks, sync_database_url) == DrainResult(succeeded=1, job_ids=(job_id,))
    with Session(sync_engine) as session:
        [done] = assert_enqueued(session, "ts_welcome", state="succeeded", count=1)
        assert done.result == "welcomed ada@example.com"
        effects = session.connection().execute(text("SELECT job_id, note FROM test_effects"))
        assert effects.all() == [(job_id, "ada@example.com")]
    assert drain(tasks, sync_database_url) == DrainResult()

    with Session(sync_engine) as session:
        assert clear_jobs(session) == 1
        session.commit()
    with Session(sync_engine) as session:
        refute_enqueued(session, "ts_welcome")


def test_sync_perform_job_runs_the_handler_in_a_loop_of_its_own(sync_database_url: str) -> None:
    assert perform_job(tasks, "ts_sum", {"a": 2, "b": 3}) == 5
    note = perform_job(
        tasks, "ts_welcome", {"email": "bo@example.com"}, database=sync_database_url, job_id=4
    )
    assert note == "welcomed bo@example.com"
    with psycopg.connect(sync_database_url) as conn:
        rows = conn.execute("SELECT job_id, note FROM test_effects").fetchall()
    assert rows == [(4, "bo@example.com")]


def test_the_sync_drain_takes_a_url_not_another_loops_pool() -> None:
    pool: Any = object()  # what an asyncpg pool would be to it: tied to another loop
    with pytest.raises(TypeError, match="takes the database's URL, not object"):
        drain(tasks, pool)
    with pytest.raises(TypeError, match=r"sync\.perform_job\(\) takes the database's URL"):
        perform_job(tasks, "ts_sum", {"a": 1, "b": 1}, database=pool)


async def test_inside_a_running_event_loop_the_sync_drain_says_to_await_the_async_one(
    pool: asyncpg.Pool, database_url: str
) -> None:
    job_id = await pool.fetchval(
        "INSERT INTO outbox_jobs (task, args) VALUES ('ts_sum', '{\"a\": 1, \"b\": 2}') "
        "RETURNING id"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no coroutine left never awaited either
        with pytest.raises(RuntimeError, match=r"await outbox_worker\.testing\.drain\(\.\.\.\)"):
            drain(tasks, database_url)
        with pytest.raises(
            RuntimeError, match=r"await outbox_worker\.testing\.perform_job\(\.\.\.\) instead"
        ):
            perform_job(tasks, "ts_sum", {"a": 1, "b": 2})
    assert await pool.fetchval("SELECT state FROM outbox_jobs WHERE id = $1", job_id) == "queued"

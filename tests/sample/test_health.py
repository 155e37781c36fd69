"""The sample service's own health routes, on real PostgreSQL: /healthz and /readyz (the
schema at its heads, live workers), /metrics, the 503 with Retry-After of every route when
the database is down, and the 503 of its QueueFull handler when a queue is over its depth
limit (backpressure)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from alembic import command
from app.core.config import Settings
from app.main import create_app, schema_heads
from outbox_worker import QueueFull, enqueue
from outbox_worker.devdb import PostgresServer
from outbox_worker.enqueue_plans import default_backpressure
from outbox_worker.web.router import RETRY_AFTER_SECONDS
from tests.conftest import WorkerProcess, alembic_config
from tests.sample.support import assert_json_detail


async def test_healthz(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_is_200_when_migrated(client: httpx.AsyncClient) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json() == {
        "status": "ready",
        "checks": {
            "database": "ok",
            "schema": "ok",
            "workers": {"alive": 0, "seen_within_seconds": 60.0},
        },
    }


async def test_readyz_reports_live_workers(
    client: httpx.AsyncClient, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    body = (await client.get("/readyz")).json()
    assert body["checks"]["workers"]["alive"] == 0
    worker = spawn_worker()
    await worker.wait_for_log("worker_ready")
    body = (await client.get("/readyz")).json()
    assert body["status"] == "ready"
    assert body["checks"]["workers"]["alive"] == 1
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    # A clean stop says goodbye.
    assert (await client.get("/readyz")).json()["checks"]["workers"]["alive"] == 0


async def test_readyz_is_503_when_the_schema_is_behind(
    client: httpx.AsyncClient, database_url: str
) -> None:
    await asyncio.to_thread(command.downgrade, alembic_config(database_url), "pgoutbox@-1")

    response = await client.get("/readyz")

    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["database"] == "ok"
    assert "pgoutbox_0017" in body["checks"]["schema"]
    for head in schema_heads():
        assert head in body["checks"]["schema"]
    # Alive nonetheless.
    assert (await client.get("/healthz")).status_code == 200

    await asyncio.to_thread(command.upgrade, alembic_config(database_url), "heads")
    assert (await client.get("/readyz")).status_code == 200


async def test_readyz_is_503_when_the_database_is_unreachable(
    pg_server: PostgresServer,
) -> None:
    unreachable = create_app(Settings(database_url=pg_server.url_for("no_such_database_here")))
    async with unreachable.router.lifespan_context(unreachable):
        transport = httpx.ASGITransport(app=unreachable)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            ready = await client.get("/readyz")
            alive = await client.get("/healthz")

    assert ready.status_code == 503, ready.text
    assert ready.headers["content-type"].startswith("application/json")
    body = ready.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["database"].startswith("unreachable")
    assert "x-request-id" in ready.headers
    assert alive.status_code == 200


ADMIN = {"Authorization": "Bearer an-admin-token-for-the-outage-test"}
EVERY_DATABASE_ROUTE: list[tuple[str, str, dict[str, Any]]] = [
    ("POST", "/signup", {"json": {"email": "ann@example.com"}}),
    ("POST", "/comments", {"json": {"author": "ann", "body": "hello"}}),
    ("POST", "/reports", {"json": {}}),
    ("GET", f"/reports/{uuid.UUID(int=1)}", {}),
    ("GET", "/metrics", {}),
    ("GET", "/jobs", {"headers": ADMIN}),
    ("GET", "/jobs/1", {"headers": ADMIN}),
    ("POST", "/jobs/1/retry", {"headers": ADMIN}),
    ("POST", "/jobs/1/cancel", {"headers": ADMIN}),
    ("POST", "/jobs/retry-dead", {"headers": ADMIN}),
    ("GET", "/queues", {"headers": ADMIN}),
    ("GET", "/dashboard", {"headers": ADMIN}),
    ("GET", "/dashboard/jobs", {"headers": ADMIN}),
    ("GET", "/dashboard/jobs/1", {"headers": ADMIN}),
]


def as_user(url: str, user: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{user}@{parts.netloc.rpartition('@')[2]}"))


@pytest.mark.parametrize("outage", ["nothing-listens", "too-many-connections"])
async def test_every_route_answers_503_with_retry_after_when_the_database_is_down(
    database_url: str, crowded_user: str, outage: str
) -> None:
    if outage == "nothing-listens":
        url = "postgresql://nobody@127.0.0.1:1/nothing"
    else:
        url = as_user(database_url, crowded_user)
    down = create_app(Settings(database_url=url, admin_token=ADMIN["Authorization"][7:]))
    async with down.router.lifespan_context(down):
        transport = httpx.ASGITransport(app=down)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            answers = [
                (method, path, await client.request(method, path, **kwargs))
                for method, path, kwargs in EVERY_DATABASE_ROUTE
            ]
            ready = await client.get("/readyz")
            alive = await client.get("/healthz")

    for method, path, response in answers:
        assert response.status_code == 503, (method, path, response.text)
        assert response.headers["retry-after"] == str(RETRY_AFTER_SECONDS), (method, path)
        assert "database" in assert_json_detail(response), (method, path)
        assert "x-request-id" in response.headers, (method, path)
    assert ready.status_code == 503
    assert ready.json()["status"] == "unavailable"
    assert alive.status_code == 200


@pytest.fixture
def depth_limit(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("OUTBOX_QUEUE_DEPTH_LIMITS", json.dumps({"reports": 3}))
    monkeypatch.setenv("OUTBOX_QUEUE_DEPTH_CACHE_SECONDS", "0")
    default_backpressure.cache_clear()
    yield
    default_backpressure.cache_clear()


async def test_backpressure_is_503_with_retry_after(
    depth_limit: None, client: httpx.AsyncClient, pool: asyncpg.Pool, engine: AsyncEngine
) -> None:
    for _ in range(3):
        assert (await client.post("/reports", json={})).status_code == 202
    full = await client.post("/reports", json={})
    assert full.status_code == 503
    assert full.headers["retry-after"] == "1"
    assert "depth limit" in full.json()["detail"]
    assert await pool.fetchval("SELECT count(*) FROM reports") == 3  # rolled back with it
    assert await pool.fetchval("SELECT count(*) FROM outbox_jobs") == 3
    # Other queues are not limited; the library raises the typed error itself.
    async with engine.begin() as conn:
        await enqueue(conn, "echo")
        with pytest.raises(QueueFull) as raised:
            await enqueue(conn, "generate_report", {"report_id": "x"}, key="x")
    assert raised.value.retry_after == 1
    # Once the workers catch up, enqueue is accepted again.
    await pool.execute(
        "UPDATE outbox_jobs SET state = 'cancelled', finished_at = now() WHERE queue = 'reports'"
    )
    assert (await client.post("/reports", json={})).status_code == 202


async def test_metrics_expose_counters_and_queue_gauges(
    client: httpx.AsyncClient, pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    assert (await client.post("/reports", json={})).status_code == 202
    text = (await client.get("/metrics")).text
    assert re.search(
        r'outbox_jobs_enqueued_total\{queue="reports",task="generate_report"\} '
        r"[1-9]",
        text,
    )
    assert 'outbox_queue_depth{queue="reports",state="queued"} 1.0' in text
    assert 'outbox_queue_depth{queue="reports",state="due"} 1.0' in text
    assert "outbox_workers_alive 0.0" in text
    await pool.execute("UPDATE outbox_jobs SET state = 'cancelled', finished_at = now()")
    worker = spawn_worker()
    await worker.wait_for_log("worker_ready")
    text = (await client.get("/metrics")).text
    assert 'outbox_queue_depth{queue="reports",state="queued"} 0.0' in text
    assert "outbox_workers_alive 1.0" in text
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0

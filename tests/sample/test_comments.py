"""The sample service's comment route (POST /comments), through the ASGI app on real
PostgreSQL: the comment is saved, and subscribers are notified after the response, of a
comment already committed."""

from __future__ import annotations

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from tests.conftest import wait_until
from tests.sample.support import probing_client


async def test_a_comment_is_saved_and_subscribers_are_notified_after_the_response(
    app: FastAPI, pool: asyncpg.Pool
) -> None:
    notified_when_sent: list[list[int]] = []

    async def on_sent() -> None:
        notified_when_sent.append(list(app.state.notifier.sent))

    async with probing_client(app, on_sent) as client:
        response = await client.post("/comments", json={"author": "ann", "body": "hello"})

    assert response.status_code == 201, response.text
    body = response.json()
    assert body == {"id": body["id"], "author": "ann", "body": "hello"}
    row = await pool.fetchrow("SELECT author, body FROM comments WHERE id = $1", body["id"])
    assert row is not None
    assert (row["author"], row["body"]) == ("ann", "hello")
    # Nobody had been notified when the response went out; afterwards, exactly once.
    assert notified_when_sent == [[]]

    async def notified() -> bool:
        return bool(app.state.notifier.sent == [body["id"]])

    await wait_until(notified, timeout=10, what="the subscriber notification")
    # A comment is not a job.
    assert await pool.fetchval("SELECT count(*) FROM outbox_jobs") == 0


async def test_subscribers_are_notified_of_a_comment_that_is_already_committed(
    app: FastAPI, client: httpx.AsyncClient, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The notification is fire-and-forget after the response; by then the comment must be
    in the database, or subscribers hear of a comment they cannot read (and a rolled-back
    comment would still be announced)."""
    notifier = app.state.notifier
    real_notify = notifier.notify
    visible: list[int] = []

    async def notify_and_look(comment_id: int, author: str) -> None:
        visible.append(
            await pool.fetchval("SELECT count(*) FROM comments WHERE id = $1", comment_id)
        )
        await real_notify(comment_id, author)

    monkeypatch.setattr(notifier, "notify", notify_and_look)
    response = await client.post("/comments", json={"author": "ann", "body": "hi"})
    assert response.status_code == 201

    async def notified() -> bool:
        return bool(visible)

    await wait_until(notified, timeout=10, what="the subscriber notification")
    assert notifier.sent == [response.json()["id"]]
    assert visible == [1], "subscribers were notified before the comment was committed"

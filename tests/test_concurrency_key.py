"""``concurrency_key`` at enqueue: stored as given by every session kind and by both of
enqueue_many's statements, refused before any SQL when it is not a short printable text, no
part of deduplication, and shown by every face that shows a job."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

import outbox_worker.sync
from outbox_worker import InvalidOption, NewJob, Outbox, enqueue
from tests.admin_support import AUTH
from tests.cli_support import cli, ok, ok_json
from tests.dashboard_support import SIGNED_IN
from tests.drivers_support import Caller, committed, open_caller, sqlalchemy_url
from tests.workload import registry


async def stored_keys(pool: asyncpg.Pool) -> dict[int, str | None]:
    """Each committed job's concurrency_key, as another connection reads it."""
    return {r["id"]: r["concurrency_key"] for r in await committed(pool)}


async def test_the_key_is_stored_on_every_kind(caller: Caller, pool: asyncpg.Pool) -> None:
    one = await caller.enqueue("echo", {"n": 1}, concurrency_key="tenant:acme")
    plain = await caller.enqueue("echo", {"n": 2})
    handle = await caller.enqueue(NewJob("noop").with_options(concurrency_key="tenant:é✓"))
    # One task's jobs alike but for their args take the short batch statement ...
    uniform = await caller.enqueue_many(
        [NewJob("echo", {"n": n}, concurrency_key="tenant:globex") for n in (3, 4)]
    )
    # ... keys that differ, or none, the general one.
    mixed = await caller.enqueue_many(
        [
            NewJob("echo", {"n": 5}, concurrency_key="tenant:acme"),
            NewJob("echo", {"n": 6}),
            NewJob("echo", {"n": 7}, concurrency_key="tenant:initech"),
            NewJob("noop", key="k", concurrency_key="tenant:acme"),
        ]
    )
    await caller.commit()
    jobs = [one, plain, handle, *uniform, *mixed]
    expected = [
        "tenant:acme",
        None,
        "tenant:é✓",
        "tenant:globex",
        "tenant:globex",
        "tenant:acme",
        None,
        "tenant:initech",
        "tenant:acme",
    ]
    assert [job.concurrency_key for job in jobs] == expected
    assert await stored_keys(pool) == {job.id: key for job, key in zip(jobs, expected, strict=True)}


async def test_the_outbox_faces_store_it(database_url: str, pool: asyncpg.Pool) -> None:
    outbox = Outbox(registry)
    async with AsyncExitStack() as stack:
        async_caller = await open_caller("asyncpg-connection", database_url, stack, outbox)
        awaited = await async_caller.enqueue("echo", concurrency_key="account:1")
        await async_caller.commit()
    engine = create_engine(sqlalchemy_url(database_url, "psycopg"))
    try:
        with Session(engine) as session:
            sync_one = outbox.sync.enqueue(session, "echo", concurrency_key="account:2")
            sync_many = outbox.sync.enqueue_many(
                session,
                [NewJob("echo", concurrency_key="account:3"), NewJob("noop")],
            )
            module_one = outbox_worker.sync.enqueue(session, "noop", concurrency_key="account:4")
            session.commit()
    finally:
        engine.dispose()
    assert await stored_keys(pool) == {
        awaited.id: "account:1",
        sync_one.id: "account:2",
        sync_many[0].id: "account:3",
        sync_many[1].id: None,
        module_one.id: "account:4",
    }


async def test_the_longest_key_is_taken_whole(engine: AsyncEngine, pool: asyncpg.Pool) -> None:
    longest = "k" * 199 + "é"
    async with AsyncSession(engine) as session, session.begin():
        job = await enqueue(session, "echo", concurrency_key=longest)
    assert await stored_keys(pool) == {job.id: longest}


async def test_the_key_takes_no_part_in_deduplication(
    engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    async with AsyncSession(engine) as session, session.begin():
        first = await enqueue(session, "echo", {"n": 1}, key="order-1", concurrency_key="a")
        again = await enqueue(session, "echo", {"n": 2}, key="order-1", concurrency_key="b")
        batch = await outbox_worker.enqueue_many(
            session,
            [
                NewJob("echo", {"n": 3}, key="order-1", concurrency_key="c"),
                NewJob("echo", {"n": 4}, key="order-2", concurrency_key="a"),
                NewJob("echo", {"n": 5}, key="order-2"),
            ],
        )
    assert (first.duplicate, again.duplicate) == (False, True)
    assert again.id == batch[0].id == first.id
    assert again.concurrency_key == batch[0].concurrency_key == "a"  # the existing job's
    assert [job.duplicate for job in batch] == [True, False, True]
    assert batch[2].id == batch[1].id
    assert batch[2].concurrency_key == "a"
    assert await stored_keys(pool) == {first.id: "a", batch[1].id: "a"}


REFUSED: list[tuple[str, Any, str]] = [
    ("empty", "", "1 to 200 characters"),
    ("int", 7, "must be a string, not int"),
    ("bytes", b"tenant", "must be a string, not bytes"),
    ("list", ["tenant:acme"], "must be a string, not list"),
    ("too-long", "k" * 201, "1 to 200 characters, not 201"),
    ("nul", "tenant\x00acme", "no control characters"),
    ("newline", "tenant\nacme", "no control characters"),
    ("tab", "\ttenant", "no control characters"),
    ("unit-separator", "tenant\x1f", "no control characters"),
    ("delete", "tenant\x7f", "no control characters"),
    ("lone-surrogate", "tenant\ud800", "not valid Unicode"),
]


@pytest.mark.parametrize(
    ("value", "message"),
    [(value, message) for _, value, message in REFUSED],
    ids=[name for name, _, _ in REFUSED],
)
async def test_a_bad_key_is_refused_with_nothing_written(
    engine: AsyncEngine, pool: asyncpg.Pool, value: Any, message: str
) -> None:
    async with AsyncSession(engine) as session:
        before = await enqueue(session, "noop")
        with pytest.raises(InvalidOption, match="concurrency_key") as refused:
            await enqueue(session, "echo", concurrency_key=value)
        assert message in str(refused.value)
        with pytest.raises(InvalidOption, match=message):
            await outbox_worker.enqueue_many(
                session, [NewJob("noop"), NewJob("echo", concurrency_key=value)]
            )
        with pytest.raises(InvalidOption, match=message):
            await enqueue(session, NewJob("echo").with_options(concurrency_key=value))
        # Nothing of that reached the database: the transaction goes on, and commits.
        after = await enqueue(session, "noop")
        await session.commit()
    assert await stored_keys(pool) == {before.id: None, after.id: None}


async def test_a_bad_key_is_refused_on_the_sync_path(database_url: str, pool: asyncpg.Pool) -> None:
    engine = create_engine(sqlalchemy_url(database_url, "psycopg"))
    try:
        with Session(engine) as session:
            for _, value, message in REFUSED:
                with pytest.raises(InvalidOption, match=message):
                    outbox_worker.sync.enqueue(session, "echo", concurrency_key=value)
                with pytest.raises(InvalidOption, match=message):
                    outbox_worker.sync.enqueue_many(
                        session, [NewJob("echo", concurrency_key=value)]
                    )
            session.commit()
    finally:
        engine.dispose()
    assert await stored_keys(pool) == {}


async def test_every_face_shows_the_key(
    engine: AsyncEngine,
    pool: asyncpg.Pool,
    database_url: str,
    admin_app: FastAPI,
    admin_client: httpx.AsyncClient,
) -> None:
    async with AsyncSession(engine) as session, session.begin():
        acme = await enqueue(session, "echo", {"n": 1}, concurrency_key="tenant:acme")
        plain = await enqueue(session, "echo", {"n": 2})

    shown = await admin_client.get(f"/jobs/{acme.id}", headers=AUTH)
    assert shown.status_code == 200, shown.text
    assert shown.json()["concurrency_key"] == "tenant:acme"
    assert (await admin_client.get(f"/jobs/{plain.id}", headers=AUTH)).json()[
        "concurrency_key"
    ] is None
    items = (await admin_client.get("/jobs", headers=AUTH)).json()["items"]
    assert {item["id"]: item["concurrency_key"] for item in items} == {
        acme.id: "tenant:acme",
        plain.id: None,
    }
    page = await admin_client.get("/jobs", params={"concurrency_key": "tenant:acme"}, headers=AUTH)
    assert [item["id"] for item in page.json()["items"]] == [acme.id]
    refused = await admin_client.get("/jobs", params={"concurrency_key": ""}, headers=AUTH)
    assert refused.status_code == 422, refused.text
    assert "concurrency_key" in refused.json()["detail"]

    as_json = ok_json(await cli(database_url, "jobs", "show", str(acme.id), "--json"))
    assert as_json["concurrency_key"] == "tenant:acme"
    as_text = ok(await cli(database_url, "jobs", "show", str(acme.id)))
    assert "concurrency key" in as_text
    assert "tenant:acme" in as_text
    assert "concurrency key" not in ok(await cli(database_url, "jobs", "show", str(plain.id)))

    job_page = await admin_client.get(f"/dashboard/jobs/{acme.id}", headers=SIGNED_IN)
    assert job_page.status_code == 200
    assert '<td id="job-concurrency-key"><code>tenant:acme</code></td>' in job_page.text

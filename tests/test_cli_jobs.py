"""The operator's ``jobs`` commands, run as ``python -m outbox_worker …`` subprocesses against
a real database: ``jobs list|show|retry|cancel|retry-dead``, in table and ``--json`` modes,
jobs nested deeper than readers go, and control characters shown, not obeyed.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from outbox_worker import enqueue
from outbox_worker.jobs import JOB_COLUMNS, MAX_JSON_DEPTH, TOO_DEEP
from tests.cli_support import (
    FINISHED,
    assert_one_line_error,
    cli,
    insert_job,
    ok,
    ok_json,
    row,
    state_of,
)
from tests.conftest import deep_json, levels

# ---------------------------------------------------------------------------------------------
# jobs list
# ---------------------------------------------------------------------------------------------


async def test_jobs_list_in_table_and_json(
    database_url: str, engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    async with engine.begin() as conn:
        queued = [
            (await enqueue(conn, "echo", {"n": n}, correlation_id=f"req-{n}")).id for n in range(3)
        ]
    dead = await insert_job(
        pool,
        task="always_fails",
        queue="mail",
        state="dead",
        attempts=3,
        last_error="ValueError: [bold]this task always fails[/bold]\n  at line 2",
    )

    page = ok_json(await cli(database_url, "jobs", "list", "--json"))
    assert set(page) == {"items", "next_cursor"}
    assert page["next_cursor"] is None
    assert [item["id"] for item in page["items"]] == [dead, *reversed(queued)]
    for item in page["items"]:
        assert set(item) == set(JOB_COLUMNS)
        assert datetime.fromisoformat(item["created_at"]).tzinfo is not None
        assert datetime.fromisoformat(item["run_at"]).tzinfo is not None
    by_id = {item["id"]: item for item in page["items"]}
    assert by_id[queued[1]]["args"] == {"n": 1}
    assert by_id[queued[1]]["correlation_id"] == "req-1"
    assert by_id[queued[1]]["state"] == "queued"
    assert by_id[dead]["state"] == "dead"
    assert by_id[dead]["last_error"].startswith("ValueError: [bold]")
    assert datetime.fromisoformat(by_id[dead]["finished_at"]).tzinfo is not None

    filtered = ok_json(await cli(database_url, "jobs", "list", "--state", "dead", "--json"))
    assert [item["id"] for item in filtered["items"]] == [dead]
    filtered = ok_json(await cli(database_url, "jobs", "list", "--queue", "mail", "--json"))
    assert [item["id"] for item in filtered["items"]] == [dead]
    filtered = ok_json(await cli(database_url, "jobs", "list", "--task", "echo", "--json"))
    assert sorted(item["id"] for item in filtered["items"]) == sorted(queued)
    none = ok_json(
        await cli(database_url, "jobs", "list", "--state", "dead", "--task", "echo", "--json")
    )
    assert none == {"items": [], "next_cursor": None}

    table = ok(await cli(database_url, "jobs", "list"))
    lines = table.splitlines()
    for job_id in [*queued, dead]:
        assert any(line.split() and line.split()[0] == str(job_id) for line in lines), table
    dead_line = next(line for line in lines if line.split() and line.split()[0] == str(dead))
    assert "always_fails" in dead_line
    assert "mail" in dead_line
    assert "3/3" in dead_line
    # Rich markup in an error is shown as written, and only its first line is listed.
    assert "ValueError: [bold]this task" in dead_line
    assert "at line 2" not in table
    assert "next cursor: none" in table

    assert "no jobs match" in ok(
        await cli(database_url, "jobs", "list", "--state", "running", "--queue", "mail")
    )


async def test_jobs_list_pages_with_the_cursor(database_url: str, pool: asyncpg.Pool) -> None:
    ids = [await insert_job(pool, args={"n": n}) for n in range(7)]

    seen: list[int] = []
    cursors: list[str | None] = []
    cursor: str | None = None
    for _ in range(5):
        args = ["jobs", "list", "--limit", "3", "--json"]
        if cursor is not None:
            args += ["--cursor", cursor]
        page = ok_json(await cli(database_url, *args))
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        cursors.append(cursor)
        if cursor is None:
            break
    assert seen == sorted(ids, reverse=True)  # every job once, newest first
    first_cursor, second_cursor, last_cursor = cursors
    assert last_cursor is None
    assert first_cursor is not None
    assert second_cursor is not None

    first = ok(await cli(database_url, "jobs", "list", "--limit", "3"))
    assert f"next cursor: {first_cursor}" in first
    second = ok(await cli(database_url, "jobs", "list", "--limit", "3", "--cursor", first_cursor))
    listed = [
        int(line.split()[0])
        for line in second.splitlines()
        if line.split() and line.split()[0].isdigit()
    ]
    assert listed == sorted(ids, reverse=True)[3:6]
    assert f"next cursor: {second_cursor}" in second
    last = ok(await cli(database_url, "jobs", "list", "--limit", "3", "--cursor", second_cursor))
    assert "next cursor: none" in last


# ---------------------------------------------------------------------------------------------
# jobs show, retry, cancel, retry-dead
# ---------------------------------------------------------------------------------------------


async def test_jobs_show(database_url: str, pool: asyncpg.Pool) -> None:
    job_id = await insert_job(
        pool,
        task="send_email",
        queue="mail",
        state="dead",
        args={"to": "ada@example.com", "n": 1},
        attempts=3,
        last_error="ConnectionError: [Errno 111] refused\nsecond line of the error",
        finished_ago=timedelta(hours=2),
    )

    table = ok(await cli(database_url, "jobs", "show", str(job_id)))
    assert "send_email" in table
    assert "mail" in table
    assert "dead" in table
    assert "3 of 3" in table
    assert '"to": "ada@example.com"' in table
    assert "[Errno 111] refused" in table
    assert "second line of the error" in table

    shown = ok_json(await cli(database_url, "jobs", "show", str(job_id), "--json"))
    stored = await row(pool, job_id)
    assert stored is not None
    assert set(shown) == set(JOB_COLUMNS)
    assert shown["id"] == job_id
    assert shown["args"] == {"to": "ada@example.com", "n": 1}
    assert shown["state"] == "dead"
    assert shown["attempts"] == 3
    assert shown["last_error"] == stored["last_error"]
    assert datetime.fromisoformat(shown["finished_at"]) == stored["finished_at"]
    # As the admin API writes it (tests/test_admin_job_json.py):
    assert shown["finished_at"].endswith("Z")
    assert datetime.fromisoformat(shown["created_at"]) == stored["created_at"]
    assert shown["started_at"] is not None
    assert shown["locked_by"] is None


async def test_jobs_retry(database_url: str, pool: asyncpg.Pool) -> None:
    dead = await insert_job(pool, state="dead", attempts=3, max_attempts=3, last_error="boom")
    cancelled = await insert_job(pool, state="cancelled")
    succeeded = await insert_job(pool, state="succeeded")
    running = await insert_job(pool, state="running")

    out = ok(await cli(database_url, "jobs", "retry", str(dead)))
    assert f"job {dead}" in out
    assert "queued" in out
    stored = await row(pool, dead)
    assert stored is not None
    assert stored["state"] == "queued"
    assert stored["finished_at"] is None
    assert stored["max_attempts"] >= stored["attempts"] + 1  # one more attempt at least
    assert await pool.fetchval("SELECT run_at <= now() FROM outbox_jobs WHERE id = $1", dead)

    retried = ok_json(await cli(database_url, "jobs", "retry", str(cancelled), "--json"))
    assert retried["id"] == cancelled
    assert retried["state"] == "queued"
    assert await state_of(pool, cancelled) == "queued"

    line = assert_one_line_error(
        await cli(database_url, "jobs", "retry", str(succeeded)), "succeeded", code=1
    )
    assert str(succeeded) in line
    assert await state_of(pool, succeeded) == "succeeded"
    assert_one_line_error(
        await cli(database_url, "jobs", "retry", str(running), "--json"), "running", code=1
    )
    assert await state_of(pool, running) == "running"


async def test_jobs_cancel(database_url: str, pool: asyncpg.Pool) -> None:
    queued = await insert_job(pool)
    queued_json = await insert_job(pool)
    running = await insert_job(pool, state="running")
    finished = {state: await insert_job(pool, state=state) for state in FINISHED}

    out = ok(await cli(database_url, "jobs", "cancel", str(queued)))
    assert f"job {queued}" in out
    assert "cancelled" in out
    assert await state_of(pool, queued) == "cancelled"

    cancelled = ok_json(await cli(database_url, "jobs", "cancel", str(queued_json), "--json"))
    assert cancelled["state"] == "cancelled"
    assert cancelled["finished_at"] is not None

    # A running job is asked to stop; its worker ends it (tests of the worker cover that).
    out = ok(await cli(database_url, "jobs", "cancel", str(running)))
    assert "cancel requested" in out
    stored = await row(pool, running)
    assert stored is not None
    assert stored["state"] == "running"
    assert stored["cancel_requested_at"] is not None

    for state, job_id in finished.items():
        line = assert_one_line_error(
            await cli(database_url, "jobs", "cancel", str(job_id)), state, code=1
        )
        assert str(job_id) in line
        assert await state_of(pool, job_id) == state


async def test_jobs_nested_deeper_than_readers_go_list_show_retry_and_cancel(
    database_url: str, pool: asyncpg.Pool
) -> None:
    """As deep as jsonb takes, from plain SQL: every command shows it cut to MAX_JSON_DEPTH
    levels with a marker, and can still retry and cancel the job."""
    job_id = await insert_job(pool, state="dead")
    await pool.execute(
        "UPDATE outbox_jobs SET args = $2::jsonb, result = $2::jsonb WHERE id = $1",
        job_id,
        deep_json(5000),
    )
    cut = (MAX_JSON_DEPTH, TOO_DEEP)

    [item] = ok_json(await cli(database_url, "jobs", "list", "--json"))["items"]
    assert (levels(item["args"]), levels(item["result"])) == (cut, cut)
    shown = ok_json(await cli(database_url, "jobs", "show", str(job_id), "--json"))
    assert (levels(shown["args"]), levels(shown["result"])) == (cut, cut)
    assert str(job_id) in ok(await cli(database_url, "jobs", "list"))
    assert TOO_DEEP in ok(await cli(database_url, "jobs", "show", str(job_id)))

    retried = ok_json(await cli(database_url, "jobs", "retry", str(job_id), "--json"))
    assert (retried["state"], levels(retried["args"])) == ("queued", cut)
    assert "cancelled" in ok(await cli(database_url, "jobs", "cancel", str(job_id)))
    assert await state_of(pool, job_id) == "cancelled"


HOSTILE_TEXT = "boom\x1b[2J\x1b]0;pwned\x07\r\x9b31mred\x7f\u202eevil"
SHOWN_TEXT = r"boom\x1b[2J\x1b]0;pwned\x07\r\x9b31mred\x7f\u202eevil"
# What must never reach the terminal raw: C0 controls but tab and newline, DEL, C1
# controls, and the bidirectional overrides and isolates.
RAW_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


async def test_control_characters_in_jobs_are_shown_not_obeyed(
    database_url: str, pool: asyncpg.Pool
) -> None:
    dead = await insert_job(
        pool, state="dead", args={"text": HOSTILE_TEXT}, last_error=f"{HOSTILE_TEXT}\nline two"
    )
    await pool.execute(
        "UPDATE outbox_jobs SET result = $2::jsonb, correlation_id = $3, dedupe_key = $3 "
        "WHERE id = $1",
        dead,
        json.dumps([HOSTILE_TEXT]),
        HOSTILE_TEXT,
    )
    running = await insert_job(pool, state="running")
    await pool.execute("UPDATE outbox_jobs SET locked_by = $2 WHERE id = $1", running, HOSTILE_TEXT)
    await pool.execute(
        "INSERT INTO outbox_workers (id, queues, concurrency) VALUES ($1, '{default}', 1)",
        HOSTILE_TEXT,
    )

    show = ok(await cli(database_url, "jobs", "show", str(dead)))
    listed = ok(await cli(database_url, "jobs", "list"))
    outputs = [
        show,
        ok(await cli(database_url, "jobs", "cancel", str(running))),
        ok(await cli(database_url, "health", "--within", "1h")),
    ]
    for out in [*outputs, listed]:
        assert not RAW_CONTROL.findall(out), out
    for out in outputs:
        assert SHOWN_TEXT in out, out
    assert SHOWN_TEXT[:30] in listed, listed  # the start of the error's first line
    # The args and result as JSON: what JSON escapes (C0), then the rest.
    assert show.count(r'"boom\u001b[2J\u001b]0;pwned\u0007\r\x9b31mred\x7f\u202eevil"') == 2
    # A traceback keeps its lines in `jobs show`.
    assert any(line.strip() == "line two" for line in show.splitlines()), show
    # JSON escapes what it must on its own, and keeps the text exact.
    shown = ok_json(await cli(database_url, "jobs", "show", str(dead), "--json"))
    assert shown["last_error"] == f"{HOSTILE_TEXT}\nline two"
    assert (shown["args"], shown["result"]) == ({"text": HOSTILE_TEXT}, [HOSTILE_TEXT])


async def test_jobs_retry_dead_by_filter(database_url: str, pool: asyncpg.Pool) -> None:
    mail_dead = [
        await insert_job(pool, task="send_email", queue="mail", state="dead") for _ in range(2)
    ]
    reports_dead = await insert_job(pool, task="generate_report", queue="reports", state="dead")
    succeeded = await insert_job(pool, task="send_email", queue="mail", state="succeeded")

    retried = ok_json(await cli(database_url, "jobs", "retry-dead", "--queue", "mail", "--json"))
    assert sorted(retried["retried"]) == sorted(mail_dead)
    assert [await state_of(pool, job_id) for job_id in mail_dead] == ["queued", "queued"]
    assert await state_of(pool, reports_dead) == "dead"

    out = ok(await cli(database_url, "jobs", "retry-dead", "--task", "send_email"))
    assert "retried 0 dead jobs" in out

    out = ok(await cli(database_url, "jobs", "retry-dead"))
    assert "retried 1 dead job" in out
    assert str(reports_dead) in out
    assert await state_of(pool, reports_dead) == "queued"
    assert await state_of(pool, succeeded) == "succeeded"

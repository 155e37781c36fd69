"""The operator's commands, run as ``python -m outbox_worker …`` subprocesses against a real
database: ``jobs list|show|retry|cancel|retry-dead``, ``queues``, ``prune``, ``health``, in
table and ``--json`` modes; bad input as one stderr line; and the worker's ``--metrics-port``
serving Prometheus text over real HTTP.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncEngine

from outbox_worker import enqueue, migrate
from outbox_worker.devdb import free_port
from outbox_worker.jobs import JOB_COLUMNS, MAX_JSON_DEPTH, TOO_DEEP
from tests.conftest import WorkerProcess, deep_json, levels, wait_until

ROOT = Path(__file__).resolve().parent.parent
ERROR_PREFIX = "outbox-worker: error:"
UNREACHABLE_URL = "postgresql://nobody@127.0.0.1:1/nothing"
FINISHED = ("succeeded", "dead", "cancelled")

Spawn = Callable[..., WorkerProcess]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _env(database_url: str | None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "OUTBOX_DATABASE_URL") and not k.startswith("OUTBOX_")
    }
    env["PYTHONPATH"] = str(ROOT)
    env["COLUMNS"] = "200"  # rich tables: wide enough that no cell is cut
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    return env


def run_cli(
    database_url: str | None, *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "outbox_worker", *args],
        env=_env(database_url) | (env or {}),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def cli(
    database_url: str | None, *args: str, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run_cli, database_url, *args, cwd=cwd)


def _report(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def ok(result: subprocess.CompletedProcess[str], *, quiet_stderr: bool = True) -> str:
    assert result.returncode == 0, _report(result)
    assert "Traceback" not in result.stderr + result.stdout, _report(result)
    if quiet_stderr:
        assert result.stderr == "", _report(result)
    return result.stdout


def ok_json(result: subprocess.CompletedProcess[str]) -> Any:
    """Exit 0, nothing on stderr, and stdout is one JSON document and nothing else."""
    return json.loads(ok(result))


def assert_one_line_error(
    result: subprocess.CompletedProcess[str], mentions: str, code: int | None = None
) -> str:
    report = _report(result)
    assert result.returncode != 0, report
    if code is not None:
        assert result.returncode == code, report
    assert "Traceback" not in result.stderr + result.stdout, report
    assert result.stdout == "", report
    lines = result.stderr.splitlines()
    assert len(lines) == 1, report
    assert lines[0].startswith(ERROR_PREFIX), report
    assert mentions.lower() in lines[0].lower(), report
    return lines[0]


async def insert_job(
    pool: asyncpg.Pool,
    *,
    task: str = "echo",
    queue: str = "default",
    state: str = "queued",
    args: dict[str, Any] | None = None,
    attempts: int | None = None,
    max_attempts: int = 3,
    last_error: str | None = None,
    finished_ago: timedelta = timedelta(0),
    run_in: timedelta = timedelta(0),
    created_ago: timedelta = timedelta(0),
) -> int:
    """A job row in any state, by SQL, as an operator's table would hold it."""
    if attempts is None:
        attempts = {"queued": 0, "running": 1, "cancelled": 0}.get(state, 1)
    job_id: int = await pool.fetchval(
        """
        INSERT INTO outbox_jobs (task, queue, args, state, attempts, max_attempts, last_error,
                                 run_at, created_at, locked_by, locked_until, started_at,
                                 finished_at)
        VALUES ($1, $2, $3::jsonb, $4, $5, $6, $7, now() + $8::interval, now() - $9::interval,
                CASE WHEN $4 = 'running' THEN 'test-host:1:abcdef' END,
                CASE WHEN $4 = 'running' THEN now() + interval '5 minutes' END,
                CASE WHEN $5 > 0 THEN now() - $10::interval END,
                CASE WHEN $4 IN ('succeeded', 'dead', 'cancelled') THEN now() - $10::interval END)
        RETURNING id
        """,
        task,
        queue,
        json.dumps(args or {}),
        state,
        attempts,
        max_attempts,
        last_error,
        run_in,
        created_ago,
        finished_ago,
    )
    return job_id


async def row(pool: asyncpg.Pool, job_id: int) -> asyncpg.Record | None:
    return await pool.fetchrow("SELECT * FROM outbox_jobs WHERE id = $1", job_id)


async def state_of(pool: asyncpg.Pool, job_id: int) -> str | None:
    value: str | None = await pool.fetchval("SELECT state FROM outbox_jobs WHERE id = $1", job_id)
    return value


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
    assert shown["finished_at"].endswith("Z")  # as the admin API writes it (tests/test_admin.py)
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


# ---------------------------------------------------------------------------------------------
# queues, prune
# ---------------------------------------------------------------------------------------------


async def test_queues(database_url: str, pool: asyncpg.Pool) -> None:
    assert "no jobs in any queue" in ok(await cli(database_url, "queues"))
    assert ok_json(await cli(database_url, "queues", "--json")) == {
        "queues": [],
        "window_seconds": 300.0,
    }

    await insert_job(pool, run_in=-timedelta(minutes=10))  # due for 10 minutes
    await insert_job(pool)  # due now
    await insert_job(pool, run_in=timedelta(hours=1))  # not due yet
    await insert_job(pool, state="running")
    await insert_job(pool, queue="mail", state="dead", finished_ago=timedelta(seconds=5))
    await insert_job(pool, queue="mail", state="succeeded", finished_ago=timedelta(hours=1))

    stats = ok_json(await cli(database_url, "queues", "--json"))
    assert stats["window_seconds"] == 300.0
    by_queue = {entry["queue"]: entry for entry in stats["queues"]}
    assert sorted(by_queue) == ["default", "mail"]
    default = by_queue["default"]
    assert default["depth"] == {
        "queued": 3,
        "running": 1,
        "succeeded": 0,
        "dead": 0,
        "cancelled": 0,
    }
    assert default["due"] == 2
    assert 600 <= default["oldest_due_seconds"] < 700
    mail = by_queue["mail"]
    assert mail["depth"]["dead"] == 1
    assert mail["depth"]["succeeded"] == 1
    assert mail["due"] == 0
    assert mail["oldest_due_seconds"] == 0
    assert mail["finished_recently"] == {"succeeded": 0, "dead": 1, "cancelled": 0}

    wider = ok_json(await cli(database_url, "queues", "--window", "2h", "--json"))
    assert wider["window_seconds"] == 7200.0
    mail = {entry["queue"]: entry for entry in wider["queues"]}["mail"]
    assert mail["finished_recently"] == {"succeeded": 1, "dead": 1, "cancelled": 0}

    table = ok(await cli(database_url, "queues"))
    default_line = next(line for line in table.splitlines() if line.strip().startswith("default"))
    assert default_line.split()[1:4] == ["3", "2", "1"]  # queued, due, running
    assert "10 min" in default_line  # the oldest due job's age, as the dashboard says it
    mail_line = next(line for line in table.splitlines() if line.strip().startswith("mail"))
    assert "1 (+1)" in mail_line  # one dead, finished within the window
    assert "finished within the last 5m" in table


async def test_prune_deletes_only_old_finished_jobs(database_url: str, pool: asyncpg.Pool) -> None:
    old = timedelta(days=10)
    old_succeeded = [await insert_job(pool, state="succeeded", finished_ago=old) for _ in range(3)]
    old_dead = await insert_job(pool, state="dead", finished_ago=old)
    old_cancelled = await insert_job(pool, state="cancelled", finished_ago=old)
    keep = [
        await insert_job(pool, state="succeeded", finished_ago=timedelta(days=1)),
        await insert_job(pool, state="dead", finished_ago=timedelta(days=6)),
        await insert_job(pool, state="queued", created_ago=timedelta(days=30)),
        await insert_job(pool, state="queued", run_in=-timedelta(days=30)),
        await insert_job(pool, state="running", created_ago=timedelta(days=30)),
    ]

    pruned = ok_json(
        await cli(database_url, "prune", "--older-than", "7d", "--state", "dead", "--json")
    )
    assert pruned == {"deleted": 1, "older_than_seconds": 7 * 86400.0, "states": ["dead"]}
    assert await row(pool, old_dead) is None
    assert await state_of(pool, old_cancelled) == "cancelled"

    # Batches of 2: three old succeeded jobs take two batches, and each is counted.
    result = await cli(database_url, "prune", "--older-than", "7d", "--batch", "2")
    out = ok(result, quiet_stderr=False)
    assert "Traceback" not in result.stderr
    assert "pruning" in result.stderr  # the progress bar goes to stderr, not stdout
    assert "deleted 4 finished jobs" in out
    for job_id in [*old_succeeded, old_cancelled]:
        assert await row(pool, job_id) is None
    remaining = await pool.fetch("SELECT id FROM outbox_jobs ORDER BY id")
    assert [r["id"] for r in remaining] == keep

    again = ok_json(await cli(database_url, "prune", "--older-than", "7d", "--json"))
    assert again["deleted"] == 0
    assert again["states"] == list(FINISHED)
    everything = ok_json(await cli(database_url, "prune", "--older-than", "12h", "--json"))
    assert everything["deleted"] == 2  # the succeeded one of 1 day and the dead one of 6


# ---------------------------------------------------------------------------------------------
# health
# ---------------------------------------------------------------------------------------------


async def test_health_needs_a_recent_worker_heartbeat(
    database_url: str, spawn_worker: Spawn, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    result = await cli(database_url, "health")
    assert result.returncode == 1, _report(result)
    assert result.stderr == ""
    assert "unhealthy" in result.stdout
    assert "no worker heartbeat within 60s" in result.stdout

    result = await cli(database_url, "health", "--json")
    assert result.returncode == 1, _report(result)
    assert result.stderr == ""
    report = json.loads(result.stdout)
    assert report["status"] == "unhealthy"
    checks = report["checks"]
    assert checks["database"]["status"] == "ok"
    assert checks["schema"]["status"] == "ok"
    assert checks["schema"]["current"] == checks["schema"]["expected"] == migrate.head()
    assert checks["schema"]["recorded_in"] == "alembic_version"  # the sample's Alembic
    assert checks["migrations"]["status"] == "ok"
    assert checks["migrations"]["current"] == checks["migrations"]["expected"]
    assert migrate.head() in checks["migrations"]["current"]
    assert checks["workers"]["status"] == "failing"
    assert checks["workers"]["alive"] == 0

    worker = spawn_worker()
    await worker.wait_for_log("worker_ready")

    report = ok_json(await cli(database_url, "health", "--json"))
    assert report["status"] == "healthy"
    workers = report["checks"]["workers"]
    assert workers["alive"] == 1
    assert workers["within_seconds"] == 60.0
    (seen,) = workers["workers"]
    assert seen["id"] == await pool.fetchval("SELECT id FROM outbox_workers")
    assert f":{worker.pid}:" in seen["id"]

    out = ok(await cli(database_url, "health"))
    assert "healthy" in out
    assert "unhealthy" not in out
    assert seen["id"] in out

    # Without the project's alembic.ini its migrations are unknown, which does not fail
    # health; pgoutbox's own schema is still checked.
    report = ok_json(
        await cli(database_url, "health", "--alembic-ini", str(tmp_path / "none.ini"), "--json")
    )
    assert report["checks"]["migrations"]["status"] == "unknown"
    assert report["checks"]["migrations"]["expected"] is None
    assert report["checks"]["schema"]["status"] == "ok"
    assert report["status"] == "healthy"
    out = ok(await cli(database_url, "health", cwd=tmp_path))  # no ./alembic.ini there
    assert "unknown" in out

    # A worker that stops cleanly says goodbye: none is left.
    worker.signal(signal.SIGTERM)
    assert await asyncio.to_thread(worker.wait) == 0
    result = await cli(database_url, "health", "--within", "1h")
    assert result.returncode == 1, _report(result)
    assert "unhealthy" in result.stdout


async def test_health_counts_only_recent_heartbeats(database_url: str, pool: asyncpg.Pool) -> None:
    await pool.execute(
        "INSERT INTO outbox_workers (id, queues, concurrency, last_seen_at) "
        "VALUES ('gone:1:abc', '{default}', 4, now() - interval '1 hour')"
    )
    result = await cli(database_url, "health", "--within", "30m", "--json")
    assert result.returncode == 1, _report(result)
    assert json.loads(result.stdout)["checks"]["workers"]["alive"] == 0
    report = ok_json(await cli(database_url, "health", "--within", "2h", "--json"))
    assert report["checks"]["workers"]["alive"] == 1
    [worker] = report["checks"]["workers"]["workers"]
    assert worker["id"] == "gone:1:abc"
    # Times in --json are written as the HTTP API writes them: UTC as Z.
    assert worker["last_seen_at"].endswith("Z"), worker
    seen = datetime.fromisoformat(worker["last_seen_at"])
    assert abs((datetime.now(UTC) - seen).total_seconds() - 3600) < 300


async def test_health_reports_a_schema_behind_its_migrations(
    database_url: str, pool: asyncpg.Pool
) -> None:
    await pool.execute(
        "UPDATE alembic_version SET version_num = 'pgoutbox_0004' "
        "WHERE version_num = 'pgoutbox_0005'"
    )
    result = await cli(database_url, "health", "--json")
    assert result.returncode == 1, _report(result)
    checks = json.loads(result.stdout)["checks"]
    assert checks["schema"]["status"] == "failing"
    assert (checks["schema"]["current"], checks["schema"]["expected"]) == (
        "pgoutbox_0004",
        "pgoutbox_0005",
    )
    assert "run your application's `alembic upgrade heads`" in checks["schema"]["detail"]
    assert checks["migrations"]["status"] == "failing"
    assert checks["migrations"]["current"] == ["pgoutbox_0004", "sample_0001"]
    assert checks["migrations"]["expected"] == ["pgoutbox_0005", "sample_0001"]


def test_health_with_the_database_unreachable() -> None:
    result = run_cli(UNREACHABLE_URL, "health", "--json")
    assert result.returncode == 1, _report(result)
    assert result.stderr == "", _report(result)
    report = json.loads(result.stdout)
    assert report["status"] == "unhealthy"
    assert report["checks"]["database"]["status"] == "failing"
    assert (
        "cannot reach the database at 127.0.0.1:1/nothing"
        in (report["checks"]["database"]["detail"])
    )
    assert report["checks"]["schema"]["status"] == "unknown"

    result = run_cli(UNREACHABLE_URL, "health")
    assert result.returncode == 1, _report(result)
    assert "Traceback" not in result.stdout + result.stderr
    assert "cannot reach the database" in result.stdout
    assert "unhealthy" in result.stdout


# ---------------------------------------------------------------------------------------------
# bad input: one line on stderr, nothing on stdout, a non-zero exit
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "mentions", "code"),
    [
        pytest.param(["jobs", "show", "abc"], "JOB_ID", 2, id="id-not-integer"),
        pytest.param(["jobs", "show", "0"], "JOB_ID", 2, id="id-zero"),
        pytest.param(["jobs", "retry", "-5"], "-5", 2, id="id-negative"),
        pytest.param(["jobs", "cancel", "1" * 20], "JOB_ID", 2, id="id-over-bigint"),
        pytest.param(["jobs", "show", "123"], "no job 123", 1, id="show-unknown"),
        pytest.param(["jobs", "show", "123", "--json"], "no job 123", 1, id="show-unknown-json"),
        pytest.param(["jobs", "retry", "123"], "no job 123", 1, id="retry-unknown"),
        pytest.param(["jobs", "cancel", "123"], "no job 123", 1, id="cancel-unknown"),
        pytest.param(["jobs", "list", "--state", "bogus"], "bogus", 1, id="bad-state"),
        pytest.param(["jobs", "list", "--queue", "bad name!"], "bad name!", 1, id="bad-queue"),
        pytest.param(
            ["jobs", "list", "--task", "bad name!", "--json"], "bad name!", 1, id="bad-task-json"
        ),
        pytest.param(["jobs", "list", "--limit", "0"], "limit", 1, id="limit-zero"),
        pytest.param(["jobs", "list", "--limit", "501"], "limit", 1, id="limit-too-big"),
        pytest.param(["jobs", "list", "--cursor", "xyz"], "xyz", 1, id="bad-cursor"),
        pytest.param(["jobs", "list", "--cursor", "²"], "cursor", 1, id="cursor-superscript"),
        pytest.param(["jobs", "list", "--cursor", str(2**63)], "cursor", 1, id="cursor-bigint"),
        pytest.param(
            ["jobs", "list", "--cursor", "9" * 19, "--json"], "cursor", 1, id="cursor-19-nines"
        ),
        pytest.param(
            ["jobs", "retry-dead", "--queue", "bad name!"], "bad name!", 1, id="retry-dead-queue"
        ),
        pytest.param(["queues", "--window", "soon"], "--window", 2, id="bad-window"),
        pytest.param(["queues", "--window", "0s"], "--window", 2, id="zero-window"),
        pytest.param(["prune", "--older-than", "forever"], "forever", 2, id="older-than-forever"),
        pytest.param(
            ["prune", "--older-than", "forever", "--json"], "forever", 2, id="older-than-json"
        ),
        pytest.param(["prune", "--older-than", ""], "--older-than", 2, id="older-than-empty"),
        pytest.param(["prune", "--older-than", "-1d"], "-1d", 2, id="older-than-negative"),
        pytest.param(
            ["prune", "--older-than", "7d", "--state", "queued"], "queued", 2, id="prune-queued"
        ),
        pytest.param(
            ["prune", "--older-than", "7d", "--state", "dead,bogus"], "bogus", 2, id="prune-bogus"
        ),
        pytest.param(["prune"], "--older-than", 2, id="prune-without-age"),
        pytest.param(["health", "--within", "whenever"], "--within", 2, id="bad-within"),
        pytest.param(
            ["prune", "--older-than", "99999999999d"], "--older-than", 2, id="older-than-huge"
        ),
        pytest.param(["queues", "--window", "99999999999d"], "--window", 2, id="window-huge"),
        pytest.param(["queues", "--window", "9" * 400], "--window", 2, id="window-past-float"),
        pytest.param(["health", "--within", "1e400d"], "--within", 2, id="within-exponent"),
        pytest.param(
            ["health", "--within", "99999999999w", "--json"], "--within", 2, id="within-huge"
        ),
        pytest.param(["jobs", "frobnicate"], "frobnicate", 2, id="unknown-command"),
    ],
)
async def test_bad_input_is_one_line_error(
    database_url: str, args: list[str], mentions: str, code: int
) -> None:
    assert_one_line_error(await cli(database_url, *args), mentions, code=code)


async def test_bad_input_changes_nothing(database_url: str, pool: asyncpg.Pool) -> None:
    old = await insert_job(pool, state="succeeded", finished_ago=timedelta(days=30))
    assert_one_line_error(
        await cli(database_url, "prune", "--older-than", "7d", "--state", "succeeded,queued"),
        "queued",
    )
    assert await state_of(pool, old) == "succeeded"


@pytest.mark.parametrize(
    "args",
    [
        ["jobs", "list"],
        ["jobs", "list", "--json"],
        ["jobs", "show", "1"],
        ["jobs", "retry", "1"],
        ["jobs", "cancel", "1"],
        ["jobs", "retry-dead"],
        ["queues", "--json"],
        ["prune", "--older-than", "7d"],
    ],
    ids=lambda args: "-".join(args),
)
def test_database_unreachable_is_one_line_error(args: list[str]) -> None:
    assert_one_line_error(
        run_cli(UNREACHABLE_URL, *args), "cannot reach the database at 127.0.0.1:1/nothing", code=1
    )


def test_missing_database_url_is_one_line_error() -> None:
    assert_one_line_error(run_cli(None, "jobs", "list"), "DATABASE_URL", code=2)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OUTBOX_RETENTION_SUCCEEDED", "99999999999d"),
        ("OUTBOX_RETENTION_DEAD", "9" * 400 + "w"),
        ("OUTBOX_RETENTION_CANCELLED", "36601d"),
    ],
)
@pytest.mark.parametrize("args", [["jobs", "list"], ["run", "tests.workload:registry"]])
def test_a_retention_too_long_is_one_line_error(variable: str, value: str, args: list[str]) -> None:
    result = run_cli(UNREACHABLE_URL, *args, env={variable: value})
    assert_one_line_error(result, variable.removeprefix("OUTBOX_").lower(), code=2)


@pytest.mark.parametrize("value", ["36600d", "", "0"])
def test_a_retention_up_to_a_century_is_accepted(value: str) -> None:
    result = run_cli(UNREACHABLE_URL, "jobs", "list", env={"OUTBOX_RETENTION_DEAD": value})
    assert_one_line_error(result, "cannot reach the database", code=1)  # past the settings


async def test_unmigrated_database_is_one_line_error(database_url: str, pool: asyncpg.Pool) -> None:
    await pool.execute("DROP TABLE outbox_jobs")
    assert_one_line_error(
        await cli(database_url, "jobs", "list"), "run `outbox-worker migrate`", code=2
    )


# ---------------------------------------------------------------------------------------------
# the worker's --metrics-port
# ---------------------------------------------------------------------------------------------


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text page, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(
    page: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float | None:
    return page.get((name, frozenset(labels.items())))


async def test_worker_serves_metrics_over_http(
    database_url: str, spawn_worker: Spawn, pool: asyncpg.Pool
) -> None:
    echo_jobs = [await insert_job(pool, args={"n": n}) for n in range(5)]
    doomed = await insert_job(pool, task="always_fails", max_attempts=1)
    later = await insert_job(pool, run_in=timedelta(hours=1))  # stays queued, not due
    port = free_port()

    worker = spawn_worker("--metrics-port", str(port), "--concurrency", "3")
    await worker.wait_for_log("worker_ready")
    assert f'"port": {port}' in worker.output()  # the metrics_serving log line

    async def finished() -> bool:
        states = [await state_of(pool, job_id) for job_id in [*echo_jobs, doomed]]
        return states == ["succeeded"] * 5 + ["dead"]

    await wait_until(finished, what="the jobs to finish")

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:

        async def scrape() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
            response = await client.get("/metrics")
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/plain")
            return samples(response.text)

        async def counted() -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
            page = await scrape()
            done = value(page, "outbox_jobs_succeeded_total", task="echo", queue="default")
            dead = value(page, "outbox_jobs_dead_total", task="always_fails", queue="default")
            return page if (done, dead) == (5.0, 1.0) else None

        page = await wait_until(counted, what="the counters to count every outcome")
        echo = {"task": "echo", "queue": "default"}
        assert value(page, "outbox_jobs_started_total", **echo) == 5.0
        assert value(page, "outbox_jobs_started_total", task="always_fails", queue="default") == 1
        assert value(page, "outbox_jobs_retried_total", **echo) is None  # none failed
        assert value(page, "outbox_job_run_seconds_count", **echo) == 5.0
        assert value(page, "outbox_job_run_seconds_bucket", le="+Inf", **echo) == 5.0
        run_seconds = value(page, "outbox_job_run_seconds_sum", **echo)
        assert run_seconds is not None
        assert run_seconds > 0
        assert value(page, "outbox_worker_slots") == 3.0
        assert value(page, "outbox_worker_slots_in_use") is not None

        # The queue gauges come from the worker's periodic query; once it has run after the
        # jobs finished, only the delayed job is left, queued but not due.
        async def settled() -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
            page = await scrape()
            depth = {
                state: value(page, "outbox_queue_depth", queue="default", state=state)
                for state in ("queued", "due", "running")
            }
            return page if depth == {"queued": 1.0, "due": 0.0, "running": 0.0} else None

        page = await wait_until(settled, timeout=45, interval=0.5, what="the queue gauges")
        assert value(page, "outbox_queue_oldest_due_seconds", queue="default") == 0.0
    assert await state_of(pool, later) == "queued"

    worker.signal(signal.SIGTERM)
    assert await asyncio.to_thread(worker.wait) == 0


def test_metrics_port_in_use_is_one_line_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            UNREACHABLE_URL, "run", "tests.workload:registry", "--metrics-port", str(port)
        )
    assert_one_line_error(result, f"cannot serve metrics on 127.0.0.1:{port}", code=2)


@pytest.mark.parametrize("port", ["0", "70000", "http"])
def test_bad_metrics_port_is_one_line_error(port: str) -> None:
    result = run_cli(UNREACHABLE_URL, "run", "tests.workload:registry", "--metrics-port", port)
    assert_one_line_error(result, "--metrics-port", code=2)


def test_help_lists_the_operator_commands() -> None:
    top = ok(run_cli(None, "--help"))
    for command in ("run", "jobs", "queues", "prune", "health"):
        assert command in top
    jobs = ok(run_cli(None, "jobs", "--help"))
    for command in ("list", "show", "retry", "cancel", "retry-dead"):
        assert command in jobs
    run = ok(run_cli(None, "run", "--help"))
    assert "--metrics-port" in run
    assert "--metrics-host" in run

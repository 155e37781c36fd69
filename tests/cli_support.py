"""Helpers for the operator's commands' tests (tests/test_cli_*.py): the commands run as
``python -m outbox_worker …`` subprocesses against a real database, their output checked (a
success, or bad input as one stderr line), and job rows written by SQL in any state."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg

from tests.conftest import ROOT, WorkerProcess

ERROR_PREFIX = "outbox-worker: error:"
UNREACHABLE_URL = "postgresql://nobody@127.0.0.1:1/nothing"
FINISHED = ("succeeded", "dead", "cancelled")

Spawn = Callable[..., WorkerProcess]


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


def report_of(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def ok(result: subprocess.CompletedProcess[str], *, quiet_stderr: bool = True) -> str:
    assert result.returncode == 0, report_of(result)
    assert "Traceback" not in result.stderr + result.stdout, report_of(result)
    if quiet_stderr:
        assert result.stderr == "", report_of(result)
    return result.stdout


def ok_json(result: subprocess.CompletedProcess[str]) -> Any:
    """Exit 0, nothing on stderr, and stdout is one JSON document and nothing else."""
    return json.loads(ok(result))


def assert_one_line_error(
    result: subprocess.CompletedProcess[str], mentions: str, code: int | None = None
) -> str:
    report = report_of(result)
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

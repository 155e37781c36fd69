"""Running ``outbox-worker`` as a user runs it, for the tests of ``outbox-worker migrate``
and of the start-up check of where a database's schema stands: the real entry point in a
subprocess, with none of the suite's settings in its environment; its output checked; and
plain SQL on the database it ran against.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
from sqlalchemy import create_engine

from alembic import command
from outbox_worker import migrate

ROOT = Path(__file__).resolve().parent.parent
ERROR_PREFIX = "outbox-worker: error:"
HEAD = "pgoutbox_0018"
NewDatabase = Callable[[], Awaitable[str]]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The suite's environment less every setting the command reads, and ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "OUTBOX_DATABASE_URL") and not k.startswith("OUTBOX_")
    }
    return env | {"PYTHONPATH": str(ROOT)} | extra


def migrate_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "outbox_worker", "migrate", *args]


async def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``outbox-worker migrate ARGS`` with only ``env`` set of the variables it reads."""

    def go() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            migrate_argv(*args),
            env=subprocess_env(**env),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    return await asyncio.to_thread(go)


def report_of(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def ok(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert result.returncode == 0, report_of(result)
    assert result.stderr == "", report_of(result)
    return result.stdout.splitlines()


def one_line_error(result: subprocess.CompletedProcess[str], code: int, *mentions: str) -> None:
    report = report_of(result)
    assert result.returncode == code, report
    assert result.stdout == "", report
    lines = result.stderr.splitlines()
    assert len(lines) == 1, report
    assert lines[0].startswith(ERROR_PREFIX), report
    for text in mentions:
        assert text in lines[0], report


async def execute(url: str, statements: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(statements)
    finally:
        await conn.close()


def downgrade_one(url: str) -> None:
    """One revision back, by the newest revision's own downgrade, recorded where
    ``outbox-worker migrate`` records it: a database as the previous release left it."""
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as conn:
            config = migrate.alembic_config()
            config.attributes["connection"] = conn
            command.downgrade(config, "-1")
            conn.commit()
    finally:
        engine.dispose()

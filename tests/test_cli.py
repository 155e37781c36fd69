"""``python -m outbox_worker run``: every mistake a user can make ends in one line on stderr.

These run the real entry point in a subprocess. Most never reach a database: a valid but
unreachable DATABASE_URL is given so that only the error under test can stop the command.
The last ones give it a database it cannot use: away, refusing it, or without the schema.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from outbox_worker.devdb import PostgresServer, with_database

ROOT = Path(__file__).resolve().parent.parent
# Valid syntax, nothing listening: the command must fail before it ever connects.
UNREACHABLE_URL = "postgresql://nobody@127.0.0.1:1/nothing"
ERROR_PREFIX = "outbox-worker: error:"


def _env(**overrides: str | None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "OUTBOX_DATABASE_URL") and not k.startswith("OUTBOX_")
    }
    env["PYTHONPATH"] = str(ROOT)
    env["DATABASE_URL"] = UNREACHABLE_URL
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "outbox_worker", *args],
        env=env if env is not None else _env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _assert_one_line_error(result: subprocess.CompletedProcess[str], mentions: str) -> None:
    report = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode != 0, report
    assert "Traceback" not in result.stderr, report
    assert "Traceback" not in result.stdout, report
    lines = result.stderr.splitlines()
    assert len(lines) == 1, report
    assert lines[0].startswith(ERROR_PREFIX), report
    assert mentions.lower() in lines[0].lower(), report


@pytest.mark.parametrize(
    ("target", "mentions"),
    [
        pytest.param("tests.workload", "MODULE:ATTRIBUTE", id="no-colon"),
        pytest.param(":registry", "MODULE:ATTRIBUTE", id="no-module-part"),
        pytest.param("tests.workload:", "MODULE:ATTRIBUTE", id="no-attribute-part"),
        pytest.param("no_such_module_for_pgoutbox:registry", "no_such_module", id="missing-module"),
        pytest.param("tests.workload:no_such_registry", "no_such_registry", id="missing-attribute"),
        pytest.param("tests.workload:record", "not an outbox_worker.Registry", id="function"),
        pytest.param("tests.workload:EXECUTIONS_DDL", "not an outbox_worker.Registry", id="str"),
        # A relative module name is an easy slip ("run .tasks:registry"); importlib answers it
        # with a TypeError rather than an ImportError.
        pytest.param(".workload:registry", "workload", id="relative-module"),
    ],
)
def test_bad_registry_target_is_one_line_error(target: str, mentions: str) -> None:
    _assert_one_line_error(_run("run", target), mentions)


@pytest.mark.parametrize(
    ("flags", "mentions"),
    [
        pytest.param(["--concurrency", "0"], "--concurrency", id="concurrency-zero"),
        pytest.param(["--concurrency", "abc"], "--concurrency", id="concurrency-not-int"),
        pytest.param(["--flag"], "--flag", id="unknown-flag"),
        pytest.param(["--queues", "bad name!"], "bad name!", id="bad-queue-name"),
        pytest.param(["--queues", " , "], "--queues", id="empty-queue-list"),
        pytest.param(["--lease-seconds", "0"], "--lease-seconds", id="lease-zero"),
        pytest.param(["--drain-timeout-seconds", "-1"], "--drain-timeout", id="negative-drain"),
        pytest.param(["--database-url", "mysql://x/y"], "postgresql://", id="bad-url-flag"),
    ],
)
def test_bad_flag_is_one_line_error(flags: list[str], mentions: str) -> None:
    _assert_one_line_error(_run("run", "tests.workload:registry", *flags), mentions)


def test_missing_database_url_is_one_line_error() -> None:
    env = _env(DATABASE_URL=None)
    _assert_one_line_error(_run("run", "tests.workload:registry", env=env), "DATABASE_URL")


@pytest.mark.parametrize(
    ("variable", "value", "mentions"),
    [
        pytest.param("DATABASE_URL", "mysql://x/y", "postgresql://", id="non-postgres-url"),
        pytest.param("OUTBOX_CONCURRENCY", "abc", "concurrency", id="env-concurrency"),
        pytest.param("OUTBOX_RETENTION_DEAD", "forever", "retention_dead", id="env-duration"),
        pytest.param(
            "OUTBOX_RETRY_CAP_SECONDS", "1e12", "retry_cap_seconds", id="env-retry-cap-past-9999"
        ),
    ],
)
def test_bad_environment_is_one_line_error(variable: str, value: str, mentions: str) -> None:
    env = _env(**{variable: value})
    _assert_one_line_error(_run("run", "tests.workload:registry", env=env), mentions)


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"]], ids=["top", "run"])
def test_help_exits_zero(args: list[str]) -> None:
    result = _run(*args)
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout
    assert result.stderr == ""
    if args[0] == "run":
        for flag in ("--concurrency", "--queues", "--burst", "--lease-seconds", "--no-listen"):
            assert flag in result.stdout


# ---------------------------------------------------------------------------------------------
# run: a database that cannot be used ends the worker at start, in one line
# ---------------------------------------------------------------------------------------------

# Only the error line: the worker's own log (retries) would go to stderr too.
QUIET = {"OUTBOX_LOG_LEVEL": "error"}


@pytest.mark.parametrize(
    "url",
    [
        pytest.param(UNREACHABLE_URL, id="refused"),
        pytest.param("postgresql://nobody@no-such-host.invalid/nothing", id="unknown-host"),
    ],
)
def test_an_unreachable_database_is_waited_for_then_one_line(url: str) -> None:
    env = _env(DATABASE_URL=url, OUTBOX_STARTUP_TIMEOUT_SECONDS="1", **QUIET)
    result = _run("run", "tests.workload:registry", env=env)
    _assert_one_line_error(result, "cannot reach the database")
    assert "(waited 1s)" in result.stderr
    assert result.returncode == 1


def test_sigterm_while_waiting_for_the_database_exits_zero() -> None:
    """Start-up waits for a database that is not up yet; a stop request ends the wait."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "outbox_worker", "run", "tests.workload:registry"],
        env=_env(OUTBOX_LOG_FORMAT="json"),
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # the first retry says the wait has begun
            if '"database_retry"' in line:
                break
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        proc.kill()
        proc.wait()


def _with_user(url: str, user: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}@{host}"))


async def test_a_database_that_refuses_us_or_lacks_the_schema_is_one_line(
    pg_server: PostgresServer, database_url: str
) -> None:
    """Mistakes no wait can mend end the worker at once: no retries, no traceback."""
    empty = f"no_schema_{os.getpid()}"
    conn = await asyncpg.connect(pg_server.url_for("postgres"))
    try:
        await conn.execute(f"CREATE DATABASE {empty}")
        cases = [
            (with_database(database_url, "no_such_database"), 1, "does not exist"),
            (_with_user(database_url, "no_such_role"), 1, "no_such_role"),
            (pg_server.url_for(empty), 2, "no pgoutbox schema"),
        ]
        for url, code, mentions in cases:
            env = _env(DATABASE_URL=url, **QUIET)
            result = await asyncio.to_thread(_run, "run", "tests.workload:registry", env=env)
            _assert_one_line_error(result, mentions)
            assert result.returncode == code, result.stderr
    finally:
        await conn.execute(f"DROP DATABASE IF EXISTS {empty} WITH (FORCE)")
        await conn.close()

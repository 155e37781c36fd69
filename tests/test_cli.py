"""``python -m outbox_worker run``: every mistake a user can make ends in one line on stderr.

These run the real entry point in a subprocess. None of them reaches a database: a valid but
unreachable DATABASE_URL is given so that only the error under test can stop the command.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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

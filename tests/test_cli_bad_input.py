"""The operator's commands, run as ``python -m outbox_worker …`` subprocesses: bad input as
one stderr line, nothing on stdout, a non-zero exit, and nothing changed; so too a database
unreachable, unset or unmigrated, and retentions too long.
"""

from __future__ import annotations

from datetime import timedelta

import asyncpg
import pytest

from tests.cli_support import (
    UNREACHABLE_URL,
    assert_one_line_error,
    cli,
    insert_job,
    run_cli,
    state_of,
)


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

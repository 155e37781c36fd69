"""``outbox-worker queues set|pause|resume`` and the settings in ``outbox-worker queues``, run
as ``python -m outbox_worker …`` subprocesses against a real database: each change committed
to ``outbox_queues`` (read back by SQL), one line or ``--json`` saying what is in force, and
bad input a one-line error that changes nothing.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
import typer

from outbox_worker.cli.queues import concurrency_limit
from tests.cli_support import (
    UNREACHABLE_URL,
    assert_one_line_error,
    cli,
    insert_job,
    ok,
    ok_json,
    report_of,
)

DEFAULTS = {
    "concurrency": None,
    "key_concurrency": None,
    "rate_limit": None,
    "rate_period": 1.0,
    "key_rate_limit": None,
    "key_rate_period": 1.0,
    "breaker_threshold": None,
    "paused": False,
    "paused_at": None,
    "paused_by": None,
    "pause_reason": None,
    "updated_at": None,
}


async def settings_rows(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        """
        SELECT name, concurrency, paused_at IS NOT NULL AS paused, paused_by, pause_reason
        FROM outbox_queues ORDER BY name
        """
    )
    return [dict(row) for row in rows]


def line_of(table: str, queue: str) -> str:
    return next(line for line in table.splitlines() if line.strip().split()[:1] == [queue])


async def test_set_pause_resume_round_trip(database_url: str, pool: asyncpg.Pool) -> None:
    out = ok(await cli(database_url, "queues", "set", "emails", "--concurrency", "5"))
    assert out == "queue emails: at most 5 running at once\n"
    assert await settings_rows(pool) == [
        {
            "name": "emails",
            "concurrency": 5,
            "paused": False,
            "paused_by": None,
            "pause_reason": None,
        }
    ]

    out = ok(await cli(database_url, "queues", "pause", "emails", "--reason", "smtp down"))
    assert out == "queue emails: paused (smtp down); when resumed, at most 5 running at once\n"
    assert await settings_rows(pool) == [
        {
            "name": "emails",
            "concurrency": 5,
            "paused": True,
            "paused_by": "operator",
            "pause_reason": "smtp down",
        }
    ]

    out = ok(await cli(database_url, "queues", "resume", "emails"))
    assert out == "queue emails: at most 5 running at once\n"
    assert await settings_rows(pool) == [
        {
            "name": "emails",
            "concurrency": 5,
            "paused": False,
            "paused_by": None,
            "pause_reason": None,
        }
    ]

    out = ok(await cli(database_url, "queues", "set", "emails", "--concurrency", "none"))
    assert out == "queue emails: running, no limit\n"
    rows = await settings_rows(pool)
    assert [(row["name"], row["concurrency"], row["paused"]) for row in rows] == [
        ("emails", None, False)
    ]

    out = ok(await cli(database_url, "queues", "pause", "reports"))
    assert out == "queue reports: paused\n"
    assert [row["name"] for row in await settings_rows(pool) if row["paused"]] == ["reports"]


async def test_json_is_the_settings_in_force(database_url: str, pool: asyncpg.Pool) -> None:
    limited = ok_json(
        await cli(database_url, "queues", "set", "emails", "--concurrency", "3", "--json")
    )
    assert isinstance(limited["updated_at"], str)
    assert limited == DEFAULTS | {
        "queue": "emails",
        "concurrency": 3,
        "updated_at": limited["updated_at"],
    }

    reason = "smtp\x1b[31m down"  # kept exact in JSON, escaped on a terminal
    paused = ok_json(
        await cli(database_url, "queues", "pause", "emails", "--reason", reason, "--json")
    )
    assert paused["queue"] == "emails"
    assert paused["concurrency"] == 3
    assert paused["paused"] is True
    assert paused["paused_by"] == "operator"
    assert paused["pause_reason"] == reason
    assert isinstance(paused["paused_at"], str)
    line = ok(await cli(database_url, "queues", "set", "emails", "--concurrency", "4"))
    assert (
        line
        == "queue emails: paused (smtp\\x1b[31m down); when resumed, at most 4 running at once\n"
    )

    resumed = ok_json(await cli(database_url, "queues", "resume", "emails", "--json"))
    assert (resumed["queue"], resumed["concurrency"], resumed["paused"]) == ("emails", 4, False)
    assert resumed["paused_at"] is resumed["pause_reason"] is None

    # A queue never set: the defaults, and no row written.
    fresh = ok_json(await cli(database_url, "queues", "resume", "reports", "--json"))
    assert fresh == DEFAULTS | {"queue": "reports"}
    assert [row["name"] for row in await settings_rows(pool)] == ["emails"]


async def test_stats_show_limit_and_pause(database_url: str, pool: asyncpg.Pool) -> None:
    await insert_job(pool)
    await insert_job(pool, state="running")
    await insert_job(pool, queue="reports")  # jobs but no settings: the defaults
    ok(await cli(database_url, "queues", "set", "default", "--concurrency", "7"))
    ok(await cli(database_url, "queues", "pause", "mail", "--reason", "smtp down"))  # no jobs

    table = ok(await cli(database_url, "queues"))
    header = next(line for line in table.splitlines() if "QUEUE" in line).split()
    assert header[-2:] == ["LIMIT", "PAUSED"]
    default = line_of(table, "default").split()
    assert default[1:4] == ["1", "1", "1"]  # queued, due, running
    assert default[-1] == "7"  # its limit; not paused, so the last cell is empty
    mail = line_of(table, "mail").split()
    assert mail[1:4] == ["0", "0", "0"]
    assert mail[-4:] == ["-", "yes", "(smtp", "down)"]
    assert line_of(table, "reports").split()[-1] == "-"

    stats = ok_json(await cli(database_url, "queues", "--window", "1h", "--json"))
    assert stats["window_seconds"] == 3600.0
    by_queue = {entry["queue"]: entry for entry in stats["queues"]}
    assert sorted(by_queue) == ["default", "mail", "reports"]
    assert by_queue["default"]["depth"]["running"] == 1
    assert by_queue["default"]["settings"]["concurrency"] == 7
    assert by_queue["default"]["settings"]["paused"] is False
    assert by_queue["mail"]["depth"] == {
        "queued": 0,
        "running": 0,
        "succeeded": 0,
        "dead": 0,
        "cancelled": 0,
    }
    assert by_queue["mail"]["finished_recently"] == {"succeeded": 0, "dead": 0, "cancelled": 0}
    assert by_queue["mail"]["settings"]["paused"] is True
    assert by_queue["mail"]["settings"]["pause_reason"] == "smtp down"
    assert by_queue["reports"]["settings"] == DEFAULTS | {"queue": "reports"}


@pytest.mark.parametrize(
    ("value", "limit"),
    [("1", 1), (" 7 ", 7), ("1000000", 1_000_000), ("none", None), ("NONE", None)],
)
def test_concurrency_values(value: str, limit: int | None) -> None:
    assert concurrency_limit(value) == limit


@pytest.mark.parametrize(
    "value", ["0", "-1", "abc", "", "1000001", "9" * 5000, "\u0665", "1_0", "+3", "2.5", "nothing"]
)
def test_concurrency_refused(value: str) -> None:
    with pytest.raises(typer.BadParameter, match="whole number from 1 to 1000000"):
        concurrency_limit(value)


# Each kind of mistake once, through the real process; the values refused are listed above.
BAD_INPUT: list[tuple[list[str], str, int]] = [
    (["queues", "set", "bad name!", "--concurrency", "5"], "bad name!", 1),
    (["queues", "pause", "bad name!"], "bad name!", 1),
    (["queues", "resume", "bad name!", "--json"], "bad name!", 1),
    (["queues", "set", "emails", "--concurrency", "0"], "--concurrency", 2),
    (["queues", "set", "emails", "--concurrency", "-1", "--json"], "--concurrency", 2),
    (["queues", "set", "emails", "--concurrency", "abc"], "'abc'", 2),
    (["queues", "set", "emails"], "--concurrency, --key-concurrency, --rate", 2),
    (["queues", "set", "emails", "--rate", "50"], "--rate", 2),
    (["queues", "set", "emails", "--rate", "50/2d"], "--rate", 2),
    (["queues", "set", "emails", "--key-concurrency", "0"], "--key-concurrency", 2),
    (["queues", "set", "emails", "--breaker", "0"], "--breaker", 2),
    (["queues", "set", "emails", "--concurrency", "3", "--breaker", "x"], "--breaker", 2),
    (["queues", "pause", "emails", "--reason", "x" * 501], "500", 1),
    (["queues", "--json", "pause", "emails"], "after the subcommand", 2),
]


async def test_bad_input_is_one_line_error_and_changes_nothing(
    database_url: str, pool: asyncpg.Pool
) -> None:
    await pool.execute("INSERT INTO outbox_queues (name, concurrency) VALUES ('emails', 2)")
    before = await settings_rows(pool)
    results = await asyncio.gather(*(cli(database_url, *args) for args, _, _ in BAD_INPUT))
    failures = []
    for (args, mentions, code), result in zip(BAD_INPUT, results, strict=True):
        try:
            assert_one_line_error(result, mentions, code=code)
        except AssertionError:
            failures.append(f"{args[:4]}: {report_of(result)}")
    assert not failures, "\n\n".join(failures)
    assert await settings_rows(pool) == before


async def test_the_breaker_is_set_apart_from_the_limit(
    database_url: str, pool: asyncpg.Pool
) -> None:
    out = ok(await cli(database_url, "queues", "set", "emails", "--concurrency", "4"))
    assert out == "queue emails: at most 4 running at once\n"
    out = ok(await cli(database_url, "queues", "set", "emails", "--breaker", "10"))
    assert out == (
        "queue emails: at most 4 running at once; pauses itself after 10 failures in a row\n"
    )
    row = await pool.fetchrow("SELECT concurrency, breaker_threshold FROM outbox_queues")
    assert row is not None
    assert (row["concurrency"], row["breaker_threshold"]) == (4, 10)
    both = ok_json(
        await cli(
            database_url,
            "queues",
            "set",
            "emails",
            "--concurrency",
            "none",
            "--breaker",
            "none",
            "--json",
        )
    )
    assert (both["concurrency"], both["breaker_threshold"]) == (None, None)


async def test_a_limit_per_key_is_set_and_shown(database_url: str, pool: asyncpg.Pool) -> None:
    out = ok(
        await cli(
            database_url, "queues", "set", "emails", "--concurrency", "8", "--key-concurrency", "1"
        )
    )
    assert out == "queue emails: at most 8, 1 per key running at once\n"
    assert await pool.fetchval("SELECT key_concurrency FROM outbox_queues") == 1
    table = ok(await cli(database_url, "queues"))
    assert line_of(table, "emails").split()[-1] == "1/key"
    out = ok(await cli(database_url, "queues", "set", "emails", "--key-concurrency", "none"))
    assert out == "queue emails: at most 8 running at once\n"


async def test_a_rate_limit_is_set_with_its_window(database_url: str, pool: asyncpg.Pool) -> None:
    out = ok(await cli(database_url, "queues", "set", "emails", "--rate", "50/1m"))
    assert out == "queue emails: running, no limit; at most 50 started per 1 min\n"
    row = await pool.fetchrow("SELECT rate_limit, rate_period FROM outbox_queues")
    assert row is not None
    assert tuple(row) == (50, 60.0)
    lifted = ok_json(await cli(database_url, "queues", "set", "emails", "--rate", "none", "--json"))
    assert (lifted["rate_limit"], lifted["rate_period"]) == (None, 1.0)


async def test_a_rate_per_key_is_set_apart_from_the_queue_s(
    database_url: str, pool: asyncpg.Pool
) -> None:
    out = ok(
        await cli(
            database_url, "queues", "set", "emails", "--rate", "100/1m", "--key-rate", "5/10s"
        )
    )
    assert out == (
        "queue emails: running, no limit; at most 100 started per 1 min; "
        "at most 5 started per key per 10 s\n"
    )
    row = await pool.fetchrow(
        "SELECT rate_limit, rate_period, key_rate_limit, key_rate_period FROM outbox_queues"
    )
    assert row is not None
    assert tuple(row) == (100, 60.0, 5, 10.0)
    lifted = ok_json(
        await cli(database_url, "queues", "set", "emails", "--key-rate", "none", "--json")
    )
    assert (lifted["key_rate_limit"], lifted["rate_limit"]) == (None, 100)
    ok(await cli(database_url, "queues", "set", "emails", "--key-rate", "2/10s"))
    table = ok(await cli(database_url, "queues"))
    assert line_of(table, "emails").split()[-2:] == ["100/1min", "2/key/10s"]


@pytest.mark.parametrize("value", ["5", "0/1s", "5/0s", "5/2d", "x/1s"])
async def test_a_bad_rate_per_key_changes_nothing(
    database_url: str, pool: asyncpg.Pool, value: str
) -> None:
    result = await cli(database_url, "queues", "set", "emails", "--key-rate", value)
    assert result.returncode == 2, report_of(result)
    assert "--key-rate" in result.stderr
    assert await pool.fetchval("SELECT count(*) FROM outbox_queues") == 0


async def test_database_unreachable_is_one_line_error() -> None:
    result = await cli(UNREACHABLE_URL, "queues", "pause", "emails", "--reason", "smtp down")
    assert_one_line_error(result, "cannot reach the database", code=1)

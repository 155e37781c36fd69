"""The operator's ``queues`` and ``prune`` commands, run as ``python -m outbox_worker …``
subprocesses against a real database, in table and ``--json`` modes.
"""

from __future__ import annotations

from datetime import timedelta

import asyncpg

from tests.cli_support import FINISHED, cli, insert_job, ok, ok_json, row, state_of


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

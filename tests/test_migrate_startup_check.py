"""The worker's start-up check of where a database's schema stands, by either bookkeeping (the
application's Alembic or ``outbox-worker migrate``'s own), run as a user runs it (the real
entry point in a subprocess, real PostgreSQL); and the same check in every command that reads
or changes jobs.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import Callable

import pytest

from tests.conftest import WorkerProcess
from tests.migrate_support import (
    HEAD,
    ROOT,
    NewDatabase,
    execute,
    ok,
    one_line_error,
    report_of,
    run,
    subprocess_env,
)

Spawn = Callable[..., WorkerProcess]


async def _refused(url: str) -> subprocess.CompletedProcess[str]:
    # The sample's registry: the test workload's says goodbye on stderr at exit.
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "outbox_worker", "run", "app.tasks:registry"],
        env=subprocess_env(DATABASE_URL=url, OUTBOX_STARTUP_TIMEOUT_SECONDS="10"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_the_worker_refuses_a_schema_recorded_behind_its_code(
    database_url: str, empty_databases: NewDatabase
) -> None:
    # The application's Alembic records the branch in alembic_version.
    await execute(
        database_url,
        f"UPDATE alembic_version SET version_num = 'pgoutbox_0004' WHERE version_num = '{HEAD}'",
    )
    one_line_error(
        await _refused(database_url),
        2,
        f"is at pgoutbox_0004 (recorded in alembic_version), this code needs {HEAD}",
        "run your application's `alembic upgrade heads`",
    )

    # `outbox-worker migrate` records it in its own table.
    own = await empty_databases()
    ok(await run("--database-url", own))
    await execute(own, "UPDATE pgoutbox_alembic_version SET version_num = 'pgoutbox_0003'")
    one_line_error(
        await _refused(own),
        2,
        f"is at pgoutbox_0003, this code needs {HEAD}: run `outbox-worker migrate`",
    )


# The commands that read or change jobs.
ADMIN_COMMANDS = [
    ("queues",),
    ("jobs", "list"),
    ("jobs", "show", "1"),
    ("jobs", "retry", "1"),
    ("jobs", "cancel", "1"),
    ("prune", "--older-than", "7d"),
]


async def _command(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "outbox_worker", *args],
        env=subprocess_env(DATABASE_URL=url),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_every_command_refuses_a_schema_missing_or_behind_in_one_line(
    empty_databases: NewDatabase,
) -> None:
    absent, behind = await empty_databases(), await empty_databases()
    ok(await run("--database-url", behind))
    await execute(behind, "UPDATE pgoutbox_alembic_version SET version_num = 'pgoutbox_0003'")
    cases = [
        (absent, "has no pgoutbox schema: run `outbox-worker migrate`"),
        (behind, f"is at pgoutbox_0003, this code needs {HEAD}: run `outbox-worker migrate`"),
    ]
    for url, says in cases:
        results = await asyncio.gather(*(_command(url, *args) for args in ADMIN_COMMANDS))
        for result in results:
            one_line_error(result, 2, says)
        # health reports it among its checks, and fails.
        result = await _command(url, "health", "--json")
        assert result.returncode == 1, report_of(result)
        schema = json.loads(result.stdout)["checks"]["schema"]
        assert schema["status"] == "failing", schema
        assert says in schema["detail"], schema


@pytest.mark.parametrize("state", ["own-head", "unrecorded", "ahead"])
async def test_the_worker_serves_a_schema_not_known_to_be_behind(
    state: str, empty_databases: NewDatabase, spawn_worker: Spawn
) -> None:
    """At head by its own bookkeeping; tables no bookkeeping explains (the worker cannot
    tell, and takes them as they are); recorded by a newer pgoutbox (a rolling deploy whose
    migration ran first)."""
    url = await empty_databases()
    ok(await run("--database-url", url))
    if state == "unrecorded":
        await execute(url, "DROP TABLE pgoutbox_alembic_version")
    elif state == "ahead":
        await execute(url, "UPDATE pgoutbox_alembic_version SET version_num = 'pgoutbox_0099'")
        # Which `migrate` itself will not touch: this version cannot know what 0099 did.
        one_line_error(await run("--check", DATABASE_URL=url), 1, "does not know")
    worker = spawn_worker(env={"DATABASE_URL": url})
    await worker.wait_for_log("worker_ready")
    worker.signal(signal.SIGTERM)
    assert await asyncio.to_thread(worker.wait) == 0, worker.output()

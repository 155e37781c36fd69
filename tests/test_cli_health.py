"""The operator's ``health`` command, run as ``python -m outbox_worker …`` subprocesses against
a real database, in table and ``--json`` modes: worker heartbeats, the schema and its
migrations, and the database unreachable.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from outbox_worker import migrate
from tests.cli_support import UNREACHABLE_URL, Spawn, cli, ok, ok_json, report_of, run_cli


async def test_health_needs_a_recent_worker_heartbeat(
    database_url: str, spawn_worker: Spawn, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    result = await cli(database_url, "health")
    assert result.returncode == 1, report_of(result)
    assert result.stderr == ""
    assert "unhealthy" in result.stdout
    assert "no worker heartbeat within 60s" in result.stdout

    result = await cli(database_url, "health", "--json")
    assert result.returncode == 1, report_of(result)
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
    assert result.returncode == 1, report_of(result)
    assert "unhealthy" in result.stdout


async def test_health_counts_only_recent_heartbeats(database_url: str, pool: asyncpg.Pool) -> None:
    await pool.execute(
        "INSERT INTO outbox_workers (id, queues, concurrency, last_seen_at) "
        "VALUES ('gone:1:abc', '{default}', 4, now() - interval '1 hour')"
    )
    result = await cli(database_url, "health", "--within", "30m", "--json")
    assert result.returncode == 1, report_of(result)
    assert json.loads(result.stdout)["checks"]["workers"]["alive"] == 0
    report = ok_json(await cli(database_url, "health", "--within", "2h", "--json"))
    assert report["checks"]["workers"]["alive"] == 1
    [worker] = report["checks"]["workers"]["workers"]
    assert worker["id"] == "gone:1:abc"
    # Times in --json are written as the HTTP API writes them: UTC as Z.
    assert worker["last_seen_at"].endswith("Z"), worker
    seen = datetime.fromisoformat(worker["last_seen_at"])
    assert abs((datetime.now(UTC) - seen).total_seconds() - 3600) < 300


async def test_health_on_this_host_counts_only_its_own_workers(
    database_url: str, pool: asyncpg.Pool
) -> None:
    """A pod's liveness probe: another host's heartbeat keeps the deployment healthy, not
    this host's worker alive."""
    host = socket.gethostname()
    await pool.execute(
        "INSERT INTO outbox_workers (id, queues, concurrency, last_seen_at) "
        "VALUES ('elsewhere:1:abc', '{default}', 4, now())"
    )
    assert ok_json(await cli(database_url, "health", "--json"))["status"] == "healthy"
    result = await cli(database_url, "health", "--this-host")
    assert result.returncode == 1, report_of(result)
    assert f"no worker heartbeat on host {host} within 60s" in result.stdout
    await pool.execute(
        "INSERT INTO outbox_workers (id, queues, concurrency, last_seen_at) "
        "VALUES ($1, '{default}', 4, now())",
        f"{host}:2:def",
    )
    report = ok_json(await cli(database_url, "health", "--this-host", "--json"))
    workers = report["checks"]["workers"]
    assert (workers["host"], workers["alive"]) == (host, 1)
    assert [worker["id"] for worker in workers["workers"]] == [f"{host}:2:def"]
    assert f"1 alive on host {host} within 60s" in ok(
        await cli(database_url, "health", "--this-host")
    )


async def test_health_reports_a_schema_behind_its_migrations(
    database_url: str, pool: asyncpg.Pool
) -> None:
    await pool.execute(
        "UPDATE alembic_version SET version_num = 'pgoutbox_0017' "
        "WHERE version_num = 'pgoutbox_0018'"
    )
    result = await cli(database_url, "health", "--json")
    assert result.returncode == 1, report_of(result)
    checks = json.loads(result.stdout)["checks"]
    assert checks["schema"]["status"] == "failing"
    assert (checks["schema"]["current"], checks["schema"]["expected"]) == (
        "pgoutbox_0017",
        "pgoutbox_0018",
    )
    assert "run your application's `alembic upgrade heads`" in checks["schema"]["detail"]
    assert checks["migrations"]["status"] == "failing"
    assert checks["migrations"]["current"] == ["pgoutbox_0017", "sample_0001"]
    assert checks["migrations"]["expected"] == ["pgoutbox_0018", "sample_0001"]


def test_health_with_the_database_unreachable() -> None:
    result = run_cli(UNREACHABLE_URL, "health", "--json")
    assert result.returncode == 1, report_of(result)
    assert result.stderr == "", report_of(result)
    report = json.loads(result.stdout)
    assert report["status"] == "unhealthy"
    assert report["checks"]["database"]["status"] == "failing"
    assert (
        "cannot reach the database at 127.0.0.1:1/nothing"
        in (report["checks"]["database"]["detail"])
    )
    assert report["checks"]["schema"]["status"] == "unknown"

    result = run_cli(UNREACHABLE_URL, "health")
    assert result.returncode == 1, report_of(result)
    assert "Traceback" not in result.stdout + result.stderr
    assert "cannot reach the database" in result.stdout
    assert "unhealthy" in result.stdout

"""``outbox-worker migrate``, run as a user runs it (the real entry point in a subprocess,
real PostgreSQL): the library's schema under its own bookkeeping, once however often and
however many deploys run it, its SQL for review, and the wheel that ships it.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from packaging.requirements import Requirement

from outbox_worker import migrate
from tests.catalog import catalog
from tests.conftest import wait_until
from tests.migrate_support import (
    HEAD,
    ROOT,
    NewDatabase,
    downgrade_one,
    execute,
    migrate_argv,
    ok,
    one_line_error,
    run,
    subprocess_env,
)

UNREACHABLE_URL = "postgresql://nobody@127.0.0.1:1/nothing"


def applied(lines: list[str]) -> list[str]:
    return [line.split(":")[0].removeprefix("applied ") for line in lines[:-1]]


async def fetch(url: str, query: str) -> list[tuple[object, ...]]:
    conn = await asyncpg.connect(url)
    try:
        return [tuple(row) for row in await conn.fetch(query)]
    finally:
        await conn.close()


def test_the_head_is_the_newest_revision_of_the_branch() -> None:
    assert migrate.head() == HEAD
    assert migrate.revisions() == {f"pgoutbox_{n:04d}" for n in range(1, 19)}


def test_the_revisions_read_from_file_names_are_alembics_own() -> None:
    """The worker reads the revisions from the file names, without Alembic: they must be
    what Alembic reads from the files, and the head the one Alembic finds."""
    scripts = migrate.alembic_script_directory()
    assert migrate.revisions() == {script.revision for script in scripts.walk_revisions()}
    assert migrate.head() == scripts.get_current_head()


async def test_migrate_installs_the_schema_once_and_check_tells_where_it_stands(
    empty_databases: NewDatabase,
) -> None:
    url = await empty_databases()
    one_line_error(
        await run("--check", "--database-url", url),
        1,
        "has no pgoutbox schema: run `outbox-worker migrate`",
    )

    first = ok(await run("--database-url", url))
    assert applied(first) == sorted(migrate.revisions())
    assert first[-1].endswith(f"is at {HEAD} (head)"), first
    assert await fetch(url, "SELECT version_num FROM pgoutbox_alembic_version") == [(HEAD,)]
    # The application's bookkeeping is none of its business: not even created.
    assert await fetch(url, "SELECT to_regclass('alembic_version')") == [(None,)]
    installed = await catalog(url)
    assert ("trigger", "outbox_jobs.outbox_jobs_notify") in {row[:2] for row in installed}

    again = ok(await run("--database-url", url))
    assert len(again) == 1
    assert again[0].endswith(f"is at {HEAD} (head): nothing to do"), again
    assert await catalog(url) == installed
    assert ok(await run("--check", "--database-url", url))[0].endswith(f"is at {HEAD} (head)")

    # One revision behind, as the newest revision's downgrade leaves a database; the URL
    # comes from DATABASE_URL just as well.
    await asyncio.to_thread(downgrade_one, url)
    one_line_error(
        await run("--check", DATABASE_URL=url),
        1,
        f"is at pgoutbox_0017, this code needs {HEAD}: run `outbox-worker migrate`",
    )
    assert applied(ok(await run(DATABASE_URL=url))) == [HEAD]
    assert await catalog(url) == installed


async def test_two_deploys_migrating_at_once_take_turns(empty_databases: NewDatabase) -> None:
    """Both wait on the advisory lock (held here first, so that they surely overlap); once
    it is free, one applies every revision and the other finds nothing left to do."""
    url = await empty_databases()
    holder = await asyncpg.connect(url)
    runs: list[asyncio.subprocess.Process] = []
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", migrate.LOCK_KEY)
        for _ in range(2):
            runs.append(
                await asyncio.create_subprocess_exec(
                    *migrate_argv("--database-url", url),
                    env=subprocess_env(),
                    cwd=ROOT,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
            )

        async def both_waiting() -> bool:
            waiting = await holder.fetchval(
                "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                "WHERE d.datname = current_database() AND l.locktype = 'advisory' "
                "AND NOT l.granted"
            )
            return bool(waiting == 2)

        await wait_until(both_waiting, timeout=60, what="both runs waiting on the lock")
        await holder.execute("SELECT pg_advisory_unlock($1)", migrate.LOCK_KEY)
        outputs = [await asyncio.wait_for(proc.communicate(), 60) for proc in runs]
    finally:
        await holder.close()
        for proc in runs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    for proc, (out, err) in zip(runs, outputs, strict=True):
        assert proc.returncode == 0, (out, err)
        assert err == b"", err
    firsts = sorted((applied(out.decode().splitlines()) for out, _ in outputs), key=len)
    assert firsts == [[], sorted(migrate.revisions())], outputs
    assert await fetch(url, "SELECT version_num FROM pgoutbox_alembic_version") == [(HEAD,)]


async def test_the_printed_sql_builds_the_same_schema(empty_databases: NewDatabase) -> None:
    by_command, by_hand = await empty_databases(), await empty_databases()
    # Needs no database: a DBA reviews it wherever.
    script = "\n".join(ok(await run("--sql")))
    assert script.startswith("BEGIN;"), script
    assert script.rstrip().endswith("COMMIT;"), script

    ok(await run("--database-url", by_command))
    await execute(by_hand, script)

    assert await catalog(by_hand) == await catalog(by_command)
    bookkeeping = "SELECT version_num FROM pgoutbox_alembic_version"
    assert await fetch(by_hand, bookkeeping) == await fetch(by_command, bookkeeping) == [(HEAD,)]
    # What the SQL recorded, the command reads: nothing left to do.
    assert ok(await run("--database-url", by_hand))[0].endswith("nothing to do")


async def test_migrate_leaves_a_schema_the_applications_alembic_carries_to_it(
    database_url: str,
) -> None:
    # The suite's databases are the sample's: the pgoutbox branch in its alembic_version.
    one_line_error(
        await run("--database-url", database_url),
        2,
        f"recorded in alembic_version (at {HEAD})",
        "run `alembic upgrade heads` there",
    )
    assert ok(await run("--check", "--database-url", database_url))[0].endswith(
        f"is at {HEAD} (head)"
    )
    await execute(
        database_url,
        f"UPDATE alembic_version SET version_num = 'pgoutbox_0004' WHERE version_num = '{HEAD}'",
    )
    one_line_error(
        await run("--check", "--database-url", database_url),
        1,
        "at pgoutbox_0004 (recorded in alembic_version)",
        "run your application's `alembic upgrade heads`",
    )
    # Tables that no bookkeeping explains (made by hand, or by an application revision that
    # depends on the library's head): neither upgraded blindly nor passed by --check.
    await execute(database_url, "DROP TABLE alembic_version")
    one_line_error(await run("--database-url", database_url), 2, "recorded neither")
    one_line_error(await run("--check", "--database-url", database_url), 1, "recorded neither")


async def test_usage_mistakes_and_an_unreachable_database_are_one_line() -> None:
    one_line_error(await run("--sql", "--check"), 2, "--sql or --check")
    one_line_error(await run(), 2, "DATABASE_URL")
    one_line_error(await run("--database-url", UNREACHABLE_URL), 1, "cannot reach the database")


async def test_a_failing_revision_is_one_line_naming_it(empty_databases: NewDatabase) -> None:
    """A role that may not create tables (PostgreSQL 15 on: no CREATE on schema public)."""
    url = await empty_databases()
    role = f"no_ddl_{os.getpid()}"
    await execute(url, f"CREATE ROLE {role} LOGIN PASSWORD 'secret'")
    parts = urlsplit(url)
    as_role = urlunsplit(parts._replace(netloc=f"{role}:secret@{parts.netloc.rpartition('@')[2]}"))
    try:
        one_line_error(
            await run("--database-url", as_role),
            1,
            "pgoutbox_0001 failed at",
            "permission denied for schema public",
            "run `outbox-worker migrate` again",
        )
    finally:
        await execute(url, f"DROP ROLE {role}")
    assert await fetch(url, "SELECT to_regclass('outbox_jobs')") == [(None,)]


def _isolation() -> list[str]:
    """Build with the installed backend when it meets pyproject's build requirements (quick,
    offline); otherwise pip fetches one, as any build from source does."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for spec in pyproject["build-system"]["requires"]:
        requirement = Requirement(spec)
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            return []
        if not requirement.specifier.contains(installed):
            return []
    return ["--no-build-isolation"]


async def test_the_wheel_ships_the_migrations(tmp_path: Path, empty_databases: NewDatabase) -> None:
    """Built and unpacked where the repository is out of sight, the package migrates."""
    url = await empty_databases()
    build = await asyncio.to_thread(
        subprocess.run,
        [
            *(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", *_isolation()),
            *("-w", str(tmp_path / "dist"), str(ROOT)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("pgoutbox-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(site)
    assert "outbox_worker/migrations/script.py.mako" in names
    assert "outbox_worker/migrations/env.py" in names
    assert f"outbox_worker/migrations/versions/{HEAD}_key_rates.py" in names

    program = (
        "import sys, outbox_worker; print(outbox_worker.__file__, flush=True); "
        "from outbox_worker.cli import main; main(sys.argv[1:])"
    )
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", program, "migrate", "--database-url", url],
        env=subprocess_env() | {"PYTHONPATH": str(site)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = ok(result)
    assert lines[0] == str(site / "outbox_worker" / "__init__.py")
    assert applied(lines[1:]) == sorted(migrate.revisions())

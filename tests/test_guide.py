"""The README's "Add pgoutbox to your FastAPI app", followed word for word in a fresh project.

The project is an existing app, not the sample: ``myapp`` with its own ``users`` table, its
own Alembic history and ``alembic_version``, an async and a sync session dependency. Into a
fresh virtualenv go the wheel (as ``pip install 'pgoutbox[web]'`` would fetch it) and the
app's own dependencies. Then the guide's steps run as the README writes them: its
``alembic.ini`` lines and ``env.py`` line are applied, its commands run, its code blocks
become the project's files, the project's test (the guide's) passes, and the app served by
uvicorn with the worker beside it welcomes users who signed up through the async route and
the sync one. A README edit that breaks a step breaks this test.
"""

from __future__ import annotations

import configparser
import io
import re
import shlex
import signal
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.conftest import ROOT, run_apart, wait_until

# The slow tier (`make test-slow`): processes, servers and builds, minutes in all.
pytestmark = pytest.mark.slow

GUIDE = "## Add pgoutbox to your FastAPI app"
# What the app needs besides pgoutbox, as its own requirements would list them.
APP_REQUIREMENTS = ("psycopg[binary]", "uvicorn", "httpx", "pytest", "pytest-asyncio")

# The app before pgoutbox: a model, session dependencies, an Alembic history of its own.
EXISTING_APP = {
    "myapp/__init__.py": "",
    "myapp/models.py": """
        from datetime import datetime

        from sqlalchemy import DateTime, String
        from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


        class Base(DeclarativeBase):
            pass


        class User(Base):
            __tablename__ = "users"

            id: Mapped[int] = mapped_column(primary_key=True)
            email: Mapped[str] = mapped_column(String(200), unique=True)
            welcomed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
        """,
    "myapp/db.py": """
        import os
        from collections.abc import AsyncIterator, Iterator
        from typing import Annotated

        from fastapi import Depends
        from sqlalchemy import create_engine
        from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
        from sqlalchemy.orm import Session, sessionmaker
        from sqlalchemy.pool import NullPool

        URL = os.environ["DATABASE_URL"]
        # NullPool: each test's event loop opens its own connections.
        engine = create_async_engine(
            URL.replace("postgresql://", "postgresql+asyncpg://", 1), poolclass=NullPool
        )
        SessionLocal = async_sessionmaker(engine, expire_on_commit=False)
        sync_engine = create_engine(URL.replace("postgresql://", "postgresql+psycopg://", 1))
        SyncSessionLocal = sessionmaker(sync_engine, expire_on_commit=False)


        async def get_session() -> AsyncIterator[AsyncSession]:
            async with SessionLocal() as session:
                yield session


        def get_sync_session() -> Iterator[Session]:
            with SyncSessionLocal() as session:
                yield session


        SessionDep = Annotated[AsyncSession, Depends(get_session)]
        SyncSessionDep = Annotated[Session, Depends(get_sync_session)]
        """,
    "alembic.ini": """
        [alembic]
        script_location = %(here)s/alembic
        prepend_sys_path = .
        """,
    "alembic/env.py": """
        import os

        from alembic import context
        from sqlalchemy import create_engine

        from myapp.models import Base

        url = os.environ["DATABASE_URL"].replace("postgresql://", "postgresql+psycopg://", 1)
        with create_engine(url).connect() as connection:
            context.configure(connection=connection, target_metadata=Base.metadata)
            with context.begin_transaction():
                context.run_migrations()
        """,
    "alembic/versions/0001_users.py": """
        import sqlalchemy as sa
        from alembic import op

        revision = "0001"
        down_revision = None
        branch_labels = None
        depends_on = None


        def upgrade() -> None:
            op.create_table(
                "users",
                sa.Column("id", sa.Integer, primary_key=True),
                sa.Column("email", sa.String(200), nullable=False, unique=True),
                sa.Column("welcomed_at", sa.DateTime(timezone=True)),
            )
        """,
    "pyproject.toml": """
        [tool.pytest.ini_options]
        pythonpath = ["."]
        asyncio_mode = "auto"
        asyncio_default_fixture_loop_scope = "function"
        """,
}


class Guide:
    """The guide's section of the README: its commands and code blocks, in order."""

    def __init__(self) -> None:
        section = (ROOT / "README.md").read_text().split(GUIDE, 1)[1].split("\n## ", 1)[0]
        self.blocks: list[tuple[str, str]] = re.findall(
            r"^```(\w+)\n(.*?)^```", section, re.MULTILINE | re.DOTALL
        )

    def commands(self) -> list[str]:
        return [line for lang, body in self.blocks if lang == "sh" for line in body.splitlines()]

    def command(self, starting: str) -> list[str]:
        """The one command the guide gives that starts with ``starting``, as argv."""
        [found] = [c for c in self.commands() if c.startswith(starting)]
        return shlex.split(found)

    def files(self) -> dict[str, str]:
        """The code blocks that are files: their first line is ``# path``."""
        found = {}
        for lang, body in self.blocks:
            first, _, rest = body.partition("\n")
            if lang == "python" and re.fullmatch(r"# [\w/]+\.py", first):
                found[first[2:]] = rest
        return found

    def block(self, lang: str, containing: str) -> str:
        [found] = [body for kind, body in self.blocks if kind == lang and containing in body]
        return found


@pytest.fixture(scope="module")
def app_venv(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Path:
    """A virtualenv with what step 1 installs, from the wheel, and the app's own needs."""
    assert Guide().command("pip install") == ["pip", "install", "pgoutbox[web]"]
    venv = tmp_path_factory.mktemp("app-venv")
    run_apart(sys.executable, "-m", "venv", venv)
    run_apart(venv / "bin" / "pip", "install", "--quiet", f"{wheel}[web]", *APP_REQUIREMENTS)
    return venv


class Project:
    """The app's folder, and its commands run in the app's virtualenv on its database."""

    def __init__(self, path: Path, venv: Path, database_url: str) -> None:
        self.path = path
        self.bin = venv / "bin"
        self.env = {"DATABASE_URL": database_url, "PATH": f"{self.bin}:/usr/bin:/bin"}
        for name, text in EXISTING_APP.items():
            self.write(name, textwrap.dedent(text).lstrip())

    def write(self, name: str, text: str) -> None:
        (self.path / name).parent.mkdir(parents=True, exist_ok=True)
        (self.path / name).write_text(text)

    def run(self, argv: list[str]) -> str:
        return run_apart(self.bin / argv[0], *argv[1:], cwd=self.path, env=self.env)

    def start(self, argv: list[str], log: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [str(self.bin / argv[0]), *argv[1:]],
            cwd=self.path,
            env=self.env,
            stdout=(self.path / log).open("wb"),
            stderr=subprocess.STDOUT,
        )

    def fails(self, argv: list[str]) -> str:
        result = subprocess.run(
            [str(self.bin / argv[0]), *argv[1:]],
            cwd=self.path,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode != 0, result.stdout
        return result.stdout + result.stderr


def apply_ini(project: Project, block: str) -> None:
    """Step 2's ``alembic.ini`` lines, set in the app's own ``[alembic]`` section."""
    ours, theirs = configparser.RawConfigParser(), configparser.RawConfigParser()
    ours.read(project.path / "alembic.ini")
    theirs.read_string(block)
    for key, value in theirs["alembic"].items():
        ours["alembic"][key] = value
    out = io.StringIO()
    ours.write(out)
    project.write("alembic.ini", out.getvalue())


def apply_env_line(project: Project, block: str) -> None:
    """Step 2's ``env.py`` lines: its import added, its ``context.configure`` in place of
    the app's."""
    env = (project.path / "alembic/env.py").read_text()
    lines = [line for line in block.splitlines() if line]
    [imported] = [line for line in lines if line.startswith("from ")]
    [configure] = [line for line in lines if line.startswith("context.configure(")]
    env, replaced = re.subn(r"context\.configure\(.*\)", lambda _: configure, env)
    assert replaced == 1
    project.write("alembic/env.py", f"{imported}\n{env}")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("schema_way", ["alembic-branch", "migrate-command"])
async def test_the_readme_guide_works_in_a_fresh_project(
    schema_way: str,
    app_venv: Path,
    tmp_path: Path,
    empty_databases: Callable[[], Awaitable[str]],
) -> None:
    guide = Guide()
    database_url = await empty_databases()
    project = Project(tmp_path / "project", app_venv, database_url)
    project.run(["alembic", "upgrade", "head"])  # the app as it was: its users table

    # Step 2: the schema, one way or the other, and autogenerate leaves the queue alone.
    if schema_way == "alembic-branch":
        apply_ini(project, guide.block("ini", "outbox_worker:migrations/versions"))
        project.run(guide.command("alembic upgrade"))
    else:
        project.run(guide.command("outbox-worker migrate"))
    assert "outbox_jobs" in project.fails(["alembic", "check"])  # without the env.py line
    apply_env_line(project, guide.block("python", "not_pgoutbox"))
    assert "No new upgrade operations detected" in project.run(["alembic", "check"])
    conn = await asyncpg.connect(database_url)
    try:
        versions = await conn.fetch("SELECT version_num FROM alembic_version ORDER BY 1")
        queue_versions = "pgoutbox_alembic_version"
        if schema_way == "alembic-branch":
            assert [r[0] for r in versions] == ["0001", "pgoutbox_0018"]
            assert await conn.fetchval("SELECT to_regclass($1)", queue_versions) is None
        else:
            assert [r[0] for r in versions] == ["0001"]  # the app's own, untouched
            assert await conn.fetchval(f"SELECT version_num FROM {queue_versions}") == (
                "pgoutbox_0018"
            )

        # Steps 3, 4 and 6: the guide's files; its test passes.
        files = guide.files()
        assert sorted(files) == ["myapp/main.py", "myapp/tasks.py", "tests/test_signup.py"]
        for name, text in files.items():
            project.write(name, text)
        assert "1 passed" in project.run(["python", "-m", "pytest", "-q", "tests"])
        assert await conn.fetchval("SELECT count(*) FROM users WHERE welcomed_at IS NOT NULL") == 1

        # Step 5: the worker beside the app; a sign-up through each route is welcomed.
        worker = project.start(guide.command("outbox-worker run"), "worker.log")
        socket = tmp_path / "app.sock"
        server = project.start(["uvicorn", "myapp.main:app", "--uds", str(socket)], "app.log")
        try:
            transport = httpx.AsyncHTTPTransport(uds=str(socket), retries=50)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:

                async def listening() -> bool:
                    return socket.exists()

                await wait_until(listening, what="uvicorn listening")
                user_ids = {}
                for route in ("/signup", "/signup-sync"):
                    answer = await client.post(
                        route,
                        json={"email": f"{route[1:]}@example.com"},
                        headers={"X-Request-ID": f"guide{route.replace('/', '-')}"},
                    )
                    assert answer.status_code == 201, answer.text
                    user_ids[route] = answer.json()["user_id"]

            async def welcomed() -> bool:
                count = await conn.fetchval(
                    "SELECT count(*) FROM users WHERE id = ANY($1) AND welcomed_at IS NOT NULL",
                    list(user_ids.values()),
                )
                return bool(count == 2)

            await wait_until(welcomed, timeout=60, what="both users welcomed by the worker")
            jobs = await conn.fetch(
                "SELECT args->>'user_id' AS user_id, state, queue, correlation_id"
                " FROM outbox_jobs ORDER BY id"
            )
            assert [tuple(job) for job in jobs[1:]] == [
                (str(user_ids["/signup"]), "succeeded", "emails", "guide-signup"),
                (str(user_ids["/signup-sync"]), "succeeded", "emails", "guide-signup-sync"),
            ]
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=60) == 0
        finally:
            for process in (worker, server):
                if process.poll() is None:
                    process.kill()
                    process.wait()
        output = (project.path / "worker.log").read_text()
        assert "Traceback" not in output, output
    finally:
        await conn.close()

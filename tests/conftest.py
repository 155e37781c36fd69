"""Fixtures for the whole suite: one PostgreSQL server per session, a migrated template
database, and a fresh clone of it for every test (``CREATE DATABASE … TEMPLATE``).

The library's tests are in tests/ and reach its HTTP face through ``admin_host``, an app of
``outbox_worker.web`` alone; the sample service's tests and fixtures are in tests/sample/."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from alembic.config import Config
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from alembic import command
from outbox_worker import current_correlation_id
from outbox_worker.config import sqlalchemy_url
from outbox_worker.devdb import PostgresServer, admin, start_postgres
from outbox_worker.enqueue_plans import default_max_args_bytes
from tests.admin_host import begun, create_admin_host
from tests.drivers_support import KINDS, Caller, open_caller
from tests.support import ADMIN_TOKEN, Enqueuer
from tests.workload import EXECUTIONS_DDL
from tests.workload import registry as workload_registry

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = "outbox_template"
_numbers = itertools.count()


def alembic_config(url: str) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["database_url"] = url
    config.attributes["configure_logging"] = False
    return config


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    server = start_postgres()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def template_url(pg_server: PostgresServer) -> str:
    asyncio.run(admin(pg_server, f"DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE)"))
    asyncio.run(admin(pg_server, f"CREATE DATABASE {TEMPLATE}"))
    url = pg_server.url_for(TEMPLATE)
    command.upgrade(alembic_config(url), "heads")

    async def add_test_tables() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(EXECUTIONS_DDL)
        finally:
            await conn.close()

    asyncio.run(add_test_tables())
    return url


@pytest.fixture
async def database_url(pg_server: PostgresServer, template_url: str) -> AsyncIterator[str]:
    """A database of its own for this test, migrated, with no jobs in it."""
    name = f"t_{os.getpid()}_{next(_numbers)}"
    await admin(pg_server, f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    try:
        yield pg_server.url_for(name)
    finally:
        await admin(pg_server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
async def empty_databases(pg_server: PostgresServer) -> AsyncIterator[Callable[[], Awaitable[str]]]:
    """Make databases with no schema at all (for the tests that install it), as many as the
    test asks for; all are dropped at the end."""
    names: list[str] = []

    async def create() -> str:
        name = f"e_{os.getpid()}_{next(_numbers)}"
        await admin(pg_server, f"CREATE DATABASE {name} TEMPLATE template0")
        names.append(name)
        return pg_server.url_for(name)

    try:
        yield create
    finally:
        for name in names:
            await admin(pg_server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=8)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def crowded_user(pool: asyncpg.Pool) -> AsyncIterator[str]:
    """A role the server refuses every connection to with "too many connections" (its
    CONNECTION LIMIT is 0); roles belong to the whole server, so each test has its own."""
    name = f"crowded_{os.getpid()}_{next(_numbers)}"
    await pool.execute(f"CREATE ROLE {name} LOGIN CONNECTION LIMIT 0")
    try:
        yield name
    finally:
        await pool.execute(f"DROP ROLE {name}")


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(sqlalchemy_url(database_url), pool_size=10, max_overflow=40)
    try:
        yield engine
    finally:
        await engine.dispose()


class WorkerProcess:
    """An ``outbox-worker run`` in a child process, its output kept in a file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "outbox_worker", "run", *args],
            env=env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker {self.pid} still running after {timeout}s:\n{self.output()}")

    async def wait_for_log(self, *texts: str, timeout: float = 30) -> str:
        """Wait until one of ``texts`` is in the worker's log; returns the one found."""
        deadline = time.monotonic() + timeout
        while True:
            output = self.output()
            for text in texts:
                if text in output:
                    return text
            if self.proc.poll() is not None:
                pytest.fail(f"worker exited with {self.proc.returncode}:\n{output}")
            if time.monotonic() > deadline:
                pytest.fail(f"none of {texts!r} in the worker's log after {timeout}s:\n{output}")
            await asyncio.sleep(0.05)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture
def spawn_worker(database_url: str, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start worker processes on this test's database; all are killed at the end."""
    started: list[WorkerProcess] = []

    def spawn(
        *args: str, env: dict[str, str] | None = None, target: str = "tests.workload:registry"
    ) -> WorkerProcess:
        full_env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "PYTHONPATH": str(ROOT),
            "OUTBOX_LOG_FORMAT": "json",
            "OUTBOX_LOG_LEVEL": "debug",
            "OUTBOX_RETRY_BASE_SECONDS": "0.05",
            "OUTBOX_RETRY_CAP_SECONDS": "1",
            "OUTBOX_TEST_EXIT_HOOK": "1",
            **(env or {}),
        }
        worker = WorkerProcess([target, *args], full_env, tmp_path / f"worker-{len(started)}.log")
        started.append(worker)
        return worker

    yield spawn
    for worker in started:
        worker.kill()


def run_apart(
    *args: str | Path, cwd: Path | None = None, env: Mapping[str, str] | None = None
) -> str:
    """Run a command away from the repository (in its own folder by default) and without
    PYTHONPATH, so that nothing of the repository is importable; its stdout, or the test
    fails with all its output."""
    full_env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    result = subprocess.run(
        [str(arg) for arg in args],
        cwd=cwd or Path(args[0]).parent,
        env={**full_env, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"{args}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="session")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel and sdist, built as a release would build them."""
    out = tmp_path_factory.mktemp("dist")
    run_apart(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ROOT)
    return out


@pytest.fixture(scope="session")
def wheel(dist: Path) -> Path:
    [found] = dist.glob("pgoutbox-*.whl")
    return found


async def wait_until(
    predicate: Callable[[], Any], timeout: float = 30, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll an async predicate until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(interval)


def deep_json(depth: int) -> str:
    """A JSON object nested ``depth`` levels deep (the object is the first level), one
    container per level, as plain SQL may store it."""
    return '{"a": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}"


def levels(value: Any) -> tuple[int, Any]:
    """How many containers lead down to the innermost value of a one-child-per-level
    structure (what deep_json builds), and that value."""
    count = 0
    while isinstance(value, dict | list):
        count += 1
        if not value:
            break
        value = next(iter(value.values())) if isinstance(value, dict) else value[0]
    return count, value


@pytest.fixture
def admin_host(engine: AsyncEngine) -> FastAPI:
    """The library's HTTP face alone (tests/admin_host.py) on this test's database, its
    session dependency opening the transaction as the sample's does; admin is off until the
    test sets ``admin_host.state.admin_token``."""
    return create_admin_host(begun(engine))


@pytest.fixture
async def admin_client(admin_host: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Real HTTP requests through the admin host (no network, no mocks)."""
    transport = httpx.ASGITransport(app=admin_host)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


@pytest.fixture(params=["session", "connection"])
async def db(request: pytest.FixtureRequest, engine: AsyncEngine) -> AsyncIterator[Enqueuer]:
    """The enqueuing caller's side: an AsyncSession or an AsyncConnection (each autobegins)."""
    assert "echo" in workload_registry  # the workload's tasks are registered in this process
    if request.param == "session":
        async with AsyncSession(engine) as session:
            yield session
    else:
        async with engine.connect() as conn:
            yield conn


@pytest.fixture
def correlation(request: pytest.FixtureRequest) -> Iterator[str]:
    """A request id in current_correlation_id for the duration of the test."""
    value = f"req-{request.node.name[-20:]}"
    token = current_correlation_id.set(value)
    try:
        yield value
    finally:
        current_correlation_id.reset(token)


@pytest.fixture
def default_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """OUTBOX_MAX_ARGS_BYTES as the environment gives it, re-read for this test."""
    monkeypatch.delenv("OUTBOX_MAX_ARGS_BYTES", raising=False)
    default_max_args_bytes.cache_clear()
    yield monkeypatch
    default_max_args_bytes.cache_clear()


@pytest.fixture
def admin_app(admin_host: FastAPI) -> FastAPI:
    """The admin host with admin on: its token set (ADMIN_TOKEN, tests/support.py)."""
    admin_host.state.admin_token = ADMIN_TOKEN
    return admin_host


@pytest.fixture(params=KINDS)
async def caller(request: pytest.FixtureRequest, database_url: str) -> AsyncIterator[Caller]:
    """An enqueuing caller of each session kind the library takes (tests/drivers_support.py)."""
    # The workload's tasks, which the module-level enqueue finds.
    assert "echo" in workload_registry
    async with AsyncExitStack() as stack:
        # SQLModel's AsyncSession warns on execute(): enqueue must not call it (nor anything
        # else that warns), so every warning is an error here.
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("error")
        yield await open_caller(request.param, database_url, stack)

"""PgBouncer in transaction mode between the library and the session's PostgreSQL: one
``pgbouncer`` process per test session (Debian's, started here on a free port, never the
system's service), and the suite's fixtures redirected through it.

Here ``engine`` (so ``db``, ``admin_host`` and ``admin_client``) and ``spawn_worker`` go
through PgBouncer; ``pool`` stays a direct connection, the tests' own view of the table. A
worker gets the PgBouncer URL as ``--database-url`` with ``OUTBOX_PREPARED_STATEMENTS=false``,
and LISTENs as ``listen_mode`` says: on the direct URL, not at all, or (only where a test asks
for it) through PgBouncer. Its handlers' own bookkeeping (tests/workload.py) still reads
``DATABASE_URL``, the direct URL.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from outbox_worker.config import sqlalchemy_url
from outbox_worker.devdb import PostgresServer, free_port
from tests.conftest import WorkerProcess

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"

# What an app's SQLAlchemy engine needs behind PgBouncer in transaction mode: neither
# asyncpg's statement cache nor SQLAlchemy's own (docs/operating.md, "Behind PgBouncer").
NO_PREPARED_STATEMENTS = {"statement_cache_size": 0, "prepared_statement_cache_size": 0}

ListenMode = Literal["direct", "off", "pooled"]


def require_pgbouncer() -> None:
    """Missing PgBouncer skips this tier on a developer's machine, and fails it under CI,
    whose .ci/run installs it."""
    if Path(PGBOUNCER).is_file():
        return
    message = (
        "pgbouncer is missing: the PgBouncer tier runs Debian's (apt-get install -y "
        "pgbouncer; .ci/run installs it)"
    )
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def pgbouncer_version() -> tuple[int, ...]:
    output = subprocess.run(
        [PGBOUNCER, "--version"], capture_output=True, text=True, check=True
    ).stdout
    found = re.search(r"PgBouncer (\d+)\.(\d+)", output)
    assert found, output
    return tuple(int(part) for part in found.groups())


@dataclass(frozen=True)
class Bouncer:
    port: int

    def url_for(self, direct_url: str) -> str:
        """``direct_url``'s database and role, through PgBouncer."""
        parts = urlsplit(direct_url)
        return f"postgresql://{parts.netloc.rpartition('@')[0]}@127.0.0.1:{self.port}{parts.path}"


def _server_host(server: PostgresServer) -> str:
    """The host of the server's URL: a name, an address, or a Unix socket's folder."""
    parts = urlsplit(server.url)
    return parts.hostname or parse_qs(parts.query).get("host", ["localhost"])[0]


def _unprivileged_user(server: PostgresServer) -> str:
    host = _server_host(server)
    if host.startswith("/"):
        return pwd.getpwuid(Path(host).stat().st_uid).pw_name
    return "nobody"


def _config(server: PostgresServer, port: int, folder: Path) -> Path:
    """The ini and auth file: any database of the server, its role trusted at PgBouncer
    (as the embedded server trusts it) and its password, if any, passed on to the server."""
    parts = urlsplit(server.url)
    user = unquote(parts.username or "postgres")
    password = unquote(parts.password or "")
    users = folder / "users.txt"
    users.write_text(f'"{user}" "{password}"\n')
    lines = [
        "[databases]",
        f"* = host={_server_host(server)} port={parts.port or 5432}",
        "[pgbouncer]",
        "listen_addr = 127.0.0.1",
        f"listen_port = {port}",
        "unix_socket_dir =",
        "auth_type = trust",
        f"auth_file = {users}",
        "pool_mode = transaction",
        "max_client_conn = 1000",
    ]
    # From 1.21 PgBouncer can track protocol-level prepared statements (on by default from
    # 1.24): off, so that a prepared statement used through it fails as it would on older
    # ones, and the tests show the library uses none.
    if pgbouncer_version() >= (1, 21):
        lines.append("max_prepared_statements = 0")
    ini = folder / "pgbouncer.ini"
    ini.write_text("\n".join(lines) + "\n")
    return ini


def _wait_until_listening(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"pgbouncer did not start:\n{log.read_text(errors='replace')}")
            time.sleep(0.05)


@pytest.fixture(scope="session")
def pgbouncer(
    pg_server: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Bouncer]:
    """PgBouncer in transaction mode in front of the session's server. It refuses to run as
    root, so as root it reads its files and then switches to the user who owns the server's
    socket folder (the embedded server's own), or to ``nobody`` for a server on TCP."""
    require_pgbouncer()
    folder = tmp_path_factory.mktemp("pgbouncer")
    port = free_port()
    ini = _config(pg_server, port, folder)
    log = folder / "pgbouncer.log"
    as_user = ["-u", _unprivileged_user(pg_server)] if os.geteuid() == 0 else []
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [PGBOUNCER, *as_user, str(ini)], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        _wait_until_listening(proc, port, log)
        yield Bouncer(port)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def bouncer_url(pgbouncer: Bouncer, database_url: str) -> str:
    """This test's database through PgBouncer."""
    return pgbouncer.url_for(database_url)


@pytest.fixture
async def engine(bouncer_url: str) -> AsyncIterator[AsyncEngine]:
    """The suite's SQLAlchemy engine, through PgBouncer, set up as docs/operating.md says."""
    engine = create_async_engine(
        sqlalchemy_url(bouncer_url),
        pool_size=10,
        max_overflow=40,
        connect_args=NO_PREPARED_STATEMENTS,
    )
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture(params=["direct", "off"])
def listen_mode(request: pytest.FixtureRequest) -> ListenMode:
    """Where a worker LISTENs: on the direct URL beside the pooled one, or nowhere (poll
    only). A test may parametrize it as ``pooled``: through PgBouncer, where LISTEN hears
    nothing."""
    mode: ListenMode = request.param
    return mode


@pytest.fixture
def spawn_worker(
    spawn_worker: Callable[..., WorkerProcess],
    bouncer_url: str,
    database_url: str,
    listen_mode: ListenMode,
) -> Callable[..., WorkerProcess]:
    """The suite's worker processes, their pools through PgBouncer with prepared statements
    off, as an operator sets them."""
    listening = {
        "direct": ["--listen-database-url", database_url],
        "off": ["--no-listen"],
        "pooled": ["--listen"],
    }[listen_mode]

    def spawn(*args: str, env: dict[str, str] | None = None, **options: Any) -> WorkerProcess:
        return spawn_worker(
            "--database-url",
            bouncer_url,
            *listening,
            *args,
            env={"OUTBOX_PREPARED_STATEMENTS": "false", **(env or {})},
            **options,
        )

    return spawn

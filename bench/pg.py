"""The PostgreSQL server of a bench run, and one fresh database per system and run.

Every system gets a template database prepared once (its schema installed); each measured
run then gets its own copy (``CREATE DATABASE … TEMPLATE``), dropped afterwards.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import asyncpg

from outbox_worker import asyncpg_dsn
from outbox_worker.devdb import PostgresServer, admin, start_embedded

_numbers = itertools.count()

AsyncDatabase = AbstractAsyncContextManager[str]


def start_server() -> PostgresServer:
    """DATABASE_URL's server when set, else an embedded one in a temporary folder."""
    url = os.environ.get("DATABASE_URL")
    if url:
        return PostgresServer(asyncpg_dsn(url), "url")
    return start_embedded()


async def execute(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def fetchrow(url: str, query: str) -> asyncpg.Record:
    conn = await asyncpg.connect(url)
    try:
        row: asyncpg.Record | None = await conn.fetchrow(query)
    finally:
        await conn.close()
    if row is None:
        raise ValueError(f"no row from {query!r}")
    return row


async def fetchval(url: str, query: str) -> object:
    return (await fetchrow(url, query))[0]


async def create_template(server: PostgresServer, name: str) -> str:
    """A new empty database for a system's schema; returns its URL."""
    await admin(server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    await admin(server, f"CREATE DATABASE {name}")
    return server.url_for(name)


async def drop(server: PostgresServer, name: str) -> None:
    await admin(server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@asynccontextmanager
async def fresh_database(server: PostgresServer, template: str) -> AsyncIterator[str]:
    """A copy of ``template`` for one run; dropped on exit."""
    name = f"bench_{os.getpid()}_{next(_numbers)}"
    await admin(server, f"CREATE DATABASE {name} TEMPLATE {template}")
    try:
        yield server.url_for(name)
    finally:
        await drop(server, name)


async def describe(url: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        version = await conn.fetchval("SHOW server_version")
        settings = [
            f"{name}={await conn.fetchval(f'SHOW {name}')}"
            for name in ("shared_buffers", "synchronous_commit", "fsync", "max_connections")
        ]
    finally:
        await conn.close()
    return f"PostgreSQL {version} ({', '.join(settings)})"

"""Helpers shared by test modules: the enqueuing caller's session type, and bringing the
session's PostgreSQL server back after a test took it away.

Helpers the bench needs as well live in :mod:`outbox_worker.devdb` (``admin``, ``free_port``,
``with_application_name``), since tests do not import the bench.
"""

from __future__ import annotations

import asyncio
from typing import TypeAlias

import asyncpg
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from outbox_worker.devdb import PostgresServer

# The enqueuing caller's side, as the ``db`` fixture gives it: a session or a connection.
Enqueuer: TypeAlias = AsyncSession | AsyncConnection

# What a client sees while the server stops, is down, or recovers.
DOWN = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.CannotConnectNowError,
)


async def ensure_server_up(pg_server: PostgresServer) -> None:
    """Leave the session's server running whatever a restart test did to it."""
    try:
        conn = await asyncpg.connect(pg_server.url_for("postgres"), timeout=5)
    except DOWN:
        await asyncio.to_thread(pg_server.start_server)
    else:
        await conn.close()

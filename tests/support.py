"""Helpers for tests that take the session's PostgreSQL server away and bring it back.

Helpers the bench needs as well live in :mod:`outbox_worker.devdb` (``admin``, ``free_port``,
``with_application_name``), since tests do not import the bench.
"""

from __future__ import annotations

import asyncio

import asyncpg

from outbox_worker.devdb import PostgresServer

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

"""The one LISTEN connection: outside the pool, re-armed after every loss.

A notification only wakes the producer; polling goes on regardless, so a lost one costs
latency, never a job. A LISTEN that hears nothing at all (through PgBouncer in transaction
mode, which runs it on a server connection it then hands to other clients) would cost that
latency silently on every job, so the first connection checks it hears a NOTIFY and, if not,
says so once.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from typing import NoReturn

import asyncpg
import structlog

from outbox_worker import sql
from outbox_worker.db import is_transient, sleep_or_stop, where
from outbox_worker.formatting import error_line

# How long the start-up check waits for its own NOTIFY: a direct connection hears it within
# milliseconds, even on a loaded server.
PROBE_SECONDS = 2.0


class Notifier:
    name = "notifier"

    def __init__(
        self,
        *,
        dsn: str,
        pool: asyncpg.Pool,
        wake: Callable[[], None],
        poll_interval: float,
        keepalive_seconds: float,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        """``pool`` sends the start-up check's NOTIFY, the way the jobs' NOTIFYs travel."""
        self._dsn = dsn
        self._pool = pool
        self._wake = wake
        self._poll_interval = poll_interval
        self._keepalive = keepalive_seconds
        self._log = log
        self._checked = False

    async def run(self) -> None:
        """Listen until cancelled, reconnecting with a growing pause after every loss."""
        delay = 0.1
        while True:
            try:
                await self._listen_until_lost()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self._log.warning("listener_lost", error=error_line(exc), retry_in=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _listen_until_lost(self) -> NoReturn:
        # No statement cache: its only statement, the keepalive, is not worth preparing, and
        # one prepared through a pooler that switches server connections would fail.
        conn: asyncpg.Connection = await asyncpg.connect(
            self._dsn, timeout=10, statement_cache_size=0
        )
        lost = asyncio.Event()
        try:
            conn.add_termination_listener(lambda _conn: lost.set())
            if not self._checked:
                await self._check_hearing(conn, lost)
                self._checked = True
            await conn.add_listener(sql.NOTIFY_CHANNEL, lambda *_: self._wake())
            self._log.debug("listening", channel=sql.NOTIFY_CHANNEL)
            # Anything inserted while we were not listening has sent its NOTIFY to nobody.
            self._wake()
            while not await sleep_or_stop(lost, self._keepalive):
                # A half-open TCP connection reports nothing: ask it something.
                await conn.fetchval("SELECT 1", timeout=self._keepalive)
            raise ConnectionError("LISTEN connection closed")
        finally:
            if not conn.is_closed():
                await conn.close(timeout=2)

    async def _check_hearing(self, conn: asyncpg.Connection, lost: asyncio.Event) -> None:
        """NOTIFY a channel of this connection's own through the pool and wait for it: a
        warning when it does not come, and the worker goes on, polling. A connection lost
        meanwhile proves nothing either way: it is re-armed and checked again."""
        channel = f"outbox_probe_{secrets.token_hex(8)}"
        answered = asyncio.Event()  # the NOTIFY heard, or the connection lost

        def answer(*_: object) -> None:
            answered.set()

        conn.add_termination_listener(answer)
        await conn.add_listener(channel, answer)
        try:
            await self._pool.execute(*sql.bind(sql.LISTEN_PROBE, channel=channel))
            await sleep_or_stop(answered, PROBE_SECONDS)
        finally:
            await conn.remove_listener(channel, answer)
        if lost.is_set():
            raise ConnectionError("LISTEN connection closed")
        if answered.is_set():
            self._log.debug("listen_verified")
            return
        self._log.warning(
            "listen_unverified",
            listen_at=where(self._dsn),
            reason=f"a NOTIFY sent through the pool was not heard within {PROBE_SECONDS:g}s "
            "(PgBouncer in transaction mode drops LISTEN)",
            hint=f"relying on polling every {self._poll_interval:g}s; give LISTEN a direct "
            "connection (OUTBOX_LISTEN_DATABASE_URL) or turn it off (OUTBOX_LISTEN=false)",
        )

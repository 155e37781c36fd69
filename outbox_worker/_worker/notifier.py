"""The one LISTEN connection: outside the pool, re-armed after every loss.

A notification only wakes the producer; polling goes on regardless, so a lost one costs
latency, never a job.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import NoReturn

import asyncpg
import structlog

from outbox_worker import sql
from outbox_worker.db import is_transient
from outbox_worker.formatting import error_line


class Notifier:
    name = "notifier"

    def __init__(
        self,
        *,
        dsn: str,
        wake: Callable[[], None],
        keepalive_seconds: float,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self._dsn = dsn
        self._wake = wake
        self._keepalive = keepalive_seconds
        self._log = log

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
        conn: asyncpg.Connection = await asyncpg.connect(self._dsn, timeout=10)
        lost = asyncio.Event()
        try:
            conn.add_termination_listener(lambda _conn: lost.set())
            await conn.add_listener(sql.NOTIFY_CHANNEL, lambda *_: self._wake())
            self._log.debug("listening", channel=sql.NOTIFY_CHANNEL)
            # Anything inserted while we were not listening has sent its NOTIFY to nobody.
            self._wake()
            while True:
                try:
                    await asyncio.wait_for(lost.wait(), timeout=self._keepalive)
                except TimeoutError:
                    # A half-open TCP connection reports nothing: ask it something.
                    await conn.fetchval("SELECT 1", timeout=self._keepalive)
                else:
                    raise ConnectionError("LISTEN connection closed")
        finally:
            if not conn.is_closed():
                await conn.close(timeout=2)

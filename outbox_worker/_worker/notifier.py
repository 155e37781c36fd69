"""The one LISTEN connection: outside the pool, re-armed after every loss.

A notification only wakes the producer; polling goes on regardless, so a lost one costs
latency, never a job.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg
import structlog

from outbox_worker import sql
from outbox_worker.db import is_transient, sleep_or_stop


class Notifier:
    def __init__(
        self,
        *,
        dsn: str,
        wake: Callable[[], None],
        stop: asyncio.Event,
        keepalive_seconds: float,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self._dsn = dsn
        self._wake = wake
        self._stop = stop
        self._keepalive = keepalive_seconds
        self._log = log

    async def run(self) -> None:
        delay = 0.1
        while not self._stop.is_set():
            try:
                await self._listen_until_lost()
                delay = 0.1
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self._log.warning(
                    "listener_lost", error=f"{type(exc).__name__}: {exc}", retry_in=delay
                )
            if await sleep_or_stop(self._stop, delay):
                return
            delay = min(delay * 2, 5.0)

    async def _listen_until_lost(self) -> None:
        conn: asyncpg.Connection = await asyncpg.connect(self._dsn, timeout=10)
        lost = asyncio.Event()
        try:
            conn.add_termination_listener(lambda _conn: lost.set())
            await conn.add_listener(sql.NOTIFY_CHANNEL, lambda *_: self._wake())
            self._log.debug("listening", channel=sql.NOTIFY_CHANNEL)
            # Anything inserted while we were not listening has sent its NOTIFY to nobody.
            self._wake()
            while not self._stop.is_set() and not lost.is_set():
                stop_wait = asyncio.ensure_future(self._stop.wait())
                lost_wait = asyncio.ensure_future(lost.wait())
                done, pending = await asyncio.wait(
                    {stop_wait, lost_wait},
                    timeout=self._keepalive,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for waiter in pending:
                    waiter.cancel()
                if not done:
                    # A half-open TCP connection reports nothing: ask it something.
                    await conn.fetchval("SELECT 1", timeout=self._keepalive)
            if lost.is_set():
                raise ConnectionError("LISTEN connection closed")
        finally:
            if not conn.is_closed():
                await conn.close(timeout=2)

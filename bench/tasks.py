"""The benchmark's tasks: a true no-op, so the figures are the queue's own cost; a job that
waits a given time, as work that awaits an API or the database does; and the latency probe,
which only notes when its handler started (``BENCH_STAMPS`` names the file)."""

from __future__ import annotations

import asyncio
import os

from bench.measure import Stamps
from outbox_worker import JobContext, Registry

registry = Registry()
_stamps = Stamps(os.environ.get("BENCH_STAMPS"))


@registry.task()
async def noop(ctx: JobContext) -> None:
    return None


@registry.task()
async def waits(ctx: JobContext, ms: float) -> None:
    await asyncio.sleep(ms / 1000)


@registry.task()
async def stamp(ctx: JobContext, i: int) -> None:
    _stamps.record(i)

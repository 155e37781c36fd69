"""The benchmark's tasks: a true no-op, so the figures are the queue's own cost, and the
latency probe, which only notes when its handler started (``BENCH_STAMPS`` names the file)."""

from __future__ import annotations

import os

from bench.measure import Stamps
from outbox_worker import JobContext, Registry

registry = Registry()
_stamps = Stamps(os.environ.get("BENCH_STAMPS"))


@registry.task()
async def noop(ctx: JobContext) -> None:
    return None


@registry.task()
async def stamp(ctx: JobContext, i: int) -> None:
    _stamps.record(i)

"""Processing throughput: no-op jobs pre-filled, N worker processes in burst/drain mode.

Timed from the first worker's "ready" to the last one's "queue empty", from the workers' own
timestamps; start-up (spawn to ready) is recorded apart, and so is the peak RSS of a single
worker. Afterwards every job must be finished, or the run fails.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

from bench import pg
from bench.context import Context, rotated, system_of
from bench.measure import BenchError, Child
from bench.systems.base import System, Variant


def row(workers: int) -> str:
    return f"processing_{workers}"


@dataclass
class Drain:
    jobs: int
    rate: float
    startup: float
    rss_mb: float


async def drain(
    ctx: Context,
    variant: Variant,
    url: str,
    jobs: int,
    workers: int,
    *,
    setup: Sequence[str] = (),
) -> Drain:
    """Pre-fill ``jobs`` no-op jobs into ``url``, run the ``setup`` statements (queue
    settings, say), drain them with ``workers`` processes."""
    system = system_of(variant)
    # A table with history (the cost-growth runs) has finished and scheduled rows already.
    waiting = await system.pending(url)
    await system.fill(url, jobs)
    if setup:
        await pg.execute(url, *setup)
    before = await system.finished(url)
    children = [
        ctx.child(
            system.worker_args(url, variant.settings, burst=True),
            system.worker_env(url),
            tag=f"{variant.system}-w{workers}-{k}",
        )
        for k in range(workers)
    ]
    for child in children:
        child.start()
    try:
        if system.exits_when_empty:
            for child in children:
                await child.wait_ok(120 + jobs / 200)
            done = [system.done_time(child) for child in children]
        else:
            done = [await poll_empty(system, url, children, 120 + jobs / 200)]
    finally:
        for child in children:
            child.terminate()
        for child in children:
            await child.wait(30)
    ready = [system.ready_time(child) for child in children]
    if None in ready or None in done:
        raise BenchError(
            f"{variant.label}: no ready/done in the output:\n{children[0].output()[-2000:]}"
        )
    finished = await system.finished(url) - before
    left = await system.pending(url) - waiting
    if finished != jobs or left:
        raise BenchError(f"{variant.label}: {finished} of {jobs} jobs finished, {left} left")
    began = min(t for t in ready if t is not None)
    ended = max(t for t in done if t is not None)
    startups = [t - child.spawned for t, child in zip(ready, children, strict=True) if t]
    return Drain(
        jobs=jobs,
        rate=jobs / max(ended - began, 1e-6),
        startup=statistics.median(startups),
        rss_mb=children[0].maxrss_kb / 1024,
    )


async def poll_empty(system: System, url: str, children: list[Child], within: float) -> float:
    """For a worker that never exits by itself: the first moment nothing is pending."""
    for child in children:
        await child.wait_for(lambda c: system.ready_time(c) is not None, 60, "worker ready")
    deadline = time.monotonic() + within
    while await system.pending(url):
        if time.monotonic() > deadline:
            raise BenchError(f"{system.name}: jobs still pending after {within:.0f}s")
        await asyncio.sleep(0.005)
    return time.time()


async def run_once(ctx: Context, variant: Variant, workers: int) -> float:
    system = system_of(variant)
    jobs = max(1, int(ctx.config.jobs * variant.jobs_factor))
    async with ctx.fresh(await ctx.template(system)) as url:
        result = await drain(ctx, variant, url, jobs, workers)
    ctx.record(row(workers), variant.label, result.rate)
    ctx.record(f"startup_{workers}", variant.label, result.startup)
    if workers == 1:
        ctx.record("rss", variant.label, result.rss_mb)
    ctx.say(
        f"processing {variant.label:<20} {workers} worker(s): {jobs} jobs, "
        f"{result.rate:,.0f} jobs/s, start-up {result.startup:.2f}s"
        + (f", peak RSS {result.rss_mb:.0f} MB" if workers == 1 else "")
    )
    return result.rate


async def run(ctx: Context) -> None:
    counts = sorted({n for v in ctx.variants for n in v.workers})
    for turn in range(ctx.config.repeat):
        for workers in counts:
            for variant in rotated(ctx.variants, turn):
                if variant.system == "pgoutbox":
                    wanted = workers in ctx.config.scaling
                else:
                    wanted = workers in variant.workers and (
                        workers == 1 or ctx.config.peer_scaling
                    )
                if wanted:
                    await run_once(ctx, variant, workers)

"""Flow control's cost and fairness, pgoutbox only (no peer limits or serves keys for free).

Cost: the processing drain (1 worker, no-op jobs) with no queue settings, with a global
concurrency limit that does not bind (ten times the worker's slots), and with a limit of one
running job per key over 1,000 keys, interleaved; then the first two with 2 worker
processes, whose claims of a limited queue take turns on its row (no target: shown so that
the price of an exact limit under several workers is in plain sight).

Fairness: one worker at its benchmark concurrency on a queue whose keys take turns; key A
holds a backlog of 10 ms jobs that fills every slot, key B enqueues a job five times a
second: B's pickup (from its enqueue's commit to its claim, the database's clock) against
the same jobs' on an idle worker."""

from __future__ import annotations

import asyncio
import time

from bench import pg
from bench.context import Context
from bench.growth import pgoutbox_system
from bench.measure import BenchError, percentile
from bench.processing import drain
from bench.systems.base import Variant

KEYS = 1_000
# How often key B enqueues while A's backlog runs (jobs per second).
B_RATE = 5.0
# Keys take turns, with a limit per key that lets A fill every slot.
TAKING_TURNS = "INSERT INTO outbox_queues (name, key_concurrency) VALUES ('default', 1000)"


def settings_for(case: str, variant: Variant) -> list[str]:
    """The queue settings of each cost case, on the default queue the drain fills."""
    slots = variant.settings.get("concurrency", 100)
    if case == "global":
        return [f"INSERT INTO outbox_queues (name, concurrency) VALUES ('default', {slots * 10})"]
    if case == "keys":
        return [
            f"UPDATE outbox_jobs SET concurrency_key = 'k' || (id % {KEYS})",
            "INSERT INTO outbox_queues (name, key_concurrency) VALUES ('default', 1)",
            "VACUUM ANALYZE outbox_jobs",
        ]
    return []


async def cost(ctx: Context, variant: Variant) -> None:
    template = await ctx.template(pgoutbox_system())
    for workers, cases in ((1, ("none", "global", "keys")), (2, ("none", "global"))):
        for turn in range(ctx.config.repeat):
            start = turn % len(cases)
            for case in cases[start:] + cases[:start]:
                async with ctx.fresh(template) as url:
                    result = await drain(
                        ctx,
                        variant,
                        url,
                        ctx.config.jobs,
                        workers,
                        setup=settings_for(case, variant),
                    )
                row = f"flow_{case}" if workers == 1 else f"flow_{case}_w{workers}"
                ctx.record(row, variant.label, result.rate)
                ctx.say(
                    f"flow       {case:<8} {workers} worker(s), {ctx.config.jobs} jobs, "
                    f"{result.rate:,.0f} jobs/s"
                )


async def pickups(url: str, backlog: int, seconds: float) -> list[float]:
    """Key B's pickup times (ms) while a worker runs ``backlog`` jobs of key A."""
    if backlog:
        await pg.execute(
            url,
            "INSERT INTO outbox_jobs (task, args, concurrency_key) "
            f"SELECT 'waits', '{{\"ms\": 10}}', 'A' FROM generate_series(1, {backlog})",
        )
    b_ids = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        b_ids.append(
            await pg.fetchval(
                url,
                "INSERT INTO outbox_jobs (task, concurrency_key) VALUES ('noop', 'B') RETURNING id",
            )
        )
        await asyncio.sleep(1 / B_RATE)
    ids = ",".join(str(int(str(job_id))) for job_id in b_ids)
    waited_until = time.monotonic() + 60
    while time.monotonic() < waited_until:
        started = await pg.fetchval(
            url,
            f"SELECT count(*) FROM outbox_jobs WHERE id IN ({ids}) AND started_at IS NOT NULL",
        )
        if int(str(started)) == len(b_ids):
            break
        await asyncio.sleep(0.1)
    else:
        raise BenchError("key B's jobs did not all start within a minute")
    row = await pg.fetchrow(
        url,
        "SELECT array_agg(extract(epoch FROM started_at - created_at) * 1000) AS ms "
        f"FROM outbox_jobs WHERE id IN ({ids})",
    )
    return [float(ms) for ms in row["ms"]]


async def fairness(ctx: Context, variant: Variant) -> None:
    system = pgoutbox_system()
    template = await ctx.template(system)
    backlog = max(2_000, ctx.config.jobs * 5)
    seconds = max(3.0, min(10.0, backlog / 10_000))
    for turn in range(ctx.config.repeat):
        for case in ("idle", "backlog") if turn % 2 == 0 else ("backlog", "idle"):
            async with ctx.fresh(template) as url:
                await pg.execute(
                    url,
                    "INSERT INTO outbox_queues (name, key_concurrency) VALUES ('default', 1000)",
                )
                worker = ctx.child(
                    system.worker_args(url, variant.settings, burst=False),
                    system.worker_env(url),
                    tag=f"flow-{case}",
                )
                worker.start()
                try:
                    await worker.wait_for(
                        lambda c: system.ready_time(c) is not None, within=60, what="ready"
                    )
                    waits = await pickups(url, backlog if case == "backlog" else 0, seconds)
                finally:
                    worker.terminate()
                    await worker.wait(30)
            ctx.record(f"flow_{case}_p99", variant.label, percentile(waits, 99))
            ctx.say(
                f"flow       key B, {case:<12} pickup p50 {percentile(waits, 50):.1f} ms, "
                f"p99 {percentile(waits, 99):.1f} ms ({len(waits)} jobs)"
            )


async def run(ctx: Context) -> None:
    variants = [v for v in ctx.variants if v.system == "pgoutbox"]
    if not variants:
        return
    await cost(ctx, variants[0])
    await fairness(ctx, variants[0])

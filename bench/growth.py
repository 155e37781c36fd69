"""Cost growth: pgoutbox's 1-worker throughput with a long history in the table (1,000,000
finished rows and 100,000 scheduled for tomorrow, inserted with generate_series and then
VACUUM ANALYZE) against the same drain into an empty table, interleaved. (The 1, 2 and 4
worker-process rows come from the processing section.)"""

from __future__ import annotations

from bench import pg
from bench.context import Context
from bench.processing import drain
from bench.systems import load
from bench.systems.base import System
from outbox_worker.devdb import admin

HISTORY = """
INSERT INTO outbox_jobs
    (queue, task, args, state, attempts, max_attempts, run_at, created_at, started_at, finished_at)
SELECT 'default', 'noop', '{{}}', 'succeeded', 1, 5, t, t, t, t
FROM (SELECT now() - interval '1 day' + g * interval '50 microseconds' AS t
      FROM generate_series(1, {finished}) AS g) AS s
"""

SCHEDULED = """
INSERT INTO outbox_jobs (queue, task, args, state, run_at)
SELECT 'default', 'noop', '{{}}', 'queued', now() + interval '1 day' + g * interval '1 ms'
FROM generate_series(1, {future}) AS g
"""


async def run(ctx: Context) -> None:
    variants = [v for v in ctx.variants if v.system == "pgoutbox"]
    if not variants:
        return
    variant = variants[0]
    cfg = ctx.config
    template = await ctx.template(pgoutbox_system())
    big_name = f"bench_growth_{id(ctx) % 100_000}"
    await admin(ctx.server, f"DROP DATABASE IF EXISTS {big_name} WITH (FORCE)")
    await admin(ctx.server, f"CREATE DATABASE {big_name} TEMPLATE {template}")
    big = ctx.server.url_for(big_name)
    try:
        ctx.note(
            f"cost growth: the table with history holds {cfg.growth_finished:,} finished and "
            f"{cfg.growth_future:,} future-scheduled rows besides the {cfg.jobs:,} drained"
        )
        await pg.execute(
            big,
            HISTORY.format(finished=cfg.growth_finished),
            SCHEDULED.format(future=cfg.growth_future),
            "VACUUM ANALYZE outbox_jobs",
        )
        for turn in range(cfg.repeat):
            for which in ("empty", "big") if turn % 2 == 0 else ("big", "empty"):
                if which == "empty":
                    async with ctx.fresh(template) as url:
                        result = await drain(ctx, variant, url, cfg.jobs, 1)
                else:
                    last = await pg.fetchval(big, "SELECT max(id) FROM outbox_jobs")
                    result = await drain(ctx, variant, big, cfg.jobs, 1)
                    await pg.execute(
                        big,
                        f"DELETE FROM outbox_jobs WHERE id > {int(str(last))}",
                        "VACUUM ANALYZE outbox_jobs",
                    )
                ctx.record(f"growth_{which}", variant.label, result.rate)
                ctx.say(f"growth     {which:<20} {cfg.jobs} jobs, {result.rate:,.0f} jobs/s")
    finally:
        await pg.drop(ctx.server, big_name)


def pgoutbox_system() -> System:
    return load("pgoutbox")

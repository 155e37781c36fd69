"""Enqueue throughput from one client process: one call and one transaction per job (and any
other single-job way the system offers: pgoutbox's enqueue on each kind of session it takes),
then the batch API with 1,000 jobs per call (where the system has one, and its other batch
ways: pgoutbox's enqueue_many on each kind of session), timed apart, in one fresh process on
a fresh database per system and repetition."""

from __future__ import annotations

from bench.context import Context, rotated, system_of
from bench.measure import BenchError
from bench.systems.base import Variant, is_batch


async def run_once(ctx: Context, variant: Variant) -> None:
    system = system_of(variant)
    cfg = ctx.config
    modes = system.enqueue_modes
    async with ctx.fresh(await ctx.template(system)) as url:
        await system.reset()
        child = ctx.child(
            system.client_args(
                url,
                "enqueue",
                "--modes",
                ",".join(modes),
                "--jobs",
                str(cfg.enqueue_single),
                "--batch-jobs",
                str(cfg.enqueue_batch),
            ),
            system.worker_env(url),
            tag=f"{variant.system}-enqueue",
        )
        child.start()
        batches = sum(is_batch(mode) for mode in modes)
        singles = len(modes) - batches
        await child.wait_ok(
            120 + singles * cfg.enqueue_single / 100 + batches * cfg.enqueue_batch / 1000
        )
    answers = [e for e in child.events() if e.get("event") == "enqueued"]
    if [answer["mode"] for answer in answers] != list(modes):
        raise BenchError(f"{variant.label}: no timing from the enqueue run:\n{child.output()}")
    for answer in answers:
        rate = int(answer["jobs"]) / float(answer["seconds"])
        ctx.record(f"enqueue_{answer['mode']}", variant.label, rate)
        ctx.say(f"enqueue    {variant.label:<20} {answer['mode']}: {rate:,.0f} jobs/s")


async def run(ctx: Context) -> None:
    variants = [v for v in ctx.variants if v.enqueue]
    for turn in range(ctx.config.repeat):
        for variant in rotated(variants, turn):
            await run_once(ctx, variant)

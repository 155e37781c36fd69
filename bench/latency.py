"""Latency into an idle worker: jobs enqueued one by one at a fixed rate (one transaction
each) into a worker that is up and idle; from the start of the enqueue call to the start of
the handler, both read off this machine's clock (the handler writes its time to a file)."""

from __future__ import annotations

import asyncio
import time

from bench.context import Context, rotated, system_of
from bench.measure import BenchError, percentile, read_stamps
from bench.systems.base import Variant

QUANTILES = (("lat_p50", 50.0), ("lat_p95", 95.0), ("lat_p99", 99.0), ("lat_max", 100.0))


async def run_once(ctx: Context, variant: Variant) -> list[float]:
    system = system_of(variant)
    cfg = ctx.config
    stamps_path = ctx.path(f"{variant.system}-stamps.txt")
    async with ctx.fresh(await ctx.template(system)) as url:
        await system.reset()
        worker = ctx.child(
            system.worker_args(url, variant.settings, burst=False),
            {**system.worker_env(url), "BENCH_STAMPS": str(stamps_path)},
            tag=f"{variant.system}-latency-worker",
        )
        worker.start()
        try:
            await worker.wait_for(
                lambda c: system.ready_time(c) is not None, within=60, what="worker ready"
            )
            await asyncio.sleep(cfg.latency_idle)  # idle: every start-up query is over
            producer = ctx.child(
                system.client_args(
                    url, "produce", "--jobs", str(cfg.latency_jobs), "--rate", str(cfg.latency_rate)
                ),
                system.worker_env(url),
                tag=f"{variant.system}-producer",
            )
            producer.start()
            await producer.wait_ok(60 + cfg.latency_jobs / cfg.latency_rate)
            sent_events = [e for e in producer.events() if e.get("event") == "sent"]
            if not sent_events:
                raise BenchError(f"{variant.label}: the producer reported nothing")
            sent = {int(i): float(t) for i, t in sent_events[0]["stamps"]}
            deadline = time.monotonic() + 30
            started = read_stamps(stamps_path)
            while len(started) < len(sent) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                started = read_stamps(stamps_path)
            if len(started) < len(sent):
                raise BenchError(f"{variant.label}: {len(started)} of {len(sent)} jobs ran")
        finally:
            worker.terminate()
            try:
                await worker.wait(30)
            except BenchError:
                worker.kill()
    latencies = [(started[i] - t0) * 1000 for i, t0 in sent.items()]
    for row, q in QUANTILES:
        ctx.record(row, variant.label, percentile(latencies, q))
    ctx.say(
        f"latency    {variant.label:<20} p50 {percentile(latencies, 50):.1f} ms, "
        f"p99 {percentile(latencies, 99):.1f} ms, max {max(latencies):.1f} ms"
    )
    return latencies


async def run(ctx: Context) -> None:
    variants = [v for v in ctx.variants if v.latency]
    for turn in range(ctx.config.repeat):
        for variant in rotated(variants, turn):
            await run_once(ctx, variant)

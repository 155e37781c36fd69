"""Steady load with the producer in the worker's process (as a public benchmark harness runs
it): 1 ms jobs, one worker, at each concurrency of the mode, in two ways. Fixed rate:
``STEADY_RATE`` jobs per second, one per enqueue call, on a schedule. Target depth: about
``STEADY_DEPTH`` jobs kept waiting, topped up through the batch API. After a warm-up, a
measured span gives completions per second and the pickup latency (handler start minus the
time stamped into the job just before its enqueue call). One fresh process on a fresh
database per run (``bench/inprocess.py``), systems interleaved."""

from __future__ import annotations

from typing import Any

from bench.config import FULL, STEADY_DEPTH, STEADY_RATE
from bench.context import Context, rotated, system_of
from bench.inprocess import RATE_LANES, child_args
from bench.measure import BenchError
from bench.systems.base import Variant

MODES = ("depth", "rate")
# What a system's completions must reach in fixed-rate mode for the run to count as keeping
# up; below it, the output says so.
KEEPS_UP = 0.95


def key(mode: str, concurrency: int, figure: str) -> str:
    return f"steady_{mode}_c{concurrency}_{figure}"


def _load(mode: str) -> str:
    return f"steady depth {STEADY_DEPTH:,}" if mode == "depth" else f"steady {STEADY_RATE:,.0f}/s"


# The table's rows (key, title, higher is better), every concurrency of the full mode; the
# runs also record ``p50`` in depth mode and ``per_s`` in rate mode (in --json only).
ROWS: tuple[tuple[str, str, bool], ...] = (
    *(
        row
        for c in FULL.steady_concurrency
        for row in (
            (key("depth", c, "per_s"), f"{_load('depth')}, c={c}: completions/s", True),
            (key("depth", c, "p99"), f"{_load('depth')}, c={c}: pickup p99 (ms)", False),
        )
    ),
    *(
        row
        for c in FULL.steady_concurrency
        for row in (
            (key("rate", c, "p50"), f"{_load('rate')}, c={c}: pickup p50 (ms)", False),
            (key("rate", c, "p99"), f"{_load('rate')}, c={c}: pickup p99 (ms)", False),
        )
    ),
)


def variants(ctx: Context) -> list[Variant]:
    return [v for v in ctx.variants if v.steady]


def summary_of(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((e for e in events if e.get("event") == "summary"), None)


async def run_once(ctx: Context, variant: Variant, mode: str, concurrency: int) -> None:
    system = system_of(variant)
    cfg = ctx.config
    async with ctx.fresh(await ctx.template(system)) as url:
        child = ctx.child(
            child_args(
                variant.system,
                url,
                concurrency,
                variant.settings.get("batch_size", 0),
                rate=STEADY_RATE if mode == "rate" else 0.0,
                depth=STEADY_DEPTH if mode == "depth" else 0,
                warmup=cfg.steady_warmup,
                seconds=cfg.steady_seconds,
            ),
            system.worker_env(url),
            tag=f"{variant.system}-steady-{mode}-c{concurrency}",
        )
        child.start()
        await child.wait_ok(90 + cfg.steady_warmup + cfg.steady_seconds)
    events = child.events()
    summary = summary_of(events)
    if summary is None or summary.get("p99") is None:
        raise BenchError(f"{variant.label}: no jobs ran in the measured span:\n{child.output()}")
    settings = next((e.get("settings") for e in events if e.get("event") == "ready"), "")
    per_s, p50, p99 = float(summary["per_s"]), float(summary["p50"]), float(summary["p99"])
    enqueued = float(summary["enqueued_per_s"])
    ctx.record(key(mode, concurrency, "per_s"), variant.label, per_s)
    ctx.record(key(mode, concurrency, "p50"), variant.label, p50)
    ctx.record(key(mode, concurrency, "p99"), variant.label, p99)
    ctx.say(
        f"steady     {variant.label:<20} {mode} c={concurrency} ({settings}): "
        f"{per_s:,.0f} completions/s, enqueued {enqueued:,.0f}/s, "
        f"pickup p50 {p50:.1f} ms, p99 {p99:.1f} ms"
    )
    if mode == "rate" and min(per_s, enqueued) < KEEPS_UP * STEADY_RATE:
        short = (
            f"its producer enqueued {enqueued:,.0f} of {STEADY_RATE:,.0f} jobs/s "
            f"(one per call, from {RATE_LANES} connections)"
            if enqueued < KEEPS_UP * STEADY_RATE
            else f"it completed {per_s:,.0f} of the {enqueued:,.0f} jobs/s enqueued"
        )
        ctx.note(f"steady {STEADY_RATE:,.0f}/s: {variant.label} at c={concurrency}: {short}")


async def run(ctx: Context) -> None:
    for turn in range(ctx.config.repeat):
        for mode in MODES:
            for concurrency in ctx.config.steady_concurrency:
                for variant in rotated(variants(ctx), turn):
                    await run_once(ctx, variant, mode, concurrency)

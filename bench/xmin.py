"""A snapshot held under steady load: what a long transaction elsewhere does to the queue.

The steady section's child (``bench/inprocess.py``: worker and producer in one process, 1 ms
jobs) runs at ``XMIN_RATE`` jobs per second, one per enqueue call, at ``XMIN_CONCURRENCY``,
for a baseline, a hold and a recovery. For the hold, another session of this process, on
the same database, takes a snapshot (``BEGIN ISOLATION LEVEL REPEATABLE READ`` and a real
query: the snapshot is taken by the first query, not by BEGIN) and stays idle in that
transaction; then ROLLBACK. Nothing the queue deletes or updates from then on can be
vacuumed away until the release.

Every window (``xmin_window`` seconds) this process reads the child's figures for it
(completions per second, pickup p50 and p99) and, on a connection of its own,
``n_dead_tup`` and ``n_live_tup`` of the system's tables, their ``pg_relation_size`` and
``pg_indexes_size``, and ``age(backend_xmin)`` of the holding session. One run per system
(long; once whatever ``--repeat`` says). The whole timeline goes to ``Context.timelines``
(``--json`` writes it beside the figures); ``python -m bench.xmin TIMELINES.json`` prints
it as a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import asyncpg

from bench.config import XMIN_CONCURRENCY, XMIN_RATE
from bench.context import Context, rotated, system_of
from bench.inprocess import child_args, read_samples, span_figures
from bench.measure import Child
from bench.systems.base import Variant

# The tables each system writes under this load, read at every sample; the rows sum them.
TABLES = {
    "pgoutbox": (
        "outbox_jobs",
        "outbox_workers",
        "outbox_ready_0",
        "outbox_ready_1",
        "outbox_ready_later",
        "outbox_lanes",
    ),
    "pgqueuer": ("pgqueuer", "pgqueuer_log", "pgqueuer_statistics"),
}
# The indexes a system's claim searches, when it names them: the entries per scan are theirs
# (others, such as a primary key probed once per claimed job, or a rescue's scan every few
# seconds, say nothing about the claim). Otherwise the index read most per scan stands in.
CLAIM_INDEXES = {"pgoutbox": frozenset({"outbox_ready_0_claim_idx", "outbox_ready_1_claim_idx"})}
STATS = """
SELECT relname, n_dead_tup, n_live_tup,
       pg_relation_size(relid) AS table_bytes, pg_indexes_size(relid) AS index_bytes
FROM pg_stat_user_tables
WHERE relname = ANY($1::text[])
"""
HOLDER_AGE = "SELECT age(backend_xmin) FROM pg_stat_activity WHERE pid = $1"
# Scans and entries read per index so far: their growth over a window, divided, is how many
# index entries (dead ones included) each scan stepped over.
INDEX_STATS = """
SELECT indexrelname, idx_scan, idx_tup_read
FROM pg_stat_user_indexes
WHERE relname = ANY($1::text[])
"""
# Recovered: the first window after the release whose pickup p99 is within this factor of
# the baseline's.
RECOVERED = 1.5
MB = 1024 * 1024
# The Markdown timeline's most rows, unless told a step.
MAX_ROWS = 30
# Below this share of the asked rate, the output says the producer fell short.
KEEPS_UP = 0.95

_TITLE = f"xmin held, {XMIN_RATE:,.0f}/s, c={XMIN_CONCURRENCY}"
ROWS: tuple[tuple[str, str, bool], ...] = (
    ("xmin_base_per_s", f"{_TITLE}: baseline, completions/s", True),
    ("xmin_base_p99", f"{_TITLE}: baseline, pickup p99 (ms)", False),
    ("xmin_hold_per_s", f"{_TITLE}: end of the hold, completions/s", True),
    ("xmin_hold_p99", f"{_TITLE}: end of the hold, pickup p99 (ms)", False),
    ("xmin_after_per_s", f"{_TITLE}: after the release, completions/s", True),
    ("xmin_after_p99", f"{_TITLE}: after the release, pickup p99 (ms)", False),
    ("xmin_dead", f"{_TITLE}: dead tuples at the end of the hold", False),
    ("xmin_size", f"{_TITLE}: tables + indexes at the end of the hold (MB)", False),
    (
        "xmin_recover",
        f"{_TITLE}: seconds after the release until p99 ≤ {RECOVERED}× baseline",
        False,
    ),
)


def variants(ctx: Context) -> list[Variant]:
    """The systems with a table to watch (the raw baseline is left out: its run would be as
    long as the others' for a table no one deploys)."""
    return [v for v in ctx.variants if v.steady and v.system in TABLES]


def _event(child: Child, name: str, k: int | None = None) -> dict[str, Any] | None:
    for event in child.events():
        if event.get("event") == name and (k is None or event.get("k") == k):
            return event
    return None


def _has(name: str, k: int | None = None) -> Callable[[Child], bool]:
    return lambda child: _event(child, name, k) is not None


async def sample(probe: asyncpg.Connection, tables: tuple[str, ...], holder: int) -> dict[str, Any]:
    rows = await probe.fetch(STATS, list(tables))
    per_table = {
        str(row["relname"]): {
            "dead": int(row["n_dead_tup"]),
            "live": int(row["n_live_tup"]),
            "table_bytes": int(row["table_bytes"]),
            "index_bytes": int(row["index_bytes"]),
        }
        for row in rows
    }
    age = await probe.fetchval(HOLDER_AGE, holder)
    indexes = {
        str(row["indexrelname"]): (int(row["idx_scan"] or 0), int(row["idx_tup_read"] or 0))
        for row in await probe.fetch(INDEX_STATS, list(tables))
    }
    return {
        "indexes": indexes,
        "dead": sum(t["dead"] for t in per_table.values()),
        "live": sum(t["live"] for t in per_table.values()),
        "table_mb": sum(t["table_bytes"] for t in per_table.values()) / MB,
        "index_mb": sum(t["index_bytes"] for t in per_table.values()) / MB,
        "xmin_age": None if age is None else int(age),
        "tables": per_table,
    }


def _per_scan(
    before: Mapping[str, tuple[int, int]],
    point: Mapping[str, Any],
    claim: frozenset[str] | None = None,
) -> float | None:
    """Index entries read per scan in the window, every entry stepped over, dead or alive:
    by the ``claim`` indexes together when named, else by the one index read most per scan
    (the claim's, for a queue that claims by one)."""

    growth = {
        name: (scans - before.get(name, (0, 0))[0], read - before.get(name, (0, 0))[1])
        for name, (scans, read) in point["indexes"].items()
    }
    if claim is not None:
        scans = sum(growth[name][0] for name in claim if name in growth)
        read = sum(growth[name][1] for name in claim if name in growth)
        return read / scans if scans else None
    return max((read / scans for scans, read in growth.values() if scans), default=None)


def _ms(value: object) -> str:
    return "—" if value is None else f"{float(str(value)):.1f}"


def _count(value: object) -> str:
    return "—" if value is None else f"{int(str(value)):,}"


def compact(label: str, point: Mapping[str, Any]) -> str:
    return (
        f"xmin       {label:<20} {point['t']:>6.1f}s {point['phase']:<8} "
        f"{point['per_s']:>6,.0f}/s (enqueued {point['enqueued_per_s']:,.0f}/s, "
        f"{point['depth']:,} waiting) p50 {_ms(point['p50'])} p99 {_ms(point['p99'])} ms, "
        f"dead {point['dead']:,}, live {point['live']:,}, "
        f"{_count(None if point['per_scan'] is None else round(point['per_scan']))} "
        "entries/scan, "
        f"{point['table_mb']:.1f}+{point['index_mb']:.1f} MB, xmin age {_count(point['xmin_age'])}"
    )


async def run_once(ctx: Context, variant: Variant) -> dict[str, Any]:
    system = system_of(variant)
    cfg = ctx.config
    window = cfg.xmin_window
    total = cfg.xmin_baseline + cfg.xmin_hold + cfg.xmin_recovery
    windows = round(total / window)
    k_hold = round(cfg.xmin_baseline / window)
    k_release = round((cfg.xmin_baseline + cfg.xmin_hold) / window)
    tables = TABLES[variant.system]
    samples_path = ctx.path(f"{variant.system}-xmin-samples.bin")
    points: list[dict[str, Any]] = []
    hold_t = release_t = math.nan
    async with ctx.fresh(await ctx.template(system)) as url:
        child = ctx.child(
            child_args(
                variant.system,
                url,
                XMIN_CONCURRENCY,
                variant.settings.get("batch_size", 0),
                rate=XMIN_RATE,
                warmup=cfg.xmin_warmup,
                seconds=total,
                window=window,
                samples=samples_path,
            ),
            system.worker_env(url),
            tag=f"{variant.system}-xmin",
        )
        probe = await asyncpg.connect(url)
        holder = await asyncpg.connect(url)
        child.start()
        try:
            await child.wait_for(_has("measuring"), 90, "measuring")
            measuring = _event(child, "measuring")
            assert measuring is not None
            t0 = float(measuring["at"])
            enqueued = int(measuring["enqueued"])
            for k in range(1, windows + 1):
                # The child reports window k at its end: look then, not before.
                await asyncio.sleep(max(0.0, t0 + k * window + 0.02 - time.time()))
                await child.wait_for(_has("window", k), 30 + window, f"window {k}")
                figures = _event(child, "window", k)
                assert figures is not None
                phase = "baseline" if k <= k_hold else "hold" if k <= k_release else "recovery"
                point = {
                    "t": round(k * window, 3),
                    "phase": phase,
                    "per_s": float(figures["per_s"]),
                    "p50": figures["p50"],
                    "p99": figures["p99"],
                    # Enqueued in the window (the producer's own rate) and waiting at its end.
                    "enqueued_per_s": (int(figures["enqueued"]) - enqueued) / window,
                    "depth": int(figures["depth"]),
                    **await sample(probe, tables, holder.get_server_pid()),
                }
                point["per_scan"] = _per_scan(
                    points[-1]["indexes"] if points else {},
                    point,
                    CLAIM_INDEXES.get(variant.system),
                )
                points.append(point)
                enqueued = int(figures["enqueued"])
                ctx.say(compact(variant.label, point))
                if k == k_hold:
                    await holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
                    await holder.fetchval("SELECT count(*) FROM pg_class")
                    hold_t = time.time()
                    ctx.say(f"xmin       {variant.label:<20} snapshot taken, idle in transaction")
                elif k == k_release:
                    await holder.execute("ROLLBACK")
                    release_t = time.time()
                    ctx.say(f"xmin       {variant.label:<20} snapshot released")
            await child.wait_ok(60)
        finally:
            child.kill()
            await holder.close()
            await probe.close()
    ready = _event(child, "ready") or {}
    ends, pickups = read_samples(samples_path)
    span = cfg.xmin_span
    phases = {
        "baseline": span_figures(ends, pickups, t0, hold_t),
        "hold_end": span_figures(ends, pickups, release_t - span, release_t),
        "after": span_figures(ends, pickups, release_t, release_t + span),
    }
    end_of_hold = points[k_release - 1]
    baseline_p99 = phases["baseline"]["p99"]
    recovered: float | None = None
    if baseline_p99 is not None:
        for point in points[k_release:]:
            if point["p99"] is not None and point["p99"] <= RECOVERED * baseline_p99:
                recovered = t0 + point["t"] - release_t
                break
    timeline: dict[str, Any] = {
        "system": variant.system,
        "settings": ready.get("settings", ""),
        "rate": XMIN_RATE,
        "concurrency": XMIN_CONCURRENCY,
        "window": window,
        "baseline": cfg.xmin_baseline,
        "hold": cfg.xmin_hold,
        "recovery": cfg.xmin_recovery,
        "span": span,
        "tables": list(tables),
        "hold_at": hold_t - t0,
        "release_at": release_t - t0,
        "phases": phases,
        "recovered_after": recovered,
        "points": points,
    }
    label = variant.label
    for phase, prefix in (("baseline", "base"), ("hold_end", "hold"), ("after", "after")):
        for figure in ("per_s", "p99"):
            value = phases[phase][figure]
            if value is not None:
                ctx.record(f"xmin_{prefix}_{figure}", label, value)
    ctx.record("xmin_dead", label, float(end_of_hold["dead"]))
    ctx.record("xmin_size", label, end_of_hold["table_mb"] + end_of_hold["index_mb"])
    produced = sum(p["enqueued_per_s"] for p in points[:k_hold]) / max(k_hold, 1)
    if produced < KEEPS_UP * XMIN_RATE:
        ctx.note(
            f"xmin: {label}'s producer enqueued {produced:,.0f} of {XMIN_RATE:,.0f} jobs/s in "
            "the baseline: the load was lighter than asked"
        )
    if recovered is None:
        ctx.note(
            f"xmin: {label}'s pickup p99 was not back within {RECOVERED}× its baseline in the "
            f"{cfg.xmin_recovery:.0f} s after the release"
        )
    else:
        ctx.record("xmin_recover", label, recovered)
    ctx.say(
        f"xmin       {label:<20} baseline p99 {_ms(baseline_p99)} ms, end of the hold "
        f"p99 {_ms(phases['hold_end']['p99'])} ms, after {_ms(phases['after']['p99'])} ms; "
        f"dead {end_of_hold['dead']:,}, "
        f"{end_of_hold['table_mb'] + end_of_hold['index_mb']:.1f} MB at the release; "
        f"p99 back after {'—' if recovered is None else f'{recovered:.1f}'} s"
    )
    ctx.timelines[label] = timeline
    return timeline


async def run(ctx: Context) -> None:
    # One repetition: a run lasts the whole baseline, hold and recovery.
    for variant in rotated(variants(ctx), 0):
        await run_once(ctx, variant)


# ---------------------------------------------------------------------------------------------
# The timeline as Markdown
# ---------------------------------------------------------------------------------------------


def timeline_table(timelines: Mapping[str, Mapping[str, Any]], every: float | None = None) -> str:
    """The timelines side by side, one row per ``every`` seconds (by default as few whole
    windows as keep it to ``MAX_ROWS`` rows) and at the last window of each phase."""
    labels = list(timelines)
    if not labels:
        return ""
    window = float(timelines[labels[0]]["window"])
    by_label = {
        label: {round(float(p["t"]) / window): p for p in timelines[label]["points"]}
        for label in labels
    }
    ks = sorted({k for points in by_label.values() for k in points})
    if every is None:
        every = window * max(1, math.ceil(len(ks) / MAX_ROWS))
    step = max(1, round(every / window))

    def phase(k: int) -> str:
        for points in by_label.values():
            if k in points:
                return str(points[k]["phase"])
        return ""

    kept = [
        k
        for i, k in enumerate(ks)
        if k % step == 0 or i == len(ks) - 1 or phase(k) != phase(ks[i + 1])
    ]
    head = ["t (s)", "phase"]
    for label in labels:
        head += [
            f"{label} jobs/s",
            f"{label} p99 (ms)",
            f"{label} dead tuples",
            f"{label} index entries/scan",
            f"{label} MB",
            f"{label} xmin age",
        ]
    lines = [
        "| " + " | ".join(head) + " |",
        "| " + " | ".join(["---:", "---"] + ["---:"] * (len(head) - 2)) + " |",
    ]
    for k in kept:
        cells = [f"{k * window:g}", phase(k)]
        for label in labels:
            p = by_label[label].get(k)
            if p is None:
                cells += [""] * 6
                continue
            cells += [
                f"{float(p['per_s']):,.0f}",
                _ms(p["p99"]),
                f"{int(p['dead']):,}",
                _count(None if p.get("per_scan") is None else round(p["per_scan"])),
                f"{float(p['table_mb']) + float(p['index_mb']):.1f}",
                _count(p["xmin_age"]),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.xmin",
        description="Print the xmin timelines that `bench.run --json PATH` wrote beside PATH "
        "(for figures.json: figures.timelines.json) as one Markdown table.",
    )
    parser.add_argument("timelines", type=Path)
    parser.add_argument("--every", type=float, help="seconds between rows")
    opts = parser.parse_args(argv)
    timelines: dict[str, Any] = json.loads(opts.timelines.read_text())
    print(timeline_table(timelines, opts.every))


if __name__ == "__main__":
    main()

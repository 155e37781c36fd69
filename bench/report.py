"""The table: medians with their spread, ratios to the best peer and to the raw baseline,
and every speed target with its ratio, met or missed."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from bench import steady, xmin
from bench.config import FULL
from bench.context import Context
from bench.measure import Sample

PGOUTBOX = "pgoutbox"
RAW = "raw SQL"


@dataclass(frozen=True)
class Row:
    key: str
    title: str
    higher_is_better: bool
    compare: bool = True  # has a figure for the peers too
    # pgoutbox only, compared with pgqueuer's (and raw's) figure in this other row: another
    # way of enqueueing what that row measures.
    versus: str = ""


ROWS = (
    Row("processing_1", "processing, 1 worker process (jobs/s)", True),
    Row("processing_2", "processing, 2 worker processes (jobs/s)", True),
    Row("startup_1", "worker start-up, spawn to ready (s)", False),
    Row("lat_p50", "idle latency p50 (ms)", False),
    Row("lat_p95", "idle latency p95 (ms)", False),
    Row("lat_p99", "idle latency p99 (ms)", False),
    Row("lat_max", "idle latency max (ms)", False),
    Row("enqueue_single", "enqueue, one transaction per job (jobs/s)", True),
    Row(
        "enqueue_one_asyncpg",
        "enqueue, one job per statement (autocommit), raw asyncpg (jobs/s)",
        True,
        compare=False,
        versus="enqueue_single",
    ),
    Row("enqueue_batch", "enqueue, batch API, 1,000 per call (jobs/s)", True),
    Row(
        "enqueue_one_asyncpg_tx",
        "enqueue, one transaction per job, raw asyncpg in conn.transaction() (jobs/s)",
        True,
        compare=False,
        versus="enqueue_single",
    ),
    Row(
        "enqueue_one_psycopg_tx",
        "enqueue, one transaction per job, psycopg AsyncConnection in conn.transaction() (jobs/s)",
        True,
        compare=False,
        versus="enqueue_single",
    ),
    Row(
        "enqueue_one_psycopg_autocommit",
        "enqueue, one job per statement (autocommit), psycopg AsyncConnection (jobs/s)",
        True,
        compare=False,
        versus="enqueue_single",
    ),
    Row(
        "enqueue_one_sync_session",
        "enqueue, one transaction per job, sync Session on psycopg (jobs/s)",
        True,
        compare=False,
        versus="enqueue_single",
    ),
    Row(
        "enqueue_batch_asyncpg_tx",
        "enqueue_many, 1,000 per call, raw asyncpg in conn.transaction() (jobs/s)",
        True,
        compare=False,
        versus="enqueue_batch",
    ),
    Row(
        "enqueue_batch_asyncpg_autocommit",
        "enqueue_many, 1,000 per call (autocommit), raw asyncpg (jobs/s)",
        True,
        compare=False,
        versus="enqueue_batch",
    ),
    Row(
        "enqueue_batch_psycopg_tx",
        "enqueue_many, 1,000 per call, psycopg AsyncConnection in conn.transaction() (jobs/s)",
        True,
        compare=False,
        versus="enqueue_batch",
    ),
    Row(
        "enqueue_batch_psycopg_autocommit",
        "enqueue_many, 1,000 per call (autocommit), psycopg AsyncConnection (jobs/s)",
        True,
        compare=False,
        versus="enqueue_batch",
    ),
    Row(
        "enqueue_batch_sync_session",
        "enqueue_many, 1,000 per call, sync Session on psycopg (jobs/s)",
        True,
        compare=False,
        versus="enqueue_batch",
    ),
    Row("rss", "worker peak RSS while processing, 1 worker (MB)", False),
    Row("processing_4", "processing, 4 worker processes (jobs/s)", True, compare=False),
    Row("growth_empty", "cost growth: 1 worker, empty table (jobs/s)", True, compare=False),
    Row("growth_big", "cost growth: 1 worker, table with history (jobs/s)", True, compare=False),
    Row("http_job_rps", "POST /reports with its job (requests/s)", True, compare=False),
    Row("http_job_p99", "POST /reports with its job, p99 (ms)", False, compare=False),
    Row("http_nojob_rps", "insert-only route, no job (requests/s)", True, compare=False),
    Row("http_nojob_p99", "insert-only route, no job, p99 (ms)", False, compare=False),
    Row(
        "http_bare_rps",
        "route with the job as a bare INSERT, no enqueue code (requests/s)",
        True,
        compare=False,
    ),
    Row(
        "http_bare_p99",
        "route with the job as a bare INSERT, no enqueue code, p99 (ms)",
        False,
        compare=False,
    ),
    # Flow control: its cost on the drain, and keys taking turns.
    Row("flow_none", "flow control: 1 worker, no queue settings (jobs/s)", True, compare=False),
    Row(
        "flow_global",
        "flow control: 1 worker, a global limit that does not bind (jobs/s)",
        True,
        compare=False,
    ),
    Row(
        "flow_keys",
        "flow control: 1 worker, one running job per key, 1,000 keys (jobs/s)",
        True,
        compare=False,
    ),
    Row(
        "flow_none_w2",
        "flow control: 2 workers, no queue settings (jobs/s)",
        True,
        compare=False,
    ),
    Row(
        "flow_global_w2",
        "flow control: 2 workers, a global limit that does not bind (jobs/s)",
        True,
        compare=False,
    ),
    Row("flow_idle_p99", "key B's pickup p99, idle worker (ms)", False, compare=False),
    Row(
        "flow_backlog_p99",
        "key B's pickup p99, key A's backlog filling every slot (ms)",
        False,
        compare=False,
    ),
    # Steady load with the producer in the worker's process; a snapshot held under it.
    *(Row(key, title, higher) for key, title, higher in steady.ROWS),
    *(Row(key, title, higher) for key, title, higher in xmin.ROWS),
)


def number(value: float) -> str:
    if math.isnan(value):
        return "—"
    if abs(value) >= 999.5:  # what rounds to 1,000 or more gets its comma
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def cell(sample: Sample | None) -> str:
    if not sample:
        return ""
    if len(sample.values) == 1:
        return number(sample.median)
    return f"{number(sample.median)} [{number(sample.low)}–{number(sample.high)}]"


@dataclass(frozen=True)
class Target:
    row: str
    text: str
    # (ratio, limit, "at least"/"at most") from the results, or None when not measured.
    ratio: Callable[[Context], float | None]
    limit: float
    at_least: bool


def median(ctx: Context, row: str, column: str) -> float | None:
    sample = ctx.results.get((row, column))
    return sample.median if sample else None


def peers(ctx: Context) -> list[str]:
    return [v.label for v in ctx.variants if v.label not in (PGOUTBOX, RAW)]


def best_peer(ctx: Context, row: str, higher: bool, among: list[str] | None = None) -> float | None:
    values = [median(ctx, row, p) for p in (among if among is not None else peers(ctx))]
    found = [v for v in values if v is not None and not math.isnan(v)]
    if not found:
        return None
    return max(found) if higher else min(found)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def pgqueuer_labels(ctx: Context) -> list[str]:
    return [v.label for v in ctx.variants if v.system == "pgqueuer"]


def versus_pgqueuer(ctx: Context, row: Row) -> float | None:
    """pgqueuer's figure in the row a pgoutbox-only row is compared with (its ``versus``)."""
    return best_peer(ctx, row.versus, True, pgqueuer_labels(ctx))


def steady_target(concurrency: int) -> Target:
    """Completions under a held depth at one slot count, against pgqueuer's at the same."""
    row = steady.key("depth", concurrency, "per_s")
    return Target(
        row,
        "≥ 1.0× pgqueuer at the same slot count",
        lambda c: ratio(median(c, row, PGOUTBOX), best_peer(c, row, True, pgqueuer_labels(c))),
        1.0,
        True,
    )


TARGETS = (
    Target(
        "processing_1",
        "≥ 2× pgqueuer's best setting",
        lambda c: ratio(
            median(c, "processing_1", PGOUTBOX),
            best_peer(c, "processing_1", True, pgqueuer_labels(c)),
        ),
        2.0,
        True,
    ),
    Target(
        "processing_1",
        "≥ 0.5× raw",
        lambda c: ratio(median(c, "processing_1", PGOUTBOX), median(c, "processing_1", RAW)),
        0.5,
        True,
    ),
    Target(
        "lat_p50",
        "p50 ≤ pgqueuer's p50",
        lambda c: ratio(
            median(c, "lat_p50", PGOUTBOX), best_peer(c, "lat_p50", False, pgqueuer_labels(c))
        ),
        1.0,
        False,
    ),
    Target(
        "lat_p50",
        "p50 ≤ 1.2× raw's p50",
        lambda c: ratio(median(c, "lat_p50", PGOUTBOX), median(c, "lat_p50", RAW)),
        1.2,
        False,
    ),
    Target(
        "lat_p99",
        "p99 ≤ 2× its own p50",
        lambda c: ratio(median(c, "lat_p99", PGOUTBOX), median(c, "lat_p50", PGOUTBOX)),
        2.0,
        False,
    ),
    Target(
        "enqueue_single",
        "≥ 1.0× pgqueuer",
        lambda c: ratio(
            median(c, "enqueue_single", PGOUTBOX),
            best_peer(c, "enqueue_single", True, pgqueuer_labels(c)),
        ),
        1.0,
        True,
    ),
    Target(
        "enqueue_batch",
        "≥ 1.5× pgqueuer's batch",
        lambda c: ratio(
            median(c, "enqueue_batch", PGOUTBOX),
            best_peer(c, "enqueue_batch", True, pgqueuer_labels(c)),
        ),
        1.5,
        True,
    ),
    Target(
        "enqueue_one_asyncpg",
        "≥ 1.0× pgqueuer's single enqueue",
        lambda c: ratio(
            median(c, "enqueue_one_asyncpg", PGOUTBOX),
            best_peer(c, "enqueue_single", True, pgqueuer_labels(c)),
        ),
        1.0,
        True,
    ),
    Target(
        "growth_big",
        "≥ 0.9× the empty table",
        lambda c: ratio(median(c, "growth_big", PGOUTBOX), median(c, "growth_empty", PGOUTBOX)),
        0.9,
        True,
    ),
    Target(
        "http_job_rps",
        "≥ 0.8× the no-job route",
        lambda c: ratio(median(c, "http_job_rps", PGOUTBOX), median(c, "http_nojob_rps", PGOUTBOX)),
        0.8,
        True,
    ),
    Target(
        "rss",
        "≤ 60 MB at concurrency 100",
        lambda c: median(c, "rss", PGOUTBOX),
        60.0,
        False,
    ),
    Target(
        "flow_global",
        "≥ 0.9× no queue settings",
        lambda c: ratio(median(c, "flow_global", PGOUTBOX), median(c, "flow_none", PGOUTBOX)),
        0.9,
        True,
    ),
    Target(
        "flow_keys",
        "≥ 0.7× no queue settings",
        lambda c: ratio(median(c, "flow_keys", PGOUTBOX), median(c, "flow_none", PGOUTBOX)),
        0.7,
        True,
    ),
    # Ahead of pgqueuer at every slot count, under a held depth.
    *(steady_target(c) for c in FULL.steady_concurrency),
    # A snapshot held for the whole hold costs at most a fifth of the steady rate, and the
    # queue is back to normal within a minute of its release.
    Target(
        "xmin_hold_per_s",
        "≥ 0.8× its baseline",
        lambda c: ratio(
            median(c, "xmin_hold_per_s", PGOUTBOX), median(c, "xmin_base_per_s", PGOUTBOX)
        ),
        0.8,
        True,
    ),
    Target(
        "xmin_recover",
        "≤ 60 s",
        lambda c: median(c, "xmin_recover", PGOUTBOX),
        60.0,
        False,
    ),
)


def verdict(ctx: Context, target: Target) -> tuple[float | None, str]:
    value = target.ratio(ctx)
    if value is None:
        return None, "not measured"
    met = value >= target.limit if target.at_least else value <= target.limit
    return value, "met" if met else "MISSED"


def target_cells(ctx: Context, row: str) -> str:
    parts = []
    for target in TARGETS:
        if target.row != row:
            continue
        value, word = verdict(ctx, target)
        unit = " MB" if target.row == "rss" else "×"
        shown = "—" if value is None else f"{value:.2f}{unit}"
        parts.append(f"{target.text}: {shown} {word}")
    return "; ".join(parts)


def table(ctx: Context) -> str:
    columns = [v.label for v in ctx.variants]
    head = ["measurement", *columns, "pgoutbox / best peer", "pgoutbox / raw", "target"]
    lines = [
        "| " + " | ".join(head) + " |",
        "| " + " | ".join(["---"] + ["---:"] * (len(head) - 2) + ["---"]) + " |",
    ]
    for row in ROWS:
        if not any(key[0] == row.key for key in ctx.results):
            continue
        cells = [cell(ctx.results.get((row.key, c))) for c in columns]
        own = median(ctx, row.key, PGOUTBOX)
        vs_peer = ratio(own, best_peer(ctx, row.key, row.higher_is_better)) if row.compare else None
        vs_raw = ratio(own, median(ctx, row.key, RAW)) if row.compare else None
        if row.versus:  # against pgqueuer's figure only, so the cell names it
            vs_peer = ratio(own, versus_pgqueuer(ctx, row))
            vs_raw = ratio(own, median(ctx, row.versus, RAW))
        lines.append(
            "| "
            + " | ".join(
                [
                    row.title,
                    *cells,
                    "" if vs_peer is None else f"{vs_peer:.2f}×{' pgqueuer' if row.versus else ''}",
                    "" if vs_raw is None else f"{vs_raw:.2f}×",
                    target_cells(ctx, row.key),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def summary(ctx: Context) -> str:
    lines = []
    for target in TARGETS:
        value, word = verdict(ctx, target)
        unit = " MB" if target.row == "rss" else "×"
        shown = "not measured" if value is None else f"{value:.2f}{unit}"
        lines.append(f"- {target.row}: {target.text} — {shown}: {word}")
    return "\n".join(lines)


def render(ctx: Context, header: str) -> str:
    parts = [
        header,
        "",
        "Medians of the repetitions, [min–max] across them; ratios are of medians. "
        "For latency, RSS and p99 rows lower is better, so a ratio below 1 is pgoutbox ahead.",
        "",
        table(ctx),
        "",
        "Targets:",
        summary(ctx),
    ]
    if ctx.notes:
        parts += ["", "Notes:", *(f"- {note}" for note in ctx.notes)]
    if ctx.timelines:
        parts += [
            "",
            "Snapshot held (xmin section), by window; dead tuples and MB (tables + indexes) "
            "summed over each system's tables:",
            "",
            xmin.timeline_table(ctx.timelines),
        ]
    return "\n".join(parts)

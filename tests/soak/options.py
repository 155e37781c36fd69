"""The soak's command line, and what every part of the run uses: its voice and a sleep
that a stop cuts short."""

from __future__ import annotations

import argparse
import asyncio
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import tests.soak


@dataclass(frozen=True, slots=True)
class Options:
    minutes: float
    rate: float
    http_share: float
    sql_share: float
    hostile_share: float
    workers: int
    concurrency: int
    lease_seconds: float
    drain_seconds: float
    kill_every: float
    stop_every: float
    term_every: float
    row_lock_every: float
    restart_every: float
    long_outage_every: int
    conn_kill_every: float
    conn_kill_kinds: tuple[str, ...]
    warmup: float
    settle_seconds: float
    progress_every: float
    seed: int
    work_dir: Path | None
    keep: bool
    summary_json: Path | None


def parse_options(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        prog="python -m tests.soak", description=(tests.soak.__doc__ or "").splitlines()[0]
    )
    p.add_argument("--minutes", type=float, default=3.0, help="how long to enqueue (default 3)")
    p.add_argument("--rate", type=float, default=60.0, help="jobs per second, all paths")
    p.add_argument("--http-share", type=float, default=0.1, help="part of --rate sent by HTTP")
    p.add_argument("--sql-share", type=float, default=0.4, help="part sent by plain SQL")
    p.add_argument(
        "--hostile-share",
        type=float,
        default=0.05,
        help="part of the Python and SQL jobs that is hostile (default 0.05)",
    )
    p.add_argument("--workers", type=int, default=4, help="worker processes")
    p.add_argument("--concurrency", type=int, default=16, help="--concurrency of each worker")
    p.add_argument("--lease-seconds", type=float, default=8.0)
    p.add_argument("--drain-seconds", type=float, default=10.0, help="workers' drain timeout")
    p.add_argument("--kill-every", type=float, default=18.0, help="seconds between kill -9s")
    p.add_argument("--stop-every", type=float, default=60.0, help="seconds between SIGSTOPs")
    p.add_argument(
        "--term-every", type=float, default=45.0, help="seconds between mid-run SIGTERMs"
    )
    p.add_argument(
        "--row-lock-every",
        type=float,
        default=20.0,
        help="seconds between locks of a running job's row by another session",
    )
    p.add_argument("--restart-every", type=float, default=150.0, help="seconds between PG restarts")
    p.add_argument(
        "--long-outage-every",
        type=int,
        default=3,
        help="every Nth restart keeps PostgreSQL down past the lease (0: never)",
    )
    p.add_argument(
        "--conn-kill-every", type=float, default=30.0, help="seconds between connection kills"
    )
    p.add_argument(
        "--conn-kill-kinds",
        default="listener,worker",
        choices=["listener,worker", "listener", "worker"],
        help="which connections a kill terminates: a worker's LISTEN connection, all of "
        "its connections, or each in turn (default)",
    )
    p.add_argument("--warmup", type=float, default=5.0, help="seconds before the first fault")
    p.add_argument(
        "--settle-seconds",
        type=float,
        default=240.0,
        help="how long the queue may take to empty after enqueueing stops",
    )
    p.add_argument("--progress-every", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--work-dir", type=Path, default=None, help="logs go here (default: /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the embedded server's data")
    p.add_argument("--summary-json", type=Path, default=None, help="also write the figures")
    a = p.parse_args(argv)
    if a.http_share + a.sql_share > 1 or min(a.http_share, a.sql_share) < 0:
        p.error("--http-share plus --sql-share must be between 0 and 1")
    if not 0 <= a.hostile_share <= 1:
        p.error("--hostile-share must be between 0 and 1")
    if a.workers < 1 or a.rate <= 0 or a.minutes <= 0:
        p.error("--workers, --rate and --minutes must be positive")
    return Options(
        minutes=a.minutes,
        rate=a.rate,
        http_share=a.http_share,
        sql_share=a.sql_share,
        hostile_share=a.hostile_share,
        workers=a.workers,
        concurrency=a.concurrency,
        lease_seconds=a.lease_seconds,
        drain_seconds=a.drain_seconds,
        kill_every=a.kill_every,
        stop_every=a.stop_every,
        term_every=a.term_every,
        row_lock_every=a.row_lock_every,
        restart_every=a.restart_every,
        long_outage_every=a.long_outage_every,
        conn_kill_every=a.conn_kill_every,
        conn_kill_kinds=tuple(a.conn_kill_kinds.split(",")),
        warmup=a.warmup,
        settle_seconds=a.settle_seconds,
        progress_every=a.progress_every,
        seed=a.seed if a.seed is not None else secrets.randbelow(2**31),
        work_dir=a.work_dir,
        keep=a.keep,
        summary_json=a.summary_json,
    )


def say(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", flush=True)


async def sleep_or(event: asyncio.Event, seconds: float) -> bool:
    """Sleep, waking early when ``event`` is set; True when it is."""
    try:
        await asyncio.wait_for(event.wait(), timeout=max(0.0, seconds))
    except TimeoutError:
        return False
    return True

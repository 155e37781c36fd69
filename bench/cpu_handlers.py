"""Async jobs' pickup while a CPU-bound handler runs, by where that handler runs.

    python -m bench.cpu_handlers [--seconds 5] [--probes 100] [--repeat 3]

One worker process (``outbox-worker run bench.cpu_handlers:registry --concurrency 20``) runs
a handler that burns CPU for ``--seconds`` in pure Python, written four ways: not at all
(the baseline), as an ``async def`` (it blocks the event loop), as a plain ``def`` (in one
of the worker's threads, sharing the GIL with the loop) and as a ``run_in="process"`` task
(in a handler process). Once the CPU loop has begun (the handler writes a marker file),
``--probes`` async no-op jobs are enqueued at an even pace over 80 % of its span, one
autocommit INSERT each; a probe's pickup is its ``started_at - created_at`` (the database's
clock). The modes are interleaved, a fresh database and worker each run.

Uses DATABASE_URL when set, else an embedded PostgreSQL in a temporary folder.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
from alembic.config import Config

from alembic import command
from bench import pg
from bench.measure import percentile
from outbox_worker import JobContext, Registry

ROOT = Path(__file__).resolve().parent.parent
MODES = ("none", "async", "thread", "process")
WORKER = [sys.executable, "-m", "outbox_worker", "run", "bench.cpu_handlers:registry"]

registry = Registry()


def burn(seconds: float, marker: str) -> int:
    """Pure-Python work for ``seconds``, after noting its start in ``marker``."""
    Path(marker).write_text(str(time.time()))
    loops = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        loops += 1
    return loops


@registry.task()
async def cpu_async(ctx: JobContext, seconds: float, marker: str) -> int:
    return burn(seconds, marker)


@registry.task()
def cpu_thread(ctx: JobContext, seconds: float, marker: str) -> int:
    return burn(seconds, marker)


@registry.task(run_in="process")
def cpu_process(ctx: JobContext, seconds: float, marker: str) -> int:
    return burn(seconds, marker)


@registry.task()
async def probe(ctx: JobContext) -> None:
    return None


async def wait_for(what: str, check: Callable[[], Awaitable[bool]], within: float = 120) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def start_worker(url: str, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [*WORKER, "--concurrency", "20"],
            env={
                **os.environ,
                "DATABASE_URL": url,
                "OUTBOX_LOG_FORMAT": "json",
                "PYTHONPATH": str(ROOT),
            },
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def stop_worker(worker: subprocess.Popen[bytes]) -> None:
    worker.send_signal(signal.SIGTERM)
    worker.wait(60)


ALL_DONE = "SELECT count(*) = 0 FROM outbox_jobs WHERE state <> 'succeeded'"


async def one_run(
    url: str, mode: str, seconds: float, probes: int, folder: Path
) -> dict[str, float]:
    """Pickup p50/p99/max (ms) of the probes, and the CPU job's run time (s), for one mode."""
    log_path = folder / f"worker-{mode}.log"
    worker = start_worker(url, log_path)
    conn = await asyncpg.connect(url)

    async def ready() -> bool:
        if worker.poll() is not None:
            raise SystemExit(f"the worker exited:\n{log_path.read_text()[-3000:]}")
        return '"worker_ready"' in log_path.read_text(errors="replace")

    async def all_done() -> bool:
        return bool(await conn.fetchval(ALL_DONE))

    try:
        await wait_for("the worker to start", ready, within=60)
        # Warm up: the worker's connections and statements, a handler process if any.
        await conn.execute(
            "INSERT INTO outbox_jobs (task) SELECT 'probe' FROM generate_series(1, 20)"
        )
        if mode == "process":
            await conn.execute(
                "INSERT INTO outbox_jobs (task, args) VALUES ('cpu_process', $1::jsonb)",
                json.dumps({"seconds": 0.01, "marker": str(folder / "warm")}),
            )
        await wait_for("the warm-up", all_done)
        cpu_id = None
        if mode != "none":
            marker = folder / f"marker-{mode}"
            marker.unlink(missing_ok=True)
            cpu_id = await conn.fetchval(
                "INSERT INTO outbox_jobs (task, args) VALUES ($1, $2::jsonb) RETURNING id",
                f"cpu_{mode}",
                json.dumps({"seconds": seconds, "marker": str(marker)}),
            )

            async def burning() -> bool:
                return marker.exists()

            await wait_for("the CPU loop to begin", burning)
        began = time.monotonic()
        ids = []
        for i in range(probes):
            await asyncio.sleep(max(0.0, began + i * seconds * 0.8 / probes - time.monotonic()))
            ids.append(
                await conn.fetchval("INSERT INTO outbox_jobs (task) VALUES ('probe') RETURNING id")
            )
        await wait_for("every job", all_done)
        rows = await conn.fetch(
            "SELECT extract(epoch FROM started_at - created_at) * 1000 AS ms FROM outbox_jobs"
            " WHERE id = ANY($1::bigint[])",
            ids,
        )
        waits = [float(r["ms"]) for r in rows]
        ran = 0.0
        if cpu_id is not None:
            ran = float(
                await conn.fetchval(
                    "SELECT extract(epoch FROM finished_at - started_at) FROM outbox_jobs"
                    " WHERE id = $1",
                    cpu_id,
                )
            )
    finally:
        await conn.close()
        await asyncio.to_thread(stop_worker, worker)
    return {
        "p50": percentile(waits, 50),
        "p99": percentile(waits, 99),
        "max": max(waits),
        "cpu_seconds": ran,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="the CPU loop's span")
    parser.add_argument("--probes", type=int, default=100, help="async jobs per run")
    parser.add_argument("--repeat", type=int, default=3)
    opts = parser.parse_args()
    server = pg.start_server()
    try:
        template = "bench_cpu_template"
        url = await pg.create_template(server, template)
        config = Config(str(ROOT / "alembic.ini"))
        config.attributes["database_url"] = url
        config.attributes["configure_logging"] = False
        await asyncio.to_thread(command.upgrade, config, "heads")
        results: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
        with tempfile.TemporaryDirectory() as folder:
            for turn in range(opts.repeat):
                for mode in MODES[turn % 4 :] + MODES[: turn % 4]:
                    async with pg.fresh_database(server, template) as fresh:
                        figures = await one_run(
                            fresh, mode, opts.seconds, opts.probes, Path(folder)
                        )
                    results[mode].append(figures)
                    print(
                        f"run {turn + 1} {mode:<8} pickup p50 {figures['p50']:8.1f} ms, "
                        f"p99 {figures['p99']:8.1f} ms, max {figures['max']:8.1f} ms; "
                        f"CPU job ran {figures['cpu_seconds']:.2f} s",
                        flush=True,
                    )
        await pg.drop(server, template)
    finally:
        server.close()
    print()
    print(f"| CPU handler ({opts.seconds:g} s) | pickup p50 (ms) | pickup p99 (ms) | max (ms) |")
    print("| --- | ---: | ---: | ---: |")
    for mode, runs in results.items():
        cells = [
            f"{statistics.median(r[key] for r in runs):,.1f} "
            f"[{min(r[key] for r in runs):,.1f}–{max(r[key] for r in runs):,.1f}]"
            for key in ("p50", "p99", "max")
        ]
        print(f"| {mode} | {' | '.join(cells)} |")


if __name__ == "__main__":
    asyncio.run(main())

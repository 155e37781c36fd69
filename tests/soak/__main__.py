"""``python -m tests.soak``: the run, from an empty database to the table (see the package's
docstring)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import asyncpg
from alembic.config import Config

from alembic import command
from outbox_worker.config import asyncpg_dsn
from outbox_worker.devdb import PostgresServer, start_embedded
from tests.soak.cluster import (
    ROOT,
    Cluster,
    count_events,
    drain,
    snapshot_code,
    supervise,
    wait_ready,
)
from tests.soak.faults import FaultInjector, admin_fetch, database_answers
from tests.soak.options import Options, parse_options, say, sleep_or
from tests.soak.producers import Enqueuers
from tests.soak.records import Ledger, RunFacts
from tests.soak.report import check, print_table
from tests.soak.tasks import SOAK_DDL


async def prepare_database(url: str, server: PostgresServer | None, code: Path) -> int:
    """Migrate, add the soak's log tables and trigger; the highest job id before the run."""
    if server is not None:
        # Several workers (each with two pools and a listener), their replacements' and
        # the dying ones' backends, the API and the enqueuers need more than 100.
        await admin_fetch(url, "ALTER SYSTEM SET max_connections = 300")
        await asyncio.to_thread(server.restart, "fast")
    config = Config(str(code / "alembic.ini"))  # the snapshot's migrations
    config.attributes["database_url"] = url
    config.attributes["configure_logging"] = False
    # In a thread: the async Alembic environment runs its own event loop.
    await asyncio.to_thread(command.upgrade, config, "heads")
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await conn.execute(SOAK_DDL)
        first_id: int = await conn.fetchval("SELECT coalesce(max(id), 0) FROM outbox_jobs")
        return first_id
    finally:
        await conn.close()


async def job_states(url: str, first_id: int) -> dict[str, int]:
    rows = await admin_fetch(
        url, "SELECT state, count(*) AS n FROM outbox_jobs WHERE id > $1 GROUP BY state", first_id
    )
    return {r["state"]: r["n"] for r in rows}


async def report_progress(
    cluster: Cluster,
    ledger: Ledger,
    injector: FaultInjector,
    first_id: int,
    stop: asyncio.Event,
    every: float,
) -> None:
    started = time.monotonic()
    while not await sleep_or(stop, every):
        try:
            states = ", ".join(
                f"{k} {v}" for k, v in sorted((await job_states(cluster.url, first_id)).items())
            )
        except Exception as exc:
            states = f"database unavailable ({type(exc).__name__})"
        acked = sum(1 for s in ledger.status.values() if s == "acked")
        faults = Counter(f.kind for f in injector.faults)
        say(
            f"{time.monotonic() - started:5.0f}s  acked {acked}  jobs: {states}  "
            f"faults: {dict(faults)}  workers {sum(w.alive() for w in cluster.workers)}"
        )


async def settle(url: str, first_id: int, within: float) -> bool:
    """Wait until no job of the run is queued or running (retries included)."""
    deadline = time.monotonic() + within
    last = time.monotonic()
    while True:
        try:
            states = await job_states(url, first_id)
            left = states.get("queued", 0) + states.get("running", 0)
        except Exception:
            left = -1
        if left == 0:
            return True
        if time.monotonic() > deadline:
            return False
        if time.monotonic() - last > 15:
            say(f"waiting for the queue to empty: {left} job(s) queued or running")
            last = time.monotonic()
        await asyncio.sleep(1.0)


def git_state(*paths: str) -> tuple[str, bool] | None:
    """The short HEAD commit and whether ``paths`` have uncommitted changes; None without git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain", "--", *paths],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return None
    return head, bool(dirty)


def code_version() -> str:
    state = git_state("outbox_worker", "app", "alembic")
    if state is None:
        return "unknown"
    head, dirty = state
    return f"{head}{' + uncommitted changes' if dirty else ''}"


async def soak(opts: Options) -> int:
    run = secrets.token_hex(4)
    rng = random.Random(opts.seed)
    work = opts.work_dir or Path(tempfile.mkdtemp(prefix=f"pgoutbox-soak-{run}-"))
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    version = code_version()
    say(f"run {run}, seed {opts.seed}, code {version}; logs in {logs}")
    code = snapshot_code(work)
    server: PostgresServer | None = None
    url = os.environ.get("DATABASE_URL")
    if url:
        url = asyncpg_dsn(url)
        say(
            "using DATABASE_URL: PostgreSQL restarts are skipped (it cannot be restarted from here)"
        )
    else:
        server = start_embedded(work / "pg" if opts.keep else None, keep=opts.keep)
        url = server.url
        say(f"embedded PostgreSQL at {url}")
    cluster = Cluster(opts, url, server, code, logs)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        first_id = await prepare_database(url, server, code)
        for _ in range(opts.workers):
            cluster.spawn_worker()
        await cluster.start_api()
        for worker in list(cluster.workers):
            if not await wait_ready(worker):
                raise SystemExit(f"worker {worker.name} did not become ready:\n{worker.tail()}")
        say(
            f"API on {cluster.api_base}, {opts.workers} workers ready; "
            f"enqueueing for {opts.minutes:g} min"
        )

        ledger = Ledger(run)
        enqueuers = Enqueuers(opts, url, cluster.api_base, ledger, rng)
        injector = FaultInjector(cluster, opts, rng, first_id)
        crashes: list[str] = []
        watch = asyncio.Event()
        started = time.monotonic()
        enqueueing = asyncio.create_task(enqueuers.run())
        injecting = asyncio.create_task(injector.run())
        supervising = asyncio.create_task(supervise(cluster, watch, crashes, injector.faults))
        progress = asyncio.create_task(
            report_progress(cluster, ledger, injector, first_id, watch, opts.progress_every)
        )
        deadline = started + opts.minutes * 60
        while time.monotonic() < deadline and not stop.is_set() and not injector.fatal:
            if enqueueing.done():
                enqueueing.result()  # an enqueuer that died is a bug of the soak: raise it
            await sleep_or(stop, min(1.0, deadline - time.monotonic()))

        say("enqueueing stops; faults stop")
        enqueuers.stop.set()
        injector.stop.set()
        await injecting
        await injector.wind_down()
        if server is not None and not await database_answers(url):
            await asyncio.to_thread(server.start_server)
        done, _ = await asyncio.wait({enqueueing}, timeout=60)
        if not done:
            say("enqueuers still retrying after 60 s: giving up on their unknown outcomes")
            enqueuers.give_up.set()
        await enqueueing
        enqueue_seconds = time.monotonic() - started
        say("waiting for the queue to empty")
        settled = await settle(url, first_id, opts.settle_seconds)
        watch.set()
        await supervising
        await progress
        say("draining the workers (SIGTERM)")
        drain_problems = await drain(cluster, opts.drain_seconds + 30)
        sigterm_at = {c.pid: c.sigterm_at for c in cluster.retired if c.sigterm_at is not None}
        facts = RunFacts(
            run=run,
            first_id=first_id,
            lease_seconds=opts.lease_seconds,
            ledger=ledger,
            faults=injector.faults,
            fault_errors=injector.errors,
            crashes=crashes + ([injector.fatal] if injector.fatal else []),
            drain_problems=injector.exit_problems + drain_problems,
            sigterm_at=sigterm_at,
            enqueue_seconds=enqueue_seconds,
            settled=settled,
            worker_events=count_events(cluster.retired),
        )
        with (work / "faults.jsonl").open("w") as log:
            for fault in injector.faults:
                log.write(json.dumps(dataclasses.asdict(fault)) + "\n")
        say("checking the invariants")
        verdict = await check(url, facts)
        title = (
            f"pgoutbox soak {run}: {enqueue_seconds / 60:.1f} min at {opts.rate:g} jobs/s, "
            f"{opts.workers} workers x {opts.concurrency}, lease {opts.lease_seconds:g} s, "
            f"hostile {opts.hostile_share:.0%}, seed {opts.seed}, code {version}"
        )
        print_table(verdict, title)
        if opts.summary_json is not None:
            opts.summary_json.write_text(json.dumps(verdict.summary, indent=2, default=str))
        if facts.fault_errors:
            say("faults that failed to inject: " + "; ".join(facts.fault_errors[:5]))
        say(f"logs: {logs}")
        return 0 if not verdict.failures else 1
    finally:
        cluster.stop_all()
        if server is not None:
            with contextlib.suppress(Exception):
                server.stop_server("fast")
            if not opts.keep:
                server.close()
        shutil.rmtree(code, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(soak(parse_options(argv)))


if __name__ == "__main__":
    raise SystemExit(main())

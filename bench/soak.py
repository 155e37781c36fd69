"""Soak: enqueue at a steady rate through three paths while injecting faults, then prove
that nothing was lost and that every repeat had a cause.

    python -m bench.soak [--minutes 3] [--rate 60] [--workers 4] ...   (make soak SOAK_ARGS=...)

It starts its own embedded PostgreSQL in a temporary folder (or uses DATABASE_URL, which
must name a database dedicated to the soak; restarts are then skipped), migrates it, runs
the API (``uvicorn app.main:app``) and several ``outbox-worker run bench.soak_tasks:registry``
processes, and enqueues through ``POST /reports`` and ``POST /signup``, through
``enqueue``/``enqueue_many`` and through plain SQL ``INSERT``s. A share of the Python and SQL
jobs (``--hostile-share``) is hostile: results and errors the database cannot store, raises
of what is not an Exception, args as deep as enqueue allows, and (by SQL) deeper than any
reader decodes. Meanwhile it kills workers with SIGKILL (and starts replacements), stops them
with SIGSTOP past their lease, restarts them with SIGTERM (a replacement first; the old one
must drain and exit 0), locks running jobs' rows from a session of its own past the lease
(and for less), restarts PostgreSQL (fast and immediate) and terminates worker and listener
connections.

At the end it stops enqueueing, waits for the queue to empty, drains the workers (SIGTERM)
and checks the invariants against three records: the jobs table, the execution log the
handlers write (``soak_executions``) and a trigger's log of every state change but the claim
(``soak_transitions``); the workers' logs say how often each defence was needed (a result
made storable, a lease not extended, a handler stopped by the lease guard). Every enqueue
carries a unique marker (a dedupe key, an Idempotency-Key, an e-mail address), so an enqueue
whose outcome a lost connection hid is retried safely and reconciled against the table:
"committed" is what is in the table.

The subprocesses run a snapshot of the code taken at start, so that edits made to the
working tree during a long soak cannot reach the replacement workers halfway through.
Exit status 0 only when every invariant holds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from alembic.config import Config
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

import bench.soak_tasks  # noqa: F401  (registers the task names enqueue checks against)
from alembic import command
from bench.measure import ROOT, git_state
from bench.soak_check import Fault, Ledger, RunFacts, check, print_table
from bench.soak_tasks import HOSTILE_KINDS, SOAK_DDL
from outbox_worker import EnqueueError, InvalidArgs, NewJob, enqueue, enqueue_many
from outbox_worker.config import asyncpg_dsn, sqlalchemy_url
from outbox_worker.devdb import (
    PostgresServer,
    free_port,
    start_embedded,
    with_application_name,
)
from outbox_worker.jobs import MAX_JSON_DEPTH

REGISTRY = "bench.soak_tasks:registry"


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------


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
        prog="python -m bench.soak", description=(__doc__ or "").splitlines()[0]
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


# ---------------------------------------------------------------------------------------------
# The processes: PostgreSQL, the API, the workers
# ---------------------------------------------------------------------------------------------


def snapshot_code(dest: Path) -> Path:
    """A copy of what the subprocesses run, immune to later edits of the working tree."""
    code = dest / "code"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("outbox_worker", "app", "alembic"):
        shutil.copytree(ROOT / name, code / name, ignore=ignore)
    shutil.copy2(ROOT / "alembic.ini", code / "alembic.ini")
    (code / "bench").mkdir()
    for name in ("__init__.py", "soak_tasks.py"):
        shutil.copy2(ROOT / "bench" / name, code / "bench" / name)
    return code


@dataclass(eq=False)
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log: Any
    stopped: bool = False  # SIGSTOPped right now
    expected_exit: bool = False  # we killed it or told it to stop
    sigterm_at: float | None = None
    said_ready: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def ready(self) -> bool:
        """Whether it logged worker_ready. Its SIGTERM handler is in place by then: before,
        a SIGTERM ends it at once, as it would any process still starting."""
        if not self.said_ready:
            with contextlib.suppress(OSError):
                self.said_ready = '"worker_ready"' in self.log_path.read_text(errors="replace")
        return self.said_ready

    def sigterm(self) -> float:
        """Tell it to stop (drain, then exit 0); when that was."""
        self.expected_exit = True
        self.sigterm_at = time.time()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        return self.sigterm_at

    def tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError, ValueError):  # closed once the worker was retired
            self.log.flush()
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def last_error(self) -> str:
        """The last exception line of its output: why it died."""
        found = [
            line.strip(" |")
            for line in self.tail(400).splitlines()
            if re.search(r"^[\s|]*[\w.]+(Error|Exception|Group)\b.*:", line)
        ]
        return found[-1] if found else self.tail(3)


class Cluster:
    """Owns every process the soak starts, and knows which pid was which worker."""

    def __init__(
        self, opts: Options, url: str, server: PostgresServer | None, code: Path, logs: Path
    ) -> None:
        self.opts = opts
        self.url = url
        self.server = server
        self.code = code
        self.logs = logs
        self.workers: list[Child] = []
        self.retired: list[Child] = []
        self.api: Child | None = None
        self.api_port = 0
        self._numbers = itertools.count(1)
        self.base_env = {
            **os.environ,
            "PYTHONPATH": str(code),
            "OUTBOX_LOG_FORMAT": "json",
            "OUTBOX_LOG_LEVEL": "info",
            "OUTBOX_RETRY_BASE_SECONDS": "0.2",
            "OUTBOX_RETRY_CAP_SECONDS": "2",
            "OUTBOX_POOL_SIZE": "4",
            # Nothing may be pruned before the checks have read it.
            "OUTBOX_RETENTION_SUCCEEDED": "",
            "OUTBOX_RETENTION_DEAD": "",
            "OUTBOX_RETENTION_CANCELLED": "",
        }

    def _popen(self, name: str, args: list[str], env: dict[str, str]) -> Child:
        log_path = self.logs / f"{name}.log"
        log = log_path.open("ab")
        proc = subprocess.Popen(
            args,
            env=env,
            cwd=self.code,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # our Ctrl-C is ours to handle, not theirs
        )
        return Child(name, proc, log_path, log)

    def spawn_worker(self) -> Child:
        name = f"soak-w{next(self._numbers)}"
        env = {
            **self.base_env,
            "DATABASE_URL": with_application_name(self.url, name),
            "OUTBOX_LISTEN_DATABASE_URL": with_application_name(self.url, f"{name}-listen"),
        }
        args = [
            sys.executable,
            "-m",
            "outbox_worker",
            "run",
            REGISTRY,
            "--concurrency",
            str(self.opts.concurrency),
            "--lease-seconds",
            str(self.opts.lease_seconds),
            "--poll-interval-seconds",
            "0.5",
            "--drain-timeout-seconds",
            str(self.opts.drain_seconds),
        ]
        child = self._popen(name, args, env)
        self.workers.append(child)
        return child

    def retire(self, child: Child) -> None:
        if child in self.workers:
            self.workers.remove(child)
        self.retired.append(child)
        with contextlib.suppress(OSError):
            child.log.close()

    def worker_by_pid(self) -> dict[int, Child]:
        return {c.pid: c for c in [*self.workers, *self.retired]}

    async def start_api(self, port: int | None = None) -> None:
        self.api_port = port or free_port()
        env = {
            **self.base_env,
            "DATABASE_URL": self.url,
            "OUTBOX_DB_POOL_SIZE": "5",
            "OUTBOX_DB_MAX_OVERFLOW": "10",
        }
        args = [
            sys.executable,
            "-m",
            "uvicorn",
            "app.main:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.api_port),
            "--log-level",
            "warning",
            "--no-access-log",
        ]
        self.api = self._popen("api", args, env)
        deadline = time.monotonic() + 60
        async with httpx.AsyncClient(base_url=self.api_base) as client:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get("/healthz", timeout=2)).status_code == 200:
                        return
                if not self.api.alive() or time.monotonic() > deadline:
                    raise SystemExit(f"the API did not come up:\n{self.api.tail()}")
                await asyncio.sleep(0.2)

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def stop_all(self) -> None:
        """Last resort on the way out: nothing we started may outlive us."""
        for child in [*self.workers, *self.retired, *([self.api] if self.api else [])]:
            if child.alive():
                with contextlib.suppress(OSError):
                    os.kill(child.pid, signal.SIGCONT)
                    child.proc.kill()
                child.proc.wait()
            with contextlib.suppress(OSError):
                child.log.close()


# ---------------------------------------------------------------------------------------------
# Enqueueing: three paths, each job with a marker that says where it came from
# ---------------------------------------------------------------------------------------------


class Pacer:
    """A steady rate; after a stall it catches up at most a few seconds' worth."""

    def __init__(self, rate: float, max_backlog_seconds: float = 5.0) -> None:
        self.rate = rate
        self.start = time.monotonic()
        self.issued = 0
        self.max_backlog = max(1, int(rate * max_backlog_seconds))

    def due(self) -> int:
        want = int((time.monotonic() - self.start) * self.rate)
        if want - self.issued > self.max_backlog:
            self.issued = want - self.max_backlog
        return max(0, want - self.issued)

    def take(self, n: int) -> None:
        self.issued += n


@dataclass(frozen=True, slots=True)
class JobMix:
    """Mostly quick jobs, some slow ones, a few longer than the lease (for a row lock or a
    SIGTERM drain to catch mid-run), a few that fail once or twice, a few poison ones, and
    ``hostile_share`` of hostile ones. Only plain SQL writes a task no registry has, or args
    nested past what enqueue accepts."""

    rng: random.Random
    lease_seconds: float
    hostile_share: float

    def pick(self, marker: str, *, via_sql: bool) -> tuple[str, dict[str, Any]]:
        rng = self.rng
        r = rng.random()
        unknown_share = 0.001 if via_sql else 0.0
        if r < unknown_share:
            return "soak_unregistered", {"marker": marker}
        if r < unknown_share + self.hostile_share:
            return "soak_hostile", self._hostile(marker, via_sql)
        if r < unknown_share + self.hostile_share + 0.004:
            return "soak_poison", {"marker": marker}
        d = rng.random()
        if d < 0.70:
            ms = rng.randint(0, 20)
        elif d < 0.95:
            ms = rng.randint(20, 200)
        elif d < 0.995:
            ms = rng.randint(500, 3000)  # likely in flight when a fault strikes
        else:
            ms = int(min(100.0, self.lease_seconds * rng.uniform(1.2, 2.5)) * 1000)
        f = rng.random()
        fail = 1 if f < 0.04 else 2 if f < 0.05 else 0  # planned transient failures
        return "soak_work", {"marker": marker, "ms": ms, "fail": fail}

    def _hostile(self, marker: str, via_sql: bool) -> dict[str, Any]:
        kind = self.rng.choice([k for k in HOSTILE_KINDS if via_sql or k != "too_deep"])
        args: dict[str, Any] = {"marker": marker, "kind": kind}
        if kind == "deep":
            args["levels"] = MAX_JSON_DEPTH - 1  # the args object itself is the first level
        elif kind == "too_deep":
            # Past json's recursion limit (about 1000 levels), within what jsonb stores.
            args["levels"] = self.rng.randint(2_000, 8_000)
        return args


def args_json(args: dict[str, Any]) -> str:
    """The args as JSON text, with ``levels`` of nested lists under "deep" when they ask for
    it, spliced in as text: json.dumps gives up near 1000 levels."""
    text = json.dumps(args)
    levels = args.get("levels", 0)
    if not levels:
        return text
    return f'{text[:-1]}, "deep": {"[" * levels}{"]" * levels}}}'


def args_object(args: dict[str, Any]) -> dict[str, Any]:
    """The args as enqueue takes them, with ``levels`` of nested lists under "deep"."""
    levels = args.get("levels", 0)
    if not levels:
        return args
    deep: list[Any] = []
    for _ in range(levels - 1):
        deep = [deep]
    return {**args, "deep": deep}


async def sleep_or(event: asyncio.Event, seconds: float) -> bool:
    """Sleep, waking early when ``event`` is set; True when it is."""
    try:
        await asyncio.wait_for(event.wait(), timeout=max(0.0, seconds))
    except TimeoutError:
        return False
    return True


class Enqueuers:
    def __init__(
        self, opts: Options, url: str, api_base: str, ledger: Ledger, rng: random.Random
    ) -> None:
        self.opts = opts
        self.url = url
        self.api_base = api_base
        self.ledger = ledger
        self.rng = rng
        self.mix = JobMix(rng, opts.lease_seconds, opts.hostile_share)
        self.stop = asyncio.Event()  # no new jobs
        self.give_up = asyncio.Event()  # no more retries either

    async def run(self) -> None:
        rate = self.opts.rate
        http_rate = rate * self.opts.http_share
        sql_rate = rate * self.opts.sql_share
        python_rate = rate - http_rate - sql_rate
        engine = create_async_engine(
            sqlalchemy_url(self.url), pool_size=3, max_overflow=3, pool_pre_ping=True
        )
        loops: list[Awaitable[None]] = []
        try:
            async with httpx.AsyncClient(base_url=self.api_base) as client:
                if http_rate > 0:
                    loops += [self._http(client, Pacer(http_rate / 4)) for _ in range(4)]
                if python_rate > 0:
                    loops += [self._python(engine, Pacer(python_rate / 2)) for _ in range(2)]
                if sql_rate > 0:
                    loops += [self._sql(Pacer(sql_rate / 2)) for _ in range(2)]
                await asyncio.gather(*loops)
        finally:
            await engine.dispose()

    async def _backoff(self, tries: int) -> None:
        await asyncio.sleep(min(2.0, 0.05 * 2**tries) * (0.5 + self.rng.random()))

    # -- HTTP: POST /reports (Idempotency-Key) and POST /signup (a unique e-mail) ------------

    async def _http(self, client: httpx.AsyncClient, pacer: Pacer) -> None:
        while not self.stop.is_set():
            if pacer.due() == 0:
                await asyncio.sleep(0.02)
                continue
            pacer.take(1)
            if self.rng.random() < 0.6:
                marker = self.ledger.marker("http-report")
                key = marker.replace(":http-report:", "-r")
                await self._post(client, marker, "/reports", {}, {"Idempotency-Key": key}, 202)
            else:
                marker = self.ledger.marker("http-signup")
                email = marker.replace(":http-signup:", "-u") + "@soak.example.com"
                await self._post(client, marker, "/signup", {"email": email}, {}, 201)

    async def _post(
        self,
        client: httpx.AsyncClient,
        marker: str,
        path: str,
        body: dict[str, Any],
        headers: dict[str, str],
        ok: int,
    ) -> None:
        ledger = self.ledger
        for tries in itertools.count():
            try:
                response = await client.post(path, json=body, headers=headers, timeout=15)
            except httpx.HTTPError as exc:
                ledger.error("http", exc)
                ledger.status[marker] = "unknown"
            else:
                code = response.status_code
                # A repeated sign-up that finds its e-mail taken committed the first time.
                if code == ok or (code == 409 and ledger.status.get(marker) == "unknown"):
                    if ledger.status.get(marker) == "unknown":
                        ledger.recovered["http"] += 1
                    ledger.status[marker] = "acked"
                    return
                if code < 500 and code != 429:  # 429: backpressure, nothing written
                    ledger.rejected.append(f"{path} {code} {response.text[:200]}")
                    ledger.status[marker] = "rejected"
                    return
                ledger.error("http", f"HTTP {code}")
                ledger.status[marker] = "unknown"
            if self.give_up.is_set():
                return
            await self._backoff(tries)

    # -- Python API: enqueue / enqueue_many in a SQLAlchemy transaction ----------------------

    async def _python(self, engine: AsyncEngine, pacer: Pacer) -> None:
        while not self.stop.is_set():
            n = pacer.due()
            if n == 0:
                await asyncio.sleep(0.05)
                continue
            one = self.rng.random() < 0.2
            n = min(n, 3 if one else 100)
            pacer.take(n)
            path = "python-one" if one else "python-many"
            jobs = []
            for _ in range(n):
                marker = self.ledger.marker(path)
                task, args = self.mix.pick(marker, via_sql=False)
                jobs.append(NewJob(task, args_object(args), key=marker))
            await self._python_tx(engine, jobs, one, rollback=self.rng.random() < 0.02)

    async def _python_tx(
        self, engine: AsyncEngine, jobs: list[NewJob], one: bool, rollback: bool
    ) -> None:
        ledger = self.ledger
        markers = [str(job.key) for job in jobs]
        for tries in itertools.count():
            try:
                async with AsyncSession(engine) as session, session.begin():
                    if one:
                        written = [await enqueue(session, j.task, j.args, key=j.key) for j in jobs]
                    else:
                        written = await enqueue_many(session, jobs)
                    if rollback:
                        raise _RollBack
            except _RollBack:
                for marker in markers:
                    ledger.status[marker] = "rolled_back"
                return
            except InvalidArgs:
                raise  # the mix wrote args enqueue refuses: a bug of the soak, not a fault
            except EnqueueError as exc:  # refused before any SQL (e.g. backpressure)
                ledger.error("python", exc)
            except Exception as exc:
                ledger.error("python", exc)
                if rollback:  # never committed, whatever the error was
                    for marker in markers:
                        ledger.status[marker] = "rolled_back"
                    return
                for marker in markers:
                    ledger.status[marker] = "unknown"
            else:
                for marker, job in zip(markers, written, strict=True):
                    if ledger.status.get(marker) == "unknown":
                        ledger.recovered[
                            "python: had committed" if job.duplicate else "python: had not"
                        ] += 1
                    ledger.status[marker] = "acked"
                return
            if self.give_up.is_set():
                return
            await self._backoff(tries)

    # -- Plain SQL: keyed multi-row INSERT ... ON CONFLICT, and bare INSERT (task, args) ----

    async def _sql(self, pacer: Pacer) -> None:
        conn: Any = None
        try:
            while not self.stop.is_set():
                n = pacer.due()
                if n == 0:
                    await asyncio.sleep(0.05)
                    continue
                if conn is None or conn.is_closed():
                    conn = await self._connect()
                    if conn is None:
                        return
                if self.rng.random() < 0.5:
                    n = min(n, 100)
                    pacer.take(n)
                    conn = await self._sql_keyed(conn, n)
                else:
                    n = min(n, 10)
                    pacer.take(n)
                    conn = await self._sql_bare(conn, n)
        finally:
            if conn is not None and not conn.is_closed():
                await conn.close()

    async def _connect(self) -> Any:
        for tries in itertools.count():
            try:
                return await asyncpg.connect(asyncpg_dsn(self.url), timeout=10)
            except Exception as exc:
                self.ledger.error("sql connect", exc)
            if self.give_up.is_set():
                return None
            await self._backoff(tries)
        return None

    async def _sql_keyed(self, conn: Any, n: int) -> Any:
        ledger = self.ledger
        rows = []
        for _ in range(n):
            marker = ledger.marker("sql-keyed")
            task, args = self.mix.pick(marker, via_sql=True)
            rows.append((task, args_json(args), marker))
        for tries in itertools.count():
            try:
                if conn is None or conn.is_closed():
                    conn = await self._connect()
                    if conn is None:
                        return None
                inserted = await conn.fetch(
                    "INSERT INTO outbox_jobs (task, args, dedupe_key) "
                    "SELECT t, a::jsonb, k FROM unnest($1::text[], $2::text[], $3::text[]) "
                    "AS u(t, a, k) "
                    "ON CONFLICT (task, dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING "
                    "RETURNING dedupe_key",
                    [r[0] for r in rows],
                    [r[1] for r in rows],
                    [r[2] for r in rows],
                    timeout=30,
                )
            except Exception as exc:
                ledger.error("sql", exc)
                for _, _, marker in rows:
                    ledger.status[marker] = "unknown"
                with contextlib.suppress(Exception):
                    await conn.close(timeout=1)
                conn = None
                if self.give_up.is_set():
                    return None
                await self._backoff(tries)
                continue
            new = {r["dedupe_key"] for r in inserted}
            for _, _, marker in rows:
                if ledger.status.get(marker) == "unknown":
                    ledger.recovered[
                        "sql: had committed" if marker not in new else "sql: had not"
                    ] += 1
                ledger.status[marker] = "acked"
            return conn
        return conn

    async def _sql_bare(self, conn: Any, n: int) -> Any:
        """The contract's own example, one autocommit INSERT per job. Without a key a retry
        could duplicate the job, so an unknown outcome is left for the reconciliation."""
        ledger = self.ledger
        for _ in range(n):
            marker = ledger.marker("sql-bare")
            task, args = self.mix.pick(marker, via_sql=True)
            try:
                await conn.execute(
                    "INSERT INTO outbox_jobs (task, args) VALUES ($1, $2::jsonb)",
                    task,
                    args_json(args),
                    timeout=30,
                )
            except Exception as exc:
                ledger.error("sql", exc)
                ledger.status[marker] = "unknown"
                with contextlib.suppress(Exception):
                    await conn.close(timeout=1)
                return None
            ledger.status[marker] = "acked"
        return conn


class _RollBack(Exception):
    """Raised inside a transaction the soak rolls back on purpose."""


# ---------------------------------------------------------------------------------------------
# Fault injection
# ---------------------------------------------------------------------------------------------


async def admin_fetch(url: str, query: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(with_application_name(asyncpg_dsn(url), "soak-admin"), timeout=10)
    try:
        rows: list[Any] = await conn.fetch(query, *args, timeout=30)
        return rows
    finally:
        await conn.close()


async def database_answers(url: str) -> bool:
    try:
        await admin_fetch(url, "SELECT 1")
    except Exception:
        return False
    return True


class FaultInjector:
    """Each kind of fault on its own jittered schedule, one started at a time; those that
    last (a SIGSTOP, a row lock, a SIGTERM drain) go on beside the schedule. Every fault is
    logged with its time and its victim (a worker's pid, a job's id), which is what explains
    a repeat afterwards."""

    def __init__(self, cluster: Cluster, opts: Options, rng: random.Random, first_id: int) -> None:
        self.cluster = cluster
        self.opts = opts
        self.rng = rng
        self.first_id = first_id
        self.stop = asyncio.Event()
        self.faults: list[Fault] = []
        self.errors: list[str] = []
        self.exit_problems: list[str] = []  # workers told to stop that did not exit 0
        self.fatal: str | None = None
        self._resumers: dict[Child, asyncio.Task[None]] = {}
        self._lasting: set[asyncio.Task[None]] = set()
        self._restarts = 0
        self._conn_kills = 0

    async def run(self) -> None:
        opts = self.opts
        plan = {
            "kill9": opts.kill_every,
            "sigstop": opts.stop_every,
            "sigterm": opts.term_every,
            "row_lock": opts.row_lock_every,
            "pg_restart": opts.restart_every if self.cluster.server is not None else 0.0,
            "conn_kill": opts.conn_kill_every,
        }
        plan = {kind: every for kind, every in plan.items() if every > 0}
        actions: dict[str, Callable[[], Awaitable[None]]] = {
            "kill9": self._kill9,
            "sigstop": self._sigstop,
            "sigterm": self._sigterm,
            "row_lock": self._row_lock,
            "pg_restart": self._pg_restart,
            "conn_kill": self._conn_kill,
        }
        start = time.monotonic() + opts.warmup
        due = {kind: start + every * self.rng.uniform(0.1, 1.0) for kind, every in plan.items()}
        while due:
            kind = min(due, key=due.__getitem__)
            if await sleep_or(self.stop, due[kind] - time.monotonic()):
                return
            due[kind] = max(due[kind], time.monotonic()) + plan[kind] * self.rng.uniform(0.7, 1.3)
            await self._attempt(kind, actions[kind]())
            if self.fatal:
                return

    async def _attempt(self, kind: str, fault: Awaitable[None]) -> None:
        try:
            await fault
        except Exception as exc:
            self.errors.append(f"{kind}: {type(exc).__name__}: {exc}")
            say(f"fault {kind} failed: {type(exc).__name__}: {exc}")

    def _beside(self, kind: str, fault: Awaitable[None]) -> None:
        """Let a lasting fault go on while the schedule moves on."""
        task = asyncio.create_task(self._attempt(kind, fault))
        self._lasting.add(task)
        task.add_done_callback(self._lasting.discard)

    async def wind_down(self) -> None:
        """After the schedule: resume the stopped workers, let the row locks end and the
        SIGTERMed workers finish their drains."""
        for victim, task in list(self._resumers.items()):
            task.cancel()
            fault = next(f for f in reversed(self.faults) if f.pid == victim.pid)
            self._resume(victim, fault)
        await asyncio.gather(*self._lasting)

    def _victims(self) -> list[Child]:
        return [w for w in self.cluster.workers if w.alive() and not w.stopped]

    async def _kill9(self) -> None:
        victims = self._victims()
        if not victims:
            return
        victim = self.rng.choice(victims)
        victim.expected_exit = True
        at = time.time()
        os.kill(victim.pid, signal.SIGKILL)
        await asyncio.to_thread(victim.proc.wait)
        self.faults.append(Fault("kill9", at, victim.pid, detail=victim.name))
        self.cluster.retire(victim)
        self.cluster.spawn_worker()

    async def _sigstop(self) -> None:
        victims = self._victims()
        if not victims:
            return
        victim = self.rng.choice(victims)
        fault = Fault("sigstop", time.time(), victim.pid, detail=victim.name)
        os.kill(victim.pid, signal.SIGSTOP)
        victim.stopped = True
        self.faults.append(fault)
        pause = self.opts.lease_seconds + self.rng.uniform(1.5, 4.0)
        self._resumers[victim] = asyncio.create_task(self._resume_later(victim, fault, pause))

    async def _resume_later(self, victim: Child, fault: Fault, pause: float) -> None:
        await asyncio.sleep(pause)
        self._resume(victim, fault)

    def _resume(self, victim: Child, fault: Fault) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim.pid, signal.SIGCONT)
        victim.stopped = False
        fault.until = time.time()
        self._resumers.pop(victim, None)

    async def _sigterm(self) -> None:
        """A rolling restart: a replacement first, then SIGTERM; the old worker must finish
        or release its jobs (a release counts the attempt) and exit 0."""
        victims = [w for w in self._victims() if w.ready()]
        if not victims:
            return
        victim = self.rng.choice(victims)
        self.cluster.spawn_worker()
        fault = Fault("sigterm", victim.sigterm(), victim.pid, detail=victim.name)
        self.faults.append(fault)
        self.cluster.retire(victim)
        self._beside("sigterm", self._exited(victim, fault))

    async def _exited(self, victim: Child, fault: Fault) -> None:
        problem = await sigterm_exit(victim, self.opts.drain_seconds + 30)
        fault.until = time.time()
        if problem is not None:
            self.exit_problems.append(problem)
            say(problem.splitlines()[0])

    async def _row_lock(self) -> None:
        """Another session (an operator in psql, a migration) holds a running job's row FOR
        UPDATE. Mostly past the lease: the heartbeat cannot extend it, the lease guard must
        stop the handler before it lapses, and a rescuer may take the job back only once the
        lock is gone. Sometimes for a fraction of the lease, which must be waited out."""
        lease = self.opts.lease_seconds
        past = self.rng.random() < 0.7
        hold = lease + self.rng.uniform(1.0, 4.0) if past else lease * self.rng.uniform(0.15, 0.4)
        # Half the time the job planned to run longest, whose handler outlasts the guard's
        # margin; else any, whose handler may end (and its outcome wait) while the lock holds.
        order = "(args->>'ms')::int DESC NULLS LAST" if self.rng.random() < 0.5 else "random()"
        self._beside("row_lock", self._hold_row(order, hold, past))

    async def _hold_row(self, order: str, hold: float, past: bool) -> None:
        dsn = with_application_name(asyncpg_dsn(self.cluster.url), "soak-row-lock")
        conn = await asyncpg.connect(dsn, timeout=10)
        fault: Fault | None = None
        try:
            async with conn.transaction():
                row = await conn.fetchrow(
                    "SELECT id, locked_by FROM outbox_jobs WHERE state = 'running' AND id > $1 "
                    f"ORDER BY {order} LIMIT 1 FOR UPDATE SKIP LOCKED",
                    self.first_id,
                    timeout=10,
                )
                if row is None:
                    return
                fault = Fault(
                    "row_lock",
                    time.time(),
                    detail=f"job {row['id']} of {row['locked_by']}, {hold:.1f}s"
                    + (" (past the lease)" if past else ""),
                    job_id=row["id"],
                )
                self.faults.append(fault)
                await asyncio.sleep(hold)
        except Exception:
            if fault is None:
                raise
            # Taken, then ended early with its connection (a restart): a shorter lock.
        finally:
            # Until here at the latest: a restart that broke the connection ended it sooner.
            if fault is not None:
                fault.until = time.time()
            with contextlib.suppress(Exception):
                await conn.close(timeout=2)

    async def _pg_restart(self) -> None:
        server = self.cluster.server
        assert server is not None
        n = self._restarts
        self._restarts += 1
        mode: Any = "fast" if n % 2 == 0 else "immediate"
        every = self.opts.long_outage_every
        long = every > 0 and n % every == every - 1
        down = (
            self.opts.lease_seconds + self.rng.uniform(1.0, 3.0)
            if long
            else self.rng.uniform(0.2, 2.0)
        )
        fault = Fault(
            f"pg_restart_{mode}",
            time.time(),
            detail=f"down {down:.1f}s{' (past the lease)' if long else ''}",
        )
        self.faults.append(fault)
        try:
            await asyncio.to_thread(server.restart, mode, down)
        except Exception as exc:
            say(f"restart ({mode}) raised {type(exc).__name__}: {exc}; bringing it back")
            for _ in range(10):
                if await database_answers(self.cluster.url):
                    break
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(server.start_server)
                await asyncio.sleep(2)
            else:
                self.fatal = f"PostgreSQL did not come back after a {mode} restart: {exc}"
        fault.until = time.time()

    async def _conn_kill(self) -> None:
        kinds = self.opts.conn_kill_kinds
        listener_only = kinds[self._conn_kills % len(kinds)] == "listener"
        victims = self._victims()
        self.rng.shuffle(victims)
        for victim in victims:
            names = [f"{victim.name}-listen"]
            if not listener_only:
                names.append(victim.name)
            at = time.time()
            rows = await admin_fetch(
                self.cluster.url,
                "SELECT pid FROM pg_stat_activity "
                "WHERE application_name = ANY($1::text[]) AND pg_terminate_backend(pid)",
                names,
            )
            if rows:
                kind = "conn_kill_listener" if listener_only else "conn_kill_worker"
                detail = f"{victim.name}: {len(rows)} backend(s)"
                self.faults.append(Fault(kind, at, victim.pid, detail=detail))
                self._conn_kills += 1
                return


# ---------------------------------------------------------------------------------------------
# Around the run: set-up, supervision, progress, settling, draining
# ---------------------------------------------------------------------------------------------


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


async def wait_ready(child: Child, within: float = 60.0) -> bool:
    deadline = time.monotonic() + within
    while not child.ready():
        if not child.alive() or time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.2)
    return True


async def supervise(
    cluster: Cluster, stop: asyncio.Event, crashes: list[str], faults: list[Fault]
) -> None:
    """A process that exits without being killed by us is a finding: note it (as a fault,
    since it explains the repeats of the jobs it held), and replace it."""
    while not await sleep_or(stop, 0.5):
        for worker in list(cluster.workers):
            if not worker.alive() and not worker.expected_exit:
                faults.append(Fault("crash", time.time(), worker.pid, detail=worker.name))
                crashes.append(
                    f"{worker.name} (pid {worker.pid}) exited on its own with "
                    f"{worker.proc.returncode}: {worker.last_error()} (see {worker.log_path})"
                )
                say(f"worker {worker.name} exited on its own ({worker.proc.returncode})")
                cluster.retire(worker)
                cluster.spawn_worker()
        api = cluster.api
        if api is not None and not api.alive():
            crashes.append(f"the API exited with {api.proc.returncode}:\n{api.tail()}")
            say("the API exited on its own; starting it again")
            await cluster.start_api(port=cluster.api_port)


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


async def sigterm_exit(child: Child, within: float) -> str | None:
    """Wait for a worker told to stop; what was wrong with its exit, if anything."""
    try:
        code = await asyncio.to_thread(child.proc.wait, within)
    except subprocess.TimeoutExpired:
        child.proc.kill()
        await asyncio.to_thread(child.proc.wait)
        return f"{child.name} (pid {child.pid}) still running {within:.0f}s after SIGTERM"
    if code != 0:
        return f"{child.name} (pid {child.pid}) exited {code} on SIGTERM:\n{child.tail()}"
    return None


async def drain(cluster: Cluster, within: float) -> list[str]:
    """SIGTERM every worker and the API; the exits that were not a clean 0."""
    problems: list[str] = []
    for worker in cluster.workers:
        await wait_ready(worker)  # a replacement just started: its SIGTERM handler first
        worker.sigterm()
    for worker in list(cluster.workers):
        problem = await sigterm_exit(worker, within)
        if problem is not None:
            problems.append(problem)
        cluster.retire(worker)
    if cluster.api is not None and cluster.api.alive():
        cluster.api.expected_exit = True
        cluster.api.proc.terminate()
        try:
            await asyncio.to_thread(cluster.api.proc.wait, 20)
        except subprocess.TimeoutExpired:
            cluster.api.proc.kill()
            cluster.api.proc.wait()
    return problems


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def count_events(children: list[Child]) -> Counter[str]:
    """How many lines of each event the workers logged (JSON, one object a line)."""
    counts: Counter[str] = Counter()
    for child in children:
        with contextlib.suppress(OSError):
            for line in child.log_path.read_text(errors="replace").splitlines():
                if not line.startswith("{"):
                    continue
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    if isinstance(entry, dict) and isinstance(entry.get("event"), str):
                        counts[entry["event"]] += 1
    return counts


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

"""The soak's enqueuers: three paths (HTTP, the Python API, plain SQL) at a steady rate,
each job with a marker that says where it came from, each outcome in the ledger."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from outbox_worker import EnqueueError, InvalidArgs, NewJob, enqueue, enqueue_many
from outbox_worker.config import asyncpg_dsn, sqlalchemy_url
from outbox_worker.jobs import MAX_JSON_DEPTH
from tests.soak.options import Options
from tests.soak.records import Ledger
from tests.soak.tasks import HOSTILE_KINDS  # and registers the names enqueue checks


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
    nested past what enqueue accepts. Each path takes the hostile kinds in turn (in an order
    the seed shuffles), so that even a short run meets every kind."""

    rng: random.Random
    lease_seconds: float
    hostile_share: float
    turns: dict[bool, Iterator[str]] = field(default_factory=dict)

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
        turn = self.turns.get(via_sql)
        if turn is None:
            kinds = [k for k in HOSTILE_KINDS if via_sql or k != "too_deep"]
            self.rng.shuffle(kinds)
            turn = self.turns[via_sql] = itertools.cycle(kinds)
        kind = next(turn)
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

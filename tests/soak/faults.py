"""The fault injector: each kind of fault on its own schedule, each logged with its time
and its victim, which is what explains a repeat afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from outbox_worker.config import asyncpg_dsn
from outbox_worker.devdb import with_application_name
from tests.soak.cluster import Child, Cluster, sigterm_exit
from tests.soak.options import Options, say, sleep_or
from tests.soak.records import Fault


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

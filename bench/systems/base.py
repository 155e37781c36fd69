"""What a system offers the suite, and the child-process side that every peer shares.

Parent side (the orchestrator): a :class:`System` prepares a template database, pre-fills
no-op jobs, says how to start its worker and how to read "ready" and "done" off it, and
counts finished jobs. Child side: ``python -m bench.systems.<name> worker|enqueue|produce``
runs a worker, times enqueues, or enqueues latency jobs at a fixed rate, reporting JSON lines.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from bench.measure import Child, emit, run_async


@dataclass(frozen=True)
class Variant:
    """One system with one set of settings: a column of the table."""

    system: str
    label: str
    settings: dict[str, int] = field(default_factory=dict)
    # Worker-process counts measured for processing throughput.
    workers: tuple[int, ...] = (1, 2)
    latency: bool = True
    enqueue: bool = True
    # Jobs drained per processing run, as a multiple of the configured count (slow peers
    # drain fewer, the raw loop more, so each run lasts long enough to time).
    jobs_factor: float = 1.0
    # Measured by the steady and xmin sections (worker and producer in one process; one
    # column per system there, its settings mapped from the concurrency).
    steady: bool = False


class System(abc.ABC):
    name: str
    module: str
    has_batch: bool = True
    # Single-job ways the system's client offers besides ``one`` (the one all systems share),
    # each a method of its client taking ``one``'s argument and timed as its own row.
    other_singles: tuple[str, ...] = ()
    # Batch ways besides ``batch``, likewise: methods named ``batch_…`` taking its argument.
    other_batches: tuple[str, ...] = ()

    @property
    def enqueue_modes(self) -> tuple[str, ...]:
        """What the enqueue section times, in order: ``single`` (``one``), then
        ``other_singles``, then ``batch`` and ``other_batches`` where there is a batch API."""
        batches = ("batch", *self.other_batches) if self.has_batch else ()
        return ("single", *self.other_singles, *batches)

    def missing(self) -> str | None:
        """Why the system cannot run here (a package not installed, no server), or None."""
        return None

    @abc.abstractmethod
    async def prepare(self, url: str) -> None:
        """Install the schema into an empty database (the template of every run)."""

    @abc.abstractmethod
    async def fill(self, url: str, jobs: int) -> None:
        """Pre-fill ``jobs`` due no-op jobs, then VACUUM ANALYZE."""

    @abc.abstractmethod
    async def finished(self, url: str) -> int:
        """How many jobs are done (succeeded) in this database."""

    async def pending(self, url: str) -> int:
        """How many jobs are still waiting or running."""
        return 0

    async def reset(self) -> None:
        """Empty whatever the system keeps outside its PostgreSQL database (Redis)."""
        return

    # False for a worker with no burst mode (celery): the parent polls ``pending`` instead.
    exits_when_empty: bool = True

    def worker_args(self, url: str, settings: dict[str, int], *, burst: bool) -> list[str]:
        return [
            "-m",
            self.module,
            "worker",
            "--dsn",
            url,
            *(["--burst"] if burst else []),
            *(arg for key, value in settings.items() for arg in (f"--{key}", str(value))),
        ]

    def worker_env(self, url: str) -> dict[str, str]:
        return {}

    def ready_time(self, child: Child) -> float | None:
        return _event_time(child, "ready")

    def done_time(self, child: Child) -> float | None:
        return _event_time(child, "done")

    def client_args(self, url: str, command: str, *extra: str) -> list[str]:
        return ["-m", self.module, command, "--dsn", url, *extra]


def _event_time(child: Child, event: str) -> float | None:
    for line in child.events():
        if line.get("event") == event and isinstance(line.get("t"), float):
            return float(line["t"])
    return None


# ---------------------------------------------------------------------------------------------
# Child side
# ---------------------------------------------------------------------------------------------


@dataclass
class WorkerOpts:
    dsn: str
    burst: bool
    stamps: str | None
    concurrency: int
    batch_size: int
    loops: int


class Client(Protocol):
    async def one(self, stamp: int | None) -> None:
        """One job in one call and its own transaction; with ``stamp``, a latency job."""

    async def batch(self, jobs: int) -> None:
        """``jobs`` no-op jobs through the batch API in one call."""

    async def close(self) -> None: ...


def is_batch(mode: str) -> bool:
    """Whether an enqueue mode is a batch API (``batch``, ``batch_…``), timed with the batch
    job count, rather than a single-job way."""
    return mode == "batch" or mode.startswith("batch_")


async def time_enqueue(client: Client, mode: str, jobs: int, batch: int) -> float:
    """Seconds to enqueue ``jobs`` jobs, after an untimed warm-up. ``mode``: ``single``
    (``client.one``), ``batch`` (``client.batch``) or the name of another single-job or
    batch method of the client."""
    if is_batch(mode):
        many: Callable[[int], Awaitable[None]] = (
            client.batch if mode == "batch" else getattr(client, mode)
        )
        await many(batch)
        began = time.perf_counter()
        for start in range(0, jobs, batch):
            await many(min(batch, jobs - start))
        return time.perf_counter() - began
    one: Callable[[int | None], Awaitable[None]] = (
        client.one if mode == "single" else getattr(client, mode)
    )
    for _ in range(50):
        await one(None)
    began = time.perf_counter()
    for _ in range(jobs):
        await one(None)
    return time.perf_counter() - began


async def produce(client: Client, jobs: int, rate: float) -> None:
    """Enqueue latency jobs at a fixed rate; report each enqueue call's start time."""
    sent: list[tuple[int, float]] = []
    began = time.monotonic() + 0.05
    for i in range(jobs):
        delay = began + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        t0 = time.time()
        await client.one(i)
        sent.append((i, t0))
    emit("sent", stamps=sent)


def child_main(
    *,
    work: Callable[[WorkerOpts], Awaitable[None]],
    connect: Callable[[str], Awaitable[Client]],
) -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    worker = commands.add_parser("worker")
    worker.add_argument("--dsn", required=True)
    worker.add_argument("--burst", action="store_true")
    worker.add_argument("--concurrency", type=int, default=50)
    worker.add_argument("--batch_size", type=int, default=10)
    worker.add_argument("--loops", type=int, default=2)
    enqueue = commands.add_parser("enqueue")
    enqueue.add_argument("--dsn", required=True)
    enqueue.add_argument(
        "--modes", required=True, help="comma-separated: single, batch, or a client's own"
    )
    enqueue.add_argument("--jobs", type=int, required=True, help="jobs enqueued one by one")
    enqueue.add_argument("--batch-jobs", type=int, default=0, help="jobs through the batch API")
    enqueue.add_argument("--batch", type=int, default=1000)
    producer = commands.add_parser("produce")
    producer.add_argument("--dsn", required=True)
    producer.add_argument("--jobs", type=int, required=True)
    producer.add_argument("--rate", type=float, required=True)
    opts = parser.parse_args()

    async def main() -> None:
        if opts.command == "worker":
            await work(
                WorkerOpts(
                    dsn=opts.dsn,
                    burst=opts.burst,
                    stamps=os.environ.get("BENCH_STAMPS"),
                    concurrency=opts.concurrency,
                    batch_size=opts.batch_size,
                    loops=opts.loops,
                )
            )
            return
        client = await connect(opts.dsn)
        try:
            if opts.command == "enqueue":
                for mode in opts.modes.split(","):
                    jobs = opts.batch_jobs if is_batch(mode) else opts.jobs
                    seconds = await time_enqueue(client, mode, jobs, opts.batch)
                    emit("enqueued", mode=mode, seconds=seconds, jobs=jobs)
            else:
                await produce(client, opts.jobs, opts.rate)
        finally:
            await client.close()

    run_async(main)

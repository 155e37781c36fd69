"""The child of the steady and xmin sections: one system's worker and its producer in ONE
process, as a public benchmark harness runs them.

    python -m bench.inprocess --system pgoutbox --dsn URL --concurrency 16 [--batch-size 100]
        (--rate 1000 | --depth 4000) --warmup 2 --seconds 10 [--window 5] [--samples PATH]

Every job's handler notes ``time.time()`` at its start, awaits 1 ms and counts itself done;
its pickup is that start minus the ``time.time()`` the producer wrote into the job's args
just before the enqueue call that carried it. The producer either keeps a fixed rate, one
job per enqueue call, each call at its place in a schedule (``i / rate`` after the start,
so that a late call does not delay the next ones), from ``RATE_LANES`` connections; or it
keeps about ``--depth`` jobs waiting, counted in the process as enqueued minus completed,
topping the queue up through the batch API whenever the depth falls below the target.

JSON lines on stdout: ``ready`` (with the system's settings), ``measuring`` (the start of
the measured span, after the warm-up), one ``window`` per ``--window`` seconds of it, and
``summary`` for the whole span. With ``--samples``, every job's completion time and pickup
are written there at the end, as doubles (``read_samples``).

Each system module offers ``in_process(dsn, concurrency, batch_size) -> Driver``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import time
from array import array
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, cast

from bench.measure import emit, percentile, run_async

# What each job's handler awaits: work that waits on an API or the database.
JOB_SECONDS = 0.001
# Producer connections in fixed-rate mode: a slow enqueue call does not hold up the schedule.
RATE_LANES = 4
# Target-depth mode: the most jobs per batch call, and how far below the target the depth
# may fall before the producer tops it up (a twentieth of the target).
DEPTH_BATCH = 1_000
DEPTH_SLACK = 20
# How often the target-depth producer looks at the depth when it is full enough.
DEPTH_POLL = 0.001

OnJob = Callable[[float], Awaitable[None]]


class Producer(Protocol):
    async def one(self, stamp: float) -> None:
        """One job carrying ``stamp``, in one call and its own transaction."""

    async def many(self, stamp: float, jobs: int) -> None:
        """``jobs`` jobs, each carrying ``stamp``, in one batch call and one transaction."""

    async def close(self) -> None: ...


class Driver(Protocol):
    """One system's worker, run in this process."""

    # The settings the worker runs with, as the system names them (for the output).
    settings: str

    async def start(self, on_job: OnJob) -> None:
        """Start the worker, each job of it calling ``on_job`` with its stamp; returns when
        the worker is up (or, for a library that does not say, started)."""

    async def producer(self) -> Producer:
        """A producer on a connection of its own."""

    async def stop(self) -> None:
        """Stop the worker (in-flight jobs finish) and raise what it failed with, if it did."""


Factory = Callable[[str, int, int], Driver]


class Recorder:
    """The jobs' figures, kept in the process: completion times and pickups, in the order the
    jobs completed (so the times only grow and a span is found by bisection)."""

    def __init__(self) -> None:
        self.ends = array("d")
        self.pickups = array("d")
        self.enqueued = 0
        self.completed = 0

    async def on_job(self, stamp: float) -> None:
        started = time.time()
        await asyncio.sleep(JOB_SECONDS)
        self.ends.append(time.time())
        self.pickups.append(started - stamp)
        self.completed += 1

    @property
    def depth(self) -> int:
        return self.enqueued - self.completed


def span_figures(
    ends: Sequence[float], pickups: Sequence[float], t0: float, t1: float
) -> dict[str, float | None]:
    """Completions per second and pickup percentiles (ms) of the jobs completed in [t0, t1)."""
    low = bisect_left(ends, t0)
    high = bisect_left(ends, t1)
    picked = [p * 1000 for p in pickups[low:high]]
    seconds = max(t1 - t0, 1e-9)
    return {
        "completions": float(high - low),
        "per_s": (high - low) / seconds,
        "p50": percentile(picked, 50) if picked else None,
        "p99": percentile(picked, 99) if picked else None,
        "max": max(picked) if picked else None,
    }


def write_samples(path: Path, recorder: Recorder) -> None:
    count = min(len(recorder.ends), len(recorder.pickups))
    pairs = array("d", [0.0]) * (2 * count)
    pairs[0::2] = recorder.ends[:count]
    pairs[1::2] = recorder.pickups[:count]
    path.write_bytes(pairs.tobytes())


def read_samples(path: Path) -> tuple[array[float], array[float]]:
    """Completion times and pickups (seconds) as ``--samples`` wrote them."""
    pairs = array("d")
    pairs.frombytes(path.read_bytes())
    return pairs[0::2], pairs[1::2]


# ---------------------------------------------------------------------------------------------
# Producers
# ---------------------------------------------------------------------------------------------


async def produce_rate(
    driver: Driver, recorder: Recorder, rate: float, stop: asyncio.Event
) -> None:
    """One job per call at ``rate`` per second: call ``i`` is due ``i / rate`` after the start
    and made as soon as a lane is free after that; a lane never sleeps when behind."""
    producers = [await driver.producer() for _ in range(RATE_LANES)]
    began = time.monotonic()
    turn = 0

    async def lane(producer: Producer) -> None:
        nonlocal turn
        while not stop.is_set():
            i = turn
            turn += 1
            delay = began + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await producer.one(time.time())
            recorder.enqueued += 1

    try:
        await asyncio.gather(*(lane(p) for p in producers))
    finally:
        for producer in producers:
            await producer.close()


async def produce_depth(
    driver: Driver, recorder: Recorder, depth: int, stop: asyncio.Event
) -> None:
    """Keep about ``depth`` jobs enqueued and not completed: top up through the batch API
    whenever the depth falls a twentieth below the target."""
    producer = await driver.producer()
    low = depth - max(1, depth // DEPTH_SLACK)
    try:
        while not stop.is_set():
            if recorder.depth > low:
                await asyncio.sleep(DEPTH_POLL)
                continue
            jobs = min(depth - recorder.depth, DEPTH_BATCH)
            await producer.many(time.time(), jobs)
            recorder.enqueued += jobs
    finally:
        await producer.close()


# ---------------------------------------------------------------------------------------------
# Child main
# ---------------------------------------------------------------------------------------------


def load_driver(system: str, dsn: str, concurrency: int, batch_size: int) -> Driver:
    module = importlib.import_module(f"bench.systems.{system}")
    factory = cast(Factory, module.in_process)
    return factory(dsn, concurrency, batch_size)


async def sleep_until(moment: float) -> None:
    await asyncio.sleep(max(0.0, moment - time.time()))


async def measure(opts: argparse.Namespace) -> None:
    driver = load_driver(opts.system, opts.dsn, opts.concurrency, opts.batch_size)
    recorder = Recorder()
    await driver.start(recorder.on_job)
    emit("ready", settings=driver.settings)
    stop = asyncio.Event()
    if opts.rate:
        producing = asyncio.create_task(produce_rate(driver, recorder, opts.rate, stop))
    else:
        producing = asyncio.create_task(produce_depth(driver, recorder, opts.depth, stop))
    try:
        start = time.time() + opts.warmup
        await sleep_until(start)
        enqueued_before = recorder.enqueued
        emit("measuring", at=start, enqueued=enqueued_before)
        window = opts.window or opts.seconds
        windows = max(1, round(opts.seconds / window))
        for k in range(1, windows + 1):
            t1 = start + k * window
            await sleep_until(t1)
            if producing.done():
                producing.result()  # the producer failed: raise what it raised
                raise RuntimeError("the producer stopped")
            if opts.window:
                figures = span_figures(recorder.ends, recorder.pickups, t1 - window, t1)
                emit(
                    "window",
                    k=k,
                    t0=t1 - window,
                    t1=t1,
                    enqueued=recorder.enqueued,
                    depth=recorder.depth,
                    **figures,
                )
        end = start + windows * window
        summary: dict[str, Any] = span_figures(recorder.ends, recorder.pickups, start, end)
        summary["enqueued_per_s"] = (recorder.enqueued - enqueued_before) / (end - start)
        summary["depth"] = recorder.depth
        emit("summary", t0=start, t1=end, **summary)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.shield(producing), 30)
        await driver.stop()
    if opts.samples:
        write_samples(Path(opts.samples), recorder)
    emit("done")


def child_args(
    system: str,
    dsn: str,
    concurrency: int,
    batch_size: int,
    *,
    rate: float = 0.0,
    depth: int = 0,
    warmup: float,
    seconds: float,
    window: float = 0.0,
    samples: Path | None = None,
) -> list[str]:
    """The arguments of this module's child (parent side), for ``Context.child``."""
    return [
        "-m",
        "bench.inprocess",
        "--system",
        system,
        "--dsn",
        dsn,
        "--concurrency",
        str(concurrency),
        "--batch-size",
        str(batch_size),
        *(["--rate", str(rate)] if rate else ["--depth", str(depth)]),
        "--warmup",
        str(warmup),
        "--seconds",
        str(seconds),
        "--window",
        str(window),
        *(["--samples", str(samples)] if samples else []),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.inprocess", description=__doc__)
    parser.add_argument("--system", required=True)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument(
        "--batch-size", type=int, default=0, help="the system's batch setting (0: its own)"
    )
    load = parser.add_mutually_exclusive_group(required=True)
    load.add_argument("--rate", type=float, default=0.0, help="jobs per second, one per call")
    load.add_argument("--depth", type=int, default=0, help="jobs kept waiting")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--seconds", type=float, required=True, help="measured span")
    parser.add_argument("--window", type=float, default=0.0, help="report every so many seconds")
    parser.add_argument("--samples", help="write every job's completion time and pickup here")
    opts = parser.parse_args()

    async def run() -> None:
        await measure(opts)

    run_async(run)


if __name__ == "__main__":
    main()

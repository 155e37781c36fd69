"""celery (PyPI) with its Redis broker: a prefork worker with ``-c 2``, ``delay()`` for one job
and ``group(...).apply_async()`` for many. Celery has no burst mode, so the parent polls the
broker (queue and unacked messages) for "queue empty". Joins only when Redis answers.

Peak RSS is that of the worker's main process; its pool processes are not counted.
"""

from __future__ import annotations

import os
from typing import Any

from bench.measure import Stamps, emit
from bench.systems import redisbase
from bench.systems.base import Client, WorkerOpts, child_main

BROKER = f"redis://{redisbase.REDIS_HOST}:{redisbase.REDIS_PORT}/0"


def make_app() -> Any:
    from celery import Celery

    app = Celery("bench", broker=BROKER)
    app.conf.update(
        task_ignore_result=True, worker_hijack_root_logger=False, worker_redirect_stdouts=False
    )
    stamps = Stamps(os.environ.get("BENCH_STAMPS"))

    def noop() -> None:
        return None

    def stamp(i: int) -> None:
        stamps.record(i)

    app.task(name="noop")(noop)
    app.task(name="stamp")(stamp)
    return app


class CeleryPeer(redisbase.RedisSystem):
    name = "celery"
    module = "bench.systems.celery"
    packages = ("celery", "redis")
    exits_when_empty = False

    async def fill(self, url: str, jobs: int) -> None:
        await redisbase.flush()
        self._filled = jobs
        client = await connect("")
        try:
            for start in range(0, jobs, 1000):
                await client.batch(min(1000, jobs - start))
        finally:
            await client.close()

    async def finished(self, url: str) -> int:
        # Celery keeps no record of a finished no-op: what was filled and left the broker ran.
        return self._filled - await self.pending(url)

    async def pending(self, url: str) -> int:
        import redis.asyncio

        client = redis.asyncio.Redis(host=redisbase.REDIS_HOST, port=redisbase.REDIS_PORT)
        try:
            # redis-py types these as "Awaitable[int] | int" (one client class for both APIs).
            broker: Any = client
            return int(await broker.llen("celery")) + int(await broker.hlen("unacked"))
        finally:
            await client.aclose()

    _filled = 0


SYSTEM = CeleryPeer()


# ---------------------------------------------------------------------------------------------
# Child side
# ---------------------------------------------------------------------------------------------


async def work(opts: WorkerOpts) -> None:
    raise SystemExit("celery's worker is started by `python -m bench.systems.celery worker`")


def run_worker(concurrency: int) -> None:
    from celery.signals import worker_ready

    app = make_app()

    def ready(**_: Any) -> None:
        emit("ready")

    worker_ready.connect(ready, weak=False)
    app.worker_main(
        [
            "worker",
            "--pool",
            "prefork",
            "--concurrency",
            str(concurrency),
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--loglevel",
            "WARNING",
        ]
    )


class CeleryClient:
    def __init__(self) -> None:
        self.app = make_app()

    async def one(self, stamp: int | None) -> None:
        if stamp is None:
            self.app.tasks["noop"].delay()
        else:
            self.app.tasks["stamp"].delay(stamp)

    async def batch(self, jobs: int) -> None:
        from celery import group

        noop = self.app.tasks["noop"]
        group(noop.s() for _ in range(jobs)).apply_async()

    async def close(self) -> None:
        self.app.close()


async def connect(dsn: str) -> Client:
    return CeleryClient()


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        concurrency = 2
        if "--concurrency" in sys.argv:
            concurrency = int(sys.argv[sys.argv.index("--concurrency") + 1])
        run_worker(concurrency)
    else:
        child_main(work=work, connect=connect)

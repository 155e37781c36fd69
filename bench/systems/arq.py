"""arq (PyPI, Redis): its Worker with max_jobs=50 and poll_delay=0.05 (burst mode drains and
returns), ``enqueue_job`` for enqueueing; it has no batch API. Joins only when Redis answers."""

from __future__ import annotations

from typing import Any

from bench.measure import Stamps, emit
from bench.systems import redisbase
from bench.systems.base import Client, WorkerOpts, child_main


class Arq(redisbase.RedisSystem):
    name = "arq"
    module = "bench.systems.arq"
    packages = ("arq", "redis")
    has_batch = False

    async def fill(self, url: str, jobs: int) -> None:
        await redisbase.flush()
        client = await connect("")
        try:
            for _ in range(jobs):
                await client.one(None)
        finally:
            await client.close()

    async def finished(self, url: str) -> int:
        import redis.asyncio

        client = redis.asyncio.Redis(host=redisbase.REDIS_HOST, port=redisbase.REDIS_PORT)
        try:
            return len([key async for key in client.scan_iter("arq:result:*", count=10_000)])
        finally:
            await client.aclose()

    async def pending(self, url: str) -> int:
        import redis.asyncio

        client = redis.asyncio.Redis(host=redisbase.REDIS_HOST, port=redisbase.REDIS_PORT)
        try:
            return int(await client.zcard("arq:queue"))
        finally:
            await client.aclose()


SYSTEM = Arq()


def settings() -> Any:
    from arq.connections import RedisSettings

    return RedisSettings(host=redisbase.REDIS_HOST, port=redisbase.REDIS_PORT)


# ---------------------------------------------------------------------------------------------
# Child side
# ---------------------------------------------------------------------------------------------


async def work(opts: WorkerOpts) -> None:
    from arq import func
    from arq.worker import Worker

    stamps = Stamps(opts.stamps)

    async def noop(ctx: dict[str, Any]) -> None:
        return None

    async def stamp(ctx: dict[str, Any], i: int) -> None:
        stamps.record(i)

    worker = Worker(
        functions=[func(noop, name="noop"), func(stamp, name="stamp")],
        redis_settings=settings(),
        burst=opts.burst,
        max_jobs=opts.concurrency,
        poll_delay=0.05,
    )
    emit("ready")
    try:
        await worker.async_run()
    finally:
        emit("done")
        await worker.close()


class ArqClient:
    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def one(self, stamp: int | None) -> None:
        if stamp is None:
            await self.pool.enqueue_job("noop")
        else:
            await self.pool.enqueue_job("stamp", stamp)

    async def batch(self, jobs: int) -> None:
        raise NotImplementedError("arq has no batch API")

    async def close(self) -> None:
        await self.pool.aclose()


async def connect(dsn: str) -> Client:
    from arq import create_pool

    return ArqClient(await create_pool(settings()))


if __name__ == "__main__":
    child_main(work=work, connect=connect)

"""procrastinate (PyPI): ``run_worker_async`` (``wait=False`` drains and returns), ``defer_async``
and ``batch_defer_async``, on its psycopg connector. Only imported when installed."""

from __future__ import annotations

import importlib.util
from typing import Any

from bench.measure import Stamps, emit
from bench.pg import execute, fetchval
from bench.systems.base import Client, System, WorkerOpts, child_main


def make_app(dsn: str, stamps: Stamps | None = None) -> Any:
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))

    async def noop() -> None:
        return None

    async def stamp(i: int) -> None:
        if stamps is not None:
            stamps.record(i)

    # Called, not used as decorators: without procrastinate installed, mypy sees Any here.
    app.task(name="noop")(noop)
    app.task(name="stamp")(stamp)
    return app


class Procrastinate(System):
    name = "procrastinate"
    module = "bench.systems.procrastinate"

    def missing(self) -> str | None:
        if importlib.util.find_spec("procrastinate") is None:
            return "not installed (pip install -e . --group bench)"
        return None

    async def prepare(self, url: str) -> None:
        app = make_app(url)
        async with app.open_async():
            await app.schema_manager.apply_schema_async()

    async def fill(self, url: str, jobs: int) -> None:
        app = make_app(url)
        async with app.open_async():
            task = app.tasks["noop"]
            for start in range(0, jobs, 1000):
                await task.batch_defer_async(*([{}] * min(1000, jobs - start)))
        await execute(url, "VACUUM ANALYZE procrastinate_jobs")

    async def finished(self, url: str) -> int:
        query = "SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'"
        return int(str(await fetchval(url, query)))

    async def pending(self, url: str) -> int:
        query = "SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')"
        return int(str(await fetchval(url, query)))


SYSTEM = Procrastinate()


# ---------------------------------------------------------------------------------------------
# Child side
# ---------------------------------------------------------------------------------------------


async def work(opts: WorkerOpts) -> None:
    app = make_app(opts.dsn, Stamps(opts.stamps))
    async with app.open_async():
        emit("ready")
        # Its own signal handlers stop it gracefully on SIGTERM (the latency runs).
        await app.run_worker_async(concurrency=opts.concurrency, wait=not opts.burst)
        emit("done")


class ProcrastinateClient:
    def __init__(self, app: Any) -> None:
        self.app = app
        self.noop = app.tasks["noop"]
        self.stamp = app.tasks["stamp"]

    async def one(self, stamp: int | None) -> None:
        if stamp is None:
            await self.noop.defer_async()
        else:
            await self.stamp.defer_async(i=stamp)

    async def batch(self, jobs: int) -> None:
        await self.noop.batch_defer_async(*([{}] * jobs))

    async def close(self) -> None:
        await self.app.close_async()


async def connect(dsn: str) -> Client:
    app = make_app(dsn)
    await app.open_async()
    return ProcrastinateClient(app)


if __name__ == "__main__":
    child_main(work=work, connect=connect)

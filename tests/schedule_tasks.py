"""A registry with a schedule that ticks every second, for the scheduler's process tests: a
registry of its own, so that no other test's workers fire it."""

from __future__ import annotations

from outbox_worker import JobContext, Registry
from tests.workload import record

registry = Registry()


@registry.periodic("* * * * * *", name="every-second")
@registry.task
async def beat(ctx: JobContext) -> None:
    await record(ctx)

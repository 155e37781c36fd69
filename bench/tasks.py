"""The benchmark's task: a true no-op, so the figures are the queue's own cost."""

from __future__ import annotations

from outbox_worker import JobContext, Registry

registry = Registry()


@registry.task()
async def noop(ctx: JobContext) -> None:
    return None

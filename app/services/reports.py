"""Reports: a row and its generate_report job in one transaction, idempotent per key."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.models import Report
from app.services.errors import IdempotencyKeyReused, NotFound
from app.tasks import generate_report
from outbox_worker import Job, Outbox, get_job


async def request_report(
    session: AsyncSession, outbox: Outbox, params: dict[str, Any], idempotency_key: str | None
) -> tuple[uuid.UUID, int]:
    """Create the report and its job, or find the ones an earlier request with the same
    Idempotency-Key created; flushes, never commits.

    Without a key, the report's id is new, so nothing can conflict: the job goes first and the
    report row is written with its job id (two statements). With a key, the report row goes
    first: it is a unique column, so concurrent repeats wait on the first insert's transaction
    (ON CONFLICT), then read its row, and all answer with the same report and job.
    """
    report_id = uuid.uuid4()
    if idempotency_key is None:
        job = await _enqueue_report(session, outbox, report_id)
        await session.execute(insert(Report).values(id=report_id, params=params, job_id=job.id))
        return report_id, job.id
    inserted = (
        await session.execute(
            pg_insert(Report)
            .values(id=report_id, params=params, idempotency_key=idempotency_key)
            .on_conflict_do_nothing(index_elements=[Report.idempotency_key])
            .returning(Report.id)
        )
    ).scalar_one_or_none()
    if inserted is None:
        existing = (
            await session.execute(select(Report).where(Report.idempotency_key == idempotency_key))
        ).scalar_one()
        if existing.params != params:
            raise IdempotencyKeyReused(
                "this Idempotency-Key was used for a different report request"
            )
        assert existing.job_id is not None
        return existing.id, existing.job_id
    job = await _enqueue_report(session, outbox, report_id)
    await session.execute(update(Report).where(Report.id == report_id).values(job_id=job.id))
    return report_id, job.id


async def _enqueue_report(session: AsyncSession, outbox: Outbox, report_id: uuid.UUID) -> Job:
    job = generate_report.job(report_id=str(report_id)).with_options(key=str(report_id))
    return await outbox.enqueue(session, job)


# What a report's status is while it is not done, read off its job's state. A succeeded job
# means the report is done (the worker writes both in one transaction); a job that is gone
# (pruned after it died or was cancelled) can no longer produce the report.
_STATUS_OF_JOB = {
    "queued": "queued",
    "running": "running",
    "succeeded": "done",
    "dead": "failed",
    "cancelled": "cancelled",
}


async def get_report(session: AsyncSession, report_id: uuid.UUID) -> tuple[Report, str]:
    """The report and its status: ``done`` once stored, else what its job is doing."""
    report = await session.get(Report, report_id)
    if report is None:
        raise NotFound(f"no report {report_id}")
    if report.status == "done" or report.job_id is None:
        return report, report.status
    job = await get_job(session, report.job_id)
    if job is None:
        return report, "failed"
    if job.state == "succeeded":
        # Finished between the two reads: read the stored result.
        await session.refresh(report)
    return report, _STATUS_OF_JOB[job.state]

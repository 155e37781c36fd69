"""Reading and repairing jobs from application code, on the caller's SQLAlchemy session.

One implementation for every face (routes, CLI), so they never disagree.
"""

from __future__ import annotations

from sqlalchemy import text

from outbox_worker import sql
from outbox_worker.enqueue import Executor
from outbox_worker.jobs import Job


async def get_job(session: Executor, job_id: int) -> Job | None:
    row = (await session.execute(text(sql.JOB_GET), {"id": job_id})).mappings().first()
    return None if row is None else Job.from_row(row)

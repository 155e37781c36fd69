"""The sample service with one more route for the request-path comparison:
``uvicorn bench.webapp:app``.

``POST /reports-no-job`` is ``POST /reports`` without the outbox, and nothing else apart:
it sits in the same router (so FastAPI routes to it the same way), takes the same body and
``Idempotency-Key`` header, runs in the same session dependency (one transaction per
request), writes the report row with the same statement minus its job id, and answers with
the same response model. The difference between the two routes is the outbox's cost.

``POST /reports-bare-job`` writes the same job row as ``POST /reports`` with a plain-SQL
INSERT sent as a bare ``text()`` statement, none of ``enqueue``'s code: the floor for any
enqueue that runs as a statement of the caller's session.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any

from fastapi import Header, HTTPException, status
from sqlalchemy import insert

from app.api.deps import SessionDep
from app.api.routes import reports
from app.main import create_app
from app.models import Report
from app.schemas import ReportIn, ReportQueued
from app.tasks import generate_report
from bench.plain import JOB_INSERT

# The options app/tasks.py registers generate_report with, which its jobs take: what a
# service writing the row by plain SQL states itself.
_REPORT_TASK = generate_report.declared


def _params(body: ReportIn | None, idempotency_key: str | None) -> dict[str, Any]:
    """What /reports does with its body and header before it writes (no key: keyed
    requests take another path there)."""
    if idempotency_key is not None:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "the bench route takes no key")
    return (body or ReportIn()).model_dump(mode="json", exclude_defaults=True)


# reports.router is included lazily, so a route added to it here is routed like /reports.
@reports.router.post("/reports-no-job", status_code=status.HTTP_202_ACCEPTED)
async def create_report_no_job(
    session: SessionDep,
    body: ReportIn | None = None,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> ReportQueued:
    params = _params(body, idempotency_key)
    report_id = uuid.uuid4()
    await session.execute(insert(Report).values(id=report_id, params=params))
    return ReportQueued(report_id=report_id, job_id=0)


@reports.router.post("/reports-bare-job", status_code=status.HTTP_202_ACCEPTED)
async def create_report_bare_job(
    session: SessionDep,
    body: ReportIn | None = None,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> ReportQueued:
    params = _params(body, idempotency_key)
    report_id = uuid.uuid4()
    task = _REPORT_TASK
    job = {
        "queue": task.queue,
        "task": task.name,
        "args": json.dumps({"report_id": str(report_id)}),
        "priority": task.priority,
        "max_attempts": task.max_attempts,
        "dedupe_key": str(report_id),
    }
    job_id = (await session.execute(JOB_INSERT, job)).scalar_one()
    await session.execute(insert(Report).values(id=report_id, params=params, job_id=job_id))
    return ReportQueued(report_id=report_id, job_id=job_id)


app = create_app()

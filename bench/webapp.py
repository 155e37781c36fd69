"""The sample service with one more route for the request-path comparison:
``uvicorn bench.webapp:app``.

``POST /reports-no-job`` is ``POST /reports`` without the outbox, and nothing else apart:
it sits in the same router (so FastAPI routes to it the same way), takes the same body and
``Idempotency-Key`` header, runs in the same session dependency (one transaction per
request), writes the report row with the same statement minus its job id, and answers with
the same response model. The difference between the two routes is the outbox's cost.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Header, HTTPException, status
from sqlalchemy import insert

from app.api.deps import SessionDep
from app.api.routes import reports
from app.main import create_app
from app.models import Report
from app.schemas import ReportIn, ReportQueued


# reports.router is included lazily, so a route added to it here is routed like /reports.
@reports.router.post("/reports-no-job", status_code=status.HTTP_202_ACCEPTED)
async def create_report_no_job(
    session: SessionDep,
    body: ReportIn | None = None,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> ReportQueued:
    if idempotency_key is not None:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "the bench route takes no key")
    params = (body or ReportIn()).model_dump(mode="json", exclude_defaults=True)
    report_id = uuid.uuid4()
    await session.execute(insert(Report).values(id=report_id, params=params))
    return ReportQueued(report_id=report_id, job_id=0)


app = create_app()

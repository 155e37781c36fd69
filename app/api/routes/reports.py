from __future__ import annotations

import re
import uuid
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, status

from app.api.deps import OutboxDep, SessionDep
from app.schemas import ReportIn, ReportOut, ReportQueued
from app.services.reports import get_report, request_report

router = APIRouter(tags=["reports"])

_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


@router.post("/reports", status_code=status.HTTP_202_ACCEPTED)
async def create_report(
    session: SessionDep,
    outbox: OutboxDep,
    body: ReportIn | None = None,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> ReportQueued:
    """Queues a report. A repeat with the same ``Idempotency-Key`` answers with the first
    request's report and job instead of creating new ones."""
    if idempotency_key is not None and not _KEY.fullmatch(idempotency_key):
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST,
            "Idempotency-Key must be 1-255 visible ASCII characters",
        )
    params = (body or ReportIn()).model_dump(mode="json", exclude_defaults=True)
    report_id, job_id = await request_report(session, outbox, params, idempotency_key)
    return ReportQueued(report_id=report_id, job_id=job_id)


@router.get("/reports/{report_id}")
async def read_report(report_id: uuid.UUID, session: SessionDep) -> ReportOut:
    report, report_status = await get_report(session, report_id)
    return ReportOut(
        report_id=report.id,
        job_id=report.job_id,
        status=report_status,
        params=report.params,
        result=report.result,
        created_at=report.created_at,
        finished_at=report.finished_at,
    )

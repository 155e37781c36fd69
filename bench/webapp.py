"""The sample service with one more route for the request-path comparison:
``uvicorn bench.webapp:app``.

``POST /reports-no-job`` does what ``POST /reports`` does minus the outbox: the same session
dependency (one transaction per request), the same insert of the report row, no job, no
second statement. The difference between the two routes is the outbox's cost.
"""

from __future__ import annotations

import uuid

from fastapi import status
from sqlalchemy.dialects.postgresql import insert as pg_insert

from app.api.deps import SessionDep
from app.main import create_app
from app.models import Report
from app.schemas import ReportIn

app = create_app()


@app.post("/reports-no-job", status_code=status.HTTP_202_ACCEPTED)
async def create_report_no_job(session: SessionDep, body: ReportIn | None = None) -> dict[str, str]:
    params = (body or ReportIn()).model_dump(mode="json", exclude_defaults=True)
    report_id = uuid.uuid4()
    await session.execute(
        pg_insert(Report)
        .values(id=report_id, params=params, idempotency_key=None)
        .on_conflict_do_nothing(index_elements=[Report.idempotency_key])
        .returning(Report.id)
    )
    return {"report_id": str(report_id)}

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, status
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from outbox_worker import refresh_gauges, workers_alive

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive; says nothing about the database."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "not ready"}})
async def readyz(request: Request) -> JSONResponse:
    """Ready when the database answers and its schema is at this code's migration heads (the
    sample's branch and pgoutbox's).

    ``workers`` reports whether a worker's heartbeat was seen recently; it informs (an API
    can take requests while its workers restart: jobs wait in the table) and does not fail
    readiness.
    """
    heads: frozenset[str] = request.app.state.schema_heads
    within = request.app.state.settings.worker_seen_within_seconds
    checks: dict[str, Any] = {"database": "ok", "schema": "ok"}
    try:
        async with request.app.state.engine.connect() as conn:
            rows = await conn.execute(text("SELECT version_num FROM alembic_version"))
            current = frozenset(row[0] for row in rows)
            if current == heads:
                alive = await workers_alive(conn, within_seconds=within)
                checks["workers"] = {"alive": len(alive), "seen_within_seconds": within}
    except Exception as exc:
        checks["database"] = f"unreachable: {type(exc).__name__}"
        checks["schema"] = "unknown"
        return JSONResponse({"status": "unavailable", "checks": checks}, status_code=503)
    if current != heads:
        checks["schema"] = f"at {sorted(current)}, code expects {sorted(heads)}"
        return JSONResponse({"status": "unavailable", "checks": checks}, status_code=503)
    return JSONResponse({"status": "ready", "checks": checks}, status_code=status.HTTP_200_OK)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> PlainTextResponse:
    """Prometheus text: this process's counters, and queue gauges read at scrape time."""
    async with request.app.state.engine.connect() as conn:
        await refresh_gauges(
            conn, worker_seen_within=request.app.state.settings.worker_seen_within_seconds
        )
    return PlainTextResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)

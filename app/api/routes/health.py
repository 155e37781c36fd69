from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, status
from fastapi.responses import JSONResponse
from sqlalchemy import text

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive; says nothing about the database."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "not ready"}})
async def readyz(request: Request) -> JSONResponse:
    """Ready when the database answers and its schema is at this code's migration head."""
    heads: frozenset[str] = request.app.state.schema_heads
    checks: dict[str, Any] = {"database": "ok", "schema": "ok"}
    try:
        async with request.app.state.engine.connect() as conn:
            rows = await conn.execute(text("SELECT version_num FROM alembic_version"))
            current = frozenset(row[0] for row in rows)
    except Exception as exc:
        checks["database"] = f"unreachable: {type(exc).__name__}"
        checks["schema"] = "unknown"
        return JSONResponse({"status": "unavailable", "checks": checks}, status_code=503)
    if current != heads:
        checks["schema"] = f"at {sorted(current)}, code expects {sorted(heads)}"
        return JSONResponse({"status": "unavailable", "checks": checks}, status_code=503)
    return JSONResponse({"status": "ready", "checks": checks}, status_code=status.HTTP_200_OK)

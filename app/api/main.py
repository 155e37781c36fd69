from __future__ import annotations

from fastapi import APIRouter

from app.api.routes import comments, health, reports, signup

api_router = APIRouter()
api_router.include_router(health.router)
api_router.include_router(comments.router)
api_router.include_router(signup.router)
api_router.include_router(reports.router)

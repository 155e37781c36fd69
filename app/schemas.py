"""Request and response bodies, kept apart from the ORM models."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, EmailStr, Field, model_validator


class CommentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    author: str = Field(min_length=1, max_length=100)
    body: str = Field(min_length=1, max_length=10_000)


class CommentOut(BaseModel):
    id: int
    author: str
    body: str


class SignupIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    email: EmailStr
    name: str | None = Field(default=None, max_length=200)


class SignupOut(BaseModel):
    user_id: int
    email: str
    job_id: int


class ReportIn(BaseModel):
    """Every field is optional: ``{}`` asks for a report over all time."""

    model_config = ConfigDict(extra="forbid")
    since: datetime | None = None
    until: datetime | None = None
    recent_limit: int = Field(default=5, ge=0, le=100)

    @model_validator(mode="after")
    def _window(self) -> ReportIn:
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None and value.utcoffset() is None:
                raise ValueError(f"{name} must include a timezone, e.g. 2026-01-01T00:00:00Z")
        if self.since and self.until and self.since >= self.until:
            raise ValueError("since must be before until")
        return self


class ReportQueued(BaseModel):
    report_id: uuid.UUID
    job_id: int
    status: Literal["queued"] = "queued"


class ReportOut(BaseModel):
    report_id: uuid.UUID
    job_id: int | None
    status: str
    params: dict[str, Any]
    result: dict[str, Any] | None
    created_at: datetime
    finished_at: datetime | None

"""Request and response bodies, kept apart from the ORM models."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, EmailStr, Field, model_validator
from pydantic_core import PydanticCustomError


def storable(value: str) -> str:
    """PostgreSQL text is UTF-8 without NUL: refuse anything else as a 422 here, not as an
    INSERT that fails with a 500. (Pydantic's str lets a lone surrogate through unless a
    length constraint happens to make it look.)"""
    if "\x00" in value:
        raise PydanticCustomError("text_nul", "must not contain the NUL character (\\u0000)")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise PydanticCustomError(
            "text_surrogate",
            "must be valid unicode: a lone surrogate (\\ud800-\\udfff) cannot be stored",
        ) from None
    return value


Text = Annotated[str, AfterValidator(storable)]


class Body(BaseModel):
    """A request body: unknown fields are refused in one error, however many there are (a
    body of 100,000 unknown keys must not cost 100,000 errors)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = cls.model_fields
            unknown = [key for key in data if key not in known]
            if unknown:
                names = ", ".join(repr(key) for key in unknown[:5])
                more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
                # No context: the names are the client's, never a template to format.
                raise PydanticCustomError("extra_forbidden", f"unknown fields: {names}{more}")
        return data


class CommentIn(Body):
    author: Text = Field(min_length=1, max_length=100)
    body: Text = Field(min_length=1, max_length=10_000)


class CommentOut(BaseModel):
    id: int
    author: str
    body: str


class SignupIn(Body):
    email: EmailStr
    name: Text | None = Field(default=None, max_length=200)


class SignupOut(BaseModel):
    user_id: int
    email: str
    job_id: int


class ReportIn(Body):
    """Every field is optional: ``{}`` asks for a report over all time."""

    since: datetime | None = None
    until: datetime | None = None
    recent_limit: int = Field(default=5, ge=0, le=100)

    @model_validator(mode="after")
    def _window(self) -> ReportIn:
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is None:
                continue
            if value.utcoffset() is None:
                raise ValueError(f"{name} must include a timezone, e.g. 2026-01-01T00:00:00Z")
            # The job passes the window on in UTC; a moment outside years 1-9999 there is one
            # no datetime (so no driver) can hold.
            try:
                value.astimezone(UTC)
            except OverflowError:
                raise ValueError(f"{name} must fall within the years 1 to 9999 in UTC") from None
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

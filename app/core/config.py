"""The service's settings: DATABASE_URL and the OUTBOX_* variables it shares with the worker."""

from __future__ import annotations

import functools

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from outbox_worker.config import sqlalchemy_url

_PLACEHOLDERS = {"changeme", "changethis", "secret", "password", "admin", "token"}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OUTBOX_", extra="ignore")

    database_url: str = Field(
        validation_alias=AliasChoices("DATABASE_URL", "OUTBOX_DATABASE_URL"),
    )
    db_pool_size: int = Field(default=10, ge=1)
    db_max_overflow: int = Field(default=20, ge=0)
    max_args_bytes: int = Field(default=1024 * 1024, gt=0)
    admin_token: str | None = None
    # A worker counts as alive for /readyz when its heartbeat is this recent.
    worker_seen_within_seconds: float = Field(default=60.0, gt=0)

    @field_validator("admin_token")
    @classmethod
    def _real_secret(cls, value: str | None) -> str | None:
        if value is not None and (len(value) < 16 or value.lower() in _PLACEHOLDERS):
            raise ValueError("OUTBOX_ADMIN_TOKEN must be a real secret of 16+ characters")
        return value or None

    @field_validator("database_url")
    @classmethod
    def _for_sqlalchemy(cls, value: str) -> str:
        return sqlalchemy_url(value)


@functools.cache
def get_settings() -> Settings:
    return Settings()

"""The service's settings: DATABASE_URL and the OUTBOX_* variables it shares with the worker."""

from __future__ import annotations

import functools

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from outbox_worker.config import sqlalchemy_url


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OUTBOX_", extra="ignore")

    database_url: str = Field(
        validation_alias=AliasChoices("DATABASE_URL", "OUTBOX_DATABASE_URL"),
    )
    db_pool_size: int = Field(default=10, ge=1)
    db_max_overflow: int = Field(default=20, ge=0)
    max_args_bytes: int = Field(default=1024 * 1024, gt=0)

    @field_validator("database_url")
    @classmethod
    def _for_sqlalchemy(cls, value: str) -> str:
        return sqlalchemy_url(value)


@functools.cache
def get_settings() -> Settings:
    return Settings()

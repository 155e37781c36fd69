"""The service's settings: DATABASE_URL and the OUTBOX_* variables it shares with the worker."""

from __future__ import annotations

import functools
import math
from collections import Counter

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from outbox_worker import sqlalchemy_url

# What a token's characters carry, by their frequencies: 16 distinct characters carry 64 bits,
# sixteen "a" none. A random token of 24 or more characters clears both bars, which a repeated
# short pattern ("abcd" * 8 carries 64 bits) does not.
MIN_TOKEN_BITS = 64
MIN_DISTINCT_CHARACTERS = 10


def estimated_bits(token: str) -> float:
    """Length times the Shannon entropy of the token's character frequencies: an upper bound
    of its strength, low for repeated characters and short alphabets."""
    return sum(count * math.log2(len(token) / count) for count in Counter(token).values())


class Settings(BaseSettings):
    # An empty variable means unset (OUTBOX_ADMIN_TOKEN= in a compose file disables admin);
    # errors never repeat the value, which may be a secret.
    model_config = SettingsConfigDict(
        env_prefix="OUTBOX_", extra="ignore", env_ignore_empty=True, hide_input_in_errors=True
    )

    database_url: str = Field(
        validation_alias=AliasChoices("DATABASE_URL", "OUTBOX_DATABASE_URL"),
    )
    db_pool_size: int = Field(default=10, ge=1)
    db_max_overflow: int = Field(default=20, ge=0)
    # The largest request body the API reads; a longer one is refused with 413.
    max_body_bytes: int = Field(default=1024 * 1024, gt=0)
    admin_token: str | None = None
    # A worker counts as alive for /readyz when its heartbeat is this recent.
    worker_seen_within_seconds: float = Field(default=60.0, gt=0)

    @field_validator("admin_token")
    @classmethod
    def _real_secret(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip()  # the routes strip the token they are given, so compare alike
        if len(value) < 16:
            raise ValueError("OUTBOX_ADMIN_TOKEN must be a real secret of 16+ characters")
        distinct, bits = len(set(value)), estimated_bits(value)
        if distinct < MIN_DISTINCT_CHARACTERS or bits < MIN_TOKEN_BITS:
            raise ValueError(
                f"OUTBOX_ADMIN_TOKEN is too easy to guess: {distinct} distinct characters "
                f"carrying about {bits:.0f} bits ({MIN_DISTINCT_CHARACTERS} and "
                f"{MIN_TOKEN_BITS} needed); use a random one, e.g. `openssl rand -hex 32`"
            )
        return value

    @field_validator("database_url")
    @classmethod
    def _for_sqlalchemy(cls, value: str) -> str:
        return sqlalchemy_url(value)


@functools.cache
def get_settings() -> Settings:
    return Settings()

"""Settings from the environment (``DATABASE_URL`` and ``OUTBOX_*``), built only by entry points.

Services receive plain values, never this object, so tests and embedders can wire them directly.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import AliasChoices, BeforeValidator, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from outbox_worker.errors import ConfigError

if TYPE_CHECKING:
    from outbox_worker.worker import WorkerOptions

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
# The longest duration a setting or flag takes: past any retention or window anyone means,
# short of what timedelta holds, and `now()` minus it is still a timestamp PostgreSQL keeps.
MAX_DURATION = timedelta(days=36_600)


def parse_duration(value: object) -> object:
    """Read ``90``, ``45s``, ``30m``, ``12h``, ``7d`` or ``2w`` as a timedelta."""
    if isinstance(value, str):
        if not value.strip():
            return None
        match = _DURATION.match(value.lower())
        if match is None:
            raise ValueError(f"{value!r} is not a duration like 30s, 15m, 12h or 7d")
        seconds: float = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    elif isinstance(value, int | float):
        seconds = value
    else:
        return value
    # Also False for NaN, and for more digits than a float holds (float() reads infinity).
    if not 0 <= seconds <= MAX_DURATION.total_seconds():
        raise ValueError(f"{value!r} is out of range: a duration is from 0 to {MAX_DURATION.days}d")
    return timedelta(seconds=seconds)


Duration = Annotated[timedelta | None, BeforeValidator(parse_duration)]


def asyncpg_dsn(url: str) -> str:
    """The URL in the form asyncpg takes: ``postgresql://``, without a SQLAlchemy driver suffix."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.split("+")[0] not in ("postgresql", "postgres"):
        raise ConfigError(f"DATABASE_URL must start with postgresql://, got {scheme or url!r}")
    return f"postgresql://{rest}"


def sqlalchemy_url(url: str) -> str:
    """The URL in the form SQLAlchemy's async engine takes: ``postgresql+asyncpg://``."""
    return "postgresql+asyncpg://" + asyncpg_dsn(url).removeprefix("postgresql://")


# The longest delay pgoutbox writes into run_at: an enqueue's delay, a retry's backoff.
MAX_DELAY_SECONDS = 10 * 366 * 86400.0


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OUTBOX_", extra="ignore")

    database_url: str = Field(
        default="", validation_alias=AliasChoices("DATABASE_URL", "OUTBOX_DATABASE_URL")
    )
    listen_database_url: str | None = None
    lease_seconds: float = Field(default=30.0, gt=0)
    poll_interval_seconds: float = Field(default=1.0, gt=0)
    drain_timeout_seconds: float = Field(default=30.0, ge=0)
    # How long a starting worker waits for a database that does not answer yet.
    startup_timeout_seconds: float = Field(default=60.0, ge=0, le=86400)
    listen: bool = True
    max_args_bytes: int = Field(default=1024 * 1024, gt=0)
    # Backpressure: queue name → most queued jobs; enqueue beyond raises QueueFull.
    queue_depth_limits: dict[str, Annotated[int, Field(gt=0)]] = Field(default_factory=dict)
    queue_depth_cache_seconds: float = Field(default=1.0, ge=0)
    concurrency: int = Field(default=10, ge=1, le=10_000)
    # Jobs claimed ahead of a free slot; unset: as many as the concurrency.
    prefetch: int | None = Field(default=None, ge=0, le=10_000)
    pool_size: int = Field(default=10, ge=2)
    # Threads for plain def handlers; unset: the concurrency, at most 32.
    handler_threads: int | None = Field(default=None, ge=1, le=1000)
    # Processes for run_in="process" handlers; unset: the CPUs, at most the concurrency.
    handler_processes: int | None = Field(default=None, ge=1, le=1000)
    prepared_statements: bool = True
    # At most MAX_DELAY_SECONDS: a retry must land on a run_at the table takes (years 1 to 9999).
    retry_base_seconds: float = Field(default=1.0, gt=0, le=MAX_DELAY_SECONDS, allow_inf_nan=False)
    retry_cap_seconds: float = Field(
        default=3600.0, gt=0, le=MAX_DELAY_SECONDS, allow_inf_nan=False
    )
    retention_succeeded: Duration = timedelta(days=7)
    retention_cancelled: Duration = timedelta(days=7)
    retention_dead: Duration = timedelta(days=30)
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    uvloop: bool = True

    @field_validator("database_url", "listen_database_url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value:
            return asyncpg_dsn(value)
        return value

    def require_database_url(self) -> str:
        if not self.database_url:
            raise ConfigError("DATABASE_URL is not set")
        return self.database_url

    def worker_options(self, *, queues: tuple[str, ...] = (), burst: bool = False) -> WorkerOptions:
        """The worker's options: the one mapping of these settings (and of the two that only
        ``run``'s flags give, ``--queues`` and ``--burst``) onto WorkerOptions' own names.
        ``prune_interval`` and ``metrics_interval`` have no setting and keep their defaults;
        tests/test_cli_options.py fails when an option or a setting is left unmapped."""
        # Imported here: the worker imports this module (through db), not the other way round.
        from outbox_worker.worker import WorkerOptions

        return WorkerOptions(
            dsn=self.require_database_url(),
            queues=queues,
            burst=burst,
            concurrency=self.concurrency,
            prefetch=self.prefetch,
            lease_seconds=self.lease_seconds,
            poll_interval=self.poll_interval_seconds,
            drain_timeout=self.drain_timeout_seconds,
            startup_timeout=self.startup_timeout_seconds,
            listen=self.listen,
            listen_dsn=self.listen_database_url,
            pool_size=self.pool_size,
            handler_threads=self.handler_threads,
            handler_processes=self.handler_processes,
            prepared_statements=self.prepared_statements,
            retry_base=self.retry_base_seconds,
            retry_cap=self.retry_cap_seconds,
            retention={
                "succeeded": self.retention_succeeded,
                "cancelled": self.retention_cancelled,
                "dead": self.retention_dead,
            },
        )

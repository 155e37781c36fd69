"""``WorkerSettings.worker_options``: the one mapping of the environment (and ``run``'s flags)
onto a worker's options, whose names differ (``poll_interval_seconds`` is ``poll_interval``).

An option that nothing sets, or a worker setting that reaches no option, fails here instead
of being silently left at its default.
"""

from __future__ import annotations

import dataclasses
import os
from datetime import timedelta
from typing import Any

import pytest

from outbox_worker.config import WorkerSettings
from outbox_worker.errors import ConfigError
from outbox_worker.worker import WorkerOptions

URL = "postgresql://app@db.internal/app"
# The URL every test's settings start from, unlike DISTINCT's.
BASE_URL = "postgresql://base@db.internal/base"

# A value for every setting, unlike both its own default and the default of the option it
# maps to, so that a value carried over can be told from a default left alone.
DISTINCT: dict[str, Any] = {
    "database_url": URL,
    "listen_database_url": "postgresql://app@db.direct/app",
    "lease_seconds": 45.0,
    "poll_interval_seconds": 0.25,
    "drain_timeout_seconds": 12.0,
    "startup_timeout_seconds": 5.0,
    "listen": False,
    "max_args_bytes": 4096,
    "queue_depth_limits": {"mail": 100},
    "queue_depth_cache_seconds": 3.0,
    "concurrency": 7,
    "prefetch": 4,
    "pool_size": 3,
    "handler_threads": 5,
    "handler_processes": 2,
    "prepared_statements": False,
    "retry_base_seconds": 2.0,
    "retry_cap_seconds": 60.0,
    "retention_succeeded": timedelta(days=1),
    "retention_cancelled": timedelta(days=2),
    "retention_dead": timedelta(days=3),
    "log_format": "json",
    "log_level": "debug",
    "uvloop": False,
}
# Options no setting gives: the code's own defaults.
OPTIONS_WITHOUT_A_SETTING = {"prune_interval", "metrics_interval"}
# Settings read by other parts (enqueue, logging, the CLI's event loop), not by the worker.
SETTINGS_FOR_OTHER_PARTS = {
    "max_args_bytes",
    "queue_depth_limits",
    "queue_depth_cache_seconds",
    "log_format",
    "log_level",
    "uvloop",
}


@pytest.fixture(autouse=True)
def no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the values a test gives: nothing from the environment of the run."""
    for name in list(os.environ):
        if name == "DATABASE_URL" or name.startswith("OUTBOX_"):
            monkeypatch.delenv(name)


def settings(**values: Any) -> WorkerSettings:
    """Settings as the CLI builds them: field names, validated."""
    return WorkerSettings.model_validate({"database_url": BASE_URL, **values})


def test_every_setting_is_accounted_for() -> None:
    assert set(DISTINCT) == set(WorkerSettings.model_fields)


def test_every_option_has_a_source() -> None:
    options = settings(**DISTINCT).worker_options(queues=("mail",), burst=True)
    defaults = WorkerOptions(dsn="")
    left_at_default = {
        field.name
        for field in dataclasses.fields(WorkerOptions)
        if getattr(options, field.name) == getattr(defaults, field.name)
    }
    assert left_at_default == OPTIONS_WITHOUT_A_SETTING, (
        "map each new WorkerOptions field in WorkerSettings.worker_options (or name it in "
        "OPTIONS_WITHOUT_A_SETTING if no setting or flag gives it)"
    )


def test_the_values_reach_the_options_by_their_own_names() -> None:
    options = settings(**DISTINCT).worker_options(queues=("mail",), burst=True)
    assert options == WorkerOptions(
        dsn=URL,
        queues=("mail",),
        burst=True,
        concurrency=7,
        prefetch=4,
        lease_seconds=45.0,
        poll_interval=0.25,
        drain_timeout=12.0,
        startup_timeout=5.0,
        listen=False,
        listen_dsn="postgresql://app@db.direct/app",
        pool_size=3,
        handler_threads=5,
        handler_processes=2,
        prepared_statements=False,
        retry_base=2.0,
        retry_cap=60.0,
        retention={
            "succeeded": timedelta(days=1),
            "cancelled": timedelta(days=2),
            "dead": timedelta(days=3),
        },
    )


@pytest.mark.parametrize("name", sorted(set(DISTINCT) - SETTINGS_FOR_OTHER_PARTS))
def test_every_worker_setting_changes_the_options(name: str) -> None:
    assert settings().worker_options() != settings(**{name: DISTINCT[name]}).worker_options()


@pytest.mark.parametrize("name", sorted(SETTINGS_FOR_OTHER_PARTS))
def test_the_settings_of_other_parts_leave_the_options_alone(name: str) -> None:
    assert settings().worker_options() == settings(**{name: DISTINCT[name]}).worker_options()


def test_no_database_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="DATABASE_URL"):
        WorkerSettings.model_validate({}).worker_options()

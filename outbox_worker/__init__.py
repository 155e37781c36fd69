"""pgoutbox: a durable job queue for FastAPI services that needs nothing but PostgreSQL.

The public API is this package's ``__all__`` and the modules ``outbox_worker.sync``,
``outbox_worker.testing``, ``outbox_worker.web`` and ``outbox_worker.devdb``; every other
module is internal and may change in any release.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from outbox_worker.config import asyncpg_dsn, sqlalchemy_url
from outbox_worker.context import JobContext, current_correlation_id
from outbox_worker.control import CancelJob, JobControl, RetryJob, SnoozeJob
from outbox_worker.enqueue_plans import NewJob
from outbox_worker.errors import (
    ArgsTooLarge,
    ConfigError,
    DatabaseUnavailable,
    EnqueueError,
    HandlerProcessDied,
    InvalidArgs,
    InvalidName,
    InvalidOption,
    InvalidRequest,
    JobNotFound,
    JobStateConflict,
    JobWaitTimeout,
    LeaseLost,
    OutboxError,
    QueueFull,
    TaskDefinitionError,
    UnknownTask,
    WrongSession,
)
from outbox_worker.jobs import Job, JobState
from outbox_worker.keys import ActiveKey, Debounce, Throttle
from outbox_worker.registry import DeclaredTask, Registry, RetryPolicy, SyncTask, Task
from outbox_worker.waiting import wait_for_job
from outbox_worker.worker import Worker, WorkerOptions

if TYPE_CHECKING:
    from outbox_worker.admin import WorkerInfo, get_job, refresh_gauges, workers_alive
    from outbox_worker.client import Outbox, SyncOutbox, enqueue, enqueue_many

# Imported on first use: they bring SQLAlchemy, which a worker process does not need (an
# app that enqueues has it loaded anyway), and which would cost every worker 25 MB.
_LAZY = {
    "WorkerInfo": "outbox_worker.admin",
    "get_job": "outbox_worker.admin",
    "refresh_gauges": "outbox_worker.admin",
    "workers_alive": "outbox_worker.admin",
    "Outbox": "outbox_worker.client",
    "SyncOutbox": "outbox_worker.client",
    "enqueue": "outbox_worker.client",
    "enqueue_many": "outbox_worker.client",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'outbox_worker' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "ActiveKey",
    "ArgsTooLarge",
    "CancelJob",
    "ConfigError",
    "DatabaseUnavailable",
    "Debounce",
    "DeclaredTask",
    "EnqueueError",
    "HandlerProcessDied",
    "InvalidArgs",
    "InvalidName",
    "InvalidOption",
    "InvalidRequest",
    "Job",
    "JobContext",
    "JobControl",
    "JobNotFound",
    "JobState",
    "JobStateConflict",
    "JobWaitTimeout",
    "LeaseLost",
    "NewJob",
    "Outbox",
    "OutboxError",
    "QueueFull",
    "Registry",
    "RetryJob",
    "RetryPolicy",
    "SnoozeJob",
    "SyncOutbox",
    "SyncTask",
    "Task",
    "TaskDefinitionError",
    "Throttle",
    "UnknownTask",
    "Worker",
    "WorkerInfo",
    "WorkerOptions",
    "WrongSession",
    "asyncpg_dsn",
    "current_correlation_id",
    "enqueue",
    "enqueue_many",
    "get_job",
    "refresh_gauges",
    "sqlalchemy_url",
    "wait_for_job",
    "workers_alive",
]

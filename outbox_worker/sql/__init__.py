"""Every statement of the queue, one named constant each (noun, then verb: JOB_CLAIM), by
the side that runs it:

- ``client``: app-side, in the caller's transaction on any driver (enqueue, the test
  helpers' reads); ``:name`` parameters, rendered per driver by outbox_worker.drivers.
- ``admin``: the admin service's reads and changes (CLI, HTTP API, dashboard) on a
  SQLAlchemy session; ``:name`` parameters.
- ``worker``: the worker's asyncpg statements, each declaring its parameters, rendered into
  ``$n`` once at import and bound by name with :func:`bind`.
- ``_params``: the helpers that render, declare and bind parameters.

Everything is re-exported here, so ``from outbox_worker import sql; sql.JOB_CLAIM`` reads the
same whichever module holds it. ``tests/test_sql.py`` prepares every statement against the
migrated schema and checks each declaration against the server's view of its parameters.
"""

from __future__ import annotations

from outbox_worker.sql._params import (
    bind,
    declared,
    parameter_names,
    positional,
    pyformat,
    statement,
)
from outbox_worker.sql.admin import (
    JOB_CANCEL_QUEUED,
    JOB_GET,
    JOB_GET_FOR_UPDATE,
    JOB_LIST,
    JOB_PRUNE_FINISHED,
    JOB_REQUEST_CANCEL,
    JOB_RETRY,
    JOB_RETRY_DEAD_MANY,
    QUEUE_ACTIVE_STATS,
    QUEUE_FINISHED_STATS,
    QUEUE_PAUSE,
    QUEUE_RESUME,
    QUEUE_SET_CONCURRENCY,
    QUEUE_SETTINGS_LIST,
    SCHEDULES_LIST,
    WORKERS_ALIVE,
)
from outbox_worker.sql.client import (
    JOB_DELETE_ALL,
    JOB_FIND,
    JOB_FIND_KEYED,
    JOB_INSERT,
    JOB_INSERT_MANY,
    JOB_INSERT_MANY_UNIFORM,
    JOB_LIST_NEWEST,
    JOB_SELECT_LIST,
    QUEUE_DEPTH_UPTO,
)
from outbox_worker.sql.worker import (
    DONE_CHANNEL,
    JOB_CANCEL_MANY,
    JOB_CLAIM,
    JOB_CLAIM_LIMITED,
    JOB_COMPLETE_AND_CLAIM,
    JOB_COMPLETE_MANY,
    JOB_EXTEND_LEASES,
    JOB_FAIL_MANY,
    JOB_GET_PG,
    JOB_PRUNE_FINISHED_PG,
    JOB_RELEASE_MANY,
    JOB_RELEASE_ORPHANS,
    JOB_RESCUE_EXPIRED,
    JOB_SNOOZE_MANY,
    JOB_UNCLAIM_MANY,
    JOB_WATCH,
    MAINTENANCE_TRY_LOCK,
    NOTIFY_CHANNEL,
    QUEUES_WATCH,
    READY_MAINTAIN,
    SCHEDULE_ADVANCE,
    SCHEDULE_DECLARE,
    SCHEDULES_DUE,
    SCHEDULES_SOONEST,
    SCHEMA_PROBE,
    WORKER_DELETE,
    WORKER_HEARTBEAT,
    WORKERS_ALIVE_PG,
    fence,
)

__all__ = [
    "DONE_CHANNEL",
    "JOB_CANCEL_MANY",
    "JOB_CANCEL_QUEUED",
    "JOB_CLAIM",
    "JOB_CLAIM_LIMITED",
    "JOB_COMPLETE_AND_CLAIM",
    "JOB_COMPLETE_MANY",
    "JOB_DELETE_ALL",
    "JOB_EXTEND_LEASES",
    "JOB_FAIL_MANY",
    "JOB_FIND",
    "JOB_FIND_KEYED",
    "JOB_GET",
    "JOB_GET_FOR_UPDATE",
    "JOB_GET_PG",
    "JOB_INSERT",
    "JOB_INSERT_MANY",
    "JOB_INSERT_MANY_UNIFORM",
    "JOB_LIST",
    "JOB_LIST_NEWEST",
    "JOB_PRUNE_FINISHED",
    "JOB_PRUNE_FINISHED_PG",
    "JOB_RELEASE_MANY",
    "JOB_RELEASE_ORPHANS",
    "JOB_REQUEST_CANCEL",
    "JOB_RESCUE_EXPIRED",
    "JOB_RETRY",
    "JOB_RETRY_DEAD_MANY",
    "JOB_SELECT_LIST",
    "JOB_SNOOZE_MANY",
    "JOB_UNCLAIM_MANY",
    "JOB_WATCH",
    "MAINTENANCE_TRY_LOCK",
    "NOTIFY_CHANNEL",
    "QUEUES_WATCH",
    "QUEUE_ACTIVE_STATS",
    "QUEUE_DEPTH_UPTO",
    "QUEUE_FINISHED_STATS",
    "QUEUE_PAUSE",
    "QUEUE_RESUME",
    "QUEUE_SETTINGS_LIST",
    "QUEUE_SET_CONCURRENCY",
    "READY_MAINTAIN",
    "SCHEDULES_DUE",
    "SCHEDULES_LIST",
    "SCHEDULES_SOONEST",
    "SCHEDULE_ADVANCE",
    "SCHEDULE_DECLARE",
    "SCHEMA_PROBE",
    "WORKERS_ALIVE",
    "WORKERS_ALIVE_PG",
    "WORKER_DELETE",
    "WORKER_HEARTBEAT",
    "bind",
    "declared",
    "fence",
    "parameter_names",
    "positional",
    "pyformat",
    "statement",
]

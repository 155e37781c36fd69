"""Enqueue from sync code: a SQLAlchemy Session or Connection (SQLModel's too) on psycopg 3 or
psycopg2, or a raw psycopg 3 Connection.

``enqueue`` and ``enqueue_many`` take the parameters of ``outbox_worker.enqueue`` and
``enqueue_many`` and return the Job(s) themselves, not an awaitable; they join the caller's
transaction and never commit. They are the module-level functions' sync twins (settings from
the environment, names from every live registry); an Outbox has its own, ``outbox.sync``.

``wait_for_job`` is ``outbox_worker.wait_for_job`` for a script or a sync view: it blocks
until the job finishes, on a connection of its own to the database URL.
"""

from __future__ import annotations

import asyncio

from outbox_worker.client import _ENVIRONMENT
from outbox_worker.errors import WrongSession
from outbox_worker.jobs import Job
from outbox_worker.waiting import DEFAULT_POLL_INTERVAL
from outbox_worker.waiting import wait_for_job as _wait_for_job

enqueue = _ENVIRONMENT.sync.enqueue
enqueue_many = _ENVIRONMENT.sync.enqueue_many


def wait_for_job(
    database_url: str,
    job_id: int,
    *,
    timeout: float,
    poll_interval: float = DEFAULT_POLL_INTERVAL,
) -> Job:
    """Block until job ``job_id`` finishes and return it; :class:`JobWaitTimeout` after
    ``timeout`` seconds. Not from inside an event loop: there, await
    ``outbox_worker.wait_for_job``."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(
            _wait_for_job(database_url, job_id, timeout=timeout, poll_interval=poll_interval)
        )
    raise WrongSession(
        "outbox_worker.sync.wait_for_job blocks, so it cannot run in an event loop: "
        "await outbox_worker.wait_for_job(...) there"
    )


__all__ = ["enqueue", "enqueue_many", "wait_for_job"]

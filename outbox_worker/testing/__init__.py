"""Helpers for testing an app that uses pgoutbox, against the PostgreSQL it really uses.

- :func:`assert_enqueued` and :func:`refute_enqueued`: what the code under test enqueued, read
  through the test's own session or connection, so an uncommitted transaction counts too.
- :func:`drain`: run the due jobs in this process as a worker would: claimed, run by the
  worker's Executor, and their outcomes written by the worker's fenced statements.
- :func:`perform_job`: call one handler with a real JobContext and no job row, to unit-test it.
- :func:`clear_jobs`: an empty queue for the next test.

The helpers that read or clear the table take every async session or connection enqueue
takes; ``outbox_worker.testing.sync`` has their twins for a sync session, and a sync
``drain`` and ``perform_job``, for a sync test suite. Each of them is a plan, as an enqueue
is (outbox_worker.enqueue_plans), run by outbox_worker.drivers: one search and one failure message
whatever the session. docs/testing.md shows them in a FastAPI app's tests.

Each job has a private module: ``_assertions`` (with the plans ``sync`` shares), ``_drain``
and ``_perform``; this one re-exports them.
"""

from __future__ import annotations

# SHOWN_JOBS and DRAIN_LEASE_SECONDS, the limits docs/testing.md states, stay importable
# from here, though not in __all__.
from outbox_worker.testing._assertions import SHOWN_JOBS as SHOWN_JOBS
from outbox_worker.testing._assertions import assert_enqueued, clear_jobs, refute_enqueued
from outbox_worker.testing._drain import DRAIN_LEASE_SECONDS as DRAIN_LEASE_SECONDS
from outbox_worker.testing._drain import DrainResult, drain
from outbox_worker.testing._perform import perform_job

__all__ = [
    "DrainResult",
    "assert_enqueued",
    "clear_jobs",
    "drain",
    "perform_job",
    "refute_enqueued",
]

"""Enqueue from sync code: a SQLAlchemy Session or Connection (SQLModel's too) on psycopg 3 or
psycopg2, or a raw psycopg 3 Connection.

``enqueue`` and ``enqueue_many`` take the parameters of ``outbox_worker.enqueue`` and
``enqueue_many`` and return the Job(s) themselves, not an awaitable; they join the caller's
transaction and never commit. They are the module-level functions' sync twins (settings from
the environment, names from every live registry); an Outbox has its own, ``outbox.sync``.
"""

from __future__ import annotations

from outbox_worker.client import _ENVIRONMENT

enqueue = _ENVIRONMENT.sync.enqueue
enqueue_many = _ENVIRONMENT.sync.enqueue_many

__all__ = ["enqueue", "enqueue_many"]

"""A job row written by plain SQL, as docs/table.md offers any service: the bench's floor for
an enqueue that is one statement of the caller's session, with no pgoutbox code on the path.

It writes the row ``enqueue`` writes (run_at now, no correlation id); with a key that
exists already it writes nothing and returns no id.
"""

from __future__ import annotations

from sqlalchemy import text

JOB_INSERT = text(
    """
INSERT INTO outbox_jobs (queue, task, args, priority, max_attempts, dedupe_key)
VALUES (:queue, :task, CAST(:args AS jsonb), :priority, :max_attempts, :dedupe_key)
ON CONFLICT (task, dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING
RETURNING id
"""
)

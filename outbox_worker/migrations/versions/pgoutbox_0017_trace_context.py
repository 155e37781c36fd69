"""outbox_jobs.trace_context: the W3C trace context of whoever enqueued the job.

A JSON object of the propagation headers (``traceparent``, ``tracestate``) taken at enqueue
when OpenTelemetry is installed, so that the span of each run links back to the request
that caused the job, whichever process or host runs it. NULL when no trace was active.

Revision ID: pgoutbox_0017
Revises: pgoutbox_0016
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "pgoutbox_0017"
down_revision: str | None = "pgoutbox_0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE outbox_jobs
            ADD COLUMN trace_context jsonb
                CONSTRAINT outbox_jobs_trace_context_object
                    CHECK (jsonb_typeof(trace_context) = 'object')
        """
    )


def downgrade() -> None:
    op.execute("ALTER TABLE outbox_jobs DROP COLUMN IF EXISTS trace_context")

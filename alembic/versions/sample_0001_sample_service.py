"""The sample service's tables: users, comments, reports, sent_emails.

The base of the sample's own branch. It depends on the library's first revision, which
creates outbox_jobs: reports.job_id and sent_emails.job_id hold its ids.

Revision ID: sample_0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "sample_0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = ("sample",)
depends_on: str | Sequence[str] | None = "pgoutbox_0001"

UPGRADE = [
    """
    CREATE TABLE users (
        id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        email      text NOT NULL,
        name       text,
        created_at timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT users_email_key UNIQUE (email)
    )
    """,
    """
    CREATE TABLE comments (
        id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        author     text NOT NULL,
        body       text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now()
    )
    """,
    """
    CREATE TABLE reports (
        id              uuid PRIMARY KEY,
        status          text NOT NULL DEFAULT 'queued',
        params          jsonb NOT NULL DEFAULT '{}'::jsonb,
        result          jsonb,
        idempotency_key text,
        job_id          bigint,
        created_at      timestamptz NOT NULL DEFAULT now(),
        finished_at     timestamptz,
        CONSTRAINT reports_idempotency_key_key UNIQUE (idempotency_key)
    )
    """,
    """
    CREATE TABLE sent_emails (
        job_id     bigint PRIMARY KEY,
        user_id    bigint NOT NULL REFERENCES users (id),
        to_address text NOT NULL,
        subject    text NOT NULL,
        body       text NOT NULL,
        sent_at    timestamptz NOT NULL DEFAULT now()
    )
    """,
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS sent_emails, reports, comments, users")

"""outbox_revoked_sessions: dashboard sessions signed out before their cookie expires.

The dashboard's cookie is stateless (a session id and its sign-in time, signed with the admin
token), so signing out cannot take it back from a copy: the session id is kept here until
the cookie would have expired anyway, and every dashboard request checks it. The table holds
only sessions signed out in the last 12 hours; each sign-out prunes the expired ones.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE outbox_revoked_sessions (
            id         text PRIMARY KEY,
            expires_at timestamptz NOT NULL
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS outbox_revoked_sessions")

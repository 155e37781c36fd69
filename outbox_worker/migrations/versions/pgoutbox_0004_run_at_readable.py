"""run_at within what every client can read: a finite timestamp from year 1 to year 9999.

Python's datetime, and so asyncpg, cannot hold a timestamptz before year 1 or after 9999:
reading such a row raises OverflowError, so one job written by plain SQL with run_at
'0001-01-01 BC' or '10000-01-01' broke every listing that included it (CLI, dashboard,
GET /jobs). 'infinity' and '-infinity' come back as naive datetimes, which cannot be compared
with the aware ones everywhere else.

Rows already outside the range move to its edge first, which changes nothing about when they
run: due since before year 1 is as due at year 1, and not due before year 10000 is as far off
at the end of 9999. The constraint is then added NOT VALID and validated, so the check of
existing rows does not block writers.

Revision ID: pgoutbox_0004
Revises: pgoutbox_0003
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "pgoutbox_0004"
down_revision: str | None = "pgoutbox_0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FIRST = "'0001-01-01 00:00:00+00'"
PAST_LAST = "'10000-01-01 00:00:00+00'"
LAST = "'9999-12-31 23:59:59.999999+00'"
NAME = "outbox_jobs_run_at_readable"


def upgrade() -> None:
    op.execute(f"UPDATE outbox_jobs SET run_at = {FIRST} WHERE run_at < {FIRST}")
    op.execute(f"UPDATE outbox_jobs SET run_at = {LAST} WHERE run_at >= {PAST_LAST}")
    op.execute(
        f"ALTER TABLE outbox_jobs ADD CONSTRAINT {NAME} "
        f"CHECK (run_at >= {FIRST} AND run_at < {PAST_LAST}) NOT VALID"
    )
    op.execute(f"ALTER TABLE outbox_jobs VALIDATE CONSTRAINT {NAME}")


def downgrade() -> None:
    op.execute(f"ALTER TABLE outbox_jobs DROP CONSTRAINT {NAME}")

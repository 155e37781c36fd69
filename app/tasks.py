"""The service's jobs: ``outbox-worker run app.tasks:registry``."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

import asyncpg

from app.mailer import DatabaseMailer, EmailMessage, Mailer
from outbox_worker import JobContext, Registry

registry = Registry()
mailer: Mailer = DatabaseMailer()


@registry.task(queue="emails", max_attempts=8, timeout=60)
async def send_welcome_email(ctx: JobContext, user_id: int) -> dict[str, Any]:
    async with ctx.transaction() as conn:
        user = await conn.fetchrow("SELECT email, name FROM users WHERE id = $1", user_id)
        if user is None:
            ctx.log.warning("welcome_email_skipped", reason="user no longer exists")
            return {"sent": False}
        greeting = f"Hello {user['name']}," if user["name"] else "Hello,"
        await mailer.send(
            conn,
            idempotency_key=ctx.job_id,
            user_id=user_id,
            message=EmailMessage(
                to=user["email"],
                subject="Welcome to pgoutbox",
                body=f"{greeting}\n\nyour account is ready.\n",
            ),
        )
        result: dict[str, Any] = {"sent": True, "to": user["email"]}
        ctx.result = result
    ctx.log.info("welcome_email_sent", user_id=user_id)
    return result


# $1 since, $2 until (either NULL for an open end).
REPORT_SQL = """
WITH w AS (
    SELECT coalesce($1::timestamptz, '-infinity') AS since,
           coalesce($2::timestamptz, 'infinity') AS until
)
SELECT
    (SELECT count(*) FROM users, w WHERE created_at >= w.since AND created_at < w.until)
        AS new_users,
    (SELECT count(*) FROM comments, w WHERE created_at >= w.since AND created_at < w.until)
        AS comments,
    (SELECT count(DISTINCT author) FROM comments, w
      WHERE created_at >= w.since AND created_at < w.until) AS active_authors,
    (SELECT count(*) FROM users) AS total_users,
    (SELECT count(*) FROM comments) AS total_comments
"""

# $1 since, $2 until, $3 how many.
RECENT_COMMENTS_SQL = """
SELECT id, author, left(body, 200) AS body, created_at
FROM comments
WHERE created_at >= coalesce($1::timestamptz, '-infinity')
  AND created_at < coalesce($2::timestamptz, 'infinity')
ORDER BY created_at DESC, id DESC
LIMIT $3
"""


def _moment(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


@registry.task(queue="reports", max_attempts=5, timeout=300)
async def generate_report(ctx: JobContext, report_id: str) -> dict[str, Any]:
    """Computes the report and stores it, with status ``done``, in the same transaction
    that completes the job: a crash cannot leave a finished report with a pending job."""
    async with ctx.transaction() as conn:
        row = await conn.fetchrow(
            "SELECT params::text AS params FROM reports WHERE id = $1 FOR UPDATE",
            uuid.UUID(report_id),
        )
        if row is None:
            ctx.log.warning("report_skipped", reason="report row no longer exists")
            return {"report_id": report_id, "missing": True}
        params = json.loads(row["params"])
        since, until = _moment(params.get("since")), _moment(params.get("until"))
        counts = await conn.fetchrow(REPORT_SQL, since, until)
        recent = await conn.fetch(RECENT_COMMENTS_SQL, since, until, params.get("recent_limit", 5))
        result = {
            "window": {"since": params.get("since"), "until": params.get("until")},
            **dict(counts),
            "recent_comments": [_comment(r) for r in recent],
        }
        await conn.execute(
            "UPDATE reports SET status = 'done', result = $2::jsonb, finished_at = now() "
            "WHERE id = $1",
            uuid.UUID(report_id),
            json.dumps(result),
        )
        ctx.result = {"report_id": report_id}
    return {"report_id": report_id}


def _comment(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": row["id"],
        "author": row["author"],
        "body": row["body"],
        "created_at": row["created_at"].isoformat(),
    }

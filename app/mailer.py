"""How the service sends e-mail. The default records each message in ``sent_emails`` keyed
by the job that sent it, inside the job's transaction: a retry cannot send twice. Each send is
a span, which OpenTelemetry, when configured, records as a child of the job's run
(docs/operating.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import asyncpg
from opentelemetry import trace


@dataclass(frozen=True, slots=True)
class EmailMessage:
    to: str
    subject: str
    body: str


class Mailer(Protocol):
    async def send(
        self,
        conn: asyncpg.Connection,
        *,
        idempotency_key: int,
        user_id: int,
        message: EmailMessage,
    ) -> None:
        """Send once per ``idempotency_key``. An SMTP or HTTP mailer passes the key to its
        provider (most accept one) so that a retried job does not mail twice."""


_tracer = trace.get_tracer("app.mailer")


class DatabaseMailer:
    async def send(
        self,
        conn: asyncpg.Connection,
        *,
        idempotency_key: int,
        user_id: int,
        message: EmailMessage,
    ) -> None:
        with _tracer.start_as_current_span("send email", kind=trace.SpanKind.CLIENT):
            await conn.execute(
                "INSERT INTO sent_emails (job_id, user_id, to_address, subject, body) "
                "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (job_id) DO NOTHING",
                idempotency_key,
                user_id,
                message.to,
                message.subject,
                message.body,
            )

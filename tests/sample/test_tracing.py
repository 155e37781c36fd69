"""The sample service traced end to end, as docs/operating.md's Traces tells it: a sign-up
whose request carries a W3C ``traceparent`` is traced by FastAPI; its welcome e-mail is
enqueued in a send span of that trace, whose context the job's row keeps; a worker runs the
job in a process span linked to that send span, and the mailer's span is a child of the run."""

from __future__ import annotations

import json

import asyncpg
import httpx
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind

from app.tasks import registry
from outbox_worker.web import REQUEST_ID_HEADER
from outbox_worker.worker import Worker, WorkerOptions
from tests.tracing_support import named, recording, traceparent

# The caller's span, as the client that sent the request would have it.
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


def _span_id(span: ReadableSpan) -> int:
    context = span.get_span_context()
    assert context is not None
    return context.span_id


def _trace_id(span: ReadableSpan) -> int:
    context = span.get_span_context()
    assert context is not None
    return context.trace_id


def _ancestors(span: ReadableSpan, spans: tuple[ReadableSpan, ...]) -> list[ReadableSpan]:
    """The span's parent, its parent's, and so on, as far as the recorded spans go."""
    by_id = {_span_id(s): s for s in spans}
    found = []
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
        found.append(span)
    return found


async def test_a_traced_sign_up_links_the_run_of_its_welcome_email_to_the_request(
    client: httpx.AsyncClient, database_url: str, pool: asyncpg.Pool
) -> None:
    with recording() as spans:
        response = await client.post(
            "/signup",
            json={"email": "ada@example.com", "name": "Ada"},
            headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"},
        )
        assert response.status_code == 201, response.text
        job_id = response.json()["job_id"]
        stored = await pool.fetchval(
            "SELECT trace_context::text FROM outbox_jobs WHERE id = $1", job_id
        )
        options = WorkerOptions(dsn=database_url, burst=True, poll_interval=0.05, listen=False)
        await Worker(registry, options).run()
        finished = spans.get_finished_spans()
        [server] = [span for span in finished if span.kind is SpanKind.SERVER]
        [send] = named(spans, "send emails")
        [run] = named(spans, "process emails")
        [mail] = named(spans, "send email")

    # The request continues the caller's trace, and the enqueue is part of the request.
    assert server.parent is not None
    assert server.parent.span_id == int(CALLER_SPAN, 16)
    assert _trace_id(server) == _trace_id(send) == int(CALLER_TRACE, 16)
    assert server in _ancestors(send, finished)
    assert send.kind is SpanKind.PRODUCER
    assert json.loads(stored) == {"traceparent": traceparent(send)}

    # The run: its own trace, linked to the send span; the mailer's span is its child.
    assert run.kind is SpanKind.CONSUMER
    assert run.parent is None
    assert [(link.context.trace_id, link.context.span_id) for link in run.links] == [
        (_trace_id(send), _span_id(send))
    ]
    assert dict(run.attributes or {}) | {"messaging.client.id": None} == {
        "messaging.system": "pgoutbox",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "emails",
        "messaging.message.id": str(job_id),
        "messaging.message.conversation_id": response.headers[REQUEST_ID_HEADER],
        "messaging.client.id": None,
        "pgoutbox.task": "send_welcome_email",
        "pgoutbox.job.attempt": 1,
        "pgoutbox.job.max_attempts": 8,
    }
    assert mail.parent is not None
    assert mail.parent.span_id == _span_id(run)
    assert await pool.fetchval("SELECT job_id FROM sent_emails") == job_id

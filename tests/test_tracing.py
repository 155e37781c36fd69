"""OpenTelemetry (outbox_worker.tracing): an enqueue made in a span is a PRODUCER span whose
context its rows store, on every session and connection an app may hold; no span, no
context. A run is a CONSUMER span linked to that span, current while the handler runs (in its
threads too); the errors of both are recorded. Without opentelemetry importable, enqueue and
run work as before. The sample service's request-to-run story is tests/sample/test_tracing.py.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, SpanKind, StatusCode
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

import outbox_worker
from outbox_worker import JobContext, NewJob, Registry, SnoozeJob, sql
from outbox_worker._worker.claims import ClaimedJob
from outbox_worker.testing import drain
from tests import offload_tasks
from tests.admin_support import AUTH
from tests.cli_support import cli, ok, ok_json
from tests.conftest import ROOT
from tests.dashboard_support import SIGNED_IN
from tests.drivers_support import Caller
from tests.tracing_support import named, recording, traceparent

tracer = trace.get_tracer("tests")
registry = Registry()
QUEUE = "traced"


@registry.task(queue=QUEUE)
async def tracing_work(ctx: JobContext) -> None:
    with tracer.start_as_current_span("handler work"):
        await asyncio.to_thread(_in_a_thread)


def _in_a_thread() -> None:
    with tracer.start_as_current_span("work in a thread"):
        pass


@registry.task(queue=QUEUE, max_attempts=1)
async def tracing_failure(ctx: JobContext) -> None:
    raise ValueError("the handler failed")


@registry.task(queue=QUEUE)
async def tracing_snooze(ctx: JobContext) -> None:
    raise SnoozeJob(60)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    with recording() as exporter:
        yield exporter


def _sends(spans: InMemorySpanExporter) -> list[ReadableSpan]:
    return [span for span in spans.get_finished_spans() if span.kind is SpanKind.PRODUCER]


async def _stored(pool: asyncpg.Pool) -> dict[int, Any]:
    """Each job's trace_context, decoded."""
    rows = await pool.fetch("SELECT id, trace_context::text AS tc FROM outbox_jobs ORDER BY id")
    return {r["id"]: None if r["tc"] is None else json.loads(r["tc"]) for r in rows}


def _context(span: ReadableSpan | trace.Span) -> SpanContext:
    context = span.get_span_context()
    assert context is not None
    return context


def _span_id(span: ReadableSpan | trace.Span) -> int:
    return _context(span).span_id


def _parent_id(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


def _attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


async def test_every_enqueue_stores_the_context_of_its_send_span(
    caller: Caller, pool: asyncpg.Pool, spans: InMemorySpanExporter
) -> None:
    with tracer.start_as_current_span("request") as request:
        one = await caller.enqueue("echo", {"n": 1})
        alike = await caller.enqueue_many([NewJob("echo", {"n": 2}), NewJob("echo", {"n": 3})])
        keyed = await caller.enqueue_many([NewJob("echo", {"n": 4}, key="four"), NewJob("noop")])
    untraced = await caller.enqueue("echo", {"n": 5})
    await caller.commit()

    sends = _sends(spans)
    assert [span.name for span in sends] == ["send default"] * 3
    assert [_parent_id(span) for span in sends] == [_span_id(request)] * 3
    single, batch, mixed = sends
    assert await _stored(pool) == {
        one.id: {"traceparent": traceparent(single)},
        alike[0].id: {"traceparent": traceparent(batch)},
        alike[1].id: {"traceparent": traceparent(batch)},
        keyed[0].id: {"traceparent": traceparent(mixed)},
        keyed[1].id: {"traceparent": traceparent(mixed)},
        untraced.id: None,
    }
    # The jobs enqueue returns carry it too.
    assert (one.trace_context, keyed[1].trace_context, untraced.trace_context) == (
        {"traceparent": traceparent(single)},
        {"traceparent": traceparent(mixed)},
        None,
    )
    assert _attributes(single) == {
        "messaging.system": "pgoutbox",
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.destination.name": "default",
        "pgoutbox.task": "echo",
        "messaging.message.id": str(one.id),
        "pgoutbox.job.duplicate": False,
    }
    assert _attributes(batch)["messaging.batch.message_count"] == 2
    assert "messaging.message.id" not in _attributes(batch)
    assert _attributes(batch)["pgoutbox.task"] == "echo"
    assert "pgoutbox.task" not in _attributes(mixed)  # echo and noop


async def test_a_duplicate_keeps_the_context_it_was_written_with(
    engine: AsyncEngine, pool: asyncpg.Pool, spans: InMemorySpanExporter, correlation: str
) -> None:
    async with AsyncSession(engine) as session:
        with tracer.start_as_current_span("first request"):
            first = await outbox_worker.enqueue(session, "echo", {"n": 1}, key="once")
        with tracer.start_as_current_span("second request"):
            again = await outbox_worker.enqueue(session, "echo", {"n": 2}, key="once")
        await session.commit()

    assert (again.id, again.duplicate) == (first.id, True)
    written, found = _sends(spans)
    assert _attributes(written)["pgoutbox.job.duplicate"] is False
    assert _attributes(found)["pgoutbox.job.duplicate"] is True
    assert _attributes(found)["messaging.message.id"] == str(first.id)
    assert _attributes(found)["messaging.message.conversation_id"] == correlation
    assert await _stored(pool) == {first.id: {"traceparent": traceparent(written)}}
    assert again.trace_context == {"traceparent": traceparent(written)}


async def test_the_job_s_json_page_and_cli_show_the_trace_of_its_enqueue(
    engine: AsyncEngine,
    admin_app: FastAPI,
    admin_client: httpx.AsyncClient,
    database_url: str,
    spans: InMemorySpanExporter,
) -> None:
    """Where an operator looking at a job finds the request that enqueued it."""
    async with AsyncSession(engine) as session:
        with tracer.start_as_current_span("request") as request:
            job = await outbox_worker.enqueue(session, "echo", {"n": 1})
        untraced = await outbox_worker.enqueue(session, "echo", {"n": 2})
        await session.commit()
    [send] = _sends(spans)
    trace_id = f"{_context(request).trace_id:032x}"
    assert job.trace_id == trace_id
    assert untraced.trace_id is None

    shown = await admin_client.get(f"/jobs/{job.id}", headers=AUTH)
    assert shown.status_code == 200, shown.text
    assert shown.json()["trace_context"] == {"traceparent": traceparent(send)}
    page = await admin_client.get(f"/dashboard/jobs/{job.id}", headers=SIGNED_IN)
    assert f'<td id="job-trace-id"><code>{trace_id}</code></td>' in page.text
    plain = await admin_client.get(f"/dashboard/jobs/{untraced.id}", headers=SIGNED_IN)
    assert plain.status_code == 200
    assert "job-trace-id" not in plain.text
    table = ok(await cli(database_url, "jobs", "show", str(job.id)))
    assert re.search(rf"trace id\s+│?\s*{trace_id}", table), table
    assert ok_json(await cli(database_url, "jobs", "show", str(job.id), "--json"))[
        "trace_context"
    ] == {"traceparent": traceparent(send)}


async def test_a_failed_enqueue_ends_its_span_with_the_error(
    pool: asyncpg.Pool, spans: InMemorySpanExporter
) -> None:
    async with pool.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        with pytest.raises(asyncpg.DivisionByZeroError):
            await conn.execute("SELECT 1 / 0")
        with (
            tracer.start_as_current_span("request"),
            pytest.raises(asyncpg.InFailedSQLTransactionError),
        ):
            await outbox_worker.enqueue(conn, "echo", {})
        await transaction.rollback()

    # Ended when the statement failed, not when the plan was collected.
    [send] = _sends(spans)
    assert send.status.status_code is StatusCode.ERROR
    assert _attributes(send)["error.type"] == "asyncpg.exceptions.InFailedSQLTransactionError"
    assert [event.name for event in send.events] == ["exception"]


async def test_a_run_is_a_consumer_span_linked_to_its_enqueue_and_parent_of_the_handlers_spans(
    engine: AsyncEngine, database_url: str, spans: InMemorySpanExporter, correlation: str
) -> None:
    async with AsyncSession(engine) as session:
        with tracer.start_as_current_span("request"):
            job = await outbox_worker.enqueue(session, "tracing_work")
        await session.commit()
    assert (await drain(registry, database_url)).succeeded == 1

    [send] = _sends(spans)
    [run] = named(spans, f"process {QUEUE}")
    assert run.kind is SpanKind.CONSUMER
    # Its own trace, linked to the enqueue's: a job outlives its request, and runs per attempt.
    assert run.parent is None
    assert _context(run).trace_id != _context(send).trace_id
    assert [(link.context.trace_id, link.context.span_id) for link in run.links] == [
        (_context(send).trace_id, _span_id(send))
    ]
    attributes = _attributes(run)
    assert str(attributes.pop("messaging.client.id")).startswith("drain:")
    assert attributes == {
        "messaging.system": "pgoutbox",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": QUEUE,
        "messaging.message.id": str(job.id),
        "messaging.message.conversation_id": correlation,
        "pgoutbox.task": "tracing_work",
        "pgoutbox.job.attempt": 1,
        "pgoutbox.job.max_attempts": 5,
    }
    assert run.status.status_code is StatusCode.UNSET
    [work] = named(spans, "handler work")
    [threaded] = named(spans, "work in a thread")
    assert _parent_id(work) == _span_id(run)
    assert _parent_id(threaded) == _span_id(work)


async def test_a_handler_in_a_process_runs_in_the_span_of_its_run(
    engine: AsyncEngine, database_url: str, pool: asyncpg.Pool, spans: InMemorySpanExporter
) -> None:
    """The run's span crosses to the handler process with the call: spans the handler makes
    there are its children."""
    async with AsyncSession(engine) as session:
        with tracer.start_as_current_span("request"):
            job = await outbox_worker.enqueue(session, "current_span")
        await session.commit()
    assert (await drain(offload_tasks.registry, database_url)).succeeded == 1
    [run] = named(spans, "process default")
    result = await pool.fetchval("SELECT result::text FROM outbox_jobs WHERE id = $1", job.id)
    assert json.loads(result) == {
        "trace_id": f"{_context(run).trace_id:032x}",
        "span_id": f"{_span_id(run):016x}",
    }


async def test_a_failed_run_records_its_error_and_a_snooze_does_not(
    engine: AsyncEngine, database_url: str, pool: asyncpg.Pool, spans: InMemorySpanExporter
) -> None:
    async with AsyncSession(engine) as session:
        await outbox_worker.enqueue_many(session, [NewJob("tracing_failure")])
        await outbox_worker.enqueue(session, "tracing_snooze")
        await session.commit()
    result = await drain(registry, database_url)
    assert (result.dead, result.snoozed) == (1, 1)

    assert _sends(spans) == []  # enqueued outside any span
    assert set((await _stored(pool)).values()) == {None}
    runs = {_attributes(span)["pgoutbox.task"]: span for span in named(spans, f"process {QUEUE}")}
    failed, snoozed = runs["tracing_failure"], runs["tracing_snooze"]
    assert (failed.links, snoozed.links) == ((), ())
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.status.description == "ValueError: the handler failed"
    assert _attributes(failed)["error.type"] == "ValueError"
    assert [event.name for event in failed.events] == ["exception"]
    # The handler chose that end: recorded, not an error.
    assert snoozed.status.status_code is StatusCode.UNSET
    assert "error.type" not in _attributes(snoozed)
    assert [event.name for event in snoozed.events] == ["exception"]


@pytest.mark.parametrize("limited", [False, True], ids=["open", "limited"])
async def test_every_claim_hands_over_the_trace_context(pool: asyncpg.Pool, limited: bool) -> None:
    """JOB_CLAIM and JOB_CLAIM_LIMITED, and the complete-and-claim of each: the claimed rows
    carry the job's trace_context, the rows of successes a NULL in its place."""
    if limited:
        await pool.execute("INSERT INTO outbox_queues (name, concurrency) VALUES ($1, 5)", QUEUE)
    contexts = [json.dumps({"traceparent": f"00-{n:032x}-{n:016x}-01"}) for n in (1, 2)]
    ids = [
        await pool.fetchval(
            "INSERT INTO outbox_jobs (queue, task, priority, trace_context)"
            " VALUES ($1, 'echo', $2, $3::jsonb) RETURNING id",
            QUEUE,
            priority,
            context,
        )
        for priority, context in zip((1, 0), contexts, strict=True)
    ]
    where = {"queue": QUEUE} if limited else {"queues": [QUEUE]}
    claim = sql.JOB_CLAIM_LIMITED if limited else sql.JOB_CLAIM
    [row] = await pool.fetch(
        *sql.bind(claim, **where, limit=1, ahead=0, worker_id="w", lease_seconds=30)
    )
    first = ClaimedJob.of(row)
    assert (first.id, json.loads(first.trace_context or "null")) == (
        ids[0],
        json.loads(contexts[0]),
    )

    again = sql.JOB_COMPLETE_AND_CLAIM_LIMITED if limited else sql.JOB_COMPLETE_AND_CLAIM
    rows = await pool.fetch(
        *sql.bind(
            again,
            **where,
            limit=1,
            ahead=0,
            worker_id="w",
            lease_seconds=30,
            ids=[first.id],
            attempts=[first.attempt],
            results=[None],
        )
    )
    [done] = [r for r in rows if not r["claimed"]]
    [claimed] = [ClaimedJob.of(r) for r in rows if r["claimed"]]
    assert (done["id"], done["trace_context"]) == (first.id, None)
    assert claimed.id == ids[1]
    assert json.loads(claimed.trace_context or "null") == json.loads(contexts[1])


# Run where opentelemetry cannot be imported, as without the otel extra: enqueue through
# asyncpg, and the job run by a drain.
_WITHOUT_OPENTELEMETRY = """
import asyncio, sys

sys.modules["opentelemetry"] = None

import asyncpg

import outbox_worker
from outbox_worker import Registry, tracing
from outbox_worker.testing import drain

registry = Registry()


@registry.task()
async def untraced(ctx):
    return "ran"


async def main(url):
    conn = await asyncpg.connect(url)
    async with conn.transaction():
        job = await outbox_worker.enqueue(conn, "untraced")
    result = await drain(registry, url)
    row = await conn.fetchrow(
        "SELECT state, result::text, trace_context FROM outbox_jobs WHERE id = $1", job.id
    )
    await conn.close()
    print(tracing.AVAILABLE, result.succeeded, *row)


asyncio.run(main(sys.argv[1]))
"""


async def test_without_opentelemetry_enqueue_and_run_work_untraced(database_url: str) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _WITHOUT_OPENTELEMETRY,
        database_url,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == 0, err.decode()
    # The last line is the script's; the drain's log lines come before it.
    assert out.decode().splitlines()[-1].split() == ["False", "1", "succeeded", '"ran"', "None"]

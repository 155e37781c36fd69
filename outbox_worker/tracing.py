"""OpenTelemetry traces of enqueues and runs, with the ``otel`` extra
(``pip install 'pgoutbox[otel]'``); docs/operating.md's Traces says what an operator sees.

An enqueue called while a span is current (a request's, say) runs in a PRODUCER span,
``send {queue}``, whose W3C trace context (what the global propagator injects:
``traceparent``, ``tracestate``) is stored in the job's ``trace_context``. Each attempt of
the job runs in a CONSUMER span, ``process {queue}``, linked to that span rather than its
child: a job runs seconds or days after its request, and once per attempt. The run's span is
current while the handler runs, so the handler's own spans are its children, in a handler
process too (its context crosses with the call).

Without opentelemetry importable, or with no span current at the enqueue, no span is made
and ``trace_context`` stays NULL; the import is tried once, here, and each call costs a
flag test.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from typing import TYPE_CHECKING, Any, TypeVar

from outbox_worker.control import CancelJob, SnoozeJob
from outbox_worker.formatting import error_line

if TYPE_CHECKING:
    from opentelemetry.context import Context

    from outbox_worker._worker.claims import ClaimedJob
    from outbox_worker.enqueue_checks import Row
    from outbox_worker.enqueue_plans import Plan
    from outbox_worker.jobs import Job

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
except ImportError:  # the otel extra is not installed: nothing is traced
    AVAILABLE = False
else:
    AVAILABLE = True
    _TRACER = trace.get_tracer("outbox_worker")

# messaging.system: pgoutbox is not one of the semantic conventions' well-known systems.
SYSTEM = "pgoutbox"

J = TypeVar("J", "Job", "list[Job]")

_UNTRACED: AbstractContextManager[None] = nullcontext()


def enqueue_context() -> Context | None:
    """The context an enqueue called now sends from: the caller's, if a span is current in
    it (sampled or not); else None, and nothing is traced."""
    if not AVAILABLE:
        return None
    context = otel_context.get_current()
    return context if trace.get_current_span(context).get_span_context().is_valid else None


def sending(parent: Context, rows: Sequence[Row], plan: Callable[[str | None], Plan[J]]) -> Plan[J]:
    """The plan ``plan`` makes of the trace context to store, run in a PRODUCER span child of
    ``parent``: one span for the rows of one call, its context stored with each of them. It
    ends with the plan, recording what the plan or a statement of it raised (the drivers
    throw a statement's error into the plan)."""
    queues = {row.queue for row in rows}
    tasks = {row.task for row in rows}
    correlation_ids = {row.correlation_id for row in rows}
    attributes: dict[str, Any] = {
        "messaging.system": SYSTEM,
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
    }
    name = "send"
    if len(queues) == 1:
        [queue] = queues
        attributes["messaging.destination.name"] = queue
        name = f"send {queue}"
    if len(tasks) == 1:
        attributes["pgoutbox.task"] = next(iter(tasks))
    if len(correlation_ids) == 1 and None not in correlation_ids:
        attributes["messaging.message.conversation_id"] = next(iter(correlation_ids))
    if len(rows) > 1:
        attributes["messaging.batch.message_count"] = len(rows)
    span = _TRACER.start_span(
        name, context=parent, kind=trace.SpanKind.PRODUCER, attributes=attributes
    )
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span, parent))
    try:
        result = yield from plan(json.dumps(carrier, separators=(",", ":")) if carrier else None)
        if not isinstance(result, list):
            span.set_attribute("messaging.message.id", str(result.id))
            # A key already taken: the job found keeps the trace context it was written with.
            span.set_attribute("pgoutbox.job.duplicate", result.duplicate)
        return result
    except BaseException as exc:
        _record(span, exc)
        raise
    finally:
        span.end()


def processing(job: ClaimedJob, worker_id: str) -> AbstractContextManager[None]:
    """Around one attempt's handler: its CONSUMER span, current while the handler runs (and
    in the threads it runs code in, which copy the context), linked to the enqueue's span."""
    if not AVAILABLE:
        return _UNTRACED
    return _processing(job, worker_id)


@contextmanager
def _processing(job: ClaimedJob, worker_id: str) -> Iterator[None]:
    attributes: dict[str, Any] = {
        "messaging.system": SYSTEM,
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": job.queue,
        "messaging.message.id": str(job.id),
        "messaging.client.id": worker_id,
        "pgoutbox.task": job.task,
        "pgoutbox.job.attempt": job.attempt,
        "pgoutbox.job.max_attempts": job.max_attempts,
    }
    if job.correlation_id is not None:
        attributes["messaging.message.conversation_id"] = job.correlation_id
    # A child of whatever span is current (none in a worker, so each attempt is the root
    # of its own trace), as the conventions advise; the enqueue is a link.
    span = _TRACER.start_span(
        f"process {job.queue}",
        kind=trace.SpanKind.CONSUMER,
        attributes=attributes,
        links=_links(job.trace_context),
    )
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        yield
    except BaseException as exc:
        _record(span, exc)
        raise
    finally:
        otel_context.detach(token)
        span.end()


def carrier() -> dict[str, str] | None:
    """The current context as propagation headers, for a handler process to continue the
    run's span from; None when nothing is traced."""
    if not AVAILABLE:
        return None
    headers: dict[str, str] = {}
    propagate.inject(headers)
    return headers or None


def continuing(headers: dict[str, str] | None) -> AbstractContextManager[None]:
    """In a handler process, around the handler: the run's span (from ``carrier``, made in
    the worker) current, so that the spans the handler makes are its children."""
    if not AVAILABLE or not headers:
        return _UNTRACED
    return _continuing(headers)


@contextmanager
def _continuing(headers: dict[str, str]) -> Iterator[None]:
    token = otel_context.attach(propagate.extract(headers))
    try:
        yield
    finally:
        otel_context.detach(token)


def _links(trace_context: str | None) -> list[trace.Link]:
    """The link to the span the job was enqueued in; none if the row holds no context the
    propagator can read (NULL, or an object written by hand: the column holds objects only)."""
    if trace_context is None:
        return []
    try:
        carrier = json.loads(trace_context)
    except RecursionError:  # nested deeper than json can read: no context of a propagator's
        return []
    context = propagate.extract(
        {key: value for key, value in carrier.items() if isinstance(value, str)},
        context=otel_context.Context(),
    )
    span_context = trace.get_current_span(context).get_span_context()
    return [trace.Link(span_context)] if span_context.is_valid else []


def _record(span: trace.Span, exc: BaseException) -> None:
    """The exception as the span's event, and its status an error unless the handler chose
    the end (SnoozeJob, CancelJob). Never raises: a user's ``__str__`` that fails must not
    change how the job ends."""
    with suppress(Exception):
        span.record_exception(exc)
        if not isinstance(exc, SnoozeJob | CancelJob):
            kind = type(exc)
            span.set_attribute(
                "error.type",
                kind.__qualname__
                if kind.__module__ == "builtins"
                else f"{kind.__module__}.{kind.__qualname__}",
            )
            span.set_status(trace.StatusCode.ERROR, error_line(exc))

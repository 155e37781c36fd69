"""The spans a test records: OpenTelemetry's SDK, exporting to memory, behind the process's
global tracer provider.

The global provider can be set only once per process, and FastAPI traces every request once
one is set; so the provider set here records only while a test is inside :func:`recording`,
and is OpenTelemetry's no-op the rest of the time, for the tests that never asked for spans.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

_NO_OP = trace.NoOpTracer()


class _SwitchedProvider(trace.TracerProvider):
    def __init__(self, sdk: TracerProvider) -> None:
        self.sdk = sdk
        self.on = False

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return _SwitchedTracer(self, self.sdk.get_tracer(*args, **kwargs))


class _SwitchedTracer(trace.Tracer):
    """The SDK's tracer while the provider is on, else the no-op one: the libraries keep the
    tracer they were given, so the switch is made at each span."""

    def __init__(self, provider: _SwitchedProvider, sdk: trace.Tracer) -> None:
        self._provider = provider
        self._sdk = sdk

    def _tracer(self) -> trace.Tracer:
        return self._sdk if self._provider.on else _NO_OP

    def start_span(self, *args: Any, **kwargs: Any) -> trace.Span:
        return self._tracer().start_span(*args, **kwargs)

    def start_as_current_span(  # type: ignore[override]
        self, *args: Any, **kwargs: Any
    ) -> AbstractContextManager[trace.Span]:
        return self._tracer().start_as_current_span(*args, **kwargs)


@functools.cache
def _installed() -> tuple[_SwitchedProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    sdk = TracerProvider()
    sdk.add_span_processor(SimpleSpanProcessor(exporter))
    provider = _SwitchedProvider(sdk)
    trace.set_tracer_provider(provider)
    assert trace.get_tracer_provider() is provider, "another global tracer provider came first"
    return provider, exporter


@contextmanager
def recording() -> Iterator[InMemorySpanExporter]:
    """Every span ended inside the block, in the exporter yielded."""
    provider, exporter = _installed()
    exporter.clear()
    provider.on = True
    try:
        yield exporter
    finally:
        provider.on = False
        exporter.clear()


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name == name]


def traceparent(span: ReadableSpan) -> str:
    """The W3C traceparent of a span: what enqueue stores for its send span."""
    context = span.get_span_context()
    assert context is not None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"

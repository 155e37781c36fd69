"""Prometheus metrics of the queue, in prometheus-client's default registry.

Counters and the run-time histogram are updated where things happen (enqueue, executor,
completer); the queue gauges are refreshed from one cheap query (sql.QUEUE_ACTIVE_STATS).

Under ``run --processes N`` each worker process writes its samples to files that the
supervisor serves as one set (prometheus-client's multiprocess mode). Counters and the
histogram are summed; each gauge's ``multiprocess_mode`` says how its processes' values are
combined: a worker's own slots add up, while what the database tells every process alike
(depths, pauses, workers alive) is read once, as the highest. The ``live`` modes leave out
processes that have exited. Outside that mode the argument changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

ENQUEUED = Counter(
    "outbox_jobs_enqueued",
    "Jobs enqueued by this process (duplicates not counted)",
    ["task", "queue"],
)
STARTED = Counter("outbox_jobs_started", "Job attempts started", ["task", "queue"])
SUCCEEDED = Counter("outbox_jobs_succeeded", "Jobs that succeeded", ["task", "queue"])
RETRIED = Counter("outbox_jobs_retried", "Failed attempts queued for a retry", ["task", "queue"])
DEAD = Counter("outbox_jobs_dead", "Jobs that went dead", ["task", "queue"])
CANCELLED = Counter(
    "outbox_jobs_cancelled",
    "Running jobs cancelled by an operator or their handler",
    ["task", "queue"],
)
SNOOZED = Counter(
    "outbox_jobs_snoozed", "Attempts snoozed by their handler (not counted)", ["task", "queue"]
)
RUN_SECONDS = Histogram(
    "outbox_job_run_seconds",
    "How long an attempt's handler ran",
    ["task", "queue"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800),
)
SCHEDULE_TICKS = Counter(
    "outbox_schedule_ticks",
    "Schedule ticks this worker dealt with: enqueued, or skipped under the missed policy",
    ["schedule", "outcome"],
)
QUEUE_DEPTH = Gauge(
    "outbox_queue_depth",
    "Jobs per queue and state (queued, due, running)",
    ["queue", "state"],
    multiprocess_mode="livemax",
)
QUEUE_OLDEST_DUE = Gauge(
    "outbox_queue_oldest_due_seconds",
    "Age of the oldest due job per queue (0 when none is due)",
    ["queue"],
    multiprocess_mode="livemax",
)
QUEUE_PAUSED = Gauge(
    "outbox_queue_paused",
    "1 while the queue is paused; by: operator, or breaker (the circuit breaker)",
    ["queue", "by"],
    multiprocess_mode="livemax",
)
BREAKER_TRIPS = Counter(
    "outbox_breaker_trips",
    "Times this worker's failures paused a queue: a task failed its threshold in a row",
    ["queue", "task"],
)
SLOTS_IN_USE = Gauge(
    "outbox_worker_slots_in_use", "Claimed jobs this worker holds", multiprocess_mode="livesum"
)
SLOTS_TOTAL = Gauge("outbox_worker_slots", "This worker's concurrency", multiprocess_mode="livesum")
WORKERS_ALIVE = Gauge(
    "outbox_workers_alive",
    "Workers whose heartbeat was seen recently",
    multiprocess_mode="livemax",
)

_seen_queues: set[str] = set()
_seen_pauses: set[tuple[str, str]] = set()


def refresh_queue_gauges(rows: Iterable[Mapping[Any, Any]]) -> None:
    """Set the gauges from QUEUE_ACTIVE_STATS rows; a queue that emptied reads 0, not stale."""
    current: set[str] = set()
    for row in rows:
        queue = row["queue"]
        current.add(queue)
        for state in ("queued", "due", "running"):
            QUEUE_DEPTH.labels(queue, state).set(row[state])
        QUEUE_OLDEST_DUE.labels(queue).set(row["oldest_due_seconds"])
    for queue in _seen_queues - current:
        for state in ("queued", "due", "running"):
            QUEUE_DEPTH.labels(queue, state).set(0)
        QUEUE_OLDEST_DUE.labels(queue).set(0)
    _seen_queues.update(current)


def refresh_pause_gauges(rows: Iterable[Mapping[Any, Any]]) -> None:
    """Set outbox_queue_paused from QUEUE_SETTINGS_LIST rows; a resumed queue reads 0."""
    current = {(row["name"], row["paused_by"] or "operator") for row in rows if row["paused_at"]}
    for queue, by in current:
        QUEUE_PAUSED.labels(queue, by).set(1)
    for queue, by in _seen_pauses - current:
        QUEUE_PAUSED.labels(queue, by).set(0)
    _seen_pauses.update(current)

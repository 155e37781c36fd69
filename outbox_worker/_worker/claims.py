"""A claimed job: what the claimer hands the executor, and what the heartbeat keeps leased."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    """The columns of a claimed row that running it needs."""

    id: int
    task: str
    queue: str
    args: str
    attempt: int
    max_attempts: int
    correlation_id: str | None
    # The enqueuer's trace context, a JSON object as text, or None: what the span of the run
    # links to (outbox_worker.tracing).
    trace_context: str | None
    # When the claim that leased it was sent (time.monotonic()): its lease runs at least
    # until this plus the lease, until the heartbeat extends it.
    leased_at: float = 0.0

    @classmethod
    def of(cls, row: Mapping[str, Any], leased_at: float = 0.0) -> ClaimedJob:
        """From a row of a claim statement (JOB_CLAIM, JOB_CLAIM_LIMITED and the
        JOB_COMPLETE_AND_CLAIM of each)."""
        return cls(
            id=row["id"],
            task=row["task"],
            queue=row["queue"],
            args=row["args"],
            attempt=row["attempts"],
            max_attempts=row["max_attempts"],
            correlation_id=row["correlation_id"],
            trace_context=row["trace_context"],
            leased_at=leased_at,
        )

"""A claimed job: what the claimer hands the executor, and what the heartbeat keeps leased."""

from __future__ import annotations

from dataclasses import dataclass


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
    # When the claim that leased it was sent (time.monotonic()): its lease runs at least
    # until this plus the lease, until the heartbeat extends it.
    leased_at: float = 0.0

"""The one shape every worker service has, so the worker can start and stop them alike."""

from __future__ import annotations

from typing import Protocol


class Service(Protocol):
    """``run()`` works until it is cancelled. It retries what is transient itself and raises
    only what it cannot get past, which ends the worker. The worker decides when each service
    stops: those that serve claiming stop with the claiming, those that serve jobs in flight
    (leases, outcomes) only once every outcome is written."""

    name: str

    async def run(self) -> None: ...

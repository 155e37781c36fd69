"""Dependencies: a request-scoped session inside one transaction that the route owns."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.services.comments import SubscriberNotifier
from outbox_worker import Outbox


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One transaction per request: committed when the route returns, rolled back if it
    raises. Domain rows and their jobs therefore commit together (the outbox)."""
    sessionmaker: async_sessionmaker[AsyncSession] = request.app.state.sessionmaker
    async with sessionmaker() as session, session.begin():
        yield session


def get_outbox(request: Request) -> Outbox:
    outbox: Outbox = request.app.state.outbox
    return outbox


def get_notifier(request: Request) -> SubscriberNotifier:
    notifier: SubscriberNotifier = request.app.state.notifier
    return notifier


# scope="function": the transaction commits when the route returns, before the response is
# sent, so a client holding a 201/202 can read what it created, and background tasks see
# committed rows only.
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]
NotifierDep = Annotated[SubscriberNotifier, Depends(get_notifier)]
OutboxDep = Annotated[Outbox, Depends(get_outbox)]

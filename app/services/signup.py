"""Sign-up: the user row and its welcome-email job, in the caller's transaction."""

from __future__ import annotations

from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.models import User
from app.services.errors import EmailTaken
from app.tasks import send_welcome_email
from outbox_worker import Job, Outbox


async def sign_up(
    session: AsyncSession, outbox: Outbox, email: str, name: str | None
) -> tuple[int, Job]:
    """Create the user and enqueue ``send_welcome_email``; flushes, never commits."""
    statement = (
        pg_insert(User)
        .values(email=email.lower(), name=name)
        .on_conflict_do_nothing(index_elements=[User.email])
        .returning(User.id)
    )
    user_id = (await session.execute(statement)).scalar_one_or_none()
    if user_id is None:
        raise EmailTaken(f"{email} is already registered")
    job = await outbox.enqueue(
        session, send_welcome_email.job(user_id=user_id).with_options(key=f"welcome:{user_id}")
    )
    return user_id, job

"""Comments, and the fire-and-forget notification BackgroundTasks runs after the response."""

from __future__ import annotations

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from app.models import Comment

log = structlog.get_logger("app.comments")


async def save_comment(session: AsyncSession, author: str, body: str) -> Comment:
    comment = Comment(author=author, body=body)
    session.add(comment)
    await session.flush()
    return comment


class SubscriberNotifier:
    """Tells subscribers about new comments. Losing one of these (a crash right after the
    response) costs a notification nobody depends on, which is why it is a BackgroundTask
    and not a job."""

    def __init__(self) -> None:
        self.sent: list[int] = []

    async def notify(self, comment_id: int, author: str) -> None:
        self.sent.append(comment_id)
        log.info("subscribers_notified", comment_id=comment_id, author=author)

from __future__ import annotations

from fastapi import APIRouter, BackgroundTasks, status

from app.api.deps import NotifierDep, SessionDep
from app.schemas import CommentIn, CommentOut
from app.services.comments import save_comment

router = APIRouter(tags=["comments"])


@router.post("/comments", status_code=status.HTTP_201_CREATED)
async def create_comment(
    body: CommentIn, session: SessionDep, notifier: NotifierDep, background: BackgroundTasks
) -> CommentOut:
    comment = await save_comment(session, body.author, body.body)
    # Fire-and-forget: runs after the response; losing it loses nothing that matters.
    background.add_task(notifier.notify, comment.id, comment.author)
    return CommentOut(id=comment.id, author=comment.author, body=comment.body)

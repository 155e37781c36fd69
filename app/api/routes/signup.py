from __future__ import annotations

from fastapi import APIRouter, status

from app.api.deps import OutboxDep, SessionDep
from app.schemas import SignupIn, SignupOut
from app.services.signup import sign_up

router = APIRouter(tags=["users"])


@router.post(
    "/signup",
    status_code=status.HTTP_201_CREATED,
    responses={409: {"description": "the e-mail is already registered"}},
)
async def signup(body: SignupIn, session: SessionDep, outbox: OutboxDep) -> SignupOut:
    """Creates the user and its welcome-email job in one transaction; the e-mail is sent by
    a worker after the response."""
    user_id, job = await sign_up(session, outbox, str(body.email), body.name)
    return SignupOut(user_id=user_id, email=str(body.email).lower(), job_id=job.id)

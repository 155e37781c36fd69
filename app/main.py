"""The sample service: ``uvicorn app.main:app``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from alembic.config import Config
from alembic.script import ScriptDirectory
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from app.api.deps import get_session
from app.api.errors import invalid_request
from app.api.main import api_router
from app.core.config import Settings, get_settings
from app.core.db import create_engine, create_sessionmaker
from app.middleware import BodySizeLimitMiddleware
from app.services.comments import SubscriberNotifier
from app.services.errors import DomainError
from app.tasks import registry
from outbox_worker import EnqueueError, Outbox, QueueFull
from outbox_worker.web import (
    REQUEST_ID_HEADER,
    RequestIdMiddleware,
    create_admin_router,
    handle_database_outages,
)

ALEMBIC_INI = Path(__file__).resolve().parent.parent / "alembic.ini"


def schema_heads() -> frozenset[str]:
    """The revisions this code's schema is at: the head of the sample's own branch and the
    head of pgoutbox's, which alembic_version holds side by side once migrated."""
    return frozenset(ScriptDirectory.from_config(Config(str(ALEMBIC_INI))).get_heads())


def create_app(settings: Settings | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        config = settings or get_settings()
        app.state.settings = config
        app.state.engine = create_engine(config)
        app.state.sessionmaker = create_sessionmaker(app.state.engine)
        app.state.notifier = SubscriberNotifier()
        app.state.schema_heads = schema_heads()
        # The client side of the queue, built once: the routes enqueue the tasks of this
        # registry, with the limits OUTBOX_MAX_ARGS_BYTES and OUTBOX_QUEUE_DEPTH_* give now.
        app.state.outbox = Outbox.from_env(registry)
        try:
            yield
        finally:
            await app.state.engine.dispose()

    application = FastAPI(title="pgoutbox sample service", lifespan=lifespan)
    application.add_middleware(
        BodySizeLimitMiddleware,
        max_bytes=lambda scope: scope["app"].state.settings.max_body_bytes,
    )
    # Added last, so outermost: refusals from the middleware above carry the id too.
    application.add_middleware(RequestIdMiddleware)
    application.include_router(api_router)
    application.include_router(
        create_admin_router(
            get_session=get_session,
            admin_token=lambda request: request.app.state.settings.admin_token,
            worker_seen_within_seconds=lambda request: (
                request.app.state.settings.worker_seen_within_seconds
            ),
        )
    )

    application.exception_handler(RequestValidationError)(invalid_request)
    # The database down: 503 with Retry-After on every route, not 500.
    handle_database_outages(application)

    @application.exception_handler(DomainError)
    async def domain_error(_: Request, exc: DomainError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)

    @application.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette answers unhandled errors outside every user middleware: add the id here.
        request_id = getattr(request.state, "request_id", None)
        return JSONResponse(
            {"detail": "Internal Server Error"},
            status_code=500,
            headers={REQUEST_ID_HEADER: request_id} if request_id else None,
        )

    @application.exception_handler(QueueFull)
    async def queue_full(_: Request, exc: QueueFull) -> JSONResponse:
        # Backpressure: a failing or slow worker shows up at the edge, not as a huge table.
        return JSONResponse(
            {"detail": str(exc)}, status_code=503, headers={"Retry-After": str(exc.retry_after)}
        )

    @application.exception_handler(EnqueueError)
    async def enqueue_error(_: Request, exc: EnqueueError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    return application


app = create_app()
